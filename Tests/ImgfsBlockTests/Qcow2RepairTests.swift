import Foundation
import Testing
import ImgfsTestSupport
@testable import ImgfsBlock

/// Reads and patches an image's refcounts by hand, for any cluster size and refcount width.
private struct RefcountPatcher {
    let scratch: QemuScratch
    let image: String
    let clusterSize: UInt64
    let refcountBits: UInt64

    init(_ scratch: QemuScratch, _ image: String) throws {
        self.scratch = scratch
        self.image = image
        clusterSize = 1 << bigEndianValue(try scratch.read(image, at: 20, count: 4))
        let version = bigEndianValue(try scratch.read(image, at: 4, count: 4))
        refcountBits = 1 << (version >= 3 ? bigEndianValue(try scratch.read(image, at: 96, count: 4)) : 4)
    }

    var fileClusters: UInt64 {
        get throws {
            let size = UInt64(try FileManager.default.attributesOfItem(atPath: scratch.path(image))[.size] as! Int)
            return (size + clusterSize - 1) / clusterSize
        }
    }

    /// The refcount block byte holding `cluster`'s refcount and the bit it starts at; nil when it has no block.
    private func location(_ cluster: UInt64) throws -> (offset: UInt64, bit: UInt64)? {
        let perBlock = clusterSize * 8 / refcountBits
        let table = bigEndianValue(try scratch.read(image, at: 48, count: 8))
        let tableClusters = bigEndianValue(try scratch.read(image, at: 56, count: 4))
        let index = cluster / perBlock
        guard index * 8 < tableClusters * clusterSize else { return nil }
        let block = bigEndianValue(try scratch.read(image, at: table + index * 8, count: 8)) & ~0x1FF
        guard block != 0 else { return nil }
        let bit = (cluster % perBlock) * refcountBits
        return (block + bit / 8, bit % 8)
    }

    func refcount(_ cluster: UInt64) throws -> UInt64? {
        guard let (offset, bit) = try location(cluster) else { return nil }
        let bytes = try scratch.read(image, at: offset, count: Int(max(1, refcountBits / 8)))
        if refcountBits >= 8 { return bigEndianValue(bytes) }
        return UInt64(bytes[0] >> UInt8(bit)) & ((1 << refcountBits) - 1)
    }

    func setRefcount(_ cluster: UInt64, to value: UInt64) throws {
        guard let (offset, bit) = try location(cluster) else { throw TestFailure("cluster \(cluster) has no refcount block") }
        if refcountBits >= 8 {
            let width = Int(refcountBits / 8)
            try scratch.patch(image, at: offset, (0..<width).map { UInt8(truncatingIfNeeded: value >> UInt64(8 * (width - 1 - $0))) })
            return
        }
        let mask = UInt8((1 << refcountBits) - 1) << UInt8(bit)
        let byte = try scratch.read(image, at: offset, count: 1)[0]
        try scratch.patch(image, at: offset, [byte & ~mask | (UInt8(value) << UInt8(bit)) & mask])
    }

    /// A cluster inside the file whose refcount is 0 (one that was discarded), covered by a refcount block.
    func freeCluster() throws -> UInt64 {
        for cluster in 1..<(try fileClusters) where try refcount(cluster) == 0 { return cluster }
        throw TestFailure("\(image) has no free cluster")
    }

    /// The host cluster of the first guest cluster (allocated by `makeImage`) and where its L2 entry lies.
    func firstDataCluster() throws -> (cluster: UInt64, l2Entry: UInt64, l1Entry: UInt64) {
        let l1 = bigEndianValue(try scratch.read(image, at: 40, count: 8))
        let l2 = bigEndianValue(try scratch.read(image, at: l1, count: 8)) & 0x00FF_FFFF_FFFF_FE00
        let host = bigEndianValue(try scratch.read(image, at: l2, count: 8)) & 0x00FF_FFFF_FFFF_FE00
        return (host / clusterSize, l2, l1)
    }
}

/// Data spread over the disk, a zero cluster, and (last, so nothing reuses them) discarded clusters, which leave
/// clusters with refcount 0 inside the file.
private func makeImage(_ scratch: QemuScratch, _ name: String, options: String? = nil) throws {
    var arguments = ["create", "-q", "-f", "qcow2"]
    if let options { arguments += ["-o", options] }
    arguments += [scratch.path(name), "32M"]
    try scratch.run("qemu-img", arguments)
    try scratch.qemuIO(name, ["write -P 0x61 0 1M", "write -P 0x62 20M 64k", "write -P 0x63 3M 192k",
                              "write -P 0x64 8M 256k", "write -z 12M 64k", "write -P 0x65 16M 128k",
                              "discard 16M 128k"])
}

/// qemu-img's check of the image finds nothing wrong.
private func expectQemuClean(_ scratch: QemuScratch, _ image: String,
                             sourceLocation: SourceLocation = #_sourceLocation) throws {
    let check = try qemuCheck(scratch, image)
    #expect(check["check-errors"] == 0 && check["leaks"] == 0 && check["corruptions"] == 0,
            "qemu-img check \(image): \(check.fields)", sourceLocation: sourceLocation)
}

private func repair(_ scratch: QemuScratch, _ image: String, mode: Qcow2RepairMode) async throws -> Qcow2RepairOutcome {
    let file = try HostFile.open(scratch.path(image), readOnly: false)
    return try await Qcow2RefcountRebuild.repair(file: file, mode: mode)
}

private func isDirty(_ scratch: QemuScratch, _ image: String) throws -> Bool {
    bigEndianValue(try scratch.read(image, at: 72, count: 8)) & 1 != 0
}

private func setDirty(_ scratch: QemuScratch, _ image: String) throws {
    let features = bigEndianValue(try scratch.read(image, at: 72, count: 8))
    try scratch.patch(image, at: 72, bigEndianBytes(features | 1))
}

extension ImageWritingSuites {
@Suite struct Qcow2RepairTests {
    @Test(arguments: [
        "refcount_bits=1", "refcount_bits=16", "refcount_bits=64",
        "cluster_size=512", "cluster_size=512,refcount_bits=1", "cluster_size=512,refcount_bits=64", "compat=0.10",
    ])
    func leakedClusters(_ options: String) async throws {
        let scratch = try QemuScratch()
        try makeImage(scratch, "l.qcow2", options: options)
        let reference = try scratch.rawContents("l.qcow2")
        let patcher = try RefcountPatcher(scratch, "l.qcow2")
        let free = try patcher.freeCluster()
        try patcher.setRefcount(free, to: 1)
        if patcher.refcountBits > 1 { try patcher.setRefcount(0, to: 2) }
        let outcome = try await repair(scratch, "l.qcow2", mode: .leaks)
        #expect(outcome.before.leaks == (patcher.refcountBits > 1 ? 2 : 1) && outcome.before.corruptions == 0,
                "\(outcome.before.messages)")
        #expect(outcome.rebuilt && outcome.leaksFixed == outcome.before.leaks && outcome.corruptionsFixed == 0)
        #expect(outcome.after == (try await Qcow2Check.check(path: scratch.path("l.qcow2"))))
        #expect(outcome.after.leaks == 0 && outcome.after.corruptions == 0, "\(outcome.after.messages)")
        try expectQemuClean(scratch, "l.qcow2")
        #expect(try scratch.rawContents("l.qcow2") == reference)
        #expect(try patcher.refcount(free) == 0)
    }

    /// The dangerous direction: a used cluster that looks free would be handed out again and overwritten.
    @Test(arguments: ["refcount_bits=16", "refcount_bits=1", "refcount_bits=64", "cluster_size=512"])
    func refcountTooLow(_ options: String) async throws {
        let scratch = try QemuScratch()
        try makeImage(scratch, "z.qcow2", options: options)
        let reference = try scratch.rawContents("z.qcow2")
        let patcher = try RefcountPatcher(scratch, "z.qcow2")
        let data = try patcher.firstDataCluster()
        try patcher.setRefcount(data.cluster, to: 0)
        // QEMU marks an image corrupt when it notices such damage; a repair that leaves nothing wrong clears it.
        let features = bigEndianValue(try scratch.read("z.qcow2", at: 72, count: 8))
        try scratch.patch("z.qcow2", at: 72, bigEndianBytes(features | 2))
        let outcome = try await repair(scratch, "z.qcow2", mode: .all)
        // The refcount below its reference, and OFLAG_COPIED set on a cluster whose refcount is not 1.
        #expect(outcome.before.corruptions == 2, "\(outcome.before.messages)")
        #expect(outcome.rebuilt && outcome.corruptionsFixed == 2 && outcome.copiedFlagsFixed == 0)
        #expect(outcome.after.corruptions == 0 && outcome.after.leaks == 0, "\(outcome.after.messages)")
        try expectQemuClean(scratch, "z.qcow2")
        #expect(try patcher.refcount(data.cluster) == 1)
        #expect(bigEndianValue(try scratch.read("z.qcow2", at: 72, count: 8)) & 3 == 0)
        #expect(try scratch.rawContents("z.qcow2") == reference)
    }

    /// As `qemu-img check -r leaks`: the leak goes, the corruption stays for `-r all`.
    @Test func leaksModeLeavesCorruptions() async throws {
        let scratch = try QemuScratch()
        try makeImage(scratch, "m.qcow2")
        let reference = try scratch.rawContents("m.qcow2")
        let patcher = try RefcountPatcher(scratch, "m.qcow2")
        let data = try patcher.firstDataCluster()
        try patcher.setRefcount(try patcher.freeCluster(), to: 3)
        try patcher.setRefcount(data.cluster, to: 0)
        let leaks = try await repair(scratch, "m.qcow2", mode: .leaks)
        #expect(leaks.before.leaks == 1 && leaks.before.corruptions == 2)
        #expect(leaks.leaksFixed == 1 && leaks.corruptionsFixed == 0 && leaks.after.corruptions == 2)
        let theirs = try qemuCheck(scratch, "m.qcow2")
        #expect(theirs["leaks"] == 0 && theirs["corruptions"] == 2, "\(theirs.fields)")
        let all = try await repair(scratch, "m.qcow2", mode: .all)
        #expect(all.corruptionsFixed == 2 && all.after.corruptions == 0 && all.after.leaks == 0)
        try expectQemuClean(scratch, "m.qcow2")
        #expect(try scratch.rawContents("m.qcow2") == reference)
    }

    @Test func internalSnapshot() async throws {
        let scratch = try QemuScratch()
        try makeImage(scratch, "s.qcow2")
        try scratch.qemuImg("snapshot", "-c", "one", scratch.path("s.qcow2"))
        try scratch.qemuIO("s.qcow2", ["write -P 0x71 0 256k", "write -P 0x72 24M 64k"])
        let active = try scratch.rawContents("s.qcow2")
        let snapshot = try scratch.rawContents("s.qcow2", snapshot: "one")
        let patcher = try RefcountPatcher(scratch, "s.qcow2")
        // Guest 8M is shared with the snapshot: refcount 2. Lower it to 1, and raise the header's to 2 (a leak).
        let l1 = bigEndianValue(try scratch.read("s.qcow2", at: 40, count: 8))
        let l2 = bigEndianValue(try scratch.read("s.qcow2", at: l1, count: 8)) & 0x00FF_FFFF_FFFF_FE00
        let entries = patcher.clusterSize / 8
        let slot = (8 << 20) / patcher.clusterSize % entries
        let shared = (bigEndianValue(try scratch.read("s.qcow2", at: l2 + slot * 8, count: 8)) & 0x00FF_FFFF_FFFF_FE00)
            / patcher.clusterSize
        #expect(try patcher.refcount(shared) == 2)
        try patcher.setRefcount(shared, to: 1)
        try patcher.setRefcount(0, to: 2)
        let outcome = try await repair(scratch, "s.qcow2", mode: .all)
        #expect(outcome.before.corruptions >= 1 && outcome.before.leaks == 1, "\(outcome.before.messages)")
        #expect(outcome.after.corruptions == 0 && outcome.after.leaks == 0, "\(outcome.after.messages)")
        try expectQemuClean(scratch, "s.qcow2")
        #expect(try patcher.refcount(shared) == 2)
        #expect(try scratch.rawContents("s.qcow2") == active)
        #expect(try scratch.rawContents("s.qcow2", snapshot: "one") == snapshot)
    }

    @Test(arguments: [nil, "extended_l2=on", "cluster_size=512"])
    func copiedFlags(_ options: String?) async throws {
        let scratch = try QemuScratch()
        try makeImage(scratch, "c.qcow2", options: options)
        let reference = try scratch.rawContents("c.qcow2")
        let data = try RefcountPatcher(scratch, "c.qcow2").firstDataCluster()
        // Clear OFLAG_COPIED on the first L1 entry and on the first L2 entry (both refcount 1).
        for offset in [data.l1Entry, data.l2Entry] {
            let entry = bigEndianValue(try scratch.read("c.qcow2", at: offset, count: 8))
            try scratch.patch("c.qcow2", at: offset, bigEndianBytes(entry & ~(UInt64(1) << 63)))
        }
        #expect(try qemuCheck(scratch, "c.qcow2")["corruptions"] == 2)
        let outcome = try await repair(scratch, "c.qcow2", mode: .all)
        #expect(outcome.before.corruptions == 2 && outcome.copiedFlagsFixed == 2 && !outcome.rebuilt)
        #expect(outcome.corruptionsFixed == 2 && outcome.after.corruptions == 0, "\(outcome.after.messages)")
        try expectQemuClean(scratch, "c.qcow2")
        #expect(try scratch.rawContents("c.qcow2") == reference)
        // `-r leaks` never touches the flags.
        let entry = bigEndianValue(try scratch.read("c.qcow2", at: data.l2Entry, count: 8))
        try scratch.patch("c.qcow2", at: data.l2Entry, bigEndianBytes(entry & ~(UInt64(1) << 63)))
        let leaks = try await repair(scratch, "c.qcow2", mode: .leaks)
        #expect(leaks.after.corruptions == 1 && leaks.copiedFlagsFixed == 0)
    }

    @Test func dirtyLazyRefcounts() async throws {
        let scratch = try QemuScratch()
        try scratch.qemuImg("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", scratch.path("lz.qcow2"), "32M")
        try scratch.qemuIO("lz.qcow2", ["write -P 1 0 1M", "write -P 2 10M 64k", "write -P 3 5M 64k", "discard 5M 64k"])
        let reference = try scratch.rawContents("lz.qcow2")
        // A clean image is left alone.
        let before = try Data(contentsOf: URL(fileURLWithPath: scratch.path("lz.qcow2")))
        #expect(try await !Qcow2RefcountRebuild.rebuildIfDirty(file: HostFile.open(scratch.path("lz.qcow2"), readOnly: false)))
        #expect(try Data(contentsOf: URL(fileURLWithPath: scratch.path("lz.qcow2"))) == before)
        // What a crash with lazy refcounts leaves: the dirty bit, refcounts behind the references.
        let patcher = try RefcountPatcher(scratch, "lz.qcow2")
        try setDirty(scratch, "lz.qcow2")
        try patcher.setRefcount(try patcher.freeCluster(), to: 1)
        try patcher.setRefcount(try patcher.firstDataCluster().cluster, to: 0)
        let rebuilt = try await Qcow2RefcountRebuild.rebuildIfDirty(file: HostFile.open(scratch.path("lz.qcow2"), readOnly: false))
        #expect(rebuilt)
        #expect(try !isDirty(scratch, "lz.qcow2"))
        try expectQemuClean(scratch, "lz.qcow2")
        #expect(try scratch.rawContents("lz.qcow2") == reference)
    }

    /// A real crash: qemu-io killed after writes with lazy refcounts leaves the image dirty.
    @Test func dirtyAfterACrash() async throws {
        let scratch = try QemuScratch()
        try scratch.qemuImg("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", scratch.path("lz.qcow2"), "32M")
        _ = try runTool("qemu-io", ["-f", "qcow2", "-c", "write -P 1 0 1M", "-c", "write -P 2 10M 64k",
                                    "-c", "sigraise 9", scratch.path("lz.qcow2")], check: false)
        #expect(try isDirty(scratch, "lz.qcow2"))
        let reference = try scratch.rawContents("lz.qcow2")
        #expect(try await Qcow2Check.check(path: scratch.path("lz.qcow2")).corruptions > 0)
        #expect(try await Qcow2RefcountRebuild.rebuildIfDirty(file: HostFile.open(scratch.path("lz.qcow2"), readOnly: false)))
        #expect(try !isDirty(scratch, "lz.qcow2"))
        try expectQemuClean(scratch, "lz.qcow2")
        #expect(try scratch.rawContents("lz.qcow2") == reference)
    }

    /// A refcount table entry naming a misaligned block: the check cannot read those refcounts (a check error);
    /// `-r all` replaces the whole structure, `-r leaks` leaves it.
    @Test func unreadableRefcountBlock() async throws {
        let scratch = try QemuScratch()
        try makeImage(scratch, "r.qcow2")
        let reference = try scratch.rawContents("r.qcow2")
        let table = bigEndianValue(try scratch.read("r.qcow2", at: 48, count: 8))
        let block = bigEndianValue(try scratch.read("r.qcow2", at: table, count: 8))
        try scratch.patch("r.qcow2", at: table, bigEndianBytes(block + 0x200))
        let leaks = try await repair(scratch, "r.qcow2", mode: .leaks)
        #expect(leaks.before.checkErrors > 0 && !leaks.rebuilt && leaks.after == leaks.before)
        let all = try await repair(scratch, "r.qcow2", mode: .all)
        #expect(all.rebuilt && all.after.checkErrors == 0 && all.after.corruptions == 0 && all.after.leaks == 0,
                "\(all.after.messages.prefix(5))")
        try expectQemuClean(scratch, "r.qcow2")
        #expect(try scratch.rawContents("r.qcow2") == reference)
    }

    @Test func hostileImagesAreRefused() async throws {
        let scratch = try QemuScratch()
        try makeImage(scratch, "h.qcow2")
        try scratch.run("cp", [scratch.path("h.qcow2"), scratch.path("g.qcow2")])
        // The refcount table offset far past the end of the file: the check cannot start.
        try scratch.patch("h.qcow2", at: 48, bigEndianBytes(UInt64(1) << 40))
        var original = try Data(contentsOf: URL(fileURLWithPath: scratch.path("h.qcow2")))
        await #expect(throws: BlockError.self) { try await repair(scratch, "h.qcow2", mode: .all) }
        #expect(try Data(contentsOf: URL(fileURLWithPath: scratch.path("h.qcow2"))) == original)
        // An L2 table past the end of the file: its references cannot be counted, so no count may be written.
        let l1 = bigEndianValue(try scratch.read("g.qcow2", at: 40, count: 8))
        try scratch.patch("g.qcow2", at: l1, bigEndianBytes(UInt64(1) << 63 | UInt64(1) << 40))
        original = try Data(contentsOf: URL(fileURLWithPath: scratch.path("g.qcow2")))
        await #expect(throws: BlockError.self) { try await repair(scratch, "g.qcow2", mode: .all) }
        #expect(try Data(contentsOf: URL(fileURLWithPath: scratch.path("g.qcow2"))) == original)
        // Garbage everywhere in the first L2 table and the refcount table: an error or a repair, never a trap.
        try makeImage(scratch, "f.qcow2", options: "cluster_size=512")
        let patcher = try RefcountPatcher(scratch, "f.qcow2")
        let data = try patcher.firstDataCluster()
        let l2 = bigEndianValue(try scratch.read("f.qcow2", at: data.l1Entry, count: 8)) & 0x00FF_FFFF_FFFF_FE00
        try scratch.patch("f.qcow2", at: l2, bigEndianBytes(UInt64.max))
        try scratch.patch("f.qcow2", at: l2 + 8, bigEndianBytes(UInt64(1) << 63 | 0x1234_5600))
        let refcountTable = bigEndianValue(try scratch.read("f.qcow2", at: 48, count: 8))
        try scratch.patch("f.qcow2", at: refcountTable + 8, bigEndianBytes(UInt64(0x1FF)))
        _ = try? await repair(scratch, "f.qcow2", mode: .all)
        _ = try? await repair(scratch, "f.qcow2", mode: .leaks)
    }

    @Test func placementCoversItself() throws {
        // 512-byte clusters with 64-bit refcounts: 64 refcounts a block, so the structure needs blocks of its own.
        let geometry = Qcow2RefcountRebuild.Geometry(clusterBits: 9, refcountOrder: 6, extendedL2: false)
        var counts = [UInt32](repeating: 1, count: 10_000)
        for index in stride(from: 100, to: 3000, by: 1) { counts[index] = 0 }
        let placement = try Qcow2RefcountRebuild.place(counts: counts, geometry: geometry)
        #expect(placement.firstCluster == counts.count)
        let perBlock = geometry.refcountsPerBlock
        for cluster in 0..<placement.endCluster where cluster >= counts.count || counts[cluster] != 0 {
            #expect(placement.blockIndexes.contains(cluster / perBlock), "cluster \(cluster) has no block")
        }
        #expect(placement.blockIndexes.count == Set(placement.blockIndexes).count)
        #expect((placement.blockIndexes.max()! + 1) * 8 <= placement.tableClusters * geometry.clusterSize)
        // Blocks covering only zeros are left out.
        #expect(!placement.blockIndexes.contains(20))
    }

    @Test(arguments: [0, 1, 2, 3, 4, 5, 6])
    func encodeMatchesDecode(_ order: Int) {
        let bits = 1 << order
        let max: UInt64 = bits == 64 ? .max : (1 << UInt64(bits)) - 1
        var block = [UInt8](repeating: 0, count: 512)
        let values = (0..<(512 * 8 / bits)).map { UInt64($0 * 2_654_435_761) & max }
        for (index, value) in values.enumerated() {
            Qcow2RefcountRebuild.encode(value, into: &block, at: 0, index: index, bits: bits)
        }
        for (index, value) in values.enumerated() {
            #expect(Qcow2Check.decode(block, index: index, bits: bits) == value)
        }
    }

    // MARK: The CLI

    @Test func cliRepairsALeak() throws {
        let binary = try ImgfsBinary.path()
        let scratch = try QemuScratch()
        try makeImage(scratch, "l.qcow2")
        let reference = try scratch.rawContents("l.qcow2")
        let patcher = try RefcountPatcher(scratch, "l.qcow2")
        try patcher.setRefcount(try patcher.freeCluster(), to: 1)
        try scratch.run("cp", [scratch.path("l.qcow2"), scratch.path("j.qcow2")])
        let leaky = try runTool(binary, ["check", scratch.path("l.qcow2")], check: false)
        #expect(leaky.status == 3)
        let repaired = try runTool(binary, ["check", "-r", "all", scratch.path("l.qcow2")], check: false)
        #expect(repaired.status == 0, "\(repaired.stderr)")
        #expect(repaired.stdout.hasPrefix("The following inconsistencies were found and repaired:\n\n"
                                          + "    1 leaked clusters\n    0 corruptions\n\n"
                                          + "Double checking the fixed image now...\nNo errors were found on the image.\n"),
                "\(repaired.stdout)")
        try expectQemuClean(scratch, "l.qcow2")
        #expect(try scratch.rawContents("l.qcow2") == reference)
        let json = try runTool(binary, ["check", "--repair", "leaks", "--output", "json", scratch.path("j.qcow2")],
                               check: false)
        #expect(json.status == 0, "\(json.stderr)")
        let object = try JSONSerialization.jsonObject(with: json.outputData) as? [String: Any]
        #expect((object?["leaks-fixed"] as? NSNumber)?.intValue == 1 && object?["leaks"] == nil && object?["corruptions-fixed"] == nil,
                "\(json.stdout)")
        try expectQemuClean(scratch, "j.qcow2")
        // Nothing to repair: the plain report.
        let clean = try runTool(binary, ["check", "-r", "all", scratch.path("l.qcow2")], check: false)
        #expect(clean.status == 0 && clean.stdout.hasPrefix("No errors were found on the image.\n"), "\(clean.stdout)")
    }

    @Test func cliRefusesAnImageQemuHasOpen() throws {
        let binary = try ImgfsBinary.path()
        let scratch = try QemuScratch()
        try makeImage(scratch, "q.qcow2")
        let patcher = try RefcountPatcher(scratch, "q.qcow2")
        try patcher.setRefcount(try patcher.freeCluster(), to: 1)
        let original = try Data(contentsOf: URL(fileURLWithPath: scratch.path("q.qcow2")))
        let holder = try spawnBackground("qemu-io", ["-f", "qcow2", "-c", "sleep 20000", scratch.path("q.qcow2")])
        defer { stopBackground(holder) }
        // Wait until qemu-io holds its locks: an OFD lock on this file's inode shows in /proc/locks.
        let inode = try FileManager.default.attributesOfItem(atPath: scratch.path("q.qcow2"))[.systemFileNumber] as! Int
        let deadline = Date().addingTimeInterval(10)
        while Date() < deadline, (try? String(contentsOfFile: "/proc/locks", encoding: .utf8))?
            .split(separator: "\n").contains(where: { $0.contains("OFDLCK") && $0.contains(":\(inode) ") }) != true {
            usleep(10_000)
        }
        let refused = try runTool(binary, ["check", "-r", "all", scratch.path("q.qcow2")], check: false)
        #expect(refused.status == 1, "\(refused.stdout)")
        #expect(refused.stderr.contains("Could not repair") && refused.stderr.contains("cannot lock")
                && refused.stderr.contains("write"), "\(refused.stderr)")
        #expect(try Data(contentsOf: URL(fileURLWithPath: scratch.path("q.qcow2"))) == original)
        // A plain check takes no locks and still runs.
        #expect(try runTool(binary, ["check", scratch.path("q.qcow2")], check: false).status == 3)
    }
}
}
