/// A run of guest bytes that share one state, with host offsets contiguous for data.
struct Qcow2Run: Sendable, Equatable {
    /// The state at the run's first byte; for `.data`, the host offset of that byte.
    let state: Qcow2UnitState
    let length: Int64
}

/// One guest cluster's L1 and L2 entries as stored (entry and bitmap 0 when there is no L2 table).
struct Qcow2L2Slot: Sendable {
    let l1Index: Int
    let l1Entry: UInt64
    let l2Offset: Int64
    /// The entry's index in its L2 table.
    let index: Int
    let entry: UInt64
    /// The subcluster bitmap (extended L2 entries only).
    let bitmap: UInt64
}

/// Guest offset → host location through one L1 table (the active one or a snapshot's).
final class Qcow2ClusterMap: Sendable {
    let layout: Qcow2Layout
    let l1: Qcow2L1Table
    let file: HostFile
    let cache: Qcow2L2Cache

    init(layout: Qcow2Layout, l1: Qcow2L1Table, file: HostFile, cache: Qcow2L2Cache) {
        self.layout = layout
        self.l1 = l1
        self.file = file
        self.cache = cache
    }

    /// Reads and decodes an L1 table of `entries` entries (already bounded by the caller).
    static func loadL1(file: HostFile, offset: Int64, entries: Int) async throws -> [UInt64] {
        if entries == 0 { return [] }
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: entries * 8, alignment: 16)
        defer { buffer.deallocate() }
        try await file.readExactly(into: buffer, at: offset)
        return Qcow2L2Table(bigEndianBytes: UnsafeRawBufferPointer(buffer)).words
    }

    /// The run starting at `guestOffset`, at most `maxLength` bytes, never crossing an L2 table.
    ///
    /// Compressed runs never pass the end of their cluster; data runs merge clusters whose host offsets follow
    /// each other, so a reader can issue one pread per run.
    func run(at guestOffset: Int64, maxLength: Int64) async throws -> Qcow2Run {
        switch try locate(guestOffset, maxLength: maxLength) {
        case .run(let run):
            return run
        case .table(let l2Offset, let limit):
            let table = try await cache.table(at: l2Offset, clusterSize: layout.clusterSize, file: file)
            return try runInTable(table, guestOffset: guestOffset, limit: limit)
        }
    }

    /// `run(at:maxLength:)` from cached tables only: nil when its L2 table is not cached, or the entry is invalid
    /// (`run` then loads the table or reports the problem). Never waits, so a FUSE loop thread may call it.
    func cachedRun(at guestOffset: Int64, maxLength: Int64) -> Qcow2Run? {
        switch try? locate(guestOffset, maxLength: maxLength) {
        case .run(let run)?:
            return run
        case .table(let l2Offset, let limit)?:
            guard let table = cache.cached(at: l2Offset) else { return nil }
            return try? runInTable(table, guestOffset: guestOffset, limit: limit)
        case nil:
            return nil
        }
    }

    /// The stored L2 entry of guest cluster `cluster`, for a writer deciding what a write must change.
    func slot(ofGuestCluster cluster: Int64) async throws -> Qcow2L2Slot {
        let l1Index = cluster / Int64(layout.l2Entries)
        let index = Int(cluster % Int64(layout.l2Entries))
        guard let l1Entry = l1.entry(l1Index) else {
            throw BlockError.corrupt("\(file.path): guest cluster \(cluster) lies past the L1 table")
        }
        let l2Offset: Int64
        switch Qcow2L2Entry.l2TableOffset(l1Entry: l1Entry, layout: layout) {
        case .success(let offset): l2Offset = offset
        case .failure(let problem): throw corrupt(cluster << Int64(layout.clusterBits), problem)
        }
        if l2Offset == 0 {
            return Qcow2L2Slot(l1Index: Int(l1Index), l1Entry: l1Entry, l2Offset: 0, index: index, entry: 0, bitmap: 0)
        }
        let table = try await cache.table(at: l2Offset, clusterSize: layout.clusterSize, file: file)
        let word = index * layout.wordsPerL2Entry
        return Qcow2L2Slot(l1Index: Int(l1Index), l1Entry: l1Entry, l2Offset: l2Offset, index: index,
                           entry: table.words[word], bitmap: layout.extendedL2 ? table.words[word + 1] : 0)
    }

    /// Where the L1 table sends a lookup: a whole run already (no L2 table), or the L2 table to look in.
    private enum Location {
        case run(Qcow2Run)
        case table(l2Offset: Int64, limit: Int64)
    }

    private func locate(_ guestOffset: Int64, maxLength: Int64) throws -> Location {
        let tableSpan = layout.bytesPerL2Table
        let l1Index = guestOffset / tableSpan
        let spanEnd = (l1Index + 1) * tableSpan
        let limit = min(maxLength, spanEnd - guestOffset)
        guard let l1Entry = l1.entry(l1Index) else {
            // Only a snapshot view can get here (the active L1 is checked against the size at open).
            return .run(Qcow2Run(state: .unallocated, length: limit))
        }
        let l2Offset: Int64
        switch Qcow2L2Entry.l2TableOffset(l1Entry: l1Entry, layout: layout) {
        case .success(let offset): l2Offset = offset
        case .failure(let problem): throw corrupt(guestOffset, problem)
        }
        if l2Offset == 0 { return .run(Qcow2Run(state: .unallocated, length: limit)) }
        return .table(l2Offset: l2Offset, limit: limit)
    }

    private func runInTable(_ table: Qcow2L2Table, guestOffset: Int64, limit: Int64) throws -> Qcow2Run {
        let unitBits = Int64(layout.unitBits)
        let unitSize = layout.unitSize
        let unitsPerCluster = layout.extendedL2 ? 32 : 1
        let spanStart = guestOffset - guestOffset % layout.bytesPerL2Table
        let firstUnit = Int((guestOffset - spanStart) >> unitBits)
        let intraUnit = guestOffset & (unitSize - 1)
        let totalUnits = layout.l2Entries * unitsPerCluster
        let words = table.words

        func state(ofUnit unit: Int) throws -> Qcow2UnitState {
            let entryIndex = unit / unitsPerCluster
            let wordIndex = entryIndex * layout.wordsPerL2Entry
            let entry = words[wordIndex]
            let bitmap = layout.extendedL2 ? words[wordIndex + 1] : 0
            switch Qcow2L2Entry.state(entry: entry, bitmap: bitmap, unit: unit % unitsPerCluster, layout: layout) {
            case .success(let state): return state
            case .failure(let problem):
                throw corrupt(spanStart + Int64(unit) << unitBits, problem)
            }
        }

        let first = try state(ofUnit: firstUnit)
        if case .compressed = first {
            let clusterEnd = (guestOffset | layout.clusterOffsetMask) + 1
            return Qcow2Run(state: first, length: min(limit, clusterEnd - guestOffset))
        }
        var covered = unitSize - intraUnit
        var unit = firstUnit + 1
        var expectedHost: Int64? = nil
        if case .data(let host) = first { expectedHost = host + unitSize }
        while covered < limit && unit < totalUnits {
            let next = try state(ofUnit: unit)
            switch (first, next) {
            case (.zero, .zero), (.unallocated, .unallocated):
                break
            case (.data, .data(let host)) where host == expectedHost:
                expectedHost = host + unitSize
            default:
                return Qcow2Run(state: adjusted(first, by: intraUnit), length: covered)
            }
            covered += unitSize
            unit += 1
        }
        return Qcow2Run(state: adjusted(first, by: intraUnit), length: min(covered, limit))
    }

    private func adjusted(_ state: Qcow2UnitState, by intra: Int64) -> Qcow2UnitState {
        if case .data(let host) = state { return .data(hostOffset: host + intra) }
        return state
    }

    private func corrupt(_ guestOffset: Int64, _ problem: L2EntryProblem) -> BlockError {
        .corrupt("\(file.path): guest offset \(guestOffset): \(problem.reason)")
    }
}
