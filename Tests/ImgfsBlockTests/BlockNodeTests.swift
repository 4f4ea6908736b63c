import Foundation
import Testing
import ImgfsTestSupport
@testable import ImgfsBlock

/// The node's own duties: tracked requests against truncate, drain, FUA, reopen, repointed children.
@Suite struct BlockNodeTests {
    private func rawNode(_ scratch: QemuScratch, size: Int, readOnly: Bool = false) async throws -> BlockNode {
        try scratch.qemuImg("create", "-q", "-f", "raw", scratch.path("d.img"), "\(size)")
        return try await ImageOpener.open(scratch.path("d.img"), options: OpenOptions(
            readOnly: readOnly, format: .raw, pathPolicy: try PathPolicy(), locking: .none))
    }

    @Test func truncatesRacingWritesLeaveWhatAModelPredicts() async throws {
        let scratch = try QemuScratch()
        let size = 8 << 20
        let node = try await rawNode(scratch, size: size)
        var model = [UInt8](repeating: 0, count: size)
        var generator = SplitMix64(seed: 77)
        for epoch in 0..<20 {
            // Sixteen writes that do not overlap each other, racing one shrink; then the disk grows back.
            let cut = Int(4 << 20) + Int(generator.next() % UInt64(4 << 20))
            var writes: [(offset: Int, bytes: [UInt8])] = []
            for slot in 0..<16 {
                let start = slot * (size / 16) + Int(generator.next() % 4096)
                let count = 4096 + Int(generator.next() % UInt64(60 << 10))
                writes.append((start, [UInt8](repeating: UInt8(truncatingIfNeeded: epoch * 16 + slot + 1), count: count)))
            }
            let succeeded = try await withThrowingTaskGroup(of: (Int, Bool).self) { group in
                for (index, write) in writes.enumerated() {
                    group.addTask {
                        do {
                            try await ImgfsBlockTests.write(node, at: Int64(write.offset), write.bytes)
                            return (index, true)
                        } catch BlockError.outOfRange {
                            return (index, false)
                        }
                    }
                }
                group.addTask {
                    try await node.truncate(to: Int64(cut))
                    return (-1, true)
                }
                var results: [Int: Bool] = [:]
                for try await (index, ok) in group where index >= 0 { results[index] = ok }
                return results
            }
            for (index, write) in writes.enumerated() where succeeded[index] == true {
                let end = min(write.offset + write.bytes.count, cut)
                if end > write.offset { model.replaceSubrange(write.offset..<end, with: write.bytes[0..<(end - write.offset)]) }
            }
            // A write that failed must have been refused whole: it did not fit the shrunk disk.
            for (index, write) in writes.enumerated() where succeeded[index] == false {
                #expect(write.offset + write.bytes.count > cut)
            }
            for i in cut..<size { model[i] = 0 }
            try await node.truncate(to: Int64(size))
        }
        try await node.flush()
        #expect(node.length == Int64(size))
        let host = [UInt8](try Data(contentsOf: URL(fileURLWithPath: scratch.path("d.img"))))
        #expect(host.count == size)
        #expect(firstDifference(host, model) == nil)
    }

    @Test func drainWaitsForRequestsInFlight() async throws {
        let scratch = try QemuScratch()
        let node = try await rawNode(scratch, size: 1 << 20)
        let request = await node.requests.begin(offset: 0, length: 4096, kind: .write)
        let drained = Locked(false)
        let drainer = Task {
            await node.drain()
            drained.withLock { $0 = true }
        }
        // The drain cannot finish while the request is registered.
        for _ in 0..<50 { await Task.yield() }
        #expect(drained.withLock { $0 } == false)
        node.requests.end(request)
        await drainer.value
        #expect(drained.withLock { $0 })
    }

    @Test func fuaWritesAreFlushedAndNoFallbackRefusesToEmulate() async throws {
        let scratch = try QemuScratch()
        let node = try await rawNode(scratch, size: 1 << 20)
        try await write(node, at: 4096, [1, 2, 3])
        let bytes: [UInt8] = [9, 9, 9, 9]
        try await write(node, at: 100, bytes, flags: .fua)
        #expect(try await readNode(node, at: 100, count: 4) == bytes)
        // Zeroing without fallback either works natively (ext4, tmpfs) or is refused; it never writes zeros.
        do {
            try await node.writeZeroes(at: 0, length: 8192, flags: .noFallback)
            #expect(try await readNode(node, at: 4096, count: 3) == [0, 0, 0])
        } catch BlockError.unsupported {}
    }

    @Test func reopenSwitchesBetweenReadOnlyAndReadWriteInPlace() async throws {
        let scratch = try QemuScratch()
        let node = try await rawNode(scratch, size: 1 << 20, readOnly: true)
        #expect(node.isReadOnly)
        await #expect(throws: BlockError.readOnly) { try await write(node, at: 0, [1]) }
        let descriptor = try #require(node.file?.descriptor)
        try await node.reopen(readOnly: false)
        #expect(!node.isReadOnly && node.file?.descriptor == descriptor)
        try await write(node, at: 0, [0xAB])
        try await node.reopen(readOnly: true)
        #expect(node.isReadOnly)
        await #expect(throws: BlockError.readOnly) { try await write(node, at: 0, [1]) }
        #expect(try await readNode(node, at: 0, count: 1) == [0xAB])
        // A format imgfs does not write cannot be reopened read-write.
        try scratch.qemuImg("create", "-q", "-f", "qcow2", scratch.path("q.qcow2"), "1M")
        let qcow2 = try await openImage(scratch.path("q.qcow2"))
        await #expect(throws: BlockError.self) { try await qcow2.reopen(readOnly: false) }
    }

    @Test func aRepointedBackingIsWhatReadsSee() async throws {
        let scratch = try QemuScratch()
        for (name, byte) in [("a.raw", "0x0a"), ("b.raw", "0x0b")] {
            try scratch.qemuImg("create", "-q", "-f", "raw", scratch.path(name), "1M")
            try scratch.qemuIO(name, format: "raw", ["write -P \(byte) 0 1M"])
        }
        try scratch.qemuImg("create", "-q", "-f", "qcow2", "-b", "a.raw", "-F", "raw", scratch.path("top.qcow2"), "1M")
        let top = try await openImage(scratch.path("top.qcow2"))
        #expect(try await readNode(top, at: 0, count: 2) == [0x0a, 0x0a])
        let b = try await ImageOpener.open(scratch.path("b.raw"), options: OpenOptions(
            readOnly: true, format: .raw, pathPolicy: try PathPolicy()))
        let old = top.children.repoint(.backing, to: b)
        #expect(old?.path.hasSuffix("a.raw") == true)
        #expect(try await readNode(top, at: 0, count: 2) == [0x0b, 0x0b])
    }
}

/// Vectored host I/O and owned buffers, with whichever engine the process chose.
@Suite struct VectoredIOTests {
    @Test func vectorsGoOutAndComeBackAsOneRange() async throws {
        let scratch = try QemuScratch()
        try scratch.qemuImg("create", "-q", "-f", "raw", scratch.path("v.img"), "1M")
        let file = try HostFile.open(scratch.path("v.img"), readOnly: false)
        let budget = MemoryBudget(limit: 1 << 20, requestHeadroom: 1 << 20)
        let pieces = [await IOBuffer(count: 1000, budget: budget), await IOBuffer(count: 0),
                      await IOBuffer(count: 70_000, budget: budget), await IOBuffer(count: 3)]
        for (index, piece) in pieces.enumerated() {
            piece.bytes.initializeMemory(as: UInt8.self, repeating: UInt8(index + 1))
        }
        #expect(budget.used == 71_000)
        try await file.write(vector: pieces.map(\.readOnly), at: 4093)
        let back = [await IOBuffer(count: 3), await IOBuffer(count: 71_003)]
        try await file.readExactly(vector: back.map(\.bytes), at: 4090)
        let joined = back.flatMap { [UInt8]($0.bytes) }
        let expected = [UInt8](repeating: 0, count: 3) + [UInt8](repeating: 1, count: 1000)
            + [UInt8](repeating: 3, count: 70_000) + [UInt8](repeating: 4, count: 3)
        #expect(joined.count == expected.count && firstDifference(joined, expected) == nil)
        // Past the end of the file a vectored read is short, which is corruption for the caller.
        await #expect(throws: BlockError.self) {
            try await file.readExactly(vector: back.map(\.bytes), at: (1 << 20) - 10)
        }
    }

    @Test func anIOBufferGivesItsBudgetBack() async {
        let budget = MemoryBudget(limit: 1 << 20, requestHeadroom: 1 << 20)
        do {
            let buffer = await IOBuffer(count: 4096, budget: budget)
            #expect(budget.used == 4096 && buffer.count == 4096)
        }
        #expect(budget.used == 0)
    }
}

/// Reads that miss the page cache may go around it with O_DIRECT; results must not change.
@Suite struct DirectHostReadTests {
    @Test func alignedMissesReadTheSameBytesAroundThePageCache() async throws {
        // On /var/tmp (a disk file system): tmpfs refuses O_DIRECT, which must fall back quietly.
        for directory in ["/var/tmp", "/tmp"] {
            let path = directory + "/imgfs-direct-\(UInt64.random(in: 0...UInt64.max)).img"
            defer { unlink(path) }
            let bytes = (0..<(1 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 3) }
            FileManager.default.createFile(atPath: path, contents: Data(bytes))
            let file = try HostFile.open(path, readOnly: true)
            HostReadPolicy.configure(directMisses: true)
            defer { HostReadPolicy.configure(directMisses: false) }
            _ = posix_fadvise(file.descriptor, 0, 0, POSIX_FADV_DONTNEED)
            let aligned = UnsafeMutableRawBufferPointer.allocate(byteCount: 65536, alignment: 4096)
            defer { aligned.deallocate() }
            for offset in [0, 4096, 1 << 19, (1 << 20) - 65536] {
                #expect(try await file.read(into: aligned, at: Int64(offset)) == 65536)
                #expect(Array(aligned) == Array(bytes[offset..<(offset + 65536)]), "\(directory) at \(offset)")
            }
            // Past the end: short, as buffered reads are.
            #expect(try await file.read(into: aligned, at: (1 << 20) - 4096) == 4096)
            // Unaligned reads take the buffered path.
            let odd = UnsafeMutableRawBufferPointer(rebasing: aligned[1..<1001])
            #expect(try await file.read(into: odd, at: 7) == 1000)
            #expect(Array(odd) == Array(bytes[7..<1007]))
        }
    }
}
