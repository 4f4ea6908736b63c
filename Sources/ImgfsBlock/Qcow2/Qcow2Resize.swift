/// Truncate of the qcow2 driver: the disk grows (a larger L1 table when needed), or shrinks where nothing this
/// image holds would be lost.
extension Qcow2Driver {
    func resize(to newLength: Int64) async throws {
        guard let metadata else { throw refuseWrite() }
        let oldLength = length
        guard newLength % 512 == 0 else {
            throw BlockError.unsupported("\(file.path): a qcow2 disk is whole 512-byte sectors; \(newLength) is not")
        }
        guard !hasBitmaps else {
            throw BlockError.unsupported("\(file.path): the image has persistent bitmaps; QEMU refuses to resize such images too")
        }
        if header.version < 3 && !snapshotEntries.isEmpty {
            throw BlockError.unsupported("\(file.path): a version 2 image with snapshots cannot be resized")
        }
        if newLength > oldLength {
            try await grow(from: oldLength, to: newLength, metadata: metadata)
        } else if newLength < oldLength {
            try await shrink(from: oldLength, to: newLength, metadata: metadata)
        }
    }

    private func grow(from oldLength: Int64, to newLength: Int64, metadata: Qcow2Metadata) async throws {
        let tableSpan = layout.bytesPerL2Table
        let needed = (newLength + tableSpan - 1) / tableSpan
        guard needed <= Int64(Qcow2Limits.maxL1Entries) else {
            throw BlockError.unsupported("\(file.path): \(newLength) bytes would need more than QEMU's \(Qcow2Limits.maxL1Entries) L1 entries")
        }
        try await metadata.mutex.withLock {
            if needed > Int64(metadata.l1.count) {
                try await metadata.moveL1(entries: Int(needed), size: newLength)
            } else {
                try await metadata.writeHeader(BigEndianWriter().u64(UInt64(newLength)).bytes, at: Qcow2Header.sizeOffset)
                try await file.flush()
            }
            setLength(newLength)
        }
        // A backing file longer than the old disk must not show through the new space, which reads as zeros.
        if let backing = backingNode, backing.length > oldLength {
            let end = min(newLength, backing.length)
            try await zeroRange(at: oldLength, length: end - oldLength, flags: [])
        }
    }

    private func shrink(from oldLength: Int64, to newLength: Int64, metadata: Qcow2Metadata) async throws {
        // Refused if this image holds data past the new end; zeros and unallocated space may go.
        var position = newLength
        while position < oldLength {
            let status = try await blockStatus(at: position, length: oldLength - position)
            if status.kind == .data {
                throw BlockError.unsupported("\(file.path): shrinking to \(newLength) bytes would discard data at \(position); " +
                                             "zero or discard it first")
            }
            position += max(1, status.length)
        }
        // Whole clusters past the end give up their entries (zero clusters may still hold a host cluster).
        let firstGone = (newLength + Int64(layout.clusterSize) - 1) >> clusterBits
        let lastCluster = (oldLength - 1) >> clusterBits
        try await metadata.mutex.withLock {
            if firstGone <= lastCluster {
                var updates: [Qcow2Metadata.EntryUpdate] = []
                for cluster in firstGone...lastCluster {
                    let slot = try await clusterMap.slot(ofGuestCluster: cluster)
                    guard slot.l2Offset != 0, slot.entry != 0 || slot.bitmap != 0 else { continue }
                    let l2 = try await metadata.writableL2Table(l1Index: slot.l1Index)
                    // Only zero entries get here (data was refused above); a zero cluster may still hold a host one.
                    if let old = Qcow2L2Entry.hostReference(entry: slot.entry, layout: layout) {
                        metadata.refcounts.free(old.offset, bytes: old.bytes)
                    }
                    updates.append(.init(l2Offset: l2, index: slot.index, entry: 0, bitmap: 0))
                }
                try await metadata.apply(updates)
                // The entries are gone from the disk before the header says the disk is smaller.
                try await metadata.flush()
            }
            try await metadata.writeHeader(BigEndianWriter().u64(UInt64(newLength)).bytes, at: Qcow2Header.sizeOffset)
            try await file.flush()
            setLength(newLength)
        }
    }
}
