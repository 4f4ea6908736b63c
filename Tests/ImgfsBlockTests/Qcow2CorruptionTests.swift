import Foundation
import Testing
import ImgfsTestSupport
@testable import ImgfsBlock


/// Opens as qcow2 explicitly (a broken magic would otherwise probe as raw) and returns the error's text.
private func openError(_ scratch: QemuScratch, _ image: String, readOnly: Bool = true) async -> BlockError? {
    do {
        _ = try await ImageOpener.open(scratch.path(image), options: OpenOptions(
            readOnly: readOnly, format: .qcow2, pathPolicy: try PathPolicy()))
        return nil
    } catch let error as BlockError {
        return error
    } catch {
        return .corrupt("unexpected error type: \(error)")
    }
}

private func isInvalidImage(_ error: BlockError?, mentioning text: String) -> Bool {
    guard case .invalidImage(_, let reason) = error else { return false }
    return reason.contains(text)
}

/// An 8 MiB image with data in its first two clusters and at 4 MiB.
private func makeImage(_ scratch: QemuScratch, _ name: String = "c.qcow2") throws {
    try scratch.qemuImg("create", "-q", "-f", "qcow2", scratch.path(name), "8M")
    try scratch.qemuIO(name, ["write -P 0x61 0 128k", "write -P 0x62 4M 64k"])
}

/// `makeImage`'s image with guest cluster 0 mapped to a data cluster at 1 TiB, far past the file's end; opened.
private func openImageWithCluster0PastTheEnd(_ scratch: QemuScratch) async throws -> BlockNode {
    try makeImage(scratch)
    let entry = try l2EntryOffset(scratch, "c.qcow2", cluster: 0)
    try scratch.patch("c.qcow2", at: entry, bigEndianBytes(UInt64(1) << 63 | UInt64(1) << 40))
    return try await openImage(scratch.path("c.qcow2"))
}

/// The file offset of the L2 entry mapping guest cluster `index` (within the first L2 table).
private func l2EntryOffset(_ scratch: QemuScratch, _ name: String, cluster index: UInt64) throws -> UInt64 {
    let l1Offset = bigEndianValue(try scratch.read(name, at: 40, count: 8))
    let l1Entry = bigEndianValue(try scratch.read(name, at: l1Offset, count: 8))
    return (l1Entry & 0x00FF_FFFF_FFFF_FE00) + 8 * index
}

@Suite struct Qcow2CorruptionTests {
    @Test func badMagic() async throws {
        let scratch = try QemuScratch()
        try makeImage(scratch)
        try scratch.patch("c.qcow2", at: 0, [0x51, 0x46, 0x49, 0x00])
        #expect(isInvalidImage(await openError(scratch, "c.qcow2"), mentioning: "bad magic"))
    }

    @Test func clusterBitsOutOfRange() async throws {
        let scratch = try QemuScratch()
        try makeImage(scratch)
        try scratch.patch("c.qcow2", at: 20, bigEndianBytes(UInt32(30)))
        #expect(isInvalidImage(await openError(scratch, "c.qcow2"), mentioning: "cluster_bits 30"))
    }

    @Test func l1TablePastTheEndOfTheFile() async throws {
        let scratch = try QemuScratch()
        try makeImage(scratch)
        try scratch.patch("c.qcow2", at: 40, bigEndianBytes(UInt64(1) << 40))
        #expect(isInvalidImage(await openError(scratch, "c.qcow2"), mentioning: "l1_table_offset"))
    }

    @Test func hugeL1Size() async throws {
        let scratch = try QemuScratch()
        try makeImage(scratch)
        try scratch.patch("c.qcow2", at: 36, bigEndianBytes(UInt32.max))
        #expect(isInvalidImage(await openError(scratch, "c.qcow2"), mentioning: "l1_size"))
    }

    @Test func l1TooSmallForTheVirtualSize() async throws {
        let scratch = try QemuScratch()
        try makeImage(scratch)
        try scratch.patch("c.qcow2", at: 24, bigEndianBytes(UInt64(1) << 50))
        #expect(isInvalidImage(await openError(scratch, "c.qcow2"), mentioning: "too small"))
    }

    @Test func unknownIncompatibleBitIsRefused() async throws {
        let scratch = try QemuScratch()
        try makeImage(scratch)
        try scratch.patch("c.qcow2", at: 78, [0x04])  // bit 10
        #expect(isInvalidImage(await openError(scratch, "c.qcow2"), mentioning: "bit 10"))
    }

    @Test func externalDataFileIsRefused() async throws {
        let scratch = try QemuScratch()
        try makeImage(scratch)
        try scratch.patch("c.qcow2", at: 79, [0x04])  // bit 2
        #expect(isInvalidImage(await openError(scratch, "c.qcow2"), mentioning: "external data file not supported"))
    }

    @Test func corruptBitAllowsOnlyReadOnly() async throws {
        let scratch = try QemuScratch()
        try makeImage(scratch)
        try scratch.patch("c.qcow2", at: 79, [0x02])  // bit 1
        var readWriteError: BlockError?
        do { _ = try await openQcow2DriverReadWrite(scratch.path("c.qcow2")) } catch { readWriteError = error as? BlockError }
        #expect(isInvalidImage(readWriteError, mentioning: "--read-only"))
        #expect(await openError(scratch, "c.qcow2", readOnly: true) == nil)
        let node = try await openImage(scratch.path("c.qcow2"))
        #expect(node.driver.formatInfo()["corrupt"] == .bool(true))
    }

    @Test func encryptionIsRefused() async throws {
        let scratch = try QemuScratch()
        try makeImage(scratch)
        try scratch.patch("c.qcow2", at: 32, bigEndianBytes(UInt32(1)))
        #expect(isInvalidImage(await openError(scratch, "c.qcow2"), mentioning: "encrypted"))
    }

    @Test func truncatedFile() async throws {
        let scratch = try QemuScratch()
        try makeImage(scratch)
        try FileManager.default.removeItem(atPath: scratch.path("c.qcow2"))
        FileManager.default.createFile(atPath: scratch.path("c.qcow2"), contents: Data([0x51, 0x46, 0x49, 0xFB, 0, 0, 0, 3]))
        #expect(isInvalidImage(await openError(scratch, "c.qcow2"), mentioning: "shorter"))
    }

    @Test func l2EntryPastTheEndFailsOnlyItsRange() async throws {
        let scratch = try QemuScratch()
        let node = try await openImageWithCluster0PastTheEnd(scratch)
        await #expect {
            _ = try await readNode(node, at: 100, count: 1000)
        } throws: { error in
            guard case BlockError.corrupt(let reason) = error else { return false }
            return reason.contains("guest offset 0")
        }
        #expect(try await readNode(node, at: 65536, count: 65536) == [UInt8](repeating: 0x61, count: 65536))
        #expect(try await readNode(node, at: 4 << 20, count: 4096) == [UInt8](repeating: 0x62, count: 4096))
    }

    @Test func aDirectReadOfAClusterPastTheEndNeverSucceeds() async throws {
        let scratch = try QemuScratch()
        let node = try await openImageWithCluster0PastTheEnd(scratch)
        // Loads the L2 table, so the lookup is answered from the cache.
        #expect(try await readNode(node, at: 65536, count: 4096) == [UInt8](repeating: 0x61, count: 4096))
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { buffer.deallocate() }
        // Declined, or started and found short: either way the async read is the one to report it.
        #expect(await startDirectRead(node, at: 0, into: buffer) != true)
        await #expect(throws: BlockError.self) { _ = try await readNode(node, at: 0, count: 4096) }
        #expect(node.requests.inFlightCount == 0)
    }

    @Test func misalignedL2EntryIsCorrupt() async throws {
        let scratch = try QemuScratch()
        try makeImage(scratch)
        let entry = try l2EntryOffset(scratch, "c.qcow2", cluster: 1)
        let original = bigEndianValue(try scratch.read("c.qcow2", at: entry, count: 8))
        try scratch.patch("c.qcow2", at: entry, bigEndianBytes(original + 4096))
        let node = try await openImage(scratch.path("c.qcow2"))
        await #expect(throws: BlockError.self) { _ = try await readNode(node, at: 65536, count: 10) }
        #expect(try await readNode(node, at: 0, count: 65536) == [UInt8](repeating: 0x61, count: 65536))
    }

    @Test func compressedEntryWithHugeSize() async throws {
        let scratch = try QemuScratch()
        try makeImage(scratch, "src.qcow2")
        try scratch.qemuImg("convert", "-c", "-O", "qcow2", scratch.path("src.qcow2"), scratch.path("c.qcow2"))
        let entry = try l2EntryOffset(scratch, "c.qcow2", cluster: 0)
        let original = bigEndianValue(try scratch.read("c.qcow2", at: entry, count: 8))
        // 64 KiB clusters: x = 54; bits 54-61 count additional sectors. Set them all.
        let huge = original | (UInt64(0xFF) << 54)
        try scratch.patch("c.qcow2", at: entry, bigEndianBytes(huge))
        let node = try await openImage(scratch.path("c.qcow2"))
        // The size is only an upper bound: the stream still ends where it did, so the data reads back intact.
        #expect(try await readNode(node, at: 0, count: 65536) == [UInt8](repeating: 0x61, count: 65536))
        // Garbage instead of the stream is corruption of that range only.
        let offset = original & ((UInt64(1) << 54) - 1)
        try scratch.patch("c.qcow2", at: offset, [UInt8](repeating: 0xFF, count: 64))
        let fresh = try await openImage(scratch.path("c.qcow2"))
        await #expect(throws: BlockError.self) { _ = try await readNode(fresh, at: 0, count: 512) }
        #expect(try await readNode(fresh, at: 4 << 20, count: 512) == [UInt8](repeating: 0x62, count: 512))
    }

    @Test func headerExtensionLengthPastTheCluster() async throws {
        let scratch = try QemuScratch()
        try makeImage(scratch)
        // The first extension follows the 112-byte v3 header; give it a length far past the cluster.
        try scratch.patch("c.qcow2", at: 112 + 4, bigEndianBytes(UInt32(1 << 30)))
        #expect(isInvalidImage(await openError(scratch, "c.qcow2"), mentioning: "header extension"))
    }

    @Test func randomHeaderDamageNeverCrashes() async throws {
        let scratch = try QemuScratch()
        try makeImage(scratch, "good.qcow2")
        let good = try Data(contentsOf: URL(fileURLWithPath: scratch.path("good.qcow2")))
        var generator = SplitMix64(seed: 0x1234_5678)
        var opened = 0
        for round in 0..<60 {
            var bytes = [UInt8](good)
            for _ in 0..<3 {
                let index = Int(generator.next() % 512)
                bytes[index] = UInt8(truncatingIfNeeded: generator.next())
            }
            let name = "fuzz\(round).qcow2"
            FileManager.default.createFile(atPath: scratch.path(name), contents: Data(bytes))
            guard let node = try? await ImageOpener.open(scratch.path(name), options: OpenOptions(
                readOnly: true, format: .qcow2, pathPolicy: try PathPolicy())) else { continue }
            opened += 1
            for offset in stride(from: Int64(0), to: min(node.length, 8 << 20), by: 1 << 20) {
                _ = try? await readNode(node, at: offset, count: Int(min(70000, node.length - offset)))
                _ = try? await node.chainBlockStatus(at: offset, length: node.length - offset)
            }
        }
        #expect(opened > 0)
    }

    @Test func snapshotsSharingOneHugeL1TableAreBounded() async throws {
        // Snapshots may all name one L1 table in the file, so the file size alone does not bound what loading
        // their tables costs: 17 snapshots of 32 MiB tables each must be refused, not allocated.
        let scratch = try QemuScratch()
        try scratch.qemuImg("create", "-q", "-f", "qcow2", "-o", "preallocation=full", scratch.path("s.qcow2"), "40M")
        for n in 0..<17 { try scratch.qemuImg("snapshot", "-c", "s\(n)", scratch.path("s.qcow2")) }
        let count = Int(bigEndianValue(try scratch.read("s.qcow2", at: 60, count: 4)))
        var entry = bigEndianValue(try scratch.read("s.qcow2", at: 64, count: 8))
        #expect(count == 17)
        for _ in 0..<count {
            try scratch.patch("s.qcow2", at: entry, bigEndianBytes(UInt64(65536)))          // l1_table_offset
            try scratch.patch("s.qcow2", at: entry + 8, bigEndianBytes(UInt32(4 << 20)))    // l1_size: 32 MiB
            let idLength = bigEndianValue(try scratch.read("s.qcow2", at: entry + 12, count: 2))
            let nameLength = bigEndianValue(try scratch.read("s.qcow2", at: entry + 14, count: 2))
            let extra = bigEndianValue(try scratch.read("s.qcow2", at: entry + 36, count: 4))
            entry += (40 + extra + idLength + nameLength + 7) / 8 * 8
        }
        let node = try await openImage(scratch.path("s.qcow2"))
        // Nothing is loaded until a view is opened; only views open at once count against the budget.
        var views: [BlockDriver] = []
        var refusal: BlockError?
        for snapshot in node.driver.snapshots {
            do {
                views.append(try await node.driver.openSnapshot(snapshot))
            } catch {
                refusal = error as? BlockError
                break
            }
        }
        #expect(views.count == 16)
        guard case .overBudget(let reason)? = refusal else {
            Issue.record("expected a refusal, got \(String(describing: refusal))")
            return
        }
        #expect(reason.contains("L1 tables together would exceed"))
        // Closing one view makes room for the 17th.
        try await views.removeLast().close()
        let last = try await node.driver.openSnapshot(node.driver.snapshots[16])
        #expect(last.length == 40 << 20)
    }
}
