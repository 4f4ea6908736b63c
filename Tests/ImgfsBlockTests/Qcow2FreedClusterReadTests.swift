import Foundation
@testable import ImgfsBlock
import ImgfsTestSupport
import Synchronization
import Testing

/// An engine that holds one chosen read until the test lets it go: a read that has looked up its cluster and is
/// still waiting for the disk.
final class HoldingEngine: IOEngine, @unchecked Sendable {
    private let inner: any IOEngine
    private let armed = Atomic<Bool>(false)
    private let holding = Atomic<Bool>(false)
    private let released = Atomic<Bool>(false)

    init(inner: any IOEngine) { self.inner = inner }

    var kind: IOEngineKind { inner.kind }

    /// The next read waits in the engine, before it reaches the file, until `release()`.
    func holdNextRead() { armed.store(true, ordering: .sequentiallyConsistent) }

    func waitUntilHolding() async throws {
        while !holding.load(ordering: .sequentiallyConsistent) { try await Task.sleep(for: .milliseconds(1)) }
    }

    func release() { released.store(true, ordering: .sequentiallyConsistent) }

    func read(fd: Int32, into buffer: UnsafeMutableRawBufferPointer, at offset: Int64, path: String) async throws -> Int {
        if armed.exchange(false, ordering: .sequentiallyConsistent) {
            holding.store(true, ordering: .sequentiallyConsistent)
            while !released.load(ordering: .sequentiallyConsistent) { try await Task.sleep(for: .milliseconds(1)) }
        }
        return try await inner.read(fd: fd, into: buffer, at: offset, path: path)
    }

    func write(fd: Int32, from buffer: UnsafeRawBufferPointer, at offset: Int64, path: String) async throws -> Int {
        try await inner.write(fd: fd, from: buffer, at: offset, path: path)
    }

    func readv(fd: Int32, into buffers: [UnsafeMutableRawBufferPointer], at offset: Int64, path: String) async throws
        -> Int {
        try await inner.readv(fd: fd, into: buffers, at: offset, path: path)
    }

    func writev(fd: Int32, from buffers: [UnsafeRawBufferPointer], at offset: Int64, path: String) async throws -> Int {
        try await inner.writev(fd: fd, from: buffers, at: offset, path: path)
    }

    func fdatasync(fd: Int32, path: String) async throws { try await inner.fdatasync(fd: fd, path: path) }

    func fallocate(fd: Int32, mode: Int32, offset: Int64, length: Int64, path: String) async throws {
        try await inner.fallocate(fd: fd, mode: mode, offset: offset, length: length, path: path)
    }
}

extension ImageWritingSuites {
@Suite struct Qcow2FreedClusterReadTests {
    /// A read that found a compressed cluster is still waiting for the disk when a write replaces that cluster
    /// and a flush frees it; new writes would then allocate the freed space. The read must still return what the
    /// cluster held, not the bytes of whatever reused its space.
    @Test func aReadOfAReplacedCompressedClusterIsDoneBeforeItsSpaceIsReused() async throws {
        let scratch = try QemuScratch()
        let clusterSize = 4096
        let size = 512 << 10
        // The first half compressible data, the second half zeros (left unallocated by the conversion).
        var original = [UInt8](repeating: 0, count: size)
        for i in stride(from: 0, to: size / 2, by: 64) { original[i] = UInt8(truncatingIfNeeded: i >> 6) | 1 }
        try Data(original).write(to: URL(fileURLWithPath: scratch.path("p.raw")))
        try scratch.qemuImg("convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=\(clusterSize)",
                            scratch.path("p.raw"), scratch.path("c.qcow2"))

        let engine = HoldingEngine(inner: SharedIOEngine.engine)
        let driver = try await openQcow2DriverReadWrite(scratch.path("c.qcow2"), engine: engine)
        // Loads the L2 table (through cluster 1), so the held read is cluster 0's compressed data itself.
        _ = try await read(driver, at: Int64(clusterSize), count: clusterSize)
        engine.holdNextRead()
        let heldRead = Task { try await read(driver, at: 0, count: clusterSize) }
        try await engine.waitUntilHolding()

        var model = DiskModel(bytes: original)
        let replacement = [UInt8](repeating: 0xa5, count: size / 2)
        try await write(driver, at: 0, replacement)
        model.write(replacement, at: 0)
        let flush = Task { try await driver.flush() }
        // Allocating writes in the unallocated half: they would take the freed space, once freed.
        let refill = [UInt8](repeating: 0x5a, count: size / 2)
        model.write(refill, at: size / 2)
        let refilled = Atomic<Bool>(false)
        let refilling = Task {
            try await write(driver, at: Int64(size / 2), refill)
            try await driver.flush()
            refilled.store(true, ordering: .sequentiallyConsistent)
        }
        // Without the grace period the flush frees the space and the refill lands in it well within this time;
        // with it, both wait for the held read.
        for _ in 0..<300 where !refilled.load(ordering: .sequentiallyConsistent) {
            try await Task.sleep(for: .milliseconds(1))
        }
        engine.release()

        let seen = try await heldRead.value
        #expect(seen == Array(original[0..<clusterSize]), "the held read returned bytes of reused space")
        try await flush.value
        try await refilling.value
        try await driver.close()
        try scratch.expectCleanCheck("c.qcow2")
        try scratch.expectContents("c.qcow2", equal: model)
    }

    private func read(_ driver: Qcow2Driver, at offset: Int64, count: Int) async throws -> [UInt8] {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: count, alignment: 16)
        defer { buffer.deallocate() }
        try await driver.read(at: offset, into: buffer)
        return [UInt8](buffer)
    }

    private func write(_ driver: Qcow2Driver, at offset: Int64, _ bytes: [UInt8]) async throws {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: bytes.count, alignment: 16)
        defer { buffer.deallocate() }
        buffer.copyBytes(from: bytes)
        try await driver.write(at: offset, from: UnsafeRawBufferPointer(buffer), flags: [])
    }
}
}
