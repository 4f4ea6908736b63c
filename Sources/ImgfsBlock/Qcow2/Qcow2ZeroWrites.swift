/// Write-zeroes and discard of the qcow2 driver: whole clusters (or subclusters) become zero entries, a metadata
/// change only; unaligned edges are written as zero bytes, where QEMU silently leaves them.
extension Qcow2Driver {
    /// Clusters changed under one hold of the metadata mutex, so a large request does not stall other writers.
    private static let clustersPerBatch: Int64 = 512

    func zeroRange(at offset: Int64, length: Int64, flags: BlockRequestFlags) async throws {
        guard let metadata else { throw refuseWrite() }
        let unit = layout.unitSize
        let end = offset + length
        let alignedStart = (offset + unit - 1) / unit * unit
        let alignedEnd = end / unit * unit
        guard alignedStart < alignedEnd else {
            return try await writeZeroBytes(at: offset, length: length, flags: flags)
        }
        if offset < alignedStart { try await writeZeroBytes(at: offset, length: alignedStart - offset, flags: flags) }
        var position = alignedStart
        while position < alignedEnd {
            let clusterEnd = ((position >> clusterBits) + Self.clustersPerBatch) << clusterBits
            let batchEnd = min(alignedEnd, clusterEnd)
            let fallback = try await zeroUnits(position..<batchEnd, mayUnmap: flags.contains(.mayUnmap), metadata: metadata)
            for range in fallback {
                try await writeZeroBytes(at: range.lowerBound, length: Int64(range.count), flags: flags)
            }
            position = batchEnd
        }
        if alignedEnd < end { try await writeZeroBytes(at: alignedEnd, length: end - alignedEnd, flags: flags) }
    }

    /// Discard frees whole clusters; the partial ones at the edges keep their data (discard is advisory).
    func discardRange(at offset: Int64, length: Int64) async throws {
        guard metadata != nil else { throw refuseWrite() }
        let unit = layout.unitSize
        let start = (offset + unit - 1) / unit * unit
        let end = (offset + length) / unit * unit
        guard start < end else { return }
        try await zeroRange(at: start, length: end - start, flags: .mayUnmap)
    }

    /// Zero bytes written as data through the ordinary write path.
    private func writeZeroBytes(at offset: Int64, length: Int64, flags: BlockRequestFlags) async throws {
        if flags.contains(.noFallback) {
            throw BlockError.unsupported("\(file.path): this range cannot be zeroed without writing zero bytes")
        }
        try await ZeroChunks.write(at: offset, length: length) { try await writeData(at: $0, from: $1) }
    }

    /// Makes whole units (clusters, or subclusters with extended L2) of `range` read as zeros by changing entries;
    /// returns the ranges that need zero bytes written instead (version 2 over a backing file, part of a
    /// compressed cluster).
    private func zeroUnits(_ range: Range<Int64>, mayUnmap: Bool, metadata: Qcow2Metadata) async throws
        -> [Range<Int64>]
    {
        let first = range.lowerBound >> clusterBits
        let last = (range.upperBound - 1) >> clusterBits
        let hasBacking = backingNode != nil
        let clusterSize = Int64(layout.clusterSize)
        var fallback: [Range<Int64>] = []
        var updates: [Qcow2Metadata.EntryUpdate] = []
        await metadata.mutex.lock()
        defer { metadata.mutex.unlock() }
        await metadata.waitUntilFree(first...last)
        for cluster in first...last {
            let clusterStart = cluster << clusterBits
            let covered = max(range.lowerBound, clusterStart)..<min(range.upperBound, clusterStart + clusterSize)
            let found = try await clusterMap.slot(ofGuestCluster: cluster)
            // Unallocated with nothing beneath reads as zeros already: no table is allocated just to say so.
            if found.l2Offset == 0 && !hasBacking { continue }
            if found.entry == 0 && found.bitmap == 0 && !hasBacking { continue }
            if layout.version < 3 && hasBacking {
                fallback.append(covered)
                continue
            }
            let slot = try await writableSlot(ofGuestCluster: cluster, metadata: metadata)
            let entry = slot.entry
            let compressed = entry & Qcow2L2Entry.compressedFlag != 0
            let copied = entry & Qcow2L2Entry.copiedFlag != 0
            let host = compressed ? 0 : Int64(entry & Qcow2L2Entry.offsetMask)
            let whole = covered.count == Int(clusterSize)
            func releaseOld() {
                if let old = Qcow2L2Entry.hostReference(entry: entry, layout: layout) {
                    metadata.refcounts.free(old.offset, bytes: old.bytes)
                }
            }
            func update(_ word: UInt64, _ bitmap: UInt64) {
                updates.append(.init(l2Offset: slot.l2Offset, index: slot.index, entry: word, bitmap: bitmap))
            }
            if !layout.extendedL2 {
                if layout.version < 3 {
                    // No zero flag, no backing: unallocated reads as zeros.
                    releaseOld()
                    update(0, 0)
                } else if host != 0 && copied && !mayUnmap {
                    // Keeps the cluster (preallocation stays), reads as zeros.
                    update(UInt64(host) | Qcow2L2Entry.copiedFlag | Qcow2L2Entry.zeroFlag, 0)
                } else {
                    releaseOld()
                    update(Qcow2L2Entry.zeroFlag, 0)
                }
                continue
            }
            if compressed {
                guard whole else {
                    fallback.append(covered)
                    continue
                }
                releaseOld()
                update(0, 0xFFFF_FFFF << 32)
                continue
            }
            let unitBits = Int64(layout.unitBits)
            let firstUnit = Int((covered.lowerBound - clusterStart) >> unitBits)
            let lastUnit = Int((covered.upperBound - 1 - clusterStart) >> unitBits)
            let mask = UInt64((1 << (lastUnit + 1)) - (1 << firstUnit))
            let allocated = slot.bitmap & 0xFFFF_FFFF & ~mask
            let zero = (slot.bitmap >> 32) | mask
            if host != 0 && allocated == 0 && (mayUnmap || !copied) {
                releaseOld()
                update(0, zero << 32)
            } else {
                update(entry, allocated | zero << 32)
            }
        }
        try await metadata.apply(updates)
        return fallback
    }
}
