import Foundation
import Testing
@testable import ImgfsBlock

@Suite struct Qcow2UnitTests {
    @Test func lruForgetsTheLeastRecentlyUsedEntry() {
        var list = LRUList<Int, String>(capacity: 3)
        list.insert("a", for: 1)
        list.insert("b", for: 2)
        list.insert("c", for: 3)
        #expect(list.value(for: 1) == "a")  // 2 is now the oldest
        list.insert("d", for: 4)
        #expect(list.value(for: 2) == nil)
        #expect(list.value(for: 1) == "a" && list.value(for: 3) == "c" && list.value(for: 4) == "d")
        list.insert("c2", for: 3)
        list.insert("e", for: 5)  // evicts 1, the oldest after the reads above
        #expect(list.value(for: 1) == nil)
        #expect(list.value(for: 3) == "c2")
        #expect(list.count == 3)
    }

    private func layout(clusterBits: UInt32, extended: Bool = false, fileSize: Int64 = 1 << 40) throws -> Qcow2Layout {
        var bytes = [UInt8](repeating: 0, count: 112)
        bytes[0...3] = [0x51, 0x46, 0x49, 0xFB]
        bytes[7] = 3
        bytes[23] = UInt8(clusterBits)
        bytes[103] = 112
        if extended { bytes[79] = 0x10 }
        let header = try Qcow2Header(parsing: BigEndianBytes(bytes))
        return Qcow2Layout(header: header, fileSize: fileSize)
    }

    @Test func defaultL2CacheCoversTheDiskUpTo32MiB() throws {
        let sixtyFourK = try layout(clusterBits: 16)
        // 1 TiB needs 2048 tables of 64 KiB (128 MiB); the default stops at 32 MiB.
        #expect(Qcow2L2Cache.defaultCapacity(layout: sixtyFourK, virtualSize: 1 << 40, requestedBytes: nil) == 512)
        // A small disk gets exactly what it needs (one table), but never fewer than four.
        #expect(Qcow2L2Cache.defaultCapacity(layout: sixtyFourK, virtualSize: 8 << 20, requestedBytes: nil) == 4)
        #expect(Qcow2L2Cache.defaultCapacity(layout: sixtyFourK, virtualSize: 1 << 40, requestedBytes: 1 << 20) == 16)
    }

    @Test func compressedDescriptorSplitsOffsetAndSectors() throws {
        let layout = try layout(clusterBits: 16)
        // x = 62 - (16 - 8) = 54: offset in bits 0-53, additional sectors in bits 54-61.
        let entry: UInt64 = 1 << 62 | 3 << 54 | 0x10_0123
        guard case .success(.compressed(let cluster)) = Qcow2L2Entry.state(entry: entry, bitmap: 0, unit: 0, layout: layout) else {
            Issue.record("not decoded as compressed")
            return
        }
        #expect(cluster.hostOffset == 0x10_0123)
        #expect(cluster.maxCompressedBytes == 4 * 512 - 0x123)
    }

    @Test func extendedEntriesDecodePerSubcluster() throws {
        let layout = try layout(clusterBits: 17, extended: true)
        let entry: UInt64 = 1 << 63 | 0x20000
        let bitmap: UInt64 = 0b0010 | (0b0100 << 32)  // subcluster 1 allocated, 2 zero
        #expect(try Qcow2L2Entry.state(entry: entry, bitmap: bitmap, unit: 0, layout: layout).get() == .unallocated)
        #expect(try Qcow2L2Entry.state(entry: entry, bitmap: bitmap, unit: 1, layout: layout).get()
                == .data(hostOffset: 0x20000 + 4096))
        #expect(try Qcow2L2Entry.state(entry: entry, bitmap: bitmap, unit: 2, layout: layout).get() == .zero)
        // Allocated and zero at once is invalid; so is a compressed cluster with a bitmap.
        #expect(throws: L2EntryProblem.self) {
            try Qcow2L2Entry.state(entry: entry, bitmap: 1 | 1 << 32, unit: 0, layout: layout).get()
        }
        #expect(throws: L2EntryProblem.self) {
            try Qcow2L2Entry.state(entry: 1 << 62 | 0x1000, bitmap: 1, unit: 0, layout: layout).get()
        }
    }

    @Test func standardEntriesRejectReservedBitsAndMisalignment() throws {
        let layout = try layout(clusterBits: 16)
        #expect(throws: L2EntryProblem.self) {
            try Qcow2L2Entry.state(entry: 1 << 63 | 0x10000 | 1 << 57, bitmap: 0, unit: 0, layout: layout).get()
        }
        #expect(throws: L2EntryProblem.self) {
            try Qcow2L2Entry.state(entry: 1 << 63 | 0x10200, bitmap: 0, unit: 0, layout: layout).get()
        }
        #expect(try Qcow2L2Entry.state(entry: 0x10001, bitmap: 0, unit: 0, layout: layout).get() == .zero)
        #expect(try Qcow2L2Entry.state(entry: 0, bitmap: 0, unit: 0, layout: layout).get() == .unallocated)
    }

    @Test func tinyMetadataCacheStillReadsCorrectly() async throws {
        let scratch = try QemuScratch()
        try scratch.qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", scratch.path("t.qcow2"), "4M")
        try scratch.qemuIO("t.qcow2", ["write -P 0x21 0 1M", "write -P 0x22 2M 1M", "write -z 512k 64k"])
        let expected = try scratch.rawContents("t.qcow2")
        let node = try await ImageOpener.open(scratch.path("t.qcow2"), options: OpenOptions(
            readOnly: true, pathPolicy: try PathPolicy(), metadataCacheBytes: 2048))
        let driver = try #require(node.driver as? Qcow2Driver)
        #expect(driver.clusterMap.cache.capacity == 4)
        #expect(try await readAll(node, chunk: 9999) == expected)
        #expect(driver.clusterMap.cache.count <= 4)
    }

    @Test func concurrentReadsAgree() async throws {
        let scratch = try QemuScratch()
        try scratch.qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", scratch.path("p.qcow2"), "16M")
        try scratch.qemuIO("p.qcow2", (0..<32).map { "write -P \($0 + 1) \($0 * 512 * 1024 + 1000) 200000" })
        let expected = try scratch.rawContents("p.qcow2")
        let node = try await openImage(scratch.path("p.qcow2"))
        let chunk = 1 << 20
        let pieces = try await withThrowingTaskGroup(of: (Int, [UInt8]).self) { group in
            for index in 0..<16 {
                group.addTask { (index, try await readNode(node, at: Int64(index * chunk), count: chunk)) }
            }
            var pieces: [Int: [UInt8]] = [:]
            for try await (index, bytes) in group { pieces[index] = bytes }
            return pieces
        }
        let joined = (0..<16).flatMap { pieces[$0] ?? [] }
        #expect(joined == expected)
    }

    @Test func snapshotViewKeepsTheBackingFile() async throws {
        let scratch = try QemuScratch()
        try scratch.qemuImg("create", "-q", "-f", "raw", scratch.path("base.raw"), "2M")
        try scratch.qemuIO("base.raw", format: "raw", ["write -P 0x99 0 2M"])
        try scratch.qemuImg("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", scratch.path("o.qcow2"), "4M")
        try scratch.qemuIO("o.qcow2", ["write -P 0x10 64k 64k"])
        try scratch.qemuImg("snapshot", "-c", "s1", scratch.path("o.qcow2"))
        try scratch.qemuIO("o.qcow2", ["write -P 0x20 0 1M"])
        let node = try await openImage(scratch.path("o.qcow2"))
        let snapshot = try #require(node.driver.snapshots.first)
        let view = try await node.driver.openSnapshot(snapshot)
        let viewNode = BlockNode(path: node.path, driver: view, children: node.children, readOnly: true, ownsChildren: false)
        #expect(try await readAll(viewNode) == (try scratch.rawContents("o.qcow2", snapshot: "s1")))
        await #expect(throws: BlockError.readOnly) { try await view.discard(at: 0, length: 512) }
    }
}
