/// Writes, write-zeroes, discard, truncate and flush of the qcow2 driver: clusters written in place when they are
/// ours alone, allocated with copy-on-write otherwise (unallocated, zero, compressed, or shared with a snapshot).
///
/// An allocating write has three steps, like QEMU's qcow2_co_pwritev: under the metadata mutex it makes the L2
/// tables writable, allocates host clusters and marks its guest clusters busy; without the mutex it writes the
/// data with the copy-on-write padding around it (one vectored write per contiguous host range); under the mutex
/// again it points the L2 entries at the new clusters and queues the old ones for freeing. In-place writes take
/// no lock at all.
extension Qcow2Driver {
    /// What one request does to one guest cluster.
    struct ClusterWrite {
        let cluster: Int64
        var slot: Qcow2L2Slot
        /// Host offset of the cluster written (its first byte).
        var host: Int64
        /// Whether `host` is a new cluster still to be allocated.
        let allocates: Bool
        /// Whether the new cluster lies past every cluster the file ever held, so it reads as zeros already.
        var isFresh = false
        /// Bytes of the cluster written: the guest's data plus the copy-on-write padding around it.
        let span: Range<Int>
        /// The guest's data within the cluster.
        let data: Range<Int>
        /// Where the data starts in the request's buffer.
        let bufferOffset: Int
        /// The new entry and subcluster bitmap (the host offset is or'ed in for allocations); nil: in place.
        var entry: (word: UInt64, bitmap: UInt64)?
        /// The reference the old entry held, dropped once the new entry is on disk.
        var release: (offset: Int64, bytes: Int64)?
    }

    var clusterBits: Int64 { Int64(layout.clusterBits) }

    func writeData(at offset: Int64, from buffer: UnsafeRawBufferPointer) async throws {
        guard let metadata else { throw refuseWrite() }
        if try await writeInPlace(at: offset, from: buffer) { return }
        try await writeAllocating(at: offset, from: buffer, metadata: metadata)
    }

    /// Writes without touching metadata when every cluster of the range is allocated, ours alone (COPIED) and
    /// not zero; returns false, having written nothing, otherwise.
    private func writeInPlace(at offset: Int64, from buffer: UnsafeRawBufferPointer) async throws -> Bool {
        var segments: [(host: Int64, range: Range<Int>)] = []
        var done = 0
        while done < buffer.count {
            let position = offset + Int64(done)
            let intra = Int(position & layout.clusterOffsetMask)
            let count = min(layout.clusterSize - intra, buffer.count - done)
            let slot = try await clusterMap.slot(ofGuestCluster: position >> clusterBits)
            guard let host = inPlaceHost(slot, bytes: intra..<(intra + count)) else { return false }
            if let last = segments.last, last.host + Int64(last.range.count) == host {
                segments[segments.count - 1].range = last.range.lowerBound..<(done + count)
            } else {
                segments.append((host, done..<(done + count)))
            }
            done += count
        }
        for segment in segments {
            try checkNotMetadata(segment.host, bytes: segment.range.count)
            try await file.write(UnsafeRawBufferPointer(rebasing: buffer[segment.range]), at: segment.host)
        }
        return true
    }

    /// The host offset of `bytes` of the slot's cluster when they can be written where they are.
    private func inPlaceHost(_ slot: Qcow2L2Slot, bytes: Range<Int>) -> Int64? {
        let entry = slot.entry
        guard slot.l2Offset != 0, entry & Qcow2L2Entry.compressedFlag == 0, entry & Qcow2L2Entry.copiedFlag != 0
        else { return nil }
        let firstUnit = bytes.lowerBound >> layout.unitBits
        let lastUnit = (bytes.upperBound - 1) >> layout.unitBits
        for unit in firstUnit...lastUnit {
            guard case .success(.data) = Qcow2L2Entry.state(entry: entry, bitmap: slot.bitmap, unit: unit, layout: layout)
            else { return nil }
        }
        return Int64(entry & Qcow2L2Entry.offsetMask) + Int64(bytes.lowerBound)
    }

    private func writeAllocating(at offset: Int64, from buffer: UnsafeRawBufferPointer,
                                 metadata: Qcow2Metadata) async throws {
        let first = offset >> clusterBits
        let last = (offset + Int64(buffer.count) - 1) >> clusterBits
        var plans: [ClusterWrite] = []
        await metadata.mutex.lock()
        do {
            await metadata.waitUntilFree(first...last)
            var done = 0
            for cluster in first...last {
                let intra = Int((offset + Int64(done)) & layout.clusterOffsetMask)
                let count = min(layout.clusterSize - intra, buffer.count - done)
                plans.append(try await plan(cluster: cluster, data: intra..<(intra + count), bufferOffset: done,
                                            metadata: metadata))
                done += count
            }
            let allocations = plans.filter(\.allocates).count
            if allocations > 0 {
                let freshFrom = layout.hostEnd.bytes
                var next = try await metadata.refcounts.allocate(clusters: allocations)
                for i in plans.indices where plans[i].allocates {
                    plans[i].host = next
                    plans[i].isFresh = next >= freshFrom
                    next += Int64(layout.clusterSize)
                }
                try await metadata.coverFile(through: layout.hostEnd.bytes)
            }
            metadata.markBusy(first...last)
        } catch {
            metadata.mutex.unlock()
            throw error
        }
        metadata.mutex.unlock()

        do {
            try await writeClusters(plans, from: buffer)
        } catch {
            await metadata.mutex.lock()
            for plan in plans where plan.allocates { try? await metadata.refcounts.unallocate(plan.host) }
            metadata.clearBusy(first...last)
            metadata.mutex.unlock()
            throw error
        }

        var completion = Qcow2Metadata.CompletedWrite(busy: first...last)
        for plan in plans {
            guard let entry = plan.entry else { continue }
            completion.updates.append(.init(l2Offset: plan.slot.l2Offset, index: plan.slot.index,
                                            entry: entry.word | UInt64(plan.host) | Qcow2L2Entry.copiedFlag,
                                            bitmap: entry.bitmap))
            if let release = plan.release { completion.releases.append(release) }
        }
        try await metadata.complete(completion)
    }

    /// Decides, under the metadata mutex, how the write of `data` reaches guest cluster `cluster`.
    private func plan(cluster: Int64, data: Range<Int>, bufferOffset: Int, metadata: Qcow2Metadata) async throws
        -> ClusterWrite
    {
        let found = try await clusterMap.slot(ofGuestCluster: cluster)
        if let host = inPlaceHost(found, bytes: data) {
            return ClusterWrite(cluster: cluster, slot: found, host: host - Int64(data.lowerBound), allocates: false,
                                span: data, data: data, bufferOffset: bufferOffset, entry: nil, release: nil)
        }
        let slot = try await writableSlot(ofGuestCluster: cluster, metadata: metadata)
        let entry = slot.entry
        let bitmap = slot.bitmap
        let clusterSize = layout.clusterSize
        let compressed = entry & Qcow2L2Entry.compressedFlag != 0
        let copied = entry & Qcow2L2Entry.copiedFlag != 0
        let oldHost = compressed ? 0 : Int64(entry & Qcow2L2Entry.offsetMask)
        // Whatever the old entry referenced is dropped, unless the cluster is ours and written in place.
        let release = Qcow2L2Entry.hostReference(entry: entry, layout: layout)
        let reuses = !compressed && copied && oldHost != 0
        func make(span: Range<Int>, bitmap newBitmap: UInt64) -> ClusterWrite {
            ClusterWrite(cluster: cluster, slot: slot, host: reuses ? oldHost : 0, allocates: !reuses, span: span,
                         data: data, bufferOffset: bufferOffset, entry: (0, newBitmap), release: reuses ? nil : release)
        }
        guard layout.extendedL2 else {
            // A whole cluster: a zero cluster that keeps its allocation is reused, anything else gets a new one.
            return make(span: 0..<clusterSize, bitmap: 0)
        }
        let unitSize = 1 << layout.unitBits
        let firstUnit = data.lowerBound / unitSize
        let lastUnit = (data.upperBound - 1) / unitSize
        let touched = UInt64((1 << (lastUnit + 1)) - (1 << firstUnit))
        let allocated = bitmap & 0xFFFF_FFFF
        let zero = bitmap >> 32
        if compressed {
            return make(span: 0..<clusterSize, bitmap: 0xFFFF_FFFF)
        }
        let newBitmap = (allocated | touched) | ((zero & ~touched) << 32)
        if reuses {
            // Allocated subclusters at the edges are written in place, byte for byte: another write may be
            // writing the rest of them right now. Only unallocated ones get padding.
            let start = allocated >> UInt64(firstUnit) & 1 != 0 ? data.lowerBound : firstUnit * unitSize
            let end = allocated >> UInt64(lastUnit) & 1 != 0 ? data.upperBound : (lastUnit + 1) * unitSize
            return make(span: start..<end, bitmap: newBitmap)
        }
        if oldHost != 0 {
            // Shared with a snapshot: the allocated subclusters are copied along.
            return make(span: 0..<clusterSize, bitmap: newBitmap)
        }
        return make(span: (firstUnit * unitSize)..<((lastUnit + 1) * unitSize), bitmap: newBitmap)
    }

    /// Guest cluster `cluster`'s entry once its L2 table is ours to change (allocated, or copied from a snapshot),
    /// with every unit validated: a corrupt entry fails the request, it is never rewritten blindly.
    func writableSlot(ofGuestCluster cluster: Int64, metadata: Qcow2Metadata) async throws -> Qcow2L2Slot {
        var slot = try await clusterMap.slot(ofGuestCluster: cluster)
        if try await metadata.writableL2Table(l1Index: slot.l1Index) != slot.l2Offset {
            slot = try await clusterMap.slot(ofGuestCluster: cluster)
        }
        for unit in 0..<(layout.extendedL2 ? 32 : 1) {
            if case .failure(let problem) = Qcow2L2Entry.state(entry: slot.entry, bitmap: slot.bitmap, unit: unit,
                                                               layout: layout) {
                throw BlockError.corrupt("\(file.path): guest cluster \(cluster): \(problem.reason)")
            }
        }
        return slot
    }

    /// Writes each cluster's span: padding read from what the guest sees there now, and the guest's data, with
    /// neighbours that follow each other on the host merged into one vectored write.
    ///
    /// A new cluster whose padding is all zeros is zeroed by the host instead (fallocate ZERO_RANGE, as QEMU's
    /// handle_alloc_space does), or not at all when it lies past every cluster the file ever held, and only the
    /// guest's data is written: a 4 KiB write into a fresh 64 KiB cluster then moves 4 KiB, not 64.
    private func writeClusters(_ plans: [ClusterWrite], from buffer: UnsafeRawBufferPointer) async throws {
        var padding: [UnsafeMutableRawBufferPointer] = []
        defer { for pad in padding { pad.deallocate() } }
        func pad(_ plan: ClusterWrite, _ range: Range<Int>) async throws -> UnsafeRawBufferPointer {
            let pad = UnsafeMutableRawBufferPointer.allocate(byteCount: range.count, alignment: 4096)
            padding.append(pad)
            try await read(at: (plan.cluster << clusterBits) + Int64(range.lowerBound), into: pad)
            return UnsafeRawBufferPointer(pad)
        }
        var zeroed: [(offset: Int64, length: Int64)] = []
        var runs: [(host: Int64, pieces: [UnsafeRawBufferPointer])] = []
        for plan in plans {
            let data = UnsafeRawBufferPointer(rebasing: buffer[plan.bufferOffset..<(plan.bufferOffset + plan.data.count)])
            let padded = plan.span != plan.data
            // The host can give zeros: the cluster reads as zeros already, or the file system zeroes ranges.
            let hostZeroes = plan.allocates && (plan.isFresh || zeroRangeWorks)
            let knownZero = padded && hostZeroes && padsReadAsZeros(plan)
            var head: UnsafeRawBufferPointer?
            var tail: UnsafeRawBufferPointer?
            if !knownZero && plan.span.lowerBound < plan.data.lowerBound {
                head = try await pad(plan, plan.span.lowerBound..<plan.data.lowerBound)
            }
            if !knownZero && plan.data.upperBound < plan.span.upperBound {
                tail = try await pad(plan, plan.data.upperBound..<plan.span.upperBound)
            }
            var pieces: [UnsafeRawBufferPointer]
            var start: Int64
            if knownZero || (padded && hostZeroes && head.map(Self.isZero) ?? true && tail.map(Self.isZero) ?? true) {
                if !plan.isFresh { zeroed.append((plan.host + Int64(plan.span.lowerBound), Int64(plan.span.count))) }
                pieces = [data]
                start = plan.host + Int64(plan.data.lowerBound)
            } else {
                pieces = [head, data, tail].compactMap { $0 }
                start = plan.host + Int64(plan.span.lowerBound)
            }
            if let last = runs.last, last.host + Int64(last.pieces.reduce(0) { $0 + $1.count }) == start,
               last.pieces.count + pieces.count <= Self.maxPiecesPerWrite {
                runs[runs.count - 1].pieces += pieces
            } else {
                runs.append((start, pieces))
            }
        }
        for range in zeroed {
            try checkNotMetadata(range.offset, bytes: Int(range.length))
            guard try await file.fallocate(mode: FallocateMode.zeroRange, offset: range.offset, length: range.length) else {
                // The host file system cannot: remember it, and write this request's zeros the plain way.
                markZeroRangeUnsupported()
                return try await writeClusters(plans, from: buffer)
            }
        }
        for run in runs {
            try checkNotMetadata(run.host, bytes: run.pieces.reduce(0) { $0 + $1.count })
            try await file.write(vector: Self.mergingAdjacent(run.pieces), at: run.host)
        }
    }

    /// Refuses a data write that would land on metadata: only a corrupt image (an entry naming a table, a
    /// refcount too low) can ask for one, and doing it would destroy the image.
    private func checkNotMetadata(_ host: Int64, bytes: Int) throws {
        guard let metadata, metadata.metadataClusters.overlaps(host, bytes: Int64(bytes)) else { return }
        throw BlockError.corrupt("\(file.path): a data write at host offset \(host) would overwrite metadata; refused")
    }

    /// Whether the cluster's old state makes its padding zeros without reading it: unallocated with nothing
    /// beneath, or zero (the common case of a write into a fresh image).
    private func padsReadAsZeros(_ plan: ClusterWrite) -> Bool {
        let entry = plan.slot.entry
        if entry & Qcow2L2Entry.compressedFlag != 0 || entry & Qcow2L2Entry.offsetMask != 0 { return false }
        let noBacking = backingNode == nil
        guard layout.extendedL2 else { return noBacking || (layout.version >= 3 && entry & Qcow2L2Entry.zeroFlag != 0) }
        let units = (plan.span.lowerBound >> layout.unitBits)...((plan.span.upperBound - 1) >> layout.unitBits)
        return units.allSatisfy { unit in noBacking || (plan.slot.bitmap >> UInt64(32 + unit)) & 1 != 0 }
    }

    private static func isZero(_ bytes: UnsafeRawBufferPointer) -> Bool {
        let words = bytes.count / 8
        let base = bytes.baseAddress!
        for i in 0..<words where base.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self) != 0 { return false }
        for i in (words * 8)..<bytes.count where bytes[i] != 0 { return false }
        return true
    }

    private static let maxPiecesPerWrite = 256

    /// Joins pieces that follow each other in memory (the guest's data cut at cluster boundaries).
    private static func mergingAdjacent(_ pieces: [UnsafeRawBufferPointer]) -> [UnsafeRawBufferPointer] {
        var merged: [UnsafeRawBufferPointer] = []
        for piece in pieces {
            if let last = merged.last, let end = last.baseAddress.map({ $0 + last.count }), end == piece.baseAddress {
                merged[merged.count - 1] = UnsafeRawBufferPointer(start: last.baseAddress, count: last.count + piece.count)
            } else {
                merged.append(piece)
            }
        }
        return merged
    }
}
