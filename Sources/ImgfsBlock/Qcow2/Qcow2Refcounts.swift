/// The refcounts of a qcow2 image, for any refcount width: read on demand, changed in memory by allocations and
/// frees, written back by the metadata flush (blocks, then the table, then the header when the table moved).
///
/// Not thread-safe: every use is under the image's metadata mutex. Frees are deferred (`free` records them,
/// `releasePendingFrees` applies them) because a refcount may only drop once no L2 or L1 entry on disk still
/// names the cluster; allocation never hands out a cluster whose free is still pending.
final class Qcow2Refcounts: @unchecked Sendable {
    let file: HostFile
    let layout: Qcow2Layout
    let order: Int
    /// Refcounts in one block.
    let entriesPerBlock: Int64
    /// Host offsets of refcount blocks (0: none yet, all its refcounts are 0).
    private(set) var table: [Int64]
    private(set) var tableOffset: Int64
    private(set) var tableClusters: Int
    private var blocks: [Int: Qcow2RefcountBlock] = [:]
    private var dirtyBlocks: Set<Int> = []
    /// The table changed in memory (a new block) and must be written after the blocks it names.
    private(set) var tableDirty = false
    /// The table moved (it grew): the header must name the new one once it is durable.
    private(set) var tableMoved = false
    /// Tables replaced by a larger one, freed once the header names their successor durably.
    private var supersededTables: [(offset: Int64, clusters: Int)] = []
    /// Host clusters whose refcount drops by one at the next `releasePendingFrees`.
    private var pendingFrees: [Int64] = []
    /// No cluster below this one is free (QEMU's free_cluster_index).
    private var freeHint: Int64 = 0
    /// Where metadata lives, for the overlap check; new refcount blocks and tables are added as they appear.
    let metadataClusters: Qcow2MetadataClusters

    static let reservedMask: UInt64 = 0x1FF
    /// QEMU's limit on the refcount table.
    static let maxTableBytes = Int(Qcow2Limits.maxRefcountTableBytes)
    /// Clean blocks kept in memory at most (dirty ones are kept until written).
    static let maxCachedBlockBytes = 16 << 20

    private init(file: HostFile, layout: Qcow2Layout, order: Int, table: [Int64], tableOffset: Int64,
                 tableClusters: Int) {
        self.file = file
        self.layout = layout
        self.order = order
        entriesPerBlock = (Int64(layout.clusterSize) * 8) >> Int64(order)
        self.table = table
        self.tableOffset = tableOffset
        self.tableClusters = tableClusters
        metadataClusters = Qcow2MetadataClusters(clusterBits: layout.clusterBits)
        metadataClusters.insert(tableOffset, bytes: Int64(tableClusters * layout.clusterSize))
        for offset in table where offset != 0 { metadataClusters.insert(offset, bytes: Int64(layout.clusterSize)) }
    }

    /// Loads the table named by a validated header (its size is already bounded by the 8 MiB limit).
    static func load(file: HostFile, header: Qcow2Header, layout: Qcow2Layout) async throws -> Qcow2Refcounts {
        let clusters = Int(header.refcountTableClusters)
        let words = clusters == 0 ? [] : try await Qcow2ClusterMap.loadL1(
            file: file, offset: Int64(header.refcountTableOffset), entries: clusters * layout.clusterSize / 8)
        var offsets: [Int64] = []
        offsets.reserveCapacity(words.count)
        for (index, word) in words.enumerated() {
            let offset = word & ~reservedMask
            guard word & reservedMask == 0, offset < Qcow2Limits.maxHostOffset,
                  Int64(offset) & layout.clusterOffsetMask == 0 else {
                throw BlockError.invalidImage(path: file.path,
                                              reason: "refcount table entry \(index) (0x\(String(word, radix: 16))) is invalid")
            }
            offsets.append(Int64(offset))
        }
        return Qcow2Refcounts(file: file, layout: layout, order: Int(header.refcountOrder), table: offsets,
                              tableOffset: Int64(header.refcountTableOffset), tableClusters: clusters)
    }

    private var clusterSize: Int64 { Int64(layout.clusterSize) }
    private var clusterBits: Int64 { Int64(layout.clusterBits) }
    /// The first cluster past the end of the host file.
    private var endCluster: Int64 { (layout.fileSize + clusterSize - 1) >> clusterBits }

    var isDirty: Bool { !dirtyBlocks.isEmpty || tableDirty || tableMoved || !pendingFrees.isEmpty }

    // MARK: Reading

    /// The reference count of host cluster `cluster` (host offset / cluster size).
    func refcount(ofHostCluster cluster: Int64) async throws -> UInt64 {
        guard cluster >= 0 else { return 0 }
        let index = cluster / entriesPerBlock
        guard index < Int64(table.count), let block = try await block(Int(index)) else { return 0 }
        return block[Int(cluster % entriesPerBlock)]
    }

    private func block(_ index: Int) async throws -> Qcow2RefcountBlock? {
        if let block = blocks[index] { return block }
        let offset = table[index]
        if offset == 0 { return nil }
        guard offset <= layout.fileSize - clusterSize else {
            throw BlockError.corrupt("\(file.path): refcount block at \(offset) lies past the end of the file")
        }
        let block = Qcow2RefcountBlock(bytes: try await file.readBytes(count: layout.clusterSize, at: offset), order: order)
        guard block.bytes.count == layout.clusterSize else {
            throw BlockError.corrupt("\(file.path): refcount block at \(offset) is cut short by the end of the file")
        }
        blocks[index] = block
        return block
    }

    // MARK: Changing

    private func setRefcount(_ cluster: Int64, to value: UInt64) async throws {
        let index = Int(cluster / entriesPerBlock)
        if index >= table.count { try await growTable(toCover: index) }
        if table[index] == 0 { try await createBlock(index) }
        guard try await block(index) != nil else { return }
        blocks[index]![Int(cluster % entriesPerBlock)] = value
        dirtyBlocks.insert(index)
    }

    /// A new zeroed block for table entry `index`, placed past the end of the file (so never inside a range being
    /// allocated), counting itself.
    private func createBlock(_ index: Int) async throws {
        let home = try await findFree(count: 1, from: endCluster)
        layout.hostEnd.raise(to: (home + 1) << clusterBits)
        blocks[index] = Qcow2RefcountBlock(zeroedClusterSize: layout.clusterSize, order: order)
        dirtyBlocks.insert(index)
        table[index] = home << clusterBits
        metadataClusters.insert(home << clusterBits, bytes: clusterSize)
        tableDirty = true
        try await setRefcount(home, to: 1)
    }

    /// Moves the table to a larger one past the end of the file, big enough to also cover itself and the blocks
    /// its own clusters need.
    private func growTable(toCover index: Int) async throws {
        let perCluster = layout.clusterSize / 8
        var entries = max(index + 1, table.count * 2, perCluster)
        var clusters = 0
        for _ in 0..<2 {
            clusters = (entries + perCluster - 1) / perCluster
            let reach = (endCluster + Int64(clusters) + 64) / entriesPerBlock + 2
            entries = max(entries, Int(reach))
        }
        clusters = (entries + perCluster - 1) / perCluster
        entries = clusters * perCluster
        guard clusters * layout.clusterSize <= Self.maxTableBytes else {
            throw BlockError.unsupported("\(file.path): the refcount table would pass QEMU's limit of 8 MiB")
        }
        let start = try await findFree(count: clusters, from: endCluster)
        layout.hostEnd.raise(to: (start + Int64(clusters)) << clusterBits)
        if tableClusters > 0 { supersededTables.append((tableOffset, tableClusters)) }
        table.append(contentsOf: repeatElement(0, count: entries - table.count))
        tableOffset = start << clusterBits
        tableClusters = clusters
        metadataClusters.insert(tableOffset, bytes: Int64(clusters) << clusterBits)
        tableDirty = true
        tableMoved = true
        for cluster in start..<(start + Int64(clusters)) { try await setRefcount(cluster, to: 1) }
    }

    /// The first run of `count` free clusters at or after `start`.
    private func findFree(count: Int, from start: Int64) async throws -> Int64 {
        let limit = Int64(Qcow2Limits.maxHostOffset >> UInt64(clusterBits))
        var cluster = start
        var runStart = start
        var run = 0
        while cluster < limit {
            // A cluster known to hold metadata is never free, whatever a damaged refcount says: handing it out
            // would put a new table or guest data over a live one.
            if try await refcount(ofHostCluster: cluster) == 0 && !metadataClusters.overlaps(cluster << clusterBits, bytes: 1) {
                if run == 0 { runStart = cluster }
                run += 1
                if run == count { return runStart }
            } else {
                run = 0
            }
            cluster += 1
        }
        throw BlockError.unsupported("\(file.path): no room left below qcow2's 64 PiB host offset limit")
    }

    /// Allocates `count` contiguous host clusters (refcount 1) and returns the host offset of the first.
    func allocate(clusters count: Int) async throws -> Int64 {
        let start = try await findFree(count: count, from: freeHint)
        layout.hostEnd.raise(to: (start + Int64(count)) << clusterBits)
        for cluster in start..<(start + Int64(count)) { try await setRefcount(cluster, to: 1) }
        if start == freeHint || count == 1 { freeHint = start + Int64(count) }
        return start << clusterBits
    }

    /// Drops a just-allocated cluster nothing points at yet (a failed write), at once.
    func unallocate(_ offset: Int64) async throws {
        let cluster = offset >> clusterBits
        try await setRefcount(cluster, to: 0)
        freeHint = min(freeHint, cluster)
    }

    /// Records one reference less to every cluster `bytes` bytes from `offset` touch; applied by
    /// `releasePendingFrees` once the entries that named them are gone from the disk.
    func free(_ offset: Int64, bytes: Int64) {
        guard bytes > 0, offset >= 0 else { return }
        for cluster in (offset >> clusterBits)...((offset + bytes - 1) >> clusterBits) { pendingFrees.append(cluster) }
    }

    var hasPendingFrees: Bool { !pendingFrees.isEmpty }

    /// Applies the deferred frees; returns the clusters no longer referenced at all.
    ///
    /// A refcount already 0 is left alone: the image was inconsistent before (a check counts it), and going below
    /// zero would wrap.
    func releasePendingFrees() async throws -> [Int64] {
        let frees = pendingFrees
        pendingFrees = []
        var released: [Int64] = []
        for cluster in frees {
            let count = try await refcount(ofHostCluster: cluster)
            guard count > 0 else { continue }
            try await setRefcount(cluster, to: count - 1)
            if count == 1 {
                released.append(cluster)
                freeHint = min(freeHint, cluster)
            }
        }
        metadataClusters.remove(clusters: released)
        return released
    }

    // MARK: Writing back

    /// Writes every changed block to its place.
    func writeDirtyBlocks() async throws {
        for index in dirtyBlocks.sorted() {
            guard let block = blocks[index] else { continue }
            try await file.writeBytes(block.bytes, at: table[index])
        }
        dirtyBlocks.removeAll()
        if blocks.count * layout.clusterSize > Self.maxCachedBlockBytes {
            blocks = blocks.filter { dirtyBlocks.contains($0.key) }
        }
    }

    /// Writes the table (in place, or at its new home); the blocks it names must be durable first.
    func writeTable() async throws {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: tableClusters * layout.clusterSize, alignment: 4096)
        defer { buffer.deallocate() }
        buffer.initializeMemory(as: UInt8.self, repeating: 0)
        for (i, offset) in table.enumerated() {
            buffer.storeBytes(of: UInt64(offset).bigEndian, toByteOffset: i * 8, as: UInt64.self)
        }
        try await file.write(UnsafeRawBufferPointer(buffer), at: tableOffset)
        tableDirty = false
    }

    /// The header fields naming the table (refcount_table_offset, refcount_table_clusters: bytes 48-59).
    var headerFields: [UInt8] {
        BigEndianWriter().u64(UInt64(tableOffset)).u32(UInt32(tableClusters)).bytes
    }

    /// The header now names the table durably: the tables it replaced may go.
    func headerWritten() {
        tableMoved = false
        for old in supersededTables { free(old.offset, bytes: Int64(old.clusters) << clusterBits) }
        supersededTables = []
    }
}
