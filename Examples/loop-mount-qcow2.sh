#!/usr/bin/env bash
# Loop-mount the file system inside a qcow2 image, read-only, through imgfs (needs root for `mount -o loop`).
#   Examples/loop-mount-qcow2.sh disk.qcow2 /mnt/guest
set -euo pipefail
image=${1:?usage: $0 IMAGE.qcow2 GUEST_DIR}
guest=${2:?usage: $0 IMAGE.qcow2 GUEST_DIR}
imgfs=${IMGFS:-imgfs}
export_dir=$(mktemp -d /tmp/imgfs-export.XXXXXX)
"$imgfs" mount --read-only "$image" "$export_dir"
raw="$export_dir/$(basename "${image%.*}").raw"
mkdir -p "$guest"
# A whole-disk image usually holds a partition table: let the loop device expose the partitions.
loop=$(losetup --find --show --read-only --partscan "$raw")
if [ -e "${loop}p1" ]; then mount -o ro "${loop}p1" "$guest"; else mount -o ro "$loop" "$guest"; fi
echo "mounted $image on $guest (loop $loop, export $export_dir)"
echo "undo: umount $guest && losetup -d $loop && $imgfs unmount $export_dir"
