import Foundation
import Testing
@testable import ImgfsBlock

/// The raw driver against the host file it wraps.
@Suite struct RawDriverTests {
    private func sparseImage(_ scratch: QemuScratch) throws -> String {
        let path = scratch.path("s.raw")
        // Not qemu-img create: it writes the first 4 KiB of a raw image (to probe alignment later).
        #expect(FileManager.default.createFile(atPath: path, contents: nil))
        #expect(truncate(path, 16 << 20) == 0)
        try scratch.qemuIO("s.raw", format: "raw", ["write -P 0x61 4M 1M", "write -P 0x62 12M 64k"])
        return path
    }

    @Test func blockStatusFollowsHostHoles() async throws {
        let scratch = try QemuScratch()
        let node = try await ImageOpener.open(try sparseImage(scratch), options: OpenOptions(
            readOnly: true, format: .raw, pathPolicy: try PathPolicy()))
        var extents: [(ChainBlockStatus.Kind, Int64, Int64)] = []
        var offset: Int64 = 0
        while offset < node.length {
            let status = try await node.chainBlockStatus(at: offset, length: node.length - offset)
            extents.append((status.kind, offset, status.length))
            offset += status.length
        }
        let data = extents.filter { $0.0 == .data }.map { [$0.1, $0.2] }
        #expect(data == [[4 << 20, 1 << 20], [12 << 20, 64 << 10]])
        #expect(extents.allSatisfy { $0.0 != .hole })  // raw decides every byte itself
    }

    @Test func writeZeroesTruncateAndReadBack() async throws {
        let scratch = try QemuScratch()
        let path = try sparseImage(scratch)
        let node = try await ImageOpener.open(path, options: OpenOptions(format: .raw, pathPolicy: try PathPolicy()))
        #expect(!node.isReadOnly)
        try await node.writeZeroes(at: 4 * 1048576 + 100, length: 5000, flags: .mayUnmap)
        try await node.writeZeroes(at: 12 * 1048576, length: 4096)
        let bytes = try await readNode(node, at: 4 * 1048576, count: 6000)
        #expect(bytes[0..<100].allSatisfy { $0 == 0x61 })
        #expect(bytes[100..<5100].allSatisfy { $0 == 0 })
        #expect(bytes[5100...].allSatisfy { $0 == 0x61 })
        try await node.truncate(to: 20 << 20)
        #expect(node.length == 20 << 20)
        #expect(try await readNode(node, at: 19 << 20, count: 4096).allSatisfy { $0 == 0 })
        try await node.truncate(to: 5 << 20)
        #expect(try FileManager.default.attributesOfItem(atPath: path)[.size] as? Int == 5 << 20)
        await #expect(throws: BlockError.self) { _ = try await readNode(node, at: 5 << 20, count: 1) }
        try await node.flush()
        let host = try scratch.read("s.raw", at: 4 << 20, count: 6000)
        #expect(host == bytes)
    }
}
