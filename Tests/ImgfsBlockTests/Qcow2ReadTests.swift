import Foundation
import Testing
@testable import ImgfsBlock
import ImgfsTestSupport

/// qemu-io commands writing distinct patterns at scattered offsets of a disk of `size` bytes.
private func scatteredWrites(size: Int64) -> [String] {
    let mib: Int64 = 1 << 20
    return [
        "write -P 0x11 0 65536",
        "write -P 0x22 \(mib + 512) 70000",
        "write -P 0x33 \(3 * mib - 4096) 12288",
        "write -P 0x44 \(size / 2 + 1000) 300000",
        "write -P 0x55 \(size - 8192) 8192",
    ]
}

/// Reads the whole image through imgfs and expects qemu-img's raw conversion, byte for byte.
private func expectSameAsQemu(_ scratch: QemuScratch, _ image: String, chunk: Int = 100_003,
                              sourceLocation: SourceLocation = #_sourceLocation) async throws {
    let expected = try scratch.rawContents(image)
    let node = try await openImage(scratch.path(image))
    #expect(node.length == Int64(expected.count), sourceLocation: sourceLocation)
    let actual = try await readAll(node, chunk: chunk)
    if actual != expected {
        Issue.record("\(image): contents differ from qemu-img at byte \(firstDifference(actual, expected) ?? -1)",
                     sourceLocation: sourceLocation)
    }
}

@Suite struct Qcow2ReadTests {
    @Test(arguments: (9...21).map { 1 << $0 })  // 512 B ... 2 MiB, every size qcow2 allows
    func everyClusterSizeReadsLikeQemu(clusterSize: Int) async throws {
        let scratch = try QemuScratch()
        let size: Int64 = 16 << 20
        try scratch.qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=\(clusterSize)", scratch.path("a.qcow2"), "\(size)")
        try scratch.qemuIO("a.qcow2", scatteredWrites(size: size))
        try await expectSameAsQemu(scratch, "a.qcow2")
    }

    @Test(arguments: ["0.10", "1.1"])
    func bothCompatLevels(compat: String) async throws {
        let scratch = try QemuScratch()
        try scratch.qemuImg("create", "-q", "-f", "qcow2", "-o", "compat=\(compat)", scratch.path("a.qcow2"), "8M")
        try scratch.qemuIO("a.qcow2", scatteredWrites(size: 8 << 20) + ["write -z 65536 131072"])
        try await expectSameAsQemu(scratch, "a.qcow2", chunk: 65_537)
        let node = try await openImage(scratch.path("a.qcow2"))
        #expect(node.driver.formatInfo()["compat"] == .string(compat))
    }

    @Test(arguments: [16 << 10, 64 << 10, 2 << 20])  // extended L2 needs clusters of at least 16 KiB
    func extendedL2AtClusterSize(clusterSize: Int) async throws {
        let scratch = try QemuScratch()
        let size: Int64 = 16 << 20
        try scratch.qemuImg("create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=\(clusterSize)",
                            scratch.path("x.qcow2"), "\(size)")
        let sub = clusterSize / 32
        try scratch.qemuIO("x.qcow2", scatteredWrites(size: size) + [
            "write -P 0x71 \(sub) \(sub)", "write -z \(3 * sub) \(2 * sub)", "write -P 0x72 \(clusterSize + 5 * sub) 700",
            "discard \(4 << 20) \(clusterSize)",
        ])
        try await expectSameAsQemu(scratch, "x.qcow2")
    }

    @Test func extendedL2SubclustersOverABackingFile() async throws {
        let scratch = try QemuScratch()
        try scratch.qemuImg("create", "-q", "-f", "raw", scratch.path("base.raw"), "8M")
        try scratch.qemuIO("base.raw", format: "raw", ["write -P 0xbb 0 8M"])
        try scratch.qemuImg("create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=128k",
                            "-b", "base.raw", "-F", "raw", scratch.path("ext.qcow2"), "8M")
        try scratch.qemuIO("ext.qcow2", [
            "write -P 0x22 4k 4k", "write -P 0x33 132k 8k", "write -z 40k 4k", "write -z 256k 128k",
            "write -P 0x44 1028k 4k", "write -P 0x45 1036k 4k", "write -z 1032k 4k", "write -P 0x66 7M 20k",
        ])
        try await expectSameAsQemu(scratch, "ext.qcow2", chunk: 3001)
        let node = try await openImage(scratch.path("ext.qcow2"))
        #expect(node.driver.formatInfo()["extended-l2"] == .bool(true))
        // Subcluster 0 of cluster 0 is unallocated, subcluster 1 holds data.
        #expect(try await node.driver.blockStatus(at: 0, length: 4096).kind == .unallocated)
        #expect(try await node.driver.blockStatus(at: 4096, length: 4096).kind == .data)
        #expect(try await node.driver.blockStatus(at: 40 << 10, length: 4096).kind == .zero)
    }

    @Test(arguments: ["zlib", "zstd"])
    func compressedClusters(type: String) async throws {
        let scratch = try QemuScratch()
        try scratch.qemuImg("create", "-q", "-f", "qcow2", scratch.path("src.qcow2"), "8M")
        try scratch.qemuIO("src.qcow2", scatteredWrites(size: 8 << 20) + ["write -P 0x77 2M 1M"])
        try scratch.qemuImg("convert", "-c", "-O", "qcow2", "-o", "compression_type=\(type)",
                            scratch.path("src.qcow2"), scratch.path("c.qcow2"))
        try await expectSameAsQemu(scratch, "c.qcow2", chunk: 4099)
        let node = try await openImage(scratch.path("c.qcow2"))
        #expect(node.driver.formatInfo()["compression-type"] == .string(type))
        let status = try await node.driver.blockStatus(at: 0, length: 65536)
        #expect(status.kind == .data && status.hostOffset == nil)
    }

    @Test func zeroAndDiscardedClusters() async throws {
        let scratch = try QemuScratch()
        try scratch.qemuImg("create", "-q", "-f", "qcow2", scratch.path("z.qcow2"), "8M")
        try scratch.qemuIO("z.qcow2", [
            "write -P 0x11 0 4M", "write -z 64k 192k", "discard 1M 512k", "write -z -u 2M 128k",
        ])
        try await expectSameAsQemu(scratch, "z.qcow2")
        let node = try await openImage(scratch.path("z.qcow2"))
        #expect(try await node.driver.blockStatus(at: 65536, length: 1 << 20).kind == .zero)
    }

    @Test func virtualSizeNotAMultipleOfTheCluster() async throws {
        let scratch = try QemuScratch()
        try scratch.qemuImg("create", "-q", "-f", "qcow2", scratch.path("odd.qcow2"), "10000005")
        try scratch.qemuIO("odd.qcow2", ["write -P 0x5a 9999872 133", "write -P 0x12 0 1000"])
        try await expectSameAsQemu(scratch, "odd.qcow2", chunk: 77_777)
    }

    @Test func oneTebibyteSparseImage() async throws {
        let scratch = try QemuScratch()
        let tib: Int64 = 1 << 40
        let mib = 1 << 20
        try scratch.qemuImg("create", "-q", "-f", "qcow2", scratch.path("big.qcow2"), "1T")
        try scratch.qemuIO("big.qcow2", [
            "write -P 0x01 0 1M", "write -P 0x02 \(tib / 2) 1M", "write -P 0x03 \(tib - Int64(mib)) 1M",
        ])
        let node = try await openImage(scratch.path("big.qcow2"))
        #expect(node.length == tib)
        #expect(try await readNode(node, at: 0, count: mib) == [UInt8](repeating: 1, count: mib))
        #expect(try await readNode(node, at: tib / 2, count: mib) == [UInt8](repeating: 2, count: mib))
        #expect(try await readNode(node, at: tib - Int64(mib), count: mib) == [UInt8](repeating: 3, count: mib))
        #expect(try await readNode(node, at: tib / 4, count: mib) == [UInt8](repeating: 0, count: mib))
    }

    @Test func chainRawUnderTwoQcow2Layers() async throws {
        let scratch = try QemuScratch()
        try scratch.qemuImg("create", "-q", "-f", "raw", scratch.path("base.raw"), "3M")
        try scratch.qemuIO("base.raw", format: "raw", ["write -P 0xa1 0 3M"])
        try scratch.qemuImg("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", scratch.path("mid.qcow2"), "8M")
        try scratch.qemuIO("mid.qcow2", ["write -P 0xb2 1M 64k", "write -P 0xb3 5M 64k", "write -z 2M 64k"])
        try scratch.qemuImg("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", scratch.path("top.qcow2"), "8M")
        try scratch.qemuIO("top.qcow2", ["write -P 0xc4 1056k 64k", "write -P 0xc5 2900k 300k"])
        try await expectSameAsQemu(scratch, "top.qcow2", chunk: 33_333)
        let node = try await openImage(scratch.path("top.qcow2"))
        #expect(node.chain.count == 3)
        #expect(node.driver.backingReference == BackingReference(name: "mid.qcow2", format: .qcow2))
        #expect(node.driver.formatInfo()["backing-filename-format"] == .string("qcow2"))
    }

    @Test func internalSnapshotView() async throws {
        let scratch = try QemuScratch()
        try scratch.qemuImg("create", "-q", "-f", "qcow2", scratch.path("s.qcow2"), "8M")
        try scratch.qemuIO("s.qcow2", ["write -P 0x10 0 2M"])
        try scratch.qemuImg("snapshot", "-c", "s1", scratch.path("s.qcow2"))
        try scratch.qemuIO("s.qcow2", ["write -P 0x20 1M 2M", "write -z 0 64k"])
        try scratch.qemuImg("snapshot", "-c", "s2", scratch.path("s.qcow2"))
        let node = try await openImage(scratch.path("s.qcow2"))
        let snapshots = node.driver.snapshots
        #expect(snapshots.map(\.name) == ["s1", "s2"])
        #expect(snapshots.allSatisfy { $0.diskSize == 8 << 20 })
        let s1 = try #require(snapshots.first)
        let view = try await node.driver.openSnapshot(s1)
        #expect(view.isReadOnly)
        let viewNode = BlockNode(path: scratch.path("s.qcow2"), driver: view, file: nil, backing: nil, readOnly: true)
        let expected = try scratch.rawContents("s.qcow2", snapshot: "s1")
        #expect(try await readAll(viewNode) == expected)
        #expect(try await readAll(node) == (try scratch.rawContents("s.qcow2")))
    }

    @Test func blockStatusMatchesQemuImgMap() async throws {
        let scratch = try QemuScratch()
        try scratch.qemuImg("create", "-q", "-f", "qcow2", scratch.path("m.qcow2"), "16M")
        try scratch.qemuIO("m.qcow2", [
            "write -P 0x11 0 1M", "write -z 256k 128k", "write -P 0x12 3M 64k", "write -P 0x13 2M 64k",
            "discard 512k 64k", "write -P 0x14 15M 1M", "write -z 10M 1M",
        ])
        let json = try scratch.run("qemu-img", ["map", "--output=json", scratch.path("m.qcow2")])
        let entries = try #require(try JSONSerialization.jsonObject(with: json) as? [[String: Any]])
        var qemu: [MapExtent] = []
        for entry in entries {
            let data = entry["data"] as? Bool ?? false
            let zero = entry["zero"] as? Bool ?? false
            let present = entry["present"] as? Bool ?? true
            let kind = data ? "data" : (present && zero ? "zero" : "hole")
            qemu.append(MapExtent(start: (entry["start"] as? NSNumber)?.int64Value ?? -1,
                                  length: (entry["length"] as? NSNumber)?.int64Value ?? -1, kind: kind,
                                  hostOffset: data ? (entry["offset"] as? NSNumber)?.int64Value : nil))
        }
        let node = try await openImage(scratch.path("m.qcow2"))
        var ours: [MapExtent] = []
        var offset: Int64 = 0
        while offset < node.length {
            let status = try await node.chainBlockStatus(at: offset, length: node.length - offset)
            let kind = status.kind == .data ? "data" : status.kind == .zero ? "zero" : "hole"
            ours.append(MapExtent(start: offset, length: status.length, kind: kind, hostOffset: status.hostOffset))
            offset += status.length
        }
        #expect(MapExtent.merged(ours) == MapExtent.merged(qemu))
        #expect(MapExtent.merged(ours).count >= 5)
    }

    @Test(arguments: [0, 6])
    func refcountOrders(order: Int) async throws {
        let scratch = try QemuScratch()
        try scratch.qemuImg("create", "-q", "-f", "qcow2", "-o", "refcount_bits=\(1 << order)", scratch.path("r.qcow2"), "4M")
        try scratch.qemuIO("r.qcow2", ["write -P 0x31 64k 128k"])
        try await expectSameAsQemu(scratch, "r.qcow2")
        let node = try await openImage(scratch.path("r.qcow2"))
        let driver = try #require(node.driver as? Qcow2Driver)
        #expect(driver.formatInfo()["refcount-bits"] == .int(Int64(1) << Int64(order)))
        let refcounts = try await driver.loadRefcounts()
        #expect(try await refcounts.refcount(ofHostCluster: 0) == 1)  // the header cluster
        let l1Cluster = Int64(driver.header.l1TableOffset) >> Int64(driver.layout.clusterBits)
        #expect(try await refcounts.refcount(ofHostCluster: l1Cluster) == 1)
        let status = try await driver.blockStatus(at: 65536, length: 65536)
        let dataCluster = try #require(status.hostOffset) >> Int64(driver.layout.clusterBits)
        #expect(try await refcounts.refcount(ofHostCluster: dataCluster) == 1)
        let pastEnd = (try node.file!.size() >> Int64(driver.layout.clusterBits)) + 10
        #expect(try await refcounts.refcount(ofHostCluster: pastEnd) == 0)
    }

    @Test func refcountsAfterASnapshotAreTwo() async throws {
        let scratch = try QemuScratch()
        try scratch.qemuImg("create", "-q", "-f", "qcow2", scratch.path("r.qcow2"), "4M")
        try scratch.qemuIO("r.qcow2", ["write -P 0x31 0 64k"])
        try scratch.qemuImg("snapshot", "-c", "snap", scratch.path("r.qcow2"))
        let node = try await openImage(scratch.path("r.qcow2"))
        let driver = try #require(node.driver as? Qcow2Driver)
        let host = try #require(try await driver.blockStatus(at: 0, length: 65536).hostOffset)
        let refcounts = try await driver.loadRefcounts()
        #expect(try await refcounts.refcount(ofHostCluster: host >> 16) == 2)
    }

    @Test func formatInfoNamesFieldsLikeQemu() async throws {
        let scratch = try QemuScratch()
        try scratch.qemuImg("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=4k", scratch.path("i.qcow2"), "1M")
        let node = try await openImage(scratch.path("i.qcow2"))
        let info = node.driver.formatInfo()
        #expect(info["compat"] == .string("1.1"))
        #expect(info["cluster-size"] == .int(4096))
        #expect(info["refcount-bits"] == .int(16))
        #expect(info["lazy-refcounts"] == .bool(true))
        #expect(info["corrupt"] == .bool(false))
        #expect(info["extended-l2"] == .bool(false))
        #expect(info["backing-filename"] == nil)
    }

    @Test func readOnlyOpensRefuseWrites() async throws {
        let scratch = try QemuScratch()
        try scratch.qemuImg("create", "-q", "-f", "qcow2", scratch.path("w.qcow2"), "1M")
        let bytes = UnsafeMutableRawBufferPointer.allocate(byteCount: 512, alignment: 16)
        defer { bytes.deallocate() }
        bytes.initializeMemory(as: UInt8.self, repeating: 1)
        let source = UncheckedSendable(UnsafeRawBufferPointer(bytes))
        let readOnly = try await openImage(scratch.path("w.qcow2"))
        await #expect(throws: BlockError.readOnly) { try await readOnly.write(at: 0, from: source.value) }
        await #expect(throws: BlockError.readOnly) { try await readOnly.driver.write(at: 0, from: source.value, flags: []) }
        await #expect(throws: BlockError.readOnly) { try await readOnly.driver.writeZeroes(at: 0, length: 512, flags: []) }
        await #expect(throws: BlockError.readOnly) { try await readOnly.driver.discard(at: 0, length: 512) }
        await #expect(throws: BlockError.readOnly) { try await readOnly.driver.truncate(to: 2 << 20) }
    }

    @Test func readWriteOpenKeepsTheBitmapsBitAndClearsUnknownAutoclearBits() async throws {
        let scratch = try QemuScratch()
        try scratch.qemuImg("create", "-q", "-f", "qcow2", scratch.path("b.qcow2"), "1M")
        try scratch.qemuImg("bitmap", "--add", scratch.path("b.qcow2"), "b0")
        // Bit 0 (bitmaps) is set by qemu-img; bit 5 means nothing to anyone.
        try scratch.patch("b.qcow2", at: 88, [0, 0, 0, 0, 0, 0, 0, 0x21])
        _ = try await openImage(scratch.path("b.qcow2"))
        #expect(try scratch.read("b.qcow2", at: 88, count: 8) == [0, 0, 0, 0, 0, 0, 0, 0x21])
        let driver = try await openQcow2DriverReadWrite(scratch.path("b.qcow2"))
        #expect(try scratch.read("b.qcow2", at: 88, count: 8) == [0, 0, 0, 0, 0, 0, 0, 1])
        // While open for writing the enabled bitmap is marked in use, as QEMU marks it; a clean close clears it.
        let during = try runTool("qemu-img", ["info", "-U", "--output=json", scratch.path("b.qcow2")]).stdout
        #expect(during.contains("in-use"))
        try await driver.close()
        let after = try runTool("qemu-img", ["info", "--output=json", scratch.path("b.qcow2")]).stdout
        #expect(!after.contains("in-use") && after.contains("\"auto\""))
    }
}

/// One extent of a map, normalised so qemu-img's and ours can be compared regardless of how runs were split.
struct MapExtent: Equatable, CustomStringConvertible {
    var start: Int64
    var length: Int64
    var kind: String
    var hostOffset: Int64?

    var description: String { "\(start)+\(length) \(kind) \(hostOffset.map(String.init) ?? "-")" }

    static func merged(_ extents: [MapExtent]) -> [MapExtent] {
        var result: [MapExtent] = []
        for extent in extents {
            if var last = result.last, last.kind == extent.kind, last.start + last.length == extent.start,
               last.hostOffset.map({ $0 + last.length }) == extent.hostOffset {
                last.length += extent.length
                result[result.count - 1] = last
            } else {
                result.append(extent)
            }
        }
        return result
    }
}
