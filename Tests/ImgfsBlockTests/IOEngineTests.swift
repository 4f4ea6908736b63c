import Foundation
import Testing
@testable import ImgfsBlock
import ImgfsTestSupport

/// Both host I/O engines against real files, pipes and bad descriptors.
@Suite struct IOEngineTests {
    /// A file whose every 8-byte word holds its own offset, so any read can be checked without a copy.
    private static func offsetPatternFile(_ scratch: QemuScratch, name: String, size: Int) throws -> String {
        let path = scratch.path(name)
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        #expect(fd >= 0)
        defer { close(fd) }
        let chunk = 1 << 20
        var words = [UInt64](repeating: 0, count: chunk / 8)
        for base in stride(from: 0, to: size, by: chunk) {
            for i in words.indices { words[i] = UInt64(base + i * 8) }
            let n = words.withUnsafeBytes { pwrite(fd, $0.baseAddress, chunk, off_t(base)) }
            #expect(n == chunk)
        }
        return path
    }

    private static func expectedPatternBytes(at offset: Int, count: Int) -> [UInt8] {
        let first = offset & ~7
        let words = (offset + count - first + 7) / 8
        let pattern = (0..<words).map { UInt64(first + $0 * 8) }
        return pattern.withUnsafeBytes { Array($0[(offset - first)..<(offset - first + count)]) }
    }

    private static func errno(of body: () async throws -> Void) async -> Int32? {
        do {
            try await body()
            return nil
        } catch let BlockError.system(code, _, _) {
            return code
        } catch {
            return -1
        }
    }

    @Test(arguments: IOEngineKind.allCases)
    func roundTrips(kind: IOEngineKind) async throws {
        let engine = try SharedIOEngine.make(kind: kind)
        #expect(engine.kind == kind)
        let scratch = try QemuScratch()
        let path = scratch.path("rt.bin")
        let fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0o644)
        #expect(fd >= 0)
        defer { close(fd) }

        let data = TestBuffer(randomBytes(256 << 10, seed: 7))
        #expect(try await engine.write(fd: fd, from: data.readable, at: 4096, path: path) == data.count)
        try await engine.fdatasync(fd: fd, path: path)

        let back = TestBuffer(count: data.count)
        #expect(try await engine.read(fd: fd, into: back.raw, at: 4096, path: path) == data.count)
        #expect(back.bytes == data.bytes)
        // At end of file a read is empty, not an error.
        #expect(try await engine.read(fd: fd, into: back.raw, at: 4096 + Int64(data.count), path: path) == 0)

        // Vectored: three buffers of different sizes as one transfer.
        let parts = [TestBuffer(randomBytes(100, seed: 1)), TestBuffer(randomBytes(5000, seed: 2)),
                     TestBuffer(randomBytes(3, seed: 3))]
        #expect(try await engine.writev(fd: fd, from: parts.map(\.readable), at: 1 << 20, path: path) == 5103)
        let first = TestBuffer(count: 5000)
        let second = TestBuffer(count: 103)
        #expect(try await engine.readv(fd: fd, into: [first.raw, second.raw], at: 1 << 20, path: path) == 5103)
        #expect(first.bytes + second.bytes == parts.flatMap(\.bytes))

        // fallocate: punch a hole (reads as zeros, size kept), then extend the file.
        try await engine.fallocate(fd: fd, mode: FallocateMode.punchHole | FallocateMode.keepSize, offset: 8192,
                                   length: 8192, path: path)
        let hole = TestBuffer(count: 8192, filler: 0xff)
        #expect(try await engine.read(fd: fd, into: hole.raw, at: 8192, path: path) == 8192)
        #expect(hole.bytes.allSatisfy { $0 == 0 })
        try await engine.fallocate(fd: fd, mode: 0, offset: 0, length: 8 << 20, path: path)
        var st = stat()
        #expect(fstat(fd, &st) == 0)
        #expect(st.st_size == 8 << 20)
    }

    @Test(arguments: IOEngineKind.allCases)
    func hostFileThroughEngine(kind: IOEngineKind) async throws {
        let engine = try SharedIOEngine.make(kind: kind)
        let scratch = try QemuScratch()
        let path = scratch.path("hf.bin")
        #expect(FileManager.default.createFile(atPath: path, contents: nil))
        let file = try HostFile.open(path, readOnly: false, engine: engine)
        #expect(file.engine.kind == kind)
        let data = TestBuffer(randomBytes(3 << 20, seed: 11))
        try await file.write(data.readable, at: 512)
        try await file.flush()
        let back = TestBuffer(count: data.count)
        try await file.readExactly(into: back.raw, at: 512)
        #expect(back.bytes == data.bytes)
        #expect(try await file.fallocate(mode: FallocateMode.zeroRange | FallocateMode.keepSize, offset: 512,
                                         length: 4096))
        let zeros = TestBuffer(count: 4096, filler: 1)
        #expect(try await file.read(into: zeros.raw, at: 512) == 4096)
        #expect(zeros.bytes.allSatisfy { $0 == 0 })
        // A read that runs past the end stops there; readExactly calls that corrupt.
        let tail = TestBuffer(count: 8192)
        #expect(try await file.read(into: tail.raw, at: Int64(512 + data.count - 100)) == 100)
        await #expect(throws: BlockError.self) {
            try await file.readExactly(into: tail.raw, at: Int64(512 + data.count - 100))
        }
    }

    @Test(arguments: IOEngineKind.allCases)
    func manyConcurrentRandomReads(kind: IOEngineKind) async throws {
        let engine = try SharedIOEngine.make(kind: kind)
        let scratch = try QemuScratch()
        let size = 64 << 20
        let path = try Self.offsetPatternFile(scratch, name: "big.bin", size: size)
        let file = try HostFile.open(path, readOnly: true, engine: engine)
        var rng = SplitMix64(seed: 42)
        let offsets = (0..<512).map { _ in Int(rng.next() % UInt64(size - 4096)) }
        let mismatches = try await withThrowingTaskGroup(of: Int.self) { group in
            for offset in offsets {
                group.addTask {
                    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 8)
                    defer { buffer.deallocate() }
                    try await file.readExactly(into: buffer, at: Int64(offset))
                    return Array(buffer) == Self.expectedPatternBytes(at: offset, count: 4096) ? 0 : 1
                }
            }
            return try await group.reduce(0, +)
        }
        #expect(mismatches == 0)
    }

    @Test(arguments: IOEngineKind.allCases)
    func errorsCarryTheirErrno(kind: IOEngineKind) async throws {
        let engine = try SharedIOEngine.make(kind: kind)
        let scratch = try QemuScratch()
        let path = try Self.offsetPatternFile(scratch, name: "e.bin", size: 1 << 20)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 8)
        defer { buffer.deallocate() }

        let writeOnly = open(path, O_WRONLY)
        #expect(writeOnly >= 0)
        defer { close(writeOnly) }
        #expect(await Self.errno { _ = try await engine.read(fd: writeOnly, into: buffer, at: 0, path: path) } == EBADF)

        let readOnly = open(path, O_RDONLY)
        #expect(readOnly >= 0)
        defer { close(readOnly) }
        #expect(await Self.errno {
            _ = try await engine.write(fd: readOnly, from: UnsafeRawBufferPointer(buffer), at: 0, path: path)
        } == EBADF)

        // Tests run in parallel and the kernel hands out the lowest free number, so a high one stays closed.
        let closed = dup2(readOnly, 3999)
        #expect(closed == 3999)
        close(closed)
        #expect(await Self.errno { _ = try await engine.read(fd: closed, into: buffer, at: 0, path: path) } == EBADF)
        #expect(await Self.errno { try await engine.fdatasync(fd: closed, path: path) } == EBADF)
        #expect(await Self.errno { _ = try await engine.read(fd: readOnly, into: buffer, at: -4096, path: path) }
                == EINVAL)

        // The error names the file and the operation.
        do {
            _ = try await engine.read(fd: writeOnly, into: buffer, at: 0, path: path)
            Issue.record("read from a write-only descriptor succeeded")
        } catch let error as BlockError {
            #expect(error == .system(errno: EBADF, operation: "read", path: path))
        }
    }

    /// 64 reads that cannot complete (empty pipes) are all in the kernel at once, and a file read still finishes:
    /// no thread waits for any of them.
    @Test func uringQueueDepthDoesNotDependOnThreads() async throws {
        let engine = try UringIOEngine()
        let scratch = try QemuScratch()
        let path = try Self.offsetPatternFile(scratch, name: "q.bin", size: 1 << 20)
        let file = try HostFile.open(path, readOnly: true, engine: engine)
        var pipes: [(read: Int32, write: Int32)] = []
        for _ in 0..<64 {
            var fds: [Int32] = [0, 0]
            #expect(pipe(&fds) == 0)
            pipes.append((fds[0], fds[1]))
        }
        defer { for p in pipes { close(p.read); close(p.write) } }

        try await withThrowingTaskGroup(of: Bool.self) { group in
            for (index, p) in pipes.enumerated() {
                group.addTask {
                    let byte = TestBuffer(count: 1)
                    let n = try await engine.read(fd: p.read, into: byte.raw, at: 0, path: "pipe")
                    return n == 1 && byte.bytes == [UInt8(index)]
                }
            }
            let deadline = ContinuousClock.now + .seconds(10)
            while engine.inFlight < 64 && ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(5)) }
            #expect(engine.inFlight == 64)

            let start = ContinuousClock.now
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 8)
            defer { buffer.deallocate() }
            try await file.readExactly(into: buffer, at: 8192)
            #expect(Array(buffer) == Self.expectedPatternBytes(at: 8192, count: 4096))
            #expect(ContinuousClock.now - start < .seconds(2))
            #expect(engine.inFlight == 64)

            for (index, p) in pipes.enumerated() {
                var byte = UInt8(index)
                #expect(write(p.write, &byte, 1) == 1)
            }
            var all = true
            for try await ok in group { all = all && ok }
            #expect(all)
        }
        #expect(engine.inFlight == 0)
    }

    /// More requests than the ring's completion queue holds wait their turn instead of overflowing it.
    @Test func uringQueuesBeyondItsCapacity() async throws {
        let engine = try UringIOEngine(entries: 4)  // room for 8 in flight
        let scratch = try QemuScratch()
        let path = try Self.offsetPatternFile(scratch, name: "c.bin", size: 4 << 20)
        let file = try HostFile.open(path, readOnly: true, engine: engine)
        let mismatches = try await withThrowingTaskGroup(of: Int.self) { group in
            for i in 0..<300 {
                group.addTask {
                    let offset = (i * 12_345) % ((4 << 20) - 512)
                    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 512, alignment: 8)
                    defer { buffer.deallocate() }
                    try await file.readExactly(into: buffer, at: Int64(offset))
                    return Array(buffer) == Self.expectedPatternBytes(at: offset, count: 512) ? 0 : 1
                }
            }
            return try await group.reduce(0, +)
        }
        #expect(mismatches == 0)
        #expect(engine.inFlight == 0)
    }

    /// The daemon's own threads carry names, so `tools/cold-profile` and `top -H` can tell them apart.
    @Test func engineThreadsAreNamed() async throws {
        func currentThreadName() -> String {
            let fd = open("/proc/thread-self/comm", O_RDONLY)
            guard fd >= 0 else { return "" }
            defer { close(fd) }
            var bytes = [UInt8](repeating: 0, count: 32)
            let n = read(fd, &bytes, bytes.count)
            return String(decoding: bytes.prefix(max(0, n)), as: UTF8.self).trimmingCharacters(in: .newlines)
        }
        // Linux keeps 15 bytes of a name: the rest is cut, not refused.
        let executor = IOExecutor(threads: 1, name: "imgfs-test-threads")
        #expect(try await executor.perform { currentThreadName() } == "imgfs-test-thre")
        let engine = try UringIOEngine()
        let onCompletionThread = try #require(engine.taskExecutor)
        let name = await Task(executorPreference: onCompletionThread) { currentThreadName() }.value
        #expect(name == "imgfs-uring")
    }

    @Test func sharedEngineFollowsTheEnvironment() throws {
        let kind = SharedIOEngine.kind
        if let requested = SharedIOEngine.requestedKind() {
            #expect(kind == requested)
        }
        // Once it exists, configuring changes nothing.
        #expect(try SharedIOEngine.configure(kind == .uring ? .threads : .uring) == kind)
    }
}

/// Heap memory a test can hand to async calls (arrays only lend theirs to synchronous closures).
final class TestBuffer: @unchecked Sendable {
    let raw: UnsafeMutableRawBufferPointer

    init(count: Int, filler: UInt8 = 0) {
        raw = .allocate(byteCount: count, alignment: 16)
        raw.initializeMemory(as: UInt8.self, repeating: filler)
    }

    convenience init(_ bytes: [UInt8]) {
        self.init(count: bytes.count)
        raw.copyBytes(from: bytes)
    }

    deinit { raw.deallocate() }

    var count: Int { raw.count }
    var readable: UnsafeRawBufferPointer { UnsafeRawBufferPointer(raw) }
    var bytes: [UInt8] { Array(raw) }
}
