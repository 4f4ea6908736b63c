/// `qemu-img check -r` for qcow2: OFLAG_COPIED fixed in place, refcounts rewritten as a new structure.
//
// The refcounts come from a full check, never from the stored ones: a new table and new blocks are written past
// the end of the file, made durable, and only then does one 12-byte header write switch to them. A crash before
// that write leaves the old structure in force and the image as it was; after it, the new one is complete. The
// old table and blocks are left in place with a refcount of 0 (free space, as QEMU's rebuild leaves them).
public enum Qcow2RefcountRebuild {
    /// Rounds of the placement's fixed-point search before giving up (each round only grows it; few are needed).
    static let maxPlacementRounds = 64
    /// Bytes of new refcount blocks written per request.
    static let writeChunkBytes = 1 << 20
    /// Clusters past the end of the file the check may have counted (a reference may end in the next cluster).
    static let maxClustersPastEnd = 2

    /// Repairs an image opened read-write; the caller holds the image's locks. Throws, changing nothing, when the
    /// image cannot be walked completely (the counts would be wrong) or its header is unusable.
    public static func repair(file: HostFile, mode: Qcow2RepairMode) async throws -> Qcow2RepairOutcome {
        guard !file.isReadOnly else { throw BlockError.readOnly }
        var check = try await Qcow2Check.analyze(file: file)
        if let reason = check.incompleteWalk {
            throw BlockError.unsupported("\(file.path): cannot repair: \(reason), so its refcounts cannot be computed")
        }
        let before = check.result
        let rebuild: Bool
        let fixFlags: Bool
        switch mode {
        case .all:
            rebuild = check.refcountProblems > 0
            // New refcounts can disagree with flags that agreed with the old ones.
            fixFlags = rebuild || check.copiedFlagErrors > 0
        case .leaks:
            // With a refcount block unreadable its stored counts are unknown, so none may be lowered.
            rebuild = before.leaks > 0 && before.checkErrors == 0
            fixFlags = false
        }
        var flagsFixed = 0
        if rebuild || fixFlags {
            let geometry = Geometry(check)
            let counts = try newCounts(&check, mode: mode, replacingStructure: rebuild)
            // Flags first: setting them changes no refcount, and they must match the counts about to be written.
            if fixFlags { flagsFixed = try await fixCopiedFlags(file: file, check: check, geometry: geometry, counts: counts) }
            if rebuild { try await writeStructure(file: file, geometry: geometry, counts: counts) }
        }
        let after = try await Qcow2Check.analyze(file: file)
        try await clearFeatureBits(file: file, after: after)
        return Qcow2RepairOutcome(before: before, after: after.result, rebuilt: rebuild, copiedFlagsFixed: flagsFixed)
    }

    /// For a read-write open: when the header's dirty bit says refcounts may lag (lazy refcounts after a crash),
    /// rebuilds them as `repair(mode: .all)` does and clears the bit. Returns whether a new refcount structure was
    /// written; throws, leaving the bit set, when the image cannot be repaired.
    static func rebuildIfDirty(file: HostFile) async throws -> Bool {
        guard try await incompatibleFeatures(of: file) & Qcow2IncompatibleFeature.dirty.mask != 0 else { return false }
        let outcome = try await repair(file: file, mode: .all)
        guard try await incompatibleFeatures(of: file) & Qcow2IncompatibleFeature.dirty.mask == 0 else {
            throw BlockError.corrupt("\(file.path): refcounts are still inconsistent after rebuilding them")
        }
        return outcome.rebuilt
    }

    /// The incompatible feature bits on disk now (always 0 for version 2, which has none).
    private static func incompatibleFeatures(of file: HostFile) async throws -> UInt64 {
        let size = try file.size()
        do {
            // The fixed fields and the compression type byte that follows them, as the check reads them.
            let bytes = try await file.readBytes(count: Int(min(size, 112)), at: 0)
            return try Qcow2Header(parsing: BigEndianBytes(bytes)).incompatibleFeatures
        } catch let error as Qcow2HeaderError {
            throw BlockError.invalidImage(path: file.path, reason: error.reason)
        }
    }

    // MARK: Counts

    /// What the repair needs of the image's geometry.
    struct Geometry {
        let clusterSize: Int
        let clusterBits: Int
        let refcountBits: Int
        let refcountMax: UInt64
        let l2Entries: Int
        let wordsPerL2Entry: Int

        init(clusterBits: Int, refcountOrder: Int, extendedL2: Bool) {
            self.clusterBits = clusterBits
            clusterSize = 1 << clusterBits
            refcountBits = 1 << refcountOrder
            refcountMax = refcountBits == 64 ? UInt64.max : (1 << UInt64(refcountBits)) - 1
            wordsPerL2Entry = extendedL2 ? 2 : 1
            l2Entries = clusterSize / (8 * wordsPerL2Entry)
        }

        init(_ check: Qcow2Check) {
            self.init(clusterBits: Int(check.header.clusterBits), refcountOrder: Int(check.header.refcountOrder),
                      extendedL2: check.header.hasExtendedL2)
        }

        /// Refcounts one refcount block holds.
        var refcountsPerBlock: Int { clusterSize * 8 / refcountBits }
    }

    /// The refcount every cluster gets, from the file's start to past the last one referenced. Takes the check's
    /// arrays (no copy of them is made).
    static func newCounts(_ check: inout Qcow2Check, mode: Qcow2RepairMode, replacingStructure: Bool) throws
        -> [UInt32]
    {
        let fileClusters = check.fileClusters
        let beyondEnd = check.beyondEnd
        let beyondEndStored = check.beyondEndStored
        let structure = replacingStructure ? check.refcountStructureReferences : []
        var (counts, stored) = check.takeCounts()
        if mode == .leaks {
            // Only a count above the references comes down; one below them stays as it is.
            for index in counts.indices where stored[index] < counts[index] { counts[index] = stored[index] }
        }
        stored = []
        // The old table and blocks lose the references they had from themselves.
        for cluster in structure where cluster < counts.count && counts[cluster] > 0 { counts[cluster] -= 1 }
        if let last = beyondEnd.keys.max() {
            guard last >= Int64(fileClusters), last - Int64(fileClusters) < Int64(maxClustersPastEnd) else {
                throw BlockError.corrupt("cluster \(last) lies too far past the end of the file")
            }
            counts += [UInt32](repeating: 0, count: Int(last) + 1 - fileClusters)
            for (cluster, references) in beyondEnd {
                let stored = UInt32(clamping: beyondEndStored[cluster] ?? 0)
                counts[Int(cluster)] = mode == .leaks ? min(references, stored) : references
            }
        }
        return counts
    }

    // MARK: OFLAG_COPIED

    /// Sets OFLAG_COPIED on each active L1 and L2 entry whose cluster's new refcount is 1 and clears it on the
    /// others, as QEMU's check does with -r all. Entries the check found corrupt (reserved bits, misaligned) and
    /// tables that overlap the header, the L1 table or the refcount structure are left alone.
    private static func fixCopiedFlags(file: HostFile, check: Qcow2Check, geometry: Geometry, counts: [UInt32])
        async throws -> Int
    {
        let clusterSize = Int64(geometry.clusterSize)
        let bits = Int64(geometry.clusterBits)
        let fileSize = try file.size()
        func word(_ bytes: [UInt8], at position: Int) -> UInt64 {
            bytes[position..<(position + 8)].reduce(0) { $0 << 8 | UInt64($1) }
        }
        func refcount(_ offset: Int64) -> UInt32 {
            let cluster = offset >> bits
            return cluster < Int64(counts.count) ? counts[Int(cluster)] : 0
        }
        let l1Offset = check.validated.l1Offset
        let l1Bytes = Int(check.header.l1Size) * 8
        var protected = Set(check.refcountStructureReferences)
        protected.insert(0)
        if l1Bytes > 0 {
            for cluster in (l1Offset >> bits)...((l1Offset + Int64(l1Bytes) - 1) >> bits) { protected.insert(Int(cluster)) }
        }
        var l1 = try await file.readBytes(count: l1Bytes, at: l1Offset)
        var fixed = 0
        var l1Changed = false
        for index in 0..<(l1Bytes / 8) {
            let entry = word(l1, at: index * 8)
            guard entry != 0, entry & Qcow2Check.l1ReservedMask == 0 else { continue }
            let l2Offset = Int64(entry & Qcow2Check.offsetMask)
            if l2Offset == 0 { continue }
            if (refcount(l2Offset) == 1) != (entry & Qcow2L2Entry.copiedFlag != 0) {
                l1[index * 8] ^= 0x80
                l1Changed = true
                fixed += 1
            }
            guard l2Offset & (clusterSize - 1) == 0, l2Offset <= fileSize - clusterSize,
                  !protected.contains(Int(l2Offset >> bits)) else { continue }
            var table = try await file.readBytes(count: geometry.clusterSize, at: l2Offset)
            var tableChanged = false
            for slot in 0..<geometry.l2Entries {
                let position = slot * geometry.wordsPerL2Entry * 8
                let l2Entry = word(table, at: position)
                guard l2Entry & Qcow2L2Entry.compressedFlag == 0, l2Entry & Qcow2Check.standardReservedMask == 0 else {
                    continue
                }
                let host = Int64(l2Entry & Qcow2Check.offsetMask)
                guard host != 0, host & (clusterSize - 1) == 0 else { continue }
                if (refcount(host) == 1) != (l2Entry & Qcow2L2Entry.copiedFlag != 0) {
                    table[position] ^= 0x80
                    tableChanged = true
                    fixed += 1
                }
            }
            if tableChanged { try await file.writeBytes(table, at: l2Offset) }
        }
        if l1Changed { try await file.writeBytes(l1, at: l1Offset) }
        if fixed > 0 { try await file.flush() }
        return fixed
    }

    // MARK: The new refcount structure

    /// Where the new blocks and table go: blocks from `firstCluster` on, one per entry of `blockIndexes` (the
    /// refcount table indexes they fill), then the table.
    struct Placement: Equatable {
        let firstCluster: Int
        let blockIndexes: [Int]
        let tableClusters: Int

        var tableCluster: Int { firstCluster + blockIndexes.count }
        /// One past the last cluster of the new structure.
        var endCluster: Int { tableCluster + tableClusters }
    }

    /// Places the new structure after every cluster in `counts`, covering itself: more blocks can need a larger
    /// table and a larger table more blocks, so the sizes grow until a round changes nothing.
    static func place(counts: [UInt32], geometry: Geometry) throws -> Placement {
        let perBlock = geometry.refcountsPerBlock
        let first = counts.count
        // Blocks the existing clusters need: those holding any non-zero refcount.
        var used = [Bool](repeating: false, count: (first + perBlock - 1) / perBlock)
        for (cluster, count) in counts.enumerated() where count != 0 { used[cluster / perBlock] = true }
        let usedCount = used.lazy.filter { $0 }.count
        let maxTableClusters = Int(Qcow2Limits.maxRefcountTableBytes) / geometry.clusterSize
        var blocks = 0
        var tableClusters = 1
        for _ in 0..<maxPlacementRounds {
            let end = first + blocks + tableClusters
            let firstOwn = first / perBlock
            let lastOwn = (end - 1) / perBlock
            // The new structure's own clusters have refcount 1; the blocks covering them are needed too.
            let ownExtra = (firstOwn...lastOwn).filter { $0 >= used.count || !used[$0] }.count
            let neededBlocks = usedCount + ownExtra
            let neededTable = ((lastOwn + 1) * 8 + geometry.clusterSize - 1) / geometry.clusterSize
            guard neededTable <= maxTableClusters else {
                throw BlockError.unsupported("a refcount table for \(end) clusters exceeds QEMU's 8 MiB limit")
            }
            if neededBlocks == blocks && neededTable == tableClusters {
                let indexes = (0...lastOwn).filter { $0 >= firstOwn || ($0 < used.count && used[$0]) }
                return Placement(firstCluster: first, blockIndexes: indexes, tableClusters: tableClusters)
            }
            blocks = max(blocks, neededBlocks)
            tableClusters = max(tableClusters, neededTable)
        }
        throw BlockError.unsupported("no placement of a new refcount structure was found")
    }

    /// Writes blocks and table, makes them durable, then switches the header to them.
    private static func writeStructure(file: HostFile, geometry: Geometry, counts: [UInt32]) async throws {
        let placement = try place(counts: counts, geometry: geometry)
        let clusterSize = geometry.clusterSize
        let perBlock = geometry.refcountsPerBlock
        func refcount(_ cluster: Int) -> UInt64 {
            if cluster < counts.count { return UInt64(counts[cluster]) }
            return cluster < placement.endCluster ? 1 : 0
        }
        let blocksPerChunk = max(1, writeChunkBytes / clusterSize)
        var chunkStart = 0
        while chunkStart < placement.blockIndexes.count {
            let chunkEnd = min(placement.blockIndexes.count, chunkStart + blocksPerChunk)
            var bytes = [UInt8](repeating: 0, count: (chunkEnd - chunkStart) * clusterSize)
            for slot in chunkStart..<chunkEnd {
                let firstCluster = placement.blockIndexes[slot] * perBlock
                let base = (slot - chunkStart) * clusterSize
                for entry in 0..<perBlock {
                    let value = refcount(firstCluster + entry)
                    if value == 0 { continue }
                    guard value <= geometry.refcountMax else {
                        throw BlockError.corrupt("\(file.path): refcount \(value) exceeds refcount_bits")
                    }
                    encode(value, into: &bytes, at: base, index: entry, bits: geometry.refcountBits)
                }
            }
            try await file.writeBytes(bytes, at: Int64(placement.firstCluster + chunkStart) * Int64(clusterSize))
            chunkStart = chunkEnd
        }
        var table = [UInt8](repeating: 0, count: placement.tableClusters * clusterSize)
        for (slot, index) in placement.blockIndexes.enumerated() {
            let offset = UInt64(placement.firstCluster + slot) * UInt64(clusterSize)
            for byte in 0..<8 { table[index * 8 + byte] = UInt8(truncatingIfNeeded: offset >> UInt64(56 - 8 * byte)) }
        }
        let tableOffset = UInt64(placement.tableCluster) * UInt64(clusterSize)
        try await file.writeBytes(table, at: Int64(tableOffset))
        try await file.flush()
        // refcount_table_offset and refcount_table_clusters in one write: no reader sees one without the other.
        var fields = [UInt8](repeating: 0, count: 12)
        for byte in 0..<8 { fields[byte] = UInt8(truncatingIfNeeded: tableOffset >> UInt64(56 - 8 * byte)) }
        let clusters = UInt32(placement.tableClusters)
        for byte in 0..<4 { fields[8 + byte] = UInt8(truncatingIfNeeded: clusters >> UInt32(24 - 8 * byte)) }
        try await file.writeBytes(fields, at: Qcow2Header.refcountTableFieldsOffset)
        try await file.flush()
    }

    /// Stores refcount `index` of the block starting at `base`; widths below a byte pack from each byte's least
    /// significant bit, wider ones are big-endian.
    static func encode(_ value: UInt64, into bytes: inout [UInt8], at base: Int, index: Int, bits: Int) {
        if bits < 8 {
            let bit = index * bits
            bytes[base + bit / 8] |= UInt8(truncatingIfNeeded: value) << UInt8(bit % 8)
            return
        }
        let width = bits / 8
        for byte in 0..<width {
            bytes[base + index * width + byte] = UInt8(truncatingIfNeeded: value >> UInt64(8 * (width - 1 - byte)))
        }
    }

    // MARK: Header bits

    /// Clears the dirty bit once the refcounts are exact, and the corrupt bit too once nothing else is wrong
    /// (QEMU's check does the same after a repair).
    private static func clearFeatureBits(file: HostFile, after: Qcow2Check) async throws {
        guard after.header.version >= 3 else { return }
        let features = after.header.incompatibleFeatures
        var clear: UInt64 = 0
        if after.refcountProblems == 0 { clear |= Qcow2IncompatibleFeature.dirty.mask }
        if after.result.corruptions == 0 && after.result.checkErrors == 0 {
            clear |= Qcow2IncompatibleFeature.dirty.mask | Qcow2IncompatibleFeature.corrupt.mask
        }
        guard features & clear != 0 else { return }
        let value = features & ~clear
        let bytes = (0..<8).map { UInt8(truncatingIfNeeded: value >> UInt64(56 - 8 * $0)) }
        try await file.writeBytes(bytes, at: Qcow2Header.incompatibleFeaturesOffset)
        try await file.flush()
    }
}
