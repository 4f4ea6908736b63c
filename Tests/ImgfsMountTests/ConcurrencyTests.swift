import Foundation
import ImgfsBlock
import ImgfsFUSE
import Synchronization
import Testing
import ImgfsTestSupport
#if canImport(Glibc)
import Glibc
#endif

/// A disk whose reads of `slowRange` take `delay`; every other read returns at once. Byte i reads as i % 251.
final class SlowReadDriver: BlockDriver {
    let format = ImageFormat.raw
    let length: Int64
    let isReadOnly = true
    let slowRange: Range<Int64>
    let delay: Duration
    let slowStarted = Atomic<Int>(0)
    let slowFinished = Atomic<Int>(0)

    init(length: Int64, slowRange: Range<Int64>, delay: Duration) {
        self.length = length
        self.slowRange = slowRange
        self.delay = delay
    }

    func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        let range = offset..<(offset + Int64(buffer.count))
        if range.overlaps(slowRange) {
            slowStarted.add(1, ordering: .relaxed)
            try await Task.sleep(for: delay)
            slowFinished.add(1, ordering: .relaxed)
        }
        for i in 0..<buffer.count { buffer[i] = UInt8((offset + Int64(i)) % 251) }
    }

    func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: BlockRequestFlags) async throws {
        throw BlockError.readOnly
    }
    func writeZeroes(at offset: Int64, length: Int64, flags: BlockRequestFlags) async throws { throw BlockError.readOnly }
    func discard(at offset: Int64, length: Int64) async throws { throw BlockError.readOnly }
    func flush() async throws {}
    func blockStatus(at offset: Int64, length: Int64) async throws -> BlockStatus {
        BlockStatus(kind: .data, length: length)
    }
    func truncate(to length: Int64) async throws { throw BlockError.readOnly }
    func close() async throws {}
}

extension ImgfsMountTests {
@Suite(.serialized)
struct ConcurrencyTests {
    @Test("a slow read does not hold up other reads (in-process FuseServer)")
    func slowReadDoesNotBlockOthers() async throws {
        var template = Array("/tmp/imgfs-mt-conc-XXXXXX".utf8CString)
        guard let made = mkdtemp(&template) else { throw TestFailure("mkdtemp: \(errnoText())") }
        let directory = String(cString: made)
        let mnt = directory + "/mnt"
        mkdir(mnt, 0o755)
        defer {
            if isMounted(mnt) { _ = umount2(mnt, Int32(MNT_DETACH)) }
            if !isMounted(mnt) { try? FileManager.default.removeItem(atPath: directory) }
        }

        let driver = SlowReadDriver(length: 64 * Int64(MiB), slowRange: 0..<4096, delay: .seconds(2))
        let node = BlockNode(path: "slow", driver: driver, file: nil, backing: nil, readOnly: true)
        let root = MountDirectory(files: [ExportedFile(name: "slow.raw", node: node, readOnly: true)])
        var config = MountConfiguration(mountpoint: mnt, sourceName: "imgfs:slow-test")
        config.handleSignals = false
        let server = FuseServer(root: root, configuration: config)
        try server.mount()
        let runFinished = Shared(false)
        let runner = Task {
            defer { runFinished.set(true) }
            try await server.run()
        }
        #expect(fsType(of: mnt) == "fuse.imgfs")

        let file = mnt + "/slow.raw"
        let result: (fastSeconds: Double, slowStillOut: Bool, fastOK: Bool, slowSeconds: Double, slowOK: Bool) =
            try await onThread {
                let slowDone = Shared(false)
                let slowOK = Shared(false)
                let slowSeconds = Shared(0.0)
                let group = DispatchGroup()
                group.enter()
                Thread {
                    defer { group.leave() }
                    let start = Date()
                    let fd = open(file, O_RDONLY)
                    guard fd >= 0 else { return }
                    defer { close(fd) }
                    if let bytes = try? preadFully(fd, count: 4096, at: 0) {
                        slowOK.set(bytes.count == 4096 && bytes[100] == 100 && bytes[300] == UInt8(300 % 251))
                    }
                    slowSeconds.set(Date().timeIntervalSince(start))
                    slowDone.set(true)
                }.start()
                // Wait until the slow read is really in the driver.
                _ = waitUntil(seconds: 5) { driver.slowStarted.load(ordering: .relaxed) > 0 }
                let start = Date()
                var fastOK = driver.slowStarted.load(ordering: .relaxed) > 0
                for i in 0..<20 {
                    let fd = open(file, O_RDONLY)
                    if fd < 0 { fastOK = false; continue }
                    let offset = Int64(8 * MiB + i * 2 * MiB + 123)
                    let bytes = (try? preadFully(fd, count: 512, at: offset)) ?? []
                    if bytes.count != 512 || bytes[0] != UInt8(offset % 251) { fastOK = false }
                    close(fd)
                }
                let fast = Date().timeIntervalSince(start)
                let stillOut = !slowDone.value
                group.wait()
                return (fast, stillOut, fastOK, slowSeconds.value, slowOK.value)
            }
        #expect(result.fastOK, "fast reads failed or returned wrong data")
        #expect(result.fastSeconds < 1.0, "20 reads took \(result.fastSeconds) s while a slow read was pending")
        #expect(result.slowStillOut, "the slow read finished before the fast ones: nothing was proven")
        #expect(result.slowOK, "slow read failed or returned wrong data")
        #expect(result.slowSeconds >= 1.5, "slow read took only \(result.slowSeconds) s")
        #expect(driver.slowFinished.load(ordering: .relaxed) >= 1)

        #expect(umount2(mnt, Int32(MNT_DETACH)) == 0, "umount2: \(errnoText())")
        // run() returns once the kernel lets go of the session.
        var waited = 0
        while !runFinished.value && waited < 1000 {
            try await Task.sleep(for: .milliseconds(10))
            waited += 1
        }
        #expect(runFinished.value, "FuseServer.run() did not return within 10 s of the unmount")
        if runFinished.value { try await runner.value }
        #expect(!isMounted(mnt))
    }

    /// Also with one FUSE loop thread: it must never be the one waiting for the disk.
    @Test("with more slow disk reads in flight than I/O threads, other reads still complete promptly",
          arguments: [2, 1])
    func slowDiskDoesNotHoldThreads(fuseThreads: Int) async throws {
        // The "disk" is a file served by this process whose first 32 MiB answer after 3 s; the daemon under test
        // mounts it as a raw image with two I/O threads, and really blocks in the kernel on those reads.
        var template = Array("/tmp/imgfs-mt-disk-XXXXXX".utf8CString)
        guard let made = mkdtemp(&template) else { throw TestFailure("mkdtemp: \(errnoText())") }
        let directory = String(cString: made)
        let disk = directory + "/disk", mnt = directory + "/mnt"
        mkdir(disk, 0o755)
        mkdir(mnt, 0o755)
        let driver = SlowReadDriver(length: 64 * Int64(MiB), slowRange: 0..<(32 * Int64(MiB)), delay: .seconds(3))
        let node = BlockNode(path: "slow", driver: driver, file: nil, backing: nil, readOnly: true)
        var config = MountConfiguration(mountpoint: disk, sourceName: "imgfs:slow-disk")
        config.handleSignals = false
        config.keepCache = false
        let server = FuseServer(root: MountDirectory(files: [ExportedFile(name: "slow.raw", node: node, readOnly: true)]),
                                configuration: config)
        try server.mount()
        let runner = Task { try await server.run() }
        let binary = try ImgfsBinary.path()
        defer {
            if isMounted(mnt) { _ = umount2(mnt, Int32(MNT_DETACH)) }
            if isMounted(disk) { _ = umount2(disk, Int32(MNT_DETACH)) }
            try? FileManager.default.removeItem(atPath: directory)
        }
        // --no-passthrough: the reads must reach imgfs's engine, not the kernel's passthrough to the slow file.
        try runTool(binary, ["mount", "--read-only", "--no-passthrough", "--format", "raw", "--io-threads", "2", "--io-engine", "uring",
                             "--fuse-threads", "\(fuseThreads)", disk + "/slow.raw", mnt])
        let file = mnt + "/slow.raw"
        let outcome = try await onThread { () -> (fast: Double, inFlight: Int, fastOK: Bool, slowOK: Bool) in
            let slowOK = Shared(true)
            let group = DispatchGroup()
            let slowReads = 6
            for index in 0..<slowReads {
                group.enter()
                Thread {
                    defer { group.leave() }
                    let fd = open(file, O_RDONLY | 0o40000)  // O_DIRECT
                    guard fd >= 0 else { return slowOK.set(false) }
                    defer { close(fd) }
                    let offset = Int64(index * 4 * MiB)
                    let bytes = (try? preadFully(fd, count: 4096, at: offset)) ?? []
                    if bytes.count != 4096 || bytes[0] != UInt8(offset % 251) { slowOK.set(false) }
                }.start()
            }
            // Every slow read must have reached the disk before the fast ones start: more than the threads.
            _ = waitUntil(seconds: 10) { driver.slowStarted.load(ordering: .relaxed) >= slowReads }
            let inFlight = driver.slowStarted.load(ordering: .relaxed) - driver.slowFinished.load(ordering: .relaxed)
            let start = Date()
            var fastOK = true
            let fd = open(file, O_RDONLY | 0o40000)
            for i in 0..<20 {
                let offset = Int64(40 * MiB + i * MiB)
                let bytes = (try? preadFully(fd, count: 4096, at: offset)) ?? []
                if bytes.count != 4096 || bytes[1] != UInt8((offset + 1) % 251) { fastOK = false }
            }
            close(fd)
            let fast = Date().timeIntervalSince(start)
            group.wait()
            return (fast, inFlight, fastOK, slowOK.value)
        }
        #expect(outcome.inFlight >= 6, "only \(outcome.inFlight) slow reads were in flight")
        #expect(outcome.fastOK && outcome.slowOK)
        #expect(outcome.fast < 1.5, "20 reads took \(outcome.fast) s behind \(outcome.inFlight) stuck ones")
        let unmount = try unmountRetryingBusy(binary, mnt)
        #expect(unmount.status == 0, "\(unmount.stderr)")
        _ = umount2(disk, Int32(MNT_DETACH))
        try await runner.value
    }
}
}
