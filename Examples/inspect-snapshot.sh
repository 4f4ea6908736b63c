#!/usr/bin/env bash
# Show a qcow2's internal snapshot as a read-only file and list which 1 MiB blocks differ from the current disk.
#   Examples/inspect-snapshot.sh disk.qcow2 SNAPSHOT_NAME
set -euo pipefail
image=${1:?usage: $0 IMAGE.qcow2 SNAPSHOT}
snapshot=${2:?usage: $0 IMAGE.qcow2 SNAPSHOT}
imgfs=${IMGFS:-imgfs}
dir=$(mktemp -d /tmp/imgfs-snap.XXXXXX)
trap '"$imgfs" unmount "$dir" >/dev/null 2>&1 || true; rmdir "$dir"' EXIT
"$imgfs" mount --read-only "$image" "$dir"
current="$dir/$(basename "${image%.*}").raw"
old="$dir/snapshots/$snapshot.raw"
[ -f "$old" ] || { echo "no snapshot '$snapshot'; have: $(ls "$dir/snapshots" 2>/dev/null)" >&2; exit 1; }
ls -l "$dir" "$dir/snapshots"
# cmp -l lists differing bytes; group them by MiB for a readable summary.
cmp -l "$old" "$current" 2>/dev/null | awk '{ print int(($1 - 1) / 1048576) }' | uniq -c |
    awk '{ printf "MiB %d: %d bytes differ\n", $2, $1 }' || true
