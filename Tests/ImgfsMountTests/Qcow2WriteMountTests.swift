import Foundation
import Synchronization
import Testing
import ImgfsTestSupport
#if canImport(Glibc)
import Glibc
#endif

/// Writing qcow2 images through the mounted file: a file system built on it, crashes, punches, locks; every image
/// ends `qemu-img check` clean and equal to what QEMU converts.
extension ImgfsMountTests {
    @Suite struct Qcow2WriteMountTests {
        /// `qemu-img check`'s exit status: 0 clean, 3 leaks only, 2 corruption.
        private func checkStatus(_ image: String) throws -> (Int32, String) {
            let result = try runTool("qemu-img", ["check", image], check: false)
            return (result.status, result.stdout + result.stderr)
        }

        private func converted(_ scratch: Scratch, _ image: String) throws -> [UInt8] {
            let out = scratch.path("converted.raw")
            try runTool("qemu-img", ["convert", "-O", "raw", image, out])
            return try readFile(out)
        }

        @Test("an ext4 file system made and filled through a loop device on the mounted file passes e2fsck")
        func ext4ThroughALoopDevice() throws {
            let scratch = try Scratch("ext4w")
            defer { scratch.cleanup() }
            let image = scratch.path("disk.qcow2")
            try runTool("qemu-img", ["create", "-q", "-f", "qcow2", image, "256M"])
            let mnt = try scratch.dir("mnt")
            let guest = try scratch.dir("guest")
            try scratch.mount(image, at: mnt)
            let loop = try runTool("losetup", ["--find", "--show", mnt + "/disk.raw"]).stdout
                .trimmingCharacters(in: .whitespacesAndNewlines)
            var files: [String: [UInt8]] = [:]
            do {
                defer { _ = try? runTool("losetup", ["-d", loop]) }
                try runTool("mkfs.ext4", ["-q", "-F", loop])
                try runTool("mount", [loop, guest])
                defer { if isMounted(guest) { _ = umount2(guest, Int32(MNT_DETACH)) } }
                for i in 0..<24 {
                    let bytes = randomBytes((i * 977_777) % (5 * MiB) + i, seed: 500 + UInt64(i))
                    files["f\(i).bin"] = bytes
                    try writeFile(guest + "/f\(i).bin", bytes)
                }
                // Some deleted again, so the file system discards and reuses space.
                for i in stride(from: 0, to: 24, by: 3) {
                    unlink(guest + "/f\(i).bin")
                    files["f\(i).bin"] = nil
                }
                try runTool("fstrim", [guest], check: false)
                try runTool("umount", [guest])
            }
            try scratch.unmount(mnt)
            let (status, report) = try checkStatus(image)
            #expect(status == 0, "\(report)")
            let raw = scratch.path("fs.raw")
            try runTool("qemu-img", ["convert", "-O", "raw", image, raw])
            let fsck = try runTool("e2fsck", ["-fn", raw], check: false)
            #expect(fsck.status == 0, "e2fsck: \(fsck.stdout) \(fsck.stderr)")
            try runTool("mount", ["-o", "loop,ro", raw, guest])
            defer { _ = umount2(guest, Int32(MNT_DETACH)) }
            for (name, bytes) in files {
                #expect(difference(try readFile(guest + "/" + name), bytes) == nil, "\(name)")
            }
        }

        @Test("SIGKILL in the middle of writes, twenty times: no corruption, everything fsynced reads back")
        func killedTwentyTimes() throws {
            let scratch = try Scratch("crash")
            defer { scratch.cleanup() }
            let image = scratch.path("c.qcow2")
            try runTool("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", image, "32M"])
            try runTool("qemu-io", ["-f", "qcow2", "-c", "write -P 0x3c 0 8M", image])
            try runTool("qemu-img", ["snapshot", "-c", "s", image])
            let snapshot = try converted(scratch, image)
            let mnt = try scratch.dir("mnt")
            // The disk is cut into 16 KiB slots; each is written once, at an unaligned place, so what a slot must
            // hold is known once an fsync covered it, whatever the kill interrupted after.
            let slotSize = 16 * KiB
            var rng = SplitMix64(seed: 77)
            let free = Array(0..<(32 * MiB / slotSize)).shuffled(using: &rng)
            let state = Mutex(CrashState(free: free))
            for round in 0..<20 {
                try scratch.mount(image, at: mnt)
                guard let pid = daemonPid(mountpoint: mnt) else { throw TestFailure("no daemon pid") }
                let fd = try openOrThrow(mnt + "/c.raw", O_RDWR)
                // The writer runs on its own thread and is killed under its feet, mid-request.
                let done = DispatchSemaphore(value: 0)
                Thread.detachNewThread {
                    var operations = 0
                    var pending: [(offset: Int, bytes: [UInt8])] = []
                    while let slot = state.withLock({ $0.free.popLast() }) {
                        var rng = SplitMix64(seed: UInt64(round * 100_000 + operations))
                        let length = Int.random(in: 1...(12 * KiB), using: &rng)
                        let offset = slot * slotSize + Int.random(in: 0...(slotSize - length), using: &rng)
                        let bytes = randomBytes(length, seed: UInt64(round * 100_000 + operations))
                        guard pwrite(fd, bytes, length, off_t(offset)) == length else { break }
                        pending.append((offset, bytes))
                        operations += 1
                        if operations % 7 == 0 {
                            guard fsync(fd) == 0 else { break }
                            let covered = pending
                            state.withLock { $0.sealed += covered }
                            pending = []
                        }
                    }
                    done.signal()
                }
                usleep(UInt32(20_000 + Int.random(in: 0..<120_000, using: &rng)))
                kill(pid, SIGKILL)
                done.wait()
                close(fd)
                #expect(waitUntil(seconds: 10) { !processAlive(pid) })
                _ = umount2(mnt, Int32(MNT_DETACH))
                // The kernel lets go of a killed process's io_uring (and the image it holds open) a moment later.
                #expect(waitUntil(seconds: 10) { (try? checkStatus(image).1.contains("lock")) == false })
                let (status, report) = try checkStatus(image)
                #expect(status == 0 || status == 3, "round \(round): \(report)")
                let disk = try converted(scratch, image)
                for (offset, bytes) in state.withLock({ $0.sealed }) where Array(disk[offset..<(offset + bytes.count)]) != bytes {
                    Issue.record("round \(round): fsynced write at \(offset) (+\(bytes.count)) lost")
                    break
                }
            }
            let sealed = state.withLock { $0.sealed }
            #expect(sealed.count > 100)
            // The snapshot never changed, and a repair leaves nothing to report.
            let snapshotNow = scratch.path("snap.raw")
            try runTool("qemu-img", ["convert", "-l", "snapshot.name=s", "-O", "raw", image, snapshotNow])
            #expect(difference(try readFile(snapshotNow), snapshot) == nil)
            try scratch.imgfs(["check", "-r", "all", image], check: false)
            #expect(try checkStatus(image).0 == 0)
        }

        @Test("unaligned punches on a mounted qcow2 read back as zeros (QEMU 7.2's export loses them)")
        func unalignedPunch() throws {
            let scratch = try Scratch("punchq")
            defer { scratch.cleanup() }
            let image = scratch.path("p.qcow2")
            try runTool("qemu-img", ["create", "-q", "-f", "qcow2", image, "4M"])
            try runTool("qemu-io", ["-f", "qcow2", "-c", "write -P 0x7e 0 4M", image])
            var model = [UInt8](repeating: 0x7e, count: 4 * MiB)
            let mnt = try scratch.dir("mnt")
            try scratch.mount(image, at: mnt)
            let fd = try openOrThrow(mnt + "/p.raw", O_RDWR)
            for (offset, length) in [(1000, 3000), (65_536 + 17, 200_000), (2 * MiB, 65_536), (3 * MiB + 5, 1)] {
                #expect(linuxFallocate(fd, mode: Falloc.punchHole | Falloc.keepSize, offset: Int64(offset),
                                       length: Int64(length)) == 0, "\(errnoText())")
                model.replaceSubrange(offset..<(offset + length), with: repeatElement(0, count: length))
            }
            #expect(difference(try preadFully(fd, count: 4 * MiB, at: 0), model) == nil)
            close(fd)
            try scratch.unmount(mnt)
            #expect(try checkStatus(image).0 == 0)
            #expect(difference(try converted(scratch, image), model) == nil)
        }

        @Test("a read-write qcow2 mount and QEMU keep each other out, backing files included")
        func lockingWithQemu() throws {
            let scratch = try Scratch("lockq")
            defer { scratch.cleanup() }
            let base = scratch.path("base.qcow2")
            let top = scratch.path("top.qcow2")
            try runTool("qemu-img", ["create", "-q", "-f", "qcow2", base, "4M"])
            try runTool("qemu-img", ["create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top])
            let mnt = try scratch.dir("mnt")
            try scratch.mount(top, at: mnt)
            for (image, commands) in [(top, ["-c", "write 0 512"]), (top, ["-r", "-c", "read 0 512"]), (base, ["-c", "write 0 512"])] {
                let qemu = try runTool("qemu-io", ["-f", "qcow2"] + commands + [image], check: false)
                #expect(qemu.status != 0 && qemu.stderr.contains("lock"), "\(image) \(commands): \(qemu.stderr)")
            }
            try scratch.unmount(mnt)
            let holder = try spawnBackground("qemu-io", ["-f", "qcow2", "-c", "sleep 20000", top])
            defer { stopBackground(holder) }
            #expect(waitUntil(seconds: 10) { (try? String(contentsOfFile: "/proc/locks", encoding: .utf8))?.contains("OFDLCK") == true })
            let refused = try scratch.imgfs(["mount", top, mnt], check: false)
            #expect(refused.status == 65 && refused.stderr.contains("cannot lock"), "\(refused.stderr)")
            #expect(!isMounted(mnt))
        }
    }
}

/// What the crash test's writer has left to write and what fsync has made durable.
private struct CrashState {
    var free: [Int]
    var sealed: [(offset: Int, bytes: [UInt8])] = []
}
