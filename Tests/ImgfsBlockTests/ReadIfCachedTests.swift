import Foundation
import Testing
@testable import ImgfsBlock
#if canImport(Glibc)
import Glibc
#endif

/// A file of `bytes` in `directory`, written and flushed (so its pages are clean and can be dropped).
private func makeFile(_ bytes: [UInt8], in directory: String = NSTemporaryDirectory()) throws -> String {
    let path = directory + "/imgfs-nowait-\(UUID().uuidString)"
    let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
    guard fd >= 0 else { throw BlockError.system(errno: errno, operation: "open", path: path) }
    defer { close(fd) }
    let written = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 0) }
    guard written == bytes.count, fsync(fd) == 0 else { throw BlockError.system(errno: errno, operation: "write", path: path) }
    return path
}

/// Asks the kernel to forget the file's cached pages (clean ones only; best effort).
private func dropPageCache(_ file: HostFile) {
    _ = posix_fadvise(file.descriptor, 0, 0, POSIX_FADV_DONTNEED)
}

private func patterned(_ count: Int, seed: UInt8 = 7) -> [UInt8] {
    (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ Int(seed) &+ $0 >> 12) }
}

/// Calls `body` with a fresh buffer of `count` bytes filled with 0xEE, so bytes left unwritten show.
private func withPoisonedBuffer<T>(_ count: Int, _ body: (UnsafeMutableRawBufferPointer) throws -> T) rethrows -> T {
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: count, alignment: 64)
    defer { buffer.deallocate() }
    buffer.initializeMemory(as: UInt8.self, repeating: 0xEE)
    return try body(buffer)
}

@Suite struct HostFileReadIfCachedTests {
    @Test func aCachedRangeReadsAtOnceAndStopsAtTheEndOfTheFile() throws {
        let bytes = patterned(300_000)
        let path = try makeFile(bytes)
        defer { unlink(path) }
        let file = try HostFile.open(path, readOnly: true)
        // The write above left the pages cached; a blocking read makes sure.
        try withPoisonedBuffer(bytes.count) { _ = try file.preadSome($0, at: 0) }
        expectCachedReads(file, of: bytes)
    }

    /// `file` (holding the 300,000 `bytes`) reads a range inside at once, short only where the file ends and
    /// nothing at all past it.
    private func expectCachedReads(_ file: HostFile, of bytes: [UInt8]) {
        withPoisonedBuffer(70_001) { buffer in
            #expect(file.readIfCached(into: buffer, at: 12_345) == buffer.count)
            #expect(Array(buffer) == Array(bytes[12_345..<(12_345 + 70_001)]))
        }
        withPoisonedBuffer(10_000) { buffer in
            #expect(file.readIfCached(into: buffer, at: 295_000) == 5_000)
            #expect(Array(buffer[..<5_000]) == Array(bytes[295_000...]))
            #expect(file.readIfCached(into: buffer, at: 400_000) == 0)
        }
    }

    @Test func aFileInMemoryIsReadPlainlyThoughItRefusesNoWait() throws {
        // tmpfs refuses RWF_NOWAIT (EOPNOTSUPP) and never waits for a disk: its files must still take the fast path.
        let directory = "/dev/shm"
        let probe = open(directory, O_RDONLY | O_DIRECTORY)
        try #require(probe >= 0)
        let type = linuxFileSystemType(probe)
        close(probe)
        try #require(type == 0x0102_1994, "\(directory) is not a tmpfs here")
        let bytes = patterned(300_000, seed: 11)
        let path = try makeFile(bytes, in: directory)
        defer { unlink(path) }
        let file = try HostFile.open(path, readOnly: true)
        let refused = withPoisonedBuffer(4096) { buffer in
            linuxPreadv2(file.descriptor, buffer, at: 0, flags: LinuxReadFlags.noWait) < 0 && errno == EOPNOTSUPP
        }
        #expect(refused, "tmpfs now takes RWF_NOWAIT: this test no longer shows the plain-read path")
        // The first call learns the file system, the second uses what it learnt.
        expectCachedReads(file, of: bytes)
        expectCachedReads(file, of: bytes)
    }

    @Test func thePageCacheShareFollowsWhatIsCached() throws {
        // A disk-backed path, as below: tmpfs pages cannot be dropped.
        let bytes = patterned(8 << 20, seed: 5)
        let path = try makeFile(bytes, in: "/var/tmp")
        defer { unlink(path) }
        let file = try HostFile.open(path, readOnly: true)
        try withPoisonedBuffer(bytes.count) { _ = try file.preadSome($0, at: 0) }
        let cached = try #require(file.pageCacheShare(), "cachestat(2) (Linux 6.5+) is missing here")
        #expect(cached > 0.99, "all 8 MiB were just read, yet the share is \(cached)")
        // Dropping is best effort (another reader may bring pages back): a few tries must see most of it gone.
        var dropped = 1.0
        for _ in 0..<20 where dropped > 0.5 {
            dropPageCache(file)
            dropped = file.pageCacheShare() ?? 1
        }
        #expect(dropped <= 0.5, "the share stayed at \(dropped) after dropping the file's pages")
    }

    @Test func aRangeNotInThePageCacheIsDeclined() throws {
        // A disk-backed path: tmpfs pages are always "cached".
        let bytes = patterned(8 << 20)
        let path = try makeFile(bytes, in: "/var/tmp")
        defer { unlink(path) }
        let file = try HostFile.open(path, readOnly: true)
        let tries = 20
        // Whether this file system shows a dropped page as a miss at all: the raw call, seen once, says so.
        var observable = false
        for _ in 0..<tries where !observable {
            dropPageCache(file)
            observable = withPoisonedBuffer(65_536) { buffer in
                linuxPreadv2(file.descriptor, buffer, at: 4 << 20, flags: LinuxReadFlags.noWait) < 0 && errno == EAGAIN
            }
        }
        var declined = false
        for _ in 0..<tries where !declined {
            dropPageCache(file)
            declined = withPoisonedBuffer(65_536) { file.readIfCached(into: $0, at: 2 << 20) == nil }
        }
        if observable { #expect(declined, "RWF_NOWAIT reported EAGAIN, yet readIfCached never declined a dropped range") }
        // Whatever it said, a blocking read brings the range in and the next try is a hit with the right bytes.
        try withPoisonedBuffer(65_536) { buffer in
            _ = try file.preadSome(buffer, at: 2 << 20)
            buffer.initializeMemory(as: UInt8.self, repeating: 0xEE)
            #expect(file.readIfCached(into: buffer, at: 2 << 20) == 65_536)
            #expect(Array(buffer) == Array(bytes[(2 << 20)..<((2 << 20) + 65_536)]))
        }
    }
}

@Suite struct DriverReadIfCachedTests {
    @Test func rawReadsCachedRangesLikeItsAsyncRead() async throws {
        let scratch = try QemuScratch()
        let bytes = patterned(1 << 20, seed: 3)
        _ = FileManager.default.createFile(atPath: scratch.path("a.raw"), contents: Data(bytes))
        let node = try await openImage(scratch.path("a.raw"))
        _ = try await readAll(node)
        for (offset, count) in [(0, 4096), (4095, 2), (333_333, 200_001), ((1 << 20) - 4096, 4096)] {
            withPoisonedBuffer(count) { buffer in
                #expect(node.readIfCached(at: Int64(offset), into: buffer))
                #expect(Array(buffer) == Array(bytes[offset..<(offset + count)]), "\(count)@\(offset)")
            }
        }
        // Past the end of the disk it is the async path's job (a short read).
        withPoisonedBuffer(8192) { #expect(!node.readIfCached(at: (1 << 20) - 4096, into: $0)) }
    }

    /// An image holding every kind of cluster: data, zero, unallocated, compressed, and (with `backing`) ranges
    /// the backing file supplies.
    private func mixedImage(_ scratch: QemuScratch, backing: Bool) throws -> String {
        let name = backing ? "top.qcow2" : "solo.qcow2"
        if backing {
            try scratch.qemuImg("create", "-q", "-f", "raw", scratch.path("base.raw"), "8M")
            try scratch.qemuIO("base.raw", format: "raw", ["write -P 0xbb 0 8M"])
            try scratch.qemuImg("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", scratch.path(name), "8M")
        } else {
            try scratch.qemuImg("create", "-q", "-f", "qcow2", scratch.path(name), "8M")
        }
        try scratch.qemuIO(name, [
            "write -P 0x11 0 1M", "write -P 0x12 1100k 300000", "write -z 256k 128k", "write -z 2M 192k",
            "write -c -P 0x33 3M 128k", "write -c -P 0x34 4M 64k", "write -P 0x55 5M 64k", "write -P 0x56 6M 1M",
            "discard 6400k 64k",
        ])
        return name
    }

    @Test(arguments: [false, true])
    func qcow2AgreesWithItsAsyncReadWhereItAccepts(backing: Bool) async throws {
        let scratch = try QemuScratch()
        let name = try mixedImage(scratch, backing: backing)
        let expected = try scratch.rawContents(name)
        let node = try await openImage(scratch.path(name))
        // The async path warms the L2 cache and the host page cache, and must itself agree with qemu-img.
        #expect(try await readAll(node) == expected)
        let driver = node.driver
        var accepted = 0
        for chunk in [4096, 65_536, 100_003, 1 << 20] {
            var offset = 0
            while offset < expected.count {
                let count = min(chunk, expected.count - offset)
                let status = try await node.chainBlockStatus(at: Int64(offset), length: Int64(count))
                let whole = status.length >= Int64(count)
                let compressed = whole && status.kind == .data && status.hostOffset == nil
                // A chain that ends says `.hole` one level below its last node: zeros, no backing read.
                let fromBacking = whole && status.depth > 0 && status.kind != .hole
                let plain = whole && !compressed && !fromBacking
                withPoisonedBuffer(count) { buffer in
                    let hit = driver.readIfCached(at: Int64(offset), into: buffer)
                    if hit {
                        accepted += 1
                        #expect(Array(buffer) == Array(expected[offset..<(offset + count)]), "\(count)@\(offset)")
                    }
                    #expect(!(hit && (compressed || fromBacking)), "accepted \(count)@\(offset): compressed or backing")
                    // Everything is cached now: plain data, zeros and holes without backing must be accepted.
                    #expect(hit || !plain, "declined \(count)@\(offset), \(status.kind) at depth \(status.depth)")
                }
                offset += count
            }
        }
        #expect(accepted > 0)
    }

    @Test func qcow2DeclinesUntilItsL2TableIsCached() async throws {
        let scratch = try QemuScratch()
        let name = try mixedImage(scratch, backing: false)
        let node = try await openImage(scratch.path(name))
        withPoisonedBuffer(4096) { #expect(!node.readIfCached(at: 0, into: $0)) }
        _ = try await readNode(node, at: 0, count: 4096)
        withPoisonedBuffer(4096) { buffer in
            #expect(node.readIfCached(at: 0, into: buffer))
            #expect(Array(buffer) == [UInt8](repeating: 0x11, count: 4096))
        }
    }

    @Test func rawDirectReadsGoStraightToTheEngine() async throws {
        let scratch = try QemuScratch()
        let bytes = patterned(1 << 20, seed: 5)
        _ = FileManager.default.createFile(atPath: scratch.path("a.raw"), contents: Data(bytes))
        let node = try await openImage(scratch.path("a.raw"))
        for (offset, count) in [(0, 4096), (4095, 2), (333_333, 200_001), ((1 << 20) - 4096, 4096)] {
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: count, alignment: 4096)
            defer { buffer.deallocate() }
            buffer.initializeMemory(as: UInt8.self, repeating: 0xEE)
            let outcome = await startDirectRead(node, at: Int64(offset), into: buffer)
            if engineStartsDirectReads {
                #expect(outcome == true, "\(count)@\(offset)")
                #expect(Array(buffer) == Array(bytes[offset..<(offset + count)]), "\(count)@\(offset)")
            } else {
                #expect(outcome == nil, "the threads engine started a direct read")
            }
        }
        // Past the end of the disk it is the async path's job (a short read), as is an empty range.
        withPoisonedBuffer(8192) { buffer in
            #expect(!node.startRead(at: (1 << 20) - 4096, into: buffer) { _ in Issue.record("started past the end") })
        }
        #expect(node.requests.inFlightCount == 0)
    }

    @Test(arguments: [false, true])
    func qcow2DirectReadsStartOnlyForPlainDataWithTheL2Cached(backing: Bool) async throws {
        let scratch = try QemuScratch()
        let name = try mixedImage(scratch, backing: backing)
        let expected = try scratch.rawContents(name)
        let node = try await openImage(scratch.path(name))
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        defer { buffer.deallocate() }
        #expect(await startDirectRead(node, at: 0, into: UnsafeMutableRawBufferPointer(rebasing: buffer[..<4096])) == nil,
                "started before the L2 table was loaded")
        #expect(try await readAll(node) == expected)
        var accepted = 0
        for chunk in [4096, 65_536, 100_003] {
            var offset = 0
            while offset < expected.count {
                let count = min(chunk, expected.count - offset)
                let status = try await node.chainBlockStatus(at: Int64(offset), length: Int64(count))
                let plainData = status.length >= Int64(count) && status.kind == .data && status.hostOffset != nil
                    && status.depth == 0
                let target = UnsafeMutableRawBufferPointer(rebasing: buffer[..<count])
                target.initializeMemory(as: UInt8.self, repeating: 0xEE)
                let outcome = await startDirectRead(node, at: Int64(offset), into: target)
                if let outcome {
                    accepted += 1
                    #expect(outcome, "\(count)@\(offset) came back short")
                    #expect(plainData, "started \(count)@\(offset), \(status.kind) at depth \(status.depth)")
                    #expect(Array(target) == Array(expected[offset..<(offset + count)]), "\(count)@\(offset)")
                }
                offset += count
            }
        }
        #expect(engineStartsDirectReads ? accepted > 0 : accepted == 0)
        #expect(node.requests.inFlightCount == 0)
    }

    @Test func aDirectReadWaitsForNoConflictAndHoldsItsRangeUntilDone() async throws {
        let scratch = try QemuScratch()
        _ = FileManager.default.createFile(atPath: scratch.path("a.raw"), contents: Data(patterned(1 << 20)))
        let node = try await openImage(scratch.path("a.raw"))
        let write = await node.requests.begin(offset: 0, length: 4096, kind: .write, serialising: true)
        withPoisonedBuffer(4096) { buffer in
            #expect(!node.startRead(at: 0, into: buffer) { _ in Issue.record("started under a serialising write") })
        }
        node.requests.end(write)
        guard engineStartsDirectReads else { return }
        // In flight, the read is a tracked request: a serialising request over it waits for its completion.
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { buffer.deallocate() }
        let trackedWhileReading = Locked<Int?>(nil)
        let target = UncheckedSendable(buffer)
        let outcome = await withCheckedContinuation { (continuation: CheckedContinuation<Bool?, Never>) in
            let started = node.startRead(at: 8192, into: target.value) { complete in
                trackedWhileReading.withLock { $0 = node.requests.inFlightCount }
                continuation.resume(returning: complete)
            }
            if !started { continuation.resume(returning: nil) }
        }
        #expect(outcome == true)
        #expect(trackedWhileReading.withLock { $0 } == 1, "the read was not tracked until its completion")
        #expect(node.requests.inFlightCount == 0)
    }

    @Test func aNodeDeclinesWhileAConflictingRequestIsInFlight() async throws {
        let scratch = try QemuScratch()
        _ = FileManager.default.createFile(atPath: scratch.path("a.raw"), contents: Data(patterned(1 << 20)))
        let node = try await openImage(scratch.path("a.raw"))
        _ = try await readAll(node)
        let write = await node.requests.begin(offset: 0, length: 4096, kind: .write, serialising: true)
        withPoisonedBuffer(4096) { buffer in
            #expect(!node.readIfCached(at: 0, into: buffer))
            #expect(node.readIfCached(at: 8192, into: buffer))
        }
        node.requests.end(write)
        withPoisonedBuffer(4096) { #expect(node.readIfCached(at: 0, into: $0)) }
        #expect(node.requests.inFlightCount == 0)
    }
}
