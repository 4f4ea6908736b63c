import Foundation
import Testing
import ImgfsTestSupport
@testable import ImgfsBlock

/// Regressions for the read-path defects hostile testing found (issue 11), checked against QEMU where it reads.
@Suite struct ReadPathDefectTests {
    private func open(_ scratch: QemuScratch, _ name: String) async throws -> BlockNode {
        try await ImageOpener.open(scratch.path(name), options: OpenOptions(readOnly: true, format: .qcow2,
                                                                            pathPolicy: try PathPolicy()))
    }

    /// Offset of snapshot table entry `index` in `name`.
    private func snapshotEntry(_ scratch: QemuScratch, _ name: String, _ index: Int) throws -> UInt64 {
        var entry = bigEndianValue(try scratch.read(name, at: 64, count: 8))
        for _ in 0..<index {
            let idLength = bigEndianValue(try scratch.read(name, at: entry + 12, count: 2))
            let nameLength = bigEndianValue(try scratch.read(name, at: entry + 14, count: 2))
            let extra = bigEndianValue(try scratch.read(name, at: entry + 36, count: 4))
            entry += (40 + extra + idLength + nameLength + 7) / 8 * 8
        }
        return entry
    }

    /// An 8 MiB image with data, and snapshots s0, s1, s2 taken after successive writes.
    private func imageWithSnapshots(_ scratch: QemuScratch) throws {
        try scratch.qemuImg("create", "-q", "-f", "qcow2", scratch.path("s.qcow2"), "8M")
        for n in 0..<3 {
            try scratch.qemuIO("s.qcow2", ["write -P 0x\(n + 1)\(n + 1) \(n)M 64k"])
            try scratch.qemuImg("snapshot", "-c", "s\(n)", scratch.path("s.qcow2"))
        }
    }

    @Test func offsetsOf2To63WithEmptyTablesDoNotTrap() async throws {
        let scratch = try QemuScratch()
        // snapshots_offset 2^63 with no snapshots: nothing to read there.
        try scratch.qemuImg("create", "-q", "-f", "qcow2", scratch.path("a.qcow2"), "8M")
        try scratch.patch("a.qcow2", at: 64, bigEndianBytes(UInt64(1) << 63))
        #expect(try await open(scratch, "a.qcow2").length == 8 << 20)
        // l1_table_offset 2^64-1 with l1_size 0 on an empty disk.
        try scratch.qemuImg("create", "-q", "-f", "qcow2", scratch.path("b.qcow2"), "0")
        #expect(bigEndianValue(try scratch.read("b.qcow2", at: 36, count: 4)) == 0)
        try scratch.patch("b.qcow2", at: 40, bigEndianBytes(UInt64.max))
        #expect(try await open(scratch, "b.qcow2").length == 0)
        // A snapshot with l1_size 0 reads as unallocated, as in QEMU; one whose (unused) L1 offset is 2^63 is left
        // out, as QEMU refuses to load it.
        try imageWithSnapshots(scratch)
        try scratch.patch("s.qcow2", at: try snapshotEntry(scratch, "s.qcow2", 1) + 8, bigEndianBytes(UInt32(0)))
        let entry = try snapshotEntry(scratch, "s.qcow2", 2)
        try scratch.patch("s.qcow2", at: entry, bigEndianBytes(UInt64(1) << 63))
        try scratch.patch("s.qcow2", at: entry + 8, bigEndianBytes(UInt32(0)))
        let node = try await open(scratch, "s.qcow2")
        #expect(node.driver.snapshots.map(\.name) == ["s0", "s1"])
        #expect(node.warnings.count == 1)
        let view = try await node.driver.openSnapshot(node.driver.snapshots[1])
        let viewNode = BlockNode(path: "view", driver: view, file: nil, backing: nil, readOnly: true)
        let expected = try scratch.rawContents("s.qcow2", snapshot: "s1")
        #expect(try await readAll(viewNode) == expected)
        #expect(isZero(expected))
    }

    @Test func badSnapshotEntriesAreLeftOutAndTheDiskStillReads() async throws {
        let scratch = try QemuScratch()
        try imageWithSnapshots(scratch)
        let active = try scratch.rawContents("s.qcow2")
        // s0: VM state size 2^63 in its extra data.
        try scratch.patch("s.qcow2", at: try snapshotEntry(scratch, "s.qcow2", 0) + 40, bigEndianBytes(UInt64(1) << 63))
        // s1: its L1 table past the end of the file.
        try scratch.patch("s.qcow2", at: try snapshotEntry(scratch, "s.qcow2", 1), bigEndianBytes(UInt64(1) << 40))
        let node = try await open(scratch, "s.qcow2")
        #expect(node.driver.snapshots.map(\.name) == ["s2"])
        #expect(node.warnings.count == 2)
        #expect(node.warnings.allSatisfy { $0.contains("left out") })
        #expect(try await readAll(node) == active)
        let s2 = try await node.driver.openSnapshot(node.driver.snapshots[0])
        let view = BlockNode(path: "view", driver: s2, file: nil, backing: nil, readOnly: true)
        #expect(try await readAll(view) == (try scratch.rawContents("s.qcow2", snapshot: "s2")))
    }

    @Test func snapshotCountLargerThanTheTableKeepsWhatIsThere() async throws {
        let scratch = try QemuScratch()
        try imageWithSnapshots(scratch)
        let active = try scratch.rawContents("s.qcow2")
        // Move the table so that it ends at the end of the file, then claim more entries than it has.
        let tableStart = bigEndianValue(try scratch.read("s.qcow2", at: 64, count: 8))
        let tableEnd = try snapshotEntry(scratch, "s.qcow2", 3)
        let table = try scratch.read("s.qcow2", at: tableStart, count: Int(tableEnd - tableStart))
        let size = UInt64(try FileManager.default.attributesOfItem(atPath: scratch.path("s.qcow2"))[.size] as! Int)
        let newStart = (size + 65535) / 65536 * 65536
        try scratch.patch("s.qcow2", at: newStart, table)
        try scratch.patch("s.qcow2", at: 64, bigEndianBytes(newStart))
        try scratch.patch("s.qcow2", at: 60, bigEndianBytes(UInt32(1000)))
        let node = try await open(scratch, "s.qcow2")
        #expect(node.driver.snapshots.map(\.name) == ["s0", "s1", "s2"])
        #expect(node.warnings.contains { $0.contains("nb_snapshots is 1000") })
        #expect(try await readAll(node) == active)
    }

    @Test func zeroFlagInAVersion2ImageIsCorruptionAsInQemu() async throws {
        let scratch = try QemuScratch()
        try scratch.qemuImg("create", "-q", "-f", "qcow2", "-o", "compat=0.10", scratch.path("v2.qcow2"), "8M")
        try scratch.qemuIO("v2.qcow2", ["write -P 0x61 0 128k"])
        let l1Offset = bigEndianValue(try scratch.read("v2.qcow2", at: 40, count: 8))
        let l2Offset = bigEndianValue(try scratch.read("v2.qcow2", at: l1Offset, count: 8)) & 0x00FF_FFFF_FFFF_FE00
        let entry = bigEndianValue(try scratch.read("v2.qcow2", at: l2Offset + 8, count: 8))
        try scratch.patch("v2.qcow2", at: l2Offset + 8, bigEndianBytes(entry | 1))
        // qemu-img refuses to convert it (its read fails as corrupt), and our read of that cluster fails too.
        #expect(throws: (any Error).self) { _ = try scratch.rawContents("v2.qcow2") }
        let node = try await open(scratch, "v2.qcow2")
        await #expect {
            _ = try await readNode(node, at: 65536, count: 512)
        } throws: { "\($0)".contains("version 2") }
        #expect(try await readNode(node, at: 0, count: 65536) == [UInt8](repeating: 0x61, count: 65536))
    }

    @Test func virtualSizeIsRoundedDownToSectorsAsInQemu() async throws {
        let scratch = try QemuScratch()
        try scratch.qemuImg("create", "-q", "-f", "qcow2", scratch.path("odd.qcow2"), "8M")
        try scratch.qemuIO("odd.qcow2", ["write -P 0x61 0 8M"])
        try scratch.patch("odd.qcow2", at: 24, bigEndianBytes(UInt64(8 << 20) - 100))
        let node = try await open(scratch, "odd.qcow2")
        let expected = try scratch.rawContents("odd.qcow2")
        #expect(node.length == Int64(expected.count))
        #expect(node.length == (8 << 20) - 512)
        #expect(try await readAll(node) == expected)
    }

    @Test func headerLengthIsBlamedOnItself() async throws {
        let scratch = try QemuScratch()
        for length in [UInt32(103), 113] {
            try scratch.qemuImg("create", "-q", "-f", "qcow2", scratch.path("h.qcow2"), "8M")
            try scratch.patch("h.qcow2", at: 100, bigEndianBytes(length))
            await #expect {
                _ = try await open(scratch, "h.qcow2")
            } throws: { "\($0)".contains("header_length \(length)") && !"\($0)".contains("extension") }
        }
    }

    @Test func compressedStreamLongerThanAClusterIsEIO() async throws {
        // QEMU keeps the first cluster's worth of such a stream; no writer makes one, so we call it corrupt
        // (README: where we differ on purpose).
        let scratch = try QemuScratch()
        try scratch.qemuImg("create", "-q", "-f", "qcow2", scratch.path("src.qcow2"), "1M")
        try scratch.qemuIO("src.qcow2", ["write -P 0x61 0 1M"])
        try scratch.qemuImg("convert", "-q", "-c", "-O", "qcow2", scratch.path("src.qcow2"), scratch.path("c.qcow2"))
        let l1Offset = bigEndianValue(try scratch.read("c.qcow2", at: 40, count: 8))
        let l2Offset = bigEndianValue(try scratch.read("c.qcow2", at: l1Offset, count: 8)) & 0x00FF_FFFF_FFFF_FE00
        // Two stored deflate blocks of 65,535 and 2 zero bytes: one byte more than a 64 KiB cluster. Appended to
        // the file, and the first cluster's descriptor pointed at it (64 KiB clusters: offset bits 0-53).
        let stream = storedBlock(65535, final: false) + storedBlock(2, final: true)
        let size = UInt64(try FileManager.default.attributesOfItem(atPath: scratch.path("c.qcow2"))[.size] as! Int)
        let host = (size + 511) / 512 * 512
        try scratch.patch("c.qcow2", at: host, stream)
        let sectors = UInt64((stream.count + 511) / 512)
        try scratch.patch("c.qcow2", at: l2Offset, bigEndianBytes(UInt64(1) << 62 | (sectors - 1) << 54 | host))
        let node = try await open(scratch, "c.qcow2")
        await #expect(throws: BlockError.self) { _ = try await readNode(node, at: 0, count: 4096) }
        #expect(try await readNode(node, at: 65536, count: 4096) == [UInt8](repeating: 0x61, count: 4096))
    }

    /// A stored (uncompressed) raw deflate block of `count` zero bytes.
    private func storedBlock(_ count: Int, final: Bool) -> [UInt8] {
        let length = UInt16(count)
        return [final ? 1 : 0, UInt8(length & 0xFF), UInt8(length >> 8), UInt8(~length & 0xFF), UInt8(~length >> 8)]
            + [UInt8](repeating: 0, count: count)
    }

    private func isZero(_ bytes: [UInt8]) -> Bool { bytes.allSatisfy { $0 == 0 } }
}
