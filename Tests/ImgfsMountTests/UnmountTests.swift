import Foundation
import Synchronization
import Testing
import ImgfsTestSupport
#if canImport(Glibc)
import Glibc
#endif

/// Unmounting (idle, under load, by SIGTERM) loses no acknowledged write, and `imgfs unmount` waits for the daemon.
struct Ack: Sendable {
    let slot: Int
    let seed: UInt64
}

extension ImgfsMountTests {
@Suite(.serialized)
struct UnmountTests {
    /// Mounts `image` as a writable raw disk and returns the mountpoint and the daemon's pid.
    private func mountWritable(_ scratch: Scratch, _ image: String) throws -> (String, pid_t) {
        let mnt = try scratch.dir("mnt")
        try scratch.mount(image, at: mnt, ["--format", "raw"])
        guard let pid = daemonPid(mountpoint: mnt) else { throw TestFailure("no pid file for \(mnt)") }
        #expect(processAlive(pid))
        return (mnt, pid)
    }

    @Test("unmount while idle loses nothing written without fsync")
    func idleUnmount() throws {
        let scratch = try Scratch("idle")
        defer { scratch.cleanup() }
        let size = 6 * MiB
        var model = randomBytes(size, seed: 10)
        let image = scratch.path("disk.img")
        try writeFile(image, model)
        let mnt = try scratch.dir("mnt")
        try scratch.mount(image, at: mnt, ["--format", "raw"])
        let fd = try openOrThrow(mnt + "/disk.raw", O_RDWR)
        var rng = SplitMix64(seed: 11)
        for i in 0..<40 {
            let count = Int.random(in: 1...200_000, using: &rng)
            let offset = Int.random(in: 0...(size - count), using: &rng)
            let data = randomBytes(count, seed: 500 + UInt64(i))
            try pwriteFully(fd, data, at: Int64(offset))
            model.replaceSubrange(offset..<(offset + count), with: data)
        }
        close(fd)
        try scratch.unmount(mnt)
        #expect(!isMounted(mnt))
        let host = try readFile(image)
        #expect(difference(host, model) == nil, "host after idle unmount: \(difference(host, model) ?? "")")
    }

    @Test("SIGTERM under write load: every acknowledged write is in the host file")
    func sigtermUnderLoad() throws {
        let scratch = try Scratch("load")
        defer { scratch.cleanup() }
        let image = scratch.path("disk.img")
        let slot = 64 * KiB
        let slots = 4096
        try runTool("truncate", ["-s", "\(slot * slots)", image])
        let (mnt, pid) = try mountWritable(scratch, image)

        let writers = 4
        let writeSize = 20_000
        // Each writer writes each of its slots once, so an acknowledged write's bytes are final.
        let acknowledged = Shared<[Ack]>([])
        let failures = Shared<[String]>([])
        let finished = DispatchGroup()
        let file = mnt + "/disk.raw"
        for w in 0..<writers {
            finished.enter()
            Thread {
                defer { finished.leave() }
                let fd = open(file, O_RDWR)
                guard fd >= 0 else {
                    failures.update { $0.append("writer \(w) open: \(errnoText())") }
                    return
                }
                defer { close(fd) }
                var s = w
                while s < slots {
                    let seed = UInt64(s) &* 7919 &+ 17
                    let data = randomBytes(writeSize, seed: seed)
                    let offset = off_t(s * slot + (s % 97) * 13)
                    let n = data.withUnsafeBytes { pwrite(fd, $0.baseAddress, writeSize, offset) }
                    if n != writeSize {
                        failures.update { $0.append("writer \(w) slot \(s): \(n) \(errnoText())") }
                        return  // the mount is going away
                    }
                    acknowledged.update { $0.append(Ack(slot: s, seed: seed)) }
                    s += writers
                }
            }.start()
        }
        // Let the load build up, then stop the daemon in the middle of it.
        _ = waitUntil(seconds: 10) { acknowledged.value.count >= 40 }
        let ackedBeforeSignal = acknowledged.value.count
        #expect(kill(pid, SIGTERM) == 0)
        #expect(waitUntil(seconds: 30) { !processAlive(pid) }, "daemon did not exit after SIGTERM")
        #expect(finished.wait(timeout: .now() + 30) == .success, "writers still blocked after the daemon exited")
        #expect(waitUntil(seconds: 5) { !isMounted(mnt) }, "mount still present after SIGTERM")

        let acked = acknowledged.value
        #expect(ackedBeforeSignal >= 40)
        #expect(acked.count < slots, "the load finished before SIGTERM; the test proved nothing")
        let host = try openOrThrow(image, O_RDONLY)
        defer { close(host) }
        var lost: [Int] = []
        for a in acked {
            let (s, seed) = (a.slot, a.seed)
            let got = try preadFully(host, count: writeSize, at: Int64(s * slot + (s % 97) * 13))
            if difference(got, randomBytes(writeSize, seed: seed)) != nil { lost.append(s) }
        }
        #expect(lost.isEmpty, "\(lost.count) of \(acked.count) acknowledged writes missing, e.g. slots \(lost.prefix(10))")
    }

    @Test("imgfs unmount returns only after the daemon exited and the mount is gone")
    func unmountWaitsForDaemon() throws {
        let scratch = try Scratch("wait")
        defer { scratch.cleanup() }
        let image = scratch.path("disk.img")
        try writeFile(image, randomBytes(2 * MiB, seed: 12))
        let (mnt, pid) = try mountWritable(scratch, image)
        // Some dirty work for the daemon to flush.
        let fd = try openOrThrow(mnt + "/disk.raw", O_RDWR)
        try pwriteFully(fd, randomBytes(MiB, seed: 13), at: 4096)
        close(fd)
        try scratch.unmount(mnt)
        // Checked immediately after the command returned, without waiting.
        #expect(!processAlive(pid), "imgfs unmount returned while daemon \(pid) is still running")
        #expect(!mountPoints().contains(mnt), "\(mnt) still in /proc/self/mountinfo")
        #expect(daemonPid(mountpoint: mnt) == nil, "pid file left behind")
        // Unmounting again is a clear error.
        let again = try scratch.imgfs(["unmount", mnt], check: false)
        #expect(again.status != 0)
        #expect(again.stderr.contains("not an imgfs mount"))
    }
}
}
