import Foundation
import Testing
import ImgfsTestSupport
@testable import ImgfsBlock

/// What `qemu-img check --output=json` reports; its absent optional fields are zero.
struct QemuCheck {
    let fields: [String: Int64]
    subscript(_ key: String) -> Int64 { fields[key] ?? 0 }
}

func qemuCheck(_ scratch: QemuScratch, _ image: String) throws -> QemuCheck {
    // Leaks and corruptions exit non-zero; the JSON on stdout is what matters.
    let output = try runTool("qemu-img", ["check", "--output=json", scratch.path(image)], cwd: scratch.directory.path,
                             check: false).outputData
    guard let object = try JSONSerialization.jsonObject(with: output) as? [String: Any] else {
        throw TestFailure("qemu-img check printed no JSON object")
    }
    var fields: [String: Int64] = [:]
    for (key, value) in object { if let number = value as? NSNumber { fields[key] = number.int64Value } }
    return QemuCheck(fields: fields)
}

private func imgfsCheck(_ scratch: QemuScratch, _ image: String) async throws -> Qcow2CheckResult {
    try await Qcow2Check.check(path: scratch.path(image))
}

/// Every count qemu-img reports, compared one by one so a failure names the field.
private func expectSameCounts(_ scratch: QemuScratch, _ image: String,
                              sourceLocation: SourceLocation = #_sourceLocation) async throws -> Qcow2CheckResult {
    let ours = try await imgfsCheck(scratch, image)
    let theirs = try qemuCheck(scratch, image)
    let pairs: [(String, Int64)] = [
        ("check-errors", Int64(ours.checkErrors)), ("leaks", Int64(ours.leaks)),
        ("corruptions", Int64(ours.corruptions)), ("image-end-offset", ours.imageEndOffset),
        ("total-clusters", ours.totalClusters), ("allocated-clusters", ours.allocatedClusters),
        ("fragmented-clusters", ours.fragmentedClusters), ("compressed-clusters", ours.compressedClusters),
    ]
    for (key, value) in pairs {
        #expect(value == theirs[key], "\(image): \(key) is \(value), qemu-img says \(theirs[key]); \(ours.messages)",
                sourceLocation: sourceLocation)
    }
    return ours
}

/// A 32 MiB image with data spread so that clusters fragment and several L2 tables fill on small clusters.
private func makeImage(_ scratch: QemuScratch, _ name: String, options: String? = nil, compressed: Bool = false)
    throws
{
    var arguments = ["create", "-q", "-f", "qcow2"]
    if let options { arguments += ["-o", options] }
    arguments += [scratch.path(name), "32M"]
    try scratch.run("qemu-img", arguments)
    let write = compressed ? "write -c" : "write"
    try scratch.qemuIO(name, ["write -P 0x61 0 1M", "write -P 0x62 20M 64k", "write -P 0x63 3M 192k",
                              "\(write) -P 0x64 8M 2M", "write -z 12M 64k", "write -P 0x65 512k 4k"])
}


/// Sets the 16-bit refcount of host cluster `cluster` (default refcount width, 64 KiB clusters).
private func patchRefcount(_ scratch: QemuScratch, _ image: String, cluster: UInt64, to refcount: UInt16) throws {
    let tableOffset = bigEndianValue(try scratch.read(image, at: 48, count: 8))
    let blockOffset = bigEndianValue(try scratch.read(image, at: tableOffset, count: 8)) & ~0x1FF
    try scratch.patch(image, at: blockOffset + 2 * cluster, [UInt8(refcount >> 8), UInt8(refcount & 0xFF)])
}

@Suite struct Qcow2CheckTests {
    @Test(arguments: [
        nil, "cluster_size=512", "cluster_size=2M", "refcount_bits=1", "refcount_bits=64",
        "extended_l2=on", "extended_l2=on,cluster_size=128k", "compat=0.10",
    ])
    func cleanImage(_ options: String?) async throws {
        let scratch = try QemuScratch()
        try makeImage(scratch, "c.qcow2", options: options)
        let result = try await expectSameCounts(scratch, "c.qcow2")
        #expect(result.leaks == 0 && result.corruptions == 0 && result.checkErrors == 0, "\(result.messages)")
        #expect(result.allocatedClusters > 0)
    }

    @Test(arguments: ["zlib", "zstd"])
    func compressedClusters(_ type: String) async throws {
        let scratch = try QemuScratch()
        try makeImage(scratch, "c.qcow2", options: "compression_type=\(type)", compressed: true)
        let result = try await expectSameCounts(scratch, "c.qcow2")
        #expect(result.compressedClusters > 0)
        #expect(result.corruptions == 0 && result.leaks == 0)
    }

    @Test func compressedSmallClusters() async throws {
        let scratch = try QemuScratch()
        try makeImage(scratch, "c.qcow2", options: "cluster_size=4k", compressed: true)
        _ = try await expectSameCounts(scratch, "c.qcow2")
    }

    @Test func twoSnapshots() async throws {
        let scratch = try QemuScratch()
        try makeImage(scratch, "s.qcow2")
        try scratch.qemuImg("snapshot", "-c", "one", scratch.path("s.qcow2"))
        try scratch.qemuIO("s.qcow2", ["write -P 0x71 0 256k", "write -P 0x72 16M 64k"])
        try scratch.qemuImg("snapshot", "-c", "two", scratch.path("s.qcow2"))
        try scratch.qemuIO("s.qcow2", ["write -P 0x73 128k 256k"])
        let result = try await expectSameCounts(scratch, "s.qcow2")
        #expect(result.corruptions == 0 && result.leaks == 0, "\(result.messages)")
    }

    @Test func backingFile() async throws {
        let scratch = try QemuScratch()
        try makeImage(scratch, "base.qcow2")
        try scratch.qemuImg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", scratch.path("top.qcow2"))
        try scratch.qemuIO("top.qcow2", ["write -P 0x81 64k 128k"])
        let result = try await expectSameCounts(scratch, "top.qcow2")
        #expect(result.corruptions == 0 && result.leaks == 0)
    }

    @Test func persistentBitmap() async throws {
        let scratch = try QemuScratch()
        try makeImage(scratch, "b.qcow2")
        try scratch.qemuImg("bitmap", "--add", scratch.path("b.qcow2"), "bm0")
        try scratch.qemuIO("b.qcow2", ["write -P 0x91 4M 1M"])
        let result = try await expectSameCounts(scratch, "b.qcow2")
        #expect(result.corruptions == 0 && result.leaks == 0, "\(result.messages)")
    }

    @Test func leakedCluster() async throws {
        let scratch = try QemuScratch()
        try makeImage(scratch, "l.qcow2")
        // Append a cluster nothing references and give it a refcount.
        let size = UInt64(try FileManager.default.attributesOfItem(atPath: scratch.path("l.qcow2"))[.size] as! Int)
        let cluster = (size + 65535) / 65536
        try scratch.patch("l.qcow2", at: cluster * 65536, [UInt8](repeating: 0, count: 65536))
        try patchRefcount(scratch, "l.qcow2", cluster: cluster, to: 1)
        let result = try await expectSameCounts(scratch, "l.qcow2")
        #expect(result.leaks == 1 && result.corruptions == 0)
    }

    @Test func raisedRefcountIsALeak() async throws {
        let scratch = try QemuScratch()
        try makeImage(scratch, "l.qcow2")
        try patchRefcount(scratch, "l.qcow2", cluster: 0, to: 2)
        let result = try await expectSameCounts(scratch, "l.qcow2")
        #expect(result.leaks == 1)
    }

    @Test func dataClusterWithRefcountZero() async throws {
        let scratch = try QemuScratch()
        try makeImage(scratch, "z.qcow2")
        let l1Offset = bigEndianValue(try scratch.read("z.qcow2", at: 40, count: 8))
        let l2Offset = bigEndianValue(try scratch.read("z.qcow2", at: l1Offset, count: 8)) & 0x00FF_FFFF_FFFF_FE00
        let host = bigEndianValue(try scratch.read("z.qcow2", at: l2Offset, count: 8)) & 0x00FF_FFFF_FFFF_FE00
        try patchRefcount(scratch, "z.qcow2", cluster: host / 65536, to: 0)
        let result = try await expectSameCounts(scratch, "z.qcow2")
        // The refcount below its one reference, and OFLAG_COPIED on a cluster whose refcount is not 1.
        #expect(result.corruptions == 2, "\(result.messages)")
    }

    @Test func misalignedSnapshotL1() async throws {
        let scratch = try QemuScratch()
        try makeImage(scratch, "s.qcow2")
        try scratch.qemuImg("snapshot", "-c", "one", scratch.path("s.qcow2"))
        try scratch.qemuIO("s.qcow2", ["write -P 0x71 0 256k"])
        let snapshots = bigEndianValue(try scratch.read("s.qcow2", at: 64, count: 8))
        let l1 = bigEndianValue(try scratch.read("s.qcow2", at: snapshots, count: 8))
        try scratch.patch("s.qcow2", at: snapshots, bigEndianBytes(l1 + 8))
        // The snapshot is not walked: one corruption, and what only it referenced leaks.
        let result = try await expectSameCounts(scratch, "s.qcow2")
        #expect(result.corruptions == 1 && result.leaks > 0)
    }

    @Test func misalignedL2Table() async throws {
        let scratch = try QemuScratch()
        try makeImage(scratch, "m.qcow2")
        let l1Offset = bigEndianValue(try scratch.read("m.qcow2", at: 40, count: 8))
        let entry = bigEndianValue(try scratch.read("m.qcow2", at: l1Offset, count: 8))
        try scratch.patch("m.qcow2", at: l1Offset, bigEndianBytes(entry + 0x200))
        let result = try await expectSameCounts(scratch, "m.qcow2")
        #expect(result.corruptions > 0 && result.leaks > 0)
    }

    /// An image killed during writes with lazy refcounts: the stored refcounts lag behind the references.
    @Test func lazyRefcountsAfterACrash() async throws {
        let scratch = try QemuScratch()
        try scratch.qemuImg("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", scratch.path("lz.qcow2"), "32M")
        _ = try runTool("qemu-io", ["-f", "qcow2", "-c", "write -P 1 0 1M", "-c", "write -P 2 10M 64k",
                                    "-c", "sigraise 9", scratch.path("lz.qcow2")], check: false)
        let result = try await expectSameCounts(scratch, "lz.qcow2")
        #expect(result.corruptions > 0)
    }

    @Test func misalignedRefcountBlockIsACheckError() async throws {
        let scratch = try QemuScratch()
        try makeImage(scratch, "r.qcow2")
        let tableOffset = bigEndianValue(try scratch.read("r.qcow2", at: 48, count: 8))
        let block = bigEndianValue(try scratch.read("r.qcow2", at: tableOffset, count: 8))
        try scratch.patch("r.qcow2", at: tableOffset, bigEndianBytes(block + 0x200))
        let result = try await expectSameCounts(scratch, "r.qcow2")
        #expect(result.checkErrors > 0 && result.corruptions == 1, "\(result.messages.prefix(5))")
    }

    @Test func refcountTablePastTheEndIsACleanError() async throws {
        let scratch = try QemuScratch()
        try makeImage(scratch, "h.qcow2")
        try scratch.patch("h.qcow2", at: 48, bigEndianBytes(UInt64(1) << 40))
        await #expect(throws: BlockError.self) { try await imgfsCheck(scratch, "h.qcow2") }
    }

    @Test func l2TablePastTheEndIsCounted() async throws {
        let scratch = try QemuScratch()
        try makeImage(scratch, "h.qcow2")
        let l1Offset = bigEndianValue(try scratch.read("h.qcow2", at: 40, count: 8))
        try scratch.patch("h.qcow2", at: l1Offset, bigEndianBytes(UInt64(1) << 63 | UInt64(1) << 40))
        let result = try await expectSameCounts(scratch, "h.qcow2")
        #expect(result.corruptions == 2, "\(result.messages)")
        #expect(result.leaks > 0)
    }

    @Test func hostileEntriesNeverTrap() async throws {
        let scratch = try QemuScratch()
        try makeImage(scratch, "h.qcow2", options: "cluster_size=512")
        let l1Offset = bigEndianValue(try scratch.read("h.qcow2", at: 40, count: 8))
        let l2Offset = bigEndianValue(try scratch.read("h.qcow2", at: l1Offset, count: 8)) & 0x00FF_FFFF_FFFF_FE00
        // An all-ones compressed entry, a misaligned data offset, a data offset at the top of the range.
        try scratch.patch("h.qcow2", at: l2Offset, bigEndianBytes(UInt64.max))
        try scratch.patch("h.qcow2", at: l2Offset + 8, bigEndianBytes(UInt64(1) << 63 | 0x1234_5600))
        try scratch.patch("h.qcow2", at: l2Offset + 16, bigEndianBytes(UInt64(0x00FF_FFFF_FFFF_FE00)))
        #expect(try await expectSameCounts(scratch, "h.qcow2").corruptions > 0)
        // Refcount table entries: reserved bits, misaligned, far past the end.
        let tableOffset = bigEndianValue(try scratch.read("h.qcow2", at: 48, count: 8))
        try scratch.patch("h.qcow2", at: tableOffset + 8, bigEndianBytes(UInt64(0x1FF)))
        try scratch.patch("h.qcow2", at: tableOffset + 16, bigEndianBytes(UInt64(0x10_0000_0200)))
        try scratch.patch("h.qcow2", at: tableOffset + 24, bigEndianBytes(UInt64(1) << 50))
        #expect(try await expectSameCounts(scratch, "h.qcow2").corruptions > 0)
    }
}
