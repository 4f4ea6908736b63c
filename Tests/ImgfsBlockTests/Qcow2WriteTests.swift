import Foundation
@testable import ImgfsBlock
import ImgfsTestSupport
import Testing

/// Writes through the qcow2 driver, checked against QEMU: `qemu-img check` clean, `qemu-img convert` equal to a
/// model of the writes.
extension ImageWritingSuites {
@Suite struct Qcow2WriteTests {
    /// Creates an image, applies seeded writes through imgfs (closing and reopening half way, so a second open
    /// starts from what the first left on disk), and checks the result.
    private func exercise(_ scratch: QemuScratch, image: String, size: Int, clusterSize: Int, seed: UInt64,
                          writes: Int = 120, initial: DiskModel? = nil) async throws -> DiskModel {
        var model = initial ?? DiskModel(bytes: [UInt8](repeating: 0, count: size))
        for round in 0..<2 {
            let node = try await openImage(scratch.path(image), readOnly: false)
            try await randomWrites(node, model: &model, seed: seed &+ UInt64(round), count: writes / 2,
                                   clusterSize: clusterSize)
            #expect(try await readAll(node) == model.bytes)
            try await node.close()
        }
        try scratch.expectCleanCheck(image)
        try scratch.expectContents(image, equal: model)
        return model
    }

    @Test(arguments: [(4096, 16), (65536, 16), (512, 16), (1 << 21, 64)])
    func randomUnalignedWritesOnAFreshImage(clusterSize: Int, refcountBits: Int) async throws {
        let scratch = try QemuScratch()
        let size = max(8 << 20, clusterSize * 8)
        try scratch.qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=\(clusterSize),refcount_bits=\(refcountBits)",
                            scratch.path("w.qcow2"), "\(size)")
        _ = try await exercise(scratch, image: "w.qcow2", size: size, clusterSize: min(clusterSize, 65536), seed: 1)
    }

    @Test(arguments: [1, 64])
    func refcountWidths(bits: Int) async throws {
        let scratch = try QemuScratch()
        try scratch.qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096,refcount_bits=\(bits)",
                            scratch.path("r.qcow2"), "4M")
        _ = try await exercise(scratch, image: "r.qcow2", size: 4 << 20, clusterSize: 4096, seed: 2)
    }

    @Test func version2Image() async throws {
        let scratch = try QemuScratch()
        try scratch.qemuImg("create", "-q", "-f", "qcow2", "-o", "compat=0.10,cluster_size=4096", scratch.path("v2.qcow2"), "4M")
        _ = try await exercise(scratch, image: "v2.qcow2", size: 4 << 20, clusterSize: 4096, seed: 3)
    }

    @Test(arguments: ["compat=1.1", "compat=0.10"])
    func overABackingFile(options: String) async throws {
        let scratch = try QemuScratch()
        let size = 4 << 20
        try scratch.qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", scratch.path("base.qcow2"), "\(size)")
        try scratch.qemuIO("base.qcow2", ["write -P 0x5a 0 4M", "write -z 1M 512k"])
        try scratch.qemuImg("create", "-q", "-f", "qcow2", "-o", "\(options),cluster_size=4096", "-F", "qcow2",
                            "-b", "base.qcow2", scratch.path("top.qcow2"))
        let base = DiskModel(bytes: try scratch.rawContents("base.qcow2"))
        _ = try await exercise(scratch, image: "top.qcow2", size: size, clusterSize: 4096, seed: 4, initial: base)
        try scratch.expectCleanCheck("base.qcow2")
        try scratch.expectContents("base.qcow2", equal: base)
    }

    @Test func snapshotContentStaysUnchanged() async throws {
        let scratch = try QemuScratch()
        try scratch.qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", scratch.path("s.qcow2"), "4M")
        try scratch.qemuIO("s.qcow2", ["write -P 0x11 0 3M", "write -c -P 0x22 3M 64k"])
        try scratch.qemuImg("snapshot", "-c", "before", scratch.path("s.qcow2"))
        let snapshot = DiskModel(bytes: try scratch.rawContents("s.qcow2"))
        _ = try await exercise(scratch, image: "s.qcow2", size: 4 << 20, clusterSize: 4096, seed: 5, writes: 200,
                               initial: snapshot)
        try scratch.expectContents("s.qcow2", equal: snapshot, snapshot: "before")
    }

    @Test func overCompressedClusters() async throws {
        let scratch = try QemuScratch()
        let size = 4 << 20
        var pattern = [UInt8](repeating: 0, count: size)
        for i in stride(from: 0, to: size, by: 64) { pattern[i] = UInt8(truncatingIfNeeded: i >> 6) }
        try Data(pattern).write(to: URL(fileURLWithPath: scratch.path("p.raw")))
        for type in ["zlib", "zstd"] {
            try scratch.qemuImg("convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o",
                                "cluster_size=4096,compression_type=\(type)", scratch.path("p.raw"), scratch.path("c-\(type).qcow2"))
            _ = try await exercise(scratch, image: "c-\(type).qcow2", size: size, clusterSize: 4096, seed: 6,
                                   initial: DiskModel(bytes: pattern))
        }
    }

    @Test func extendedL2WithAndWithoutBacking() async throws {
        let scratch = try QemuScratch()
        let size = 4 << 20
        try scratch.qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", scratch.path("base.qcow2"), "\(size)")
        try scratch.qemuIO("base.qcow2", ["write -P 0x77 0 4M"])
        try scratch.qemuImg("create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=65536", "-F", "qcow2",
                            "-b", "base.qcow2", scratch.path("x.qcow2"))
        try scratch.qemuIO("x.qcow2", ["write -P 0x33 6k 10k", "write -z 100k 8k", "write -c -P 0x44 1M 64k"])
        _ = try await exercise(scratch, image: "x.qcow2", size: size, clusterSize: 65536, seed: 7,
                               initial: DiskModel(bytes: try scratch.rawContents("x.qcow2")))
        try scratch.qemuImg("create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=16384", scratch.path("y.qcow2"), "\(size)")
        _ = try await exercise(scratch, image: "y.qcow2", size: size, clusterSize: 16384, seed: 8)
    }

    @Test func writesPast4GiBOnALargeSparseImage() async throws {
        let scratch = try QemuScratch()
        let size: Int64 = 8 << 30
        try scratch.qemuImg("create", "-q", "-f", "qcow2", scratch.path("big.qcow2"), "\(size)")
        // Windows around 4 GiB and near the end, each modelled by itself.
        let windows: [Int64] = [0, (4 << 30) - (1 << 20), size - (2 << 20)]
        var models = windows.map { _ in DiskModel(bytes: [UInt8](repeating: 0, count: 2 << 20)) }
        let node = try await openImage(scratch.path("big.qcow2"), readOnly: false)
        var rng = SplitMix64(seed: 9)
        for i in 0..<150 {
            let w = Int.random(in: 0..<windows.count, using: &rng)
            let length = Int.random(in: 1...200_000, using: &rng)
            let offset = Int.random(in: 0..<((2 << 20) - length), using: &rng)
            let data = randomBytes(length, seed: UInt64(i) &+ 900)
            try await write(node, at: windows[w] + Int64(offset), data)
            models[w].write(data, at: offset)
        }
        try await node.close()
        try scratch.expectCleanCheck("big.qcow2")
        let raw = scratch.path("big.raw")
        try scratch.run("qemu-img", ["convert", "-O", "raw", scratch.path("big.qcow2"), raw])
        for (w, start) in windows.enumerated() {
            let handle = try FileHandle(forReadingFrom: URL(fileURLWithPath: raw))
            try handle.seek(toOffset: UInt64(start))
            let bytes = [UInt8](handle.readData(ofLength: 2 << 20))
            try handle.close()
            #expect(firstDifference(bytes, models[w].bytes) == nil, "window \(w)")
        }
    }

    /// Small writes into clusters appended at the end of the file: only the guest's bytes are written (the file is
    /// extended ahead, with a hole), the rest of each cluster reads as zeros at once and after reopening, and a
    /// close gives the extension back, leaving the file where QEMU's check says the image ends.
    @Test func smallWritesIntoAppendedClusters() async throws {
        let scratch = try QemuScratch()
        let size = 8 << 20
        try scratch.qemuImg("create", "-q", "-f", "qcow2", scratch.path("a.qcow2"), "\(size)")
        var model = DiskModel(bytes: [UInt8](repeating: 0, count: size))
        let node = try await openImage(scratch.path("a.qcow2"), readOnly: false)
        // The last cluster first, so later ones land below the end the file first reached.
        for (i, offset) in [size - 4096, 1 << 20, (5 << 20) + 12345, 3 << 20].enumerated() {
            let data = randomBytes(4096, seed: UInt64(i) + 40)
            try await write(node, at: Int64(offset), data)
            model.write(data, at: offset)
            let cluster = offset & ~0xffff
            #expect(try await readNode(node, at: Int64(cluster), count: 65536) == Array(model.bytes[cluster..<(cluster + 65536)]))
        }
        try await node.flush()
        #expect(try await readAll(node, chunk: 1 << 20) == model.bytes)
        try await node.close()
        try scratch.expectCleanCheck("a.qcow2")
        try scratch.expectContents("a.qcow2", equal: model)
        let check = try runTool("qemu-img", ["check", "--output=json", scratch.path("a.qcow2")])
        let report = try JSONSerialization.jsonObject(with: Data(check.stdout.utf8)) as? [String: Any]
        let end = try #require(report?["image-end-offset"] as? Int)
        let fileSize = try FileManager.default.attributesOfItem(atPath: scratch.path("a.qcow2"))[.size] as? Int
        #expect(fileSize == end, "the file keeps bytes past the image's end")
        // Reopened: the clusters are read back from the disk, and new ones appended after them.
        let again = try await openImage(scratch.path("a.qcow2"), readOnly: false)
        let data = randomBytes(100, seed: 99)
        try await write(again, at: Int64(6 << 20) + 7, data)
        model.write(data, at: (6 << 20) + 7)
        #expect(try await readAll(again, chunk: 1 << 20) == model.bytes)
        try await again.close()
        try scratch.expectCleanCheck("a.qcow2")
        try scratch.expectContents("a.qcow2", equal: model)
    }

    @Test func concurrentWritersOnSharedClusters() async throws {
        let scratch = try QemuScratch()
        let size = 2 << 20
        try scratch.qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", scratch.path("c.qcow2"), "\(size)")
        try scratch.qemuIO("c.qcow2", ["write -P 0x99 0 1M"])
        try scratch.qemuImg("snapshot", "-c", "s", scratch.path("c.qcow2"))
        var model = DiskModel(bytes: try scratch.rawContents("c.qcow2"))
        let snapshot = model
        // Eight writers; writer k owns the k-th 8 KiB of every cluster, so they collide on every cluster (allocation,
        // copy-on-write from the snapshot or from zeros) yet the outcome does not depend on their order.
        let node = try await openImage(scratch.path("c.qcow2"), readOnly: false)
        var jobs: [(Int, [UInt8])] = []
        for k in 0..<8 {
            for cluster in 0..<(size / 65536) {
                var rng = SplitMix64(seed: UInt64(k * 1000 + cluster))
                let start = cluster * 65536 + k * 8192 + Int.random(in: 0..<4096, using: &rng)
                let data = randomBytes(Int.random(in: 1...4096, using: &rng), seed: UInt64(k * 1000 + cluster))
                jobs.append((start, data))
                model.write(data, at: start)
            }
        }
        try await withThrowingTaskGroup(of: Void.self) { group in
            for k in 0..<8 {
                let mine = jobs.enumerated().filter { $0.offset % 8 == k }.map(\.element)
                group.addTask {
                    for (offset, data) in mine { try await write(node, at: Int64(offset), data) }
                }
            }
            try await group.waitForAll()
        }
        #expect(try await readAll(node) == model.bytes)
        try await node.close()
        try scratch.expectCleanCheck("c.qcow2")
        try scratch.expectContents("c.qcow2", equal: model)
        try scratch.expectContents("c.qcow2", equal: snapshot, snapshot: "s")
    }

    @Test func zeroWritesAndPunchesAtAnyAlignment() async throws {
        let scratch = try QemuScratch()
        try scratch.qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", scratch.path("z.qcow2"), "1M")
        try scratch.qemuIO("z.qcow2", ["write -P 0x61 0 1M"])
        var model = DiskModel(bytes: try scratch.rawContents("z.qcow2"))
        let node = try await openImage(scratch.path("z.qcow2"), readOnly: false)
        for (offset, length, unmap) in [(100, 10_000, true), (8192, 8192, false), (65536 + 3, 200_000, true), (1_000_000, 48_576, false)] {
            try await node.writeZeroes(at: Int64(offset), length: Int64(length), flags: unmap ? .mayUnmap : [])
            model.zero(offset, length)
        }
        try await node.close()
        try scratch.expectCleanCheck("z.qcow2")
        try scratch.expectContents("z.qcow2", equal: model)
        // Whole clusters unmapped are given back: the image has fewer allocated clusters than before.
        let map = try scratch.run("qemu-img", ["map", "--output=json", scratch.path("z.qcow2")])
        #expect(String(decoding: map, as: UTF8.self).contains("\"zero\": true"))
    }

    @Test func truncateGrowsAndShrinks() async throws {
        let scratch = try QemuScratch()
        try scratch.qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", scratch.path("t.qcow2"), "64k")
        try scratch.qemuIO("t.qcow2", ["write -P 0x42 0 64k"])
        let node = try await openImage(scratch.path("t.qcow2"), readOnly: false)
        // 64 KiB of 512-byte clusters is one L2 table's reach; 8 MiB needs a larger L1 table.
        try await node.truncate(to: 8 << 20)
        #expect(node.length == 8 << 20)
        try await write(node, at: (8 << 20) - 700, [UInt8](repeating: 0x43, count: 700))
        await #expect(throws: BlockError.self) { try await node.truncate(to: 1 << 20) }
        try await node.writeZeroes(at: 4 << 20, length: 4 << 20, flags: .mayUnmap)
        try await node.truncate(to: 4 << 20)
        await #expect(throws: BlockError.self) { try await node.truncate(to: (4 << 20) + 100) }
        try await node.close()
        try scratch.expectCleanCheck("t.qcow2")
        var model = DiskModel(bytes: [UInt8](repeating: 0, count: 4 << 20))
        model.write([UInt8](repeating: 0x42, count: 65536), at: 0)
        try scratch.expectContents("t.qcow2", equal: model)
    }

    @Test func growingOverALongerBackingFileReadsZeros() async throws {
        let scratch = try QemuScratch()
        try scratch.qemuImg("create", "-q", "-f", "raw", scratch.path("base.raw"), "2M")
        try scratch.qemuIO("base.raw", format: "raw", ["write -P 0x66 0 2M"])
        try scratch.qemuImg("create", "-q", "-f", "qcow2", "-F", "raw", "-b", "base.raw", scratch.path("top.qcow2"), "1M")
        let node = try await openImage(scratch.path("top.qcow2"), readOnly: false)
        try await node.truncate(to: 3 << 20)
        try await node.close()
        var model = DiskModel(bytes: [UInt8](repeating: 0, count: 3 << 20))
        model.write([UInt8](repeating: 0x66, count: 1 << 20), at: 0)
        try scratch.expectCleanCheck("top.qcow2")
        try scratch.expectContents("top.qcow2", equal: model)
    }
}

}

extension ImageWritingSuites.Qcow2WriteTests {
    @Test func aDirtyImageIsRepairedBeforeItIsWritten() async throws {
        let scratch = try QemuScratch()
        try scratch.qemuImg("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=4096", scratch.path("d.qcow2"), "4M")
        // qemu-io dies by SIGKILL after writing with lazy refcounts: the dirty bit stays set, refcounts lag.
        _ = try runTool("qemu-io", ["-f", "qcow2", "-c", "write -P 0x21 0 1M", "-c", "sigraise 9", scratch.path("d.qcow2")],
                        check: false)
        var model = DiskModel(bytes: try scratch.rawContents("d.qcow2"))
        #expect(model.bytes[0] == 0x21)
        let node = try await openImage(scratch.path("d.qcow2"), readOnly: false)
        try await randomWrites(node, model: &model, seed: 11, count: 40, clusterSize: 4096)
        try await node.close()
        try scratch.expectCleanCheck("d.qcow2")
        try scratch.expectContents("d.qcow2", equal: model)
        let info = try scratch.run("qemu-img", ["info", "--output=json", scratch.path("d.qcow2")])
        #expect(String(decoding: info, as: UTF8.self).contains("\"dirty-flag\": false"))
    }
}

extension ImageWritingSuites.Qcow2WriteTests {
    /// The ranges a bitmap marks dirty, as QEMU reads the bitmap: qemu-nbd exports it and `qemu-img map` shows
    /// dirty ranges as `"data": false`.
    private func dirtyRanges(_ scratch: QemuScratch, _ image: String, bitmap: String) throws -> [Range<Int64>] {
        let socket = scratch.path("nbd.sock")
        try scratch.run("qemu-nbd", ["--fork", "-k", socket, "-f", "qcow2", "-r", "-B", bitmap, scratch.path(image)])
        let map = try scratch.run("qemu-img", ["map", "--output=json", "--image-opts",
                                               "driver=nbd,server.type=unix,server.path=\(socket),x-dirty-bitmap=qemu:dirty-bitmap:\(bitmap)"])
        let extents = try JSONSerialization.jsonObject(with: map) as? [[String: Any]] ?? []
        return extents.compactMap { extent in
            guard let start = extent["start"] as? Int64, let length = extent["length"] as? Int64,
                  extent["data"] as? Bool == false else { return nil }
            return start..<(start + length)
        }
    }

    @Test func enabledBitmapsRecordEveryWriteAndAreStoredConsistent() async throws {
        let scratch = try QemuScratch()
        try scratch.qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", scratch.path("b.qcow2"), "8M")
        try scratch.qemuImg("bitmap", "--add", "-g", "65536", scratch.path("b.qcow2"), "enabled")
        try scratch.qemuImg("bitmap", "--add", "--disable", scratch.path("b.qcow2"), "disabled")
        try scratch.qemuIO("b.qcow2", ["write -P 0x10 0 4k"])
        var model = DiskModel(bytes: try scratch.rawContents("b.qcow2"))
        let node = try await openImage(scratch.path("b.qcow2"), readOnly: false)
        try await randomWrites(node, model: &model, seed: 12, count: 30, clusterSize: 65536, window: (1 << 20)..<(6 << 20))
        try await node.writeZeroes(at: 7 << 20, length: 100_000, flags: .mayUnmap)
        model.zero(7 << 20, 100_000)
        try await node.close()
        try scratch.expectCleanCheck("b.qcow2")
        try scratch.expectContents("b.qcow2", equal: model)
        let info = String(decoding: try scratch.run("qemu-img", ["info", scratch.path("b.qcow2")]), as: UTF8.self)
        #expect(!info.contains("in-use"), "\(info)")
        // Every 64 KiB chunk the writes touched is dirty in the enabled bitmap; none is in the disabled one.
        let dirty = try dirtyRanges(scratch, "b.qcow2", bitmap: "enabled")
        var rng = SplitMix64(seed: 12)
        var touched: [Range<Int64>] = [0..<4096, Int64(7 << 20)..<Int64((7 << 20) + 100_000)]
        for _ in 0..<30 {
            let length = Int.random(in: 1...(3 * 65536), using: &rng)
            let offset = Int.random(in: (1 << 20)..<((6 << 20) - length), using: &rng)
            if Int.random(in: 0..<6, using: &rng) == 0 { _ = Bool.random(using: &rng) }
            touched.append(Int64(offset)..<Int64(offset + length))
        }
        for range in touched {
            let first = range.lowerBound / 65536 * 65536
            let covered = dirty.contains { $0.lowerBound <= first && $0.upperBound >= range.upperBound }
                || stride(from: first, to: range.upperBound, by: 65536).allSatisfy { chunk in dirty.contains { $0.contains(chunk) } }
            #expect(covered, "\(range) not dirty in \(dirty)")
        }
        #expect(!dirty.contains { $0.overlaps(Int64(6 << 20)..<Int64(7 << 20)) }, "untouched space is dirty: \(dirty)")
        #expect(try dirtyRanges(scratch, "b.qcow2", bitmap: "disabled").isEmpty)
    }
}

extension ImageWritingSuites.Qcow2WriteTests {
    @Test func aDataWriteOntoMetadataIsRefused() async throws {
        let scratch = try QemuScratch()
        try scratch.qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", scratch.path("m.qcow2"), "1M")
        try scratch.qemuIO("m.qcow2", ["write -P 0x11 0 4k"])
        // Point guest cluster 0's entry (COPIED, so an in-place write) at the L1 table, then at the refcount table.
        let l1Offset = bigEndianValue(try scratch.read("m.qcow2", at: 40, count: 8))
        let refcountTable = bigEndianValue(try scratch.read("m.qcow2", at: 48, count: 8))
        let l2Offset = bigEndianValue(try scratch.read("m.qcow2", at: l1Offset, count: 8)) & 0x00FF_FFFF_FFFF_FE00
        for target in [l1Offset, refcountTable, 0] {
            try scratch.patch("m.qcow2", at: l2Offset, bigEndianBytes(target | 1 << 63))
            let before = try scratch.read("m.qcow2", at: 0, count: 4 << 12)
            let node = try await openImage(scratch.path("m.qcow2"), readOnly: false)
            await #expect(throws: BlockError.self) { try await write(node, at: 0, [UInt8](repeating: 0xEE, count: 512)) }
            try await node.close()
            #expect(try scratch.read("m.qcow2", at: 0, count: 4 << 12) == before, "target \(target)")
        }
    }
}

extension ImageWritingSuites.Qcow2WriteTests {
    @Test func theRefcountTableGrowsWhenTheFileOutgrowsIt() async throws {
        let scratch = try QemuScratch()
        // 512-byte clusters with 64-bit refcounts: one table cluster covers 64 blocks of 64 clusters, 2 MiB of file.
        try scratch.qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=64", scratch.path("g.qcow2"), "16M")
        let tableBefore = bigEndianValue(try scratch.read("g.qcow2", at: 48, count: 8))
        var model = DiskModel(bytes: [UInt8](repeating: 0, count: 16 << 20))
        let node = try await openImage(scratch.path("g.qcow2"), readOnly: false)
        for chunk in 0..<100 {
            let data = randomBytes(64 << 10, seed: UInt64(chunk) &+ 4242)
            try await write(node, at: Int64(chunk) << 16, data)
            model.write(data, at: chunk << 16)
        }
        try await node.close()
        #expect(bigEndianValue(try scratch.read("g.qcow2", at: 48, count: 8)) != tableBefore)
        #expect(try scratch.read("g.qcow2", at: 56, count: 4) != [0, 0, 0, 1])
        try scratch.expectCleanCheck("g.qcow2")
        try scratch.expectContents("g.qcow2", equal: model)
    }
}
