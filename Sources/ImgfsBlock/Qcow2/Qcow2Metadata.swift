/// The metadata a writable qcow2 image changes (active L1, L2 tables, refcounts, header fields), changed under one
/// async mutex and written back in dependency order, as QEMU's qcow2-cache does.
///
/// Crash safety rests on the order of `flush`: refcount increases and the data they cover are made durable before
/// any L2 table that points at them is written, L2 tables before the L1 entries that name them, and refcount
/// decreases are applied only after the entries that referenced the clusters are gone from the disk. A crash at
/// any point can therefore leak clusters but never leave an entry pointing at unwritten or foreign data, nor a
/// refcount too low. Data I/O does not hold the mutex.
final class Qcow2Metadata: @unchecked Sendable {
    let file: HostFile
    let layout: Qcow2Layout
    let l1: Qcow2L1Table
    let l2Cache: Qcow2L2Cache
    let refcounts: Qcow2Refcounts
    /// Held by every change to the metadata, and by the flush.
    let mutex = AsyncMutex()
    /// Reads of this image's host clusters in flight; frees wait for those that looked up the old entries.
    let readers = GracePeriod()
    private(set) var l1Offset: Int64
    private var l1Dirty = false
    /// Guest clusters an allocating write is changing: others touching them wait, then look again.
    private var busyClusters: Set<Int64> = []
    private let busyWaiters = AsyncWaitQueue()
    /// Dirty L2 tables kept before a write triggers a flush on its own.
    private let dirtyTableLimit: Int
    /// Where guest data must never be written.
    var metadataClusters: Qcow2MetadataClusters { refcounts.metadataClusters }
    /// The host file's size as this image found it, and as it has set it since: the file covers every cluster
    /// allocated, and what lies past the clusters ever allocated (`layout.hostEnd` before an allocation) reads as
    /// zeros without being written.
    private var fileCovers: Int64

    init(file: HostFile, layout: Qcow2Layout, l1: Qcow2L1Table, l1Offset: Int64, l2Cache: Qcow2L2Cache,
         refcounts: Qcow2Refcounts) {
        self.file = file
        self.layout = layout
        self.l1 = l1
        self.l1Offset = l1Offset
        self.l2Cache = l2Cache
        self.refcounts = refcounts
        fileCovers = (try? file.size()) ?? layout.hostEnd.bytes
        dirtyTableLimit = max(16, min(l2Cache.capacity / 2, (32 << 20) / layout.clusterSize))
        let clusters = refcounts.metadataClusters
        clusters.insert(0, bytes: Int64(layout.clusterSize))
        clusters.insert(l1Offset, bytes: Int64(l1.count * 8))
        for entry in l1.words where entry & Qcow2L2Entry.offsetMask != 0 {
            clusters.insert(Int64(entry & Qcow2L2Entry.offsetMask), bytes: Int64(layout.clusterSize))
        }
    }

    // MARK: The host file's length (mutex held)

    /// Extends the host file (with a hole) to cover `end`, a step ahead so most allocations need no call. A new
    /// cluster past every cluster ever allocated then reads as zeros, and a write into it moves only the guest's
    /// bytes: no zeroing call per cluster, and never a cluster the file does not cover (which reads would call
    /// corrupt).
    func coverFile(through end: Int64) async throws {
        guard end > fileCovers else { return }
        let step = Int64(max(layout.clusterSize, Self.extensionStep))
        try await setFileSize((end + step - 1) / step * step)
    }

    /// How far ahead of the last allocated cluster the host file is extended at once.
    private static let extensionStep = 8 << 20

    /// Gives back what `coverFile` extended past the last allocated cluster; for close. (`hostEnd` starts at the
    /// file's size at open and only grows, so nothing the image had is cut.)
    func trimFile() async throws {
        let end = layout.hostEnd.bytes
        guard fileCovers > end else { return }
        try await setFileSize(end)
    }

    private func setFileSize(_ size: Int64) async throws {
        let file = self.file
        try await file.executor.perform { try file.setSize(size) }
        fileCovers = size
    }

    // MARK: Cluster reservations (mutex held)

    /// Waits, releasing the mutex meanwhile, until no other write is changing any of `clusters`.
    func waitUntilFree(_ clusters: ClosedRange<Int64>) async {
        while clusters.contains(where: { busyClusters.contains($0) }) {
            await busyWaiters.wait(releasing: mutex)
        }
    }

    func markBusy(_ clusters: ClosedRange<Int64>) {
        for cluster in clusters { busyClusters.insert(cluster) }
    }

    func clearBusy(_ clusters: ClosedRange<Int64>) {
        for cluster in clusters { busyClusters.remove(cluster) }
        _ = busyWaiters.signalAll()
    }

    // MARK: Tables (mutex held)

    /// The L2 table for L1 entry `l1Index`, made writable: allocated (zeroed) if there is none, copied if a
    /// snapshot shares it. Returns its host offset.
    func writableL2Table(l1Index: Int) async throws -> Int64 {
        guard let entry = l1.entry(Int64(l1Index)) else {
            throw BlockError.corrupt("\(file.path): L1 index \(l1Index) lies past the L1 table")
        }
        let offset: Int64
        switch Qcow2L2Entry.l2TableOffset(l1Entry: entry, layout: layout) {
        case .success(let value): offset = value
        case .failure(let problem): throw BlockError.corrupt("\(file.path): L1 entry \(l1Index): \(problem.reason)")
        }
        if offset != 0 && entry & Qcow2L2Entry.copiedFlag != 0 { return offset }
        let words: [UInt64]
        if offset == 0 {
            words = [UInt64](repeating: 0, count: layout.clusterSize / 8)
        } else {
            // Shared with a snapshot: the copy is ours, the original stays the snapshot's.
            words = try await l2Cache.table(at: offset, clusterSize: layout.clusterSize, file: file).words
        }
        let newOffset = try await refcounts.allocate(clusters: 1)
        metadataClusters.insert(newOffset, bytes: Int64(layout.clusterSize))
        l2Cache.update(Qcow2L2Table(words: words), at: newOffset)
        l1.set(l1Index, to: UInt64(newOffset) | Qcow2L2Entry.copiedFlag)
        l1Dirty = true
        if offset != 0 { refcounts.free(offset, bytes: Int64(layout.clusterSize)) }
        return newOffset
    }

    /// One L2 entry's new value.
    struct EntryUpdate {
        let l2Offset: Int64
        let index: Int
        let entry: UInt64
        let bitmap: UInt64
    }

    /// Applies entry updates, one new copy per table touched.
    func apply(_ updates: [EntryUpdate]) async throws {
        var byTable: [Int64: [EntryUpdate]] = [:]
        for update in updates { byTable[update.l2Offset, default: []].append(update) }
        for (offset, changes) in byTable {
            var words = try await l2Cache.table(at: offset, clusterSize: layout.clusterSize, file: file).words
            for change in changes {
                let word = change.index * layout.wordsPerL2Entry
                words[word] = change.entry
                if layout.extendedL2 { words[word + 1] = change.bitmap }
            }
            l2Cache.update(Qcow2L2Table(words: words), at: offset)
        }
        if l2Cache.dirtyCount > dirtyTableLimit { try await flush() }
    }

    /// What an allocating write hands back once its data is written: entries to point at it, references to drop,
    /// and the guest clusters it held busy.
    struct CompletedWrite {
        var updates: [EntryUpdate] = []
        var releases: [(offset: Int64, bytes: Int64)] = []
        let busy: ClosedRange<Int64>
    }

    /// Completed writes waiting for the mutex; whoever holds it next applies them all.
    private let completedWrites = Locked<[CompletedWrite]>([])

    /// Publishes a write's entries. Writes completing together are applied as one batch by the first of them to
    /// get the mutex (one copy of each L2 table per batch, not per write); the others find theirs applied already.
    /// Returns once this write's entries are in the tables.
    func complete(_ write: CompletedWrite) async throws {
        completedWrites.withLock { $0.append(write) }
        await mutex.lock()
        defer { mutex.unlock() }
        let batch = completedWrites.withLock { queued -> [CompletedWrite] in
            defer { queued = [] }
            return queued
        }
        guard !batch.isEmpty else { return }
        defer { for write in batch { clearBusy(write.busy) } }
        for write in batch {
            for release in write.releases { refcounts.free(release.offset, bytes: release.bytes) }
        }
        try await apply(batch.flatMap(\.updates))
    }

    /// Points the image at a new, larger L1 table: everything the old one named is flushed first, the new table
    /// is written and made durable, then the header names it and the new disk size in one write, and the old
    /// table's clusters are freed.
    func moveL1(entries: Int, size: Int64) async throws {
        try await flush()
        let bytes = entries * 8
        let clusters = (bytes + layout.clusterSize - 1) / layout.clusterSize
        let newOffset = try await refcounts.allocate(clusters: clusters)
        metadataClusters.insert(newOffset, bytes: Int64(clusters * layout.clusterSize))
        let oldOffset = l1Offset
        let oldClusters = (l1.count * 8 + layout.clusterSize - 1) / layout.clusterSize
        l1.grow(to: entries)
        try await writeL1(at: newOffset, clusters: clusters)
        // The new table's refcounts must be durable before the header names it.
        try await writeRefcounts()
        try await file.flush()
        // Bytes 24-47: size, crypt_method (0), l1_size, l1_table_offset, in one write.
        let fields = BigEndianWriter().u64(UInt64(size)).u32(0).u32(UInt32(entries)).u64(UInt64(newOffset)).bytes
        try await writeHeader(fields, at: Qcow2Header.sizeOffset)
        try await file.flush()
        l1Offset = newOffset
        l1Dirty = false
        if oldClusters > 0 { refcounts.free(oldOffset, bytes: Int64(oldClusters * layout.clusterSize)) }
    }

    func writeHeader(_ bytes: [UInt8], at offset: Int64) async throws {
        try await file.writeBytes(bytes, at: offset)
    }

    // MARK: Write-back (mutex held)

    var isDirty: Bool { refcounts.isDirty || l1Dirty || l2Cache.dirtyCount > 0 }

    /// Makes every completed write durable, metadata in dependency order (see the type's documentation).
    func flush() async throws {
        guard isDirty else { return try await file.flush() }
        try await writeRefcounts()
        try await file.flush()
        for (offset, table) in l2Cache.dirtyTables {
            try await table.withBigEndianBytes { try await file.write($0, at: offset) }
            l2Cache.markWritten(table, at: offset)
        }
        if l1Dirty {
            try await file.flush()
            try await writeL1(at: l1Offset, clusters: nil)
            l1Dirty = false
        }
        try await file.flush()
        // Nothing on disk names the freed clusters any more, and once the reads that found them in memory are done
        // nothing will read them: their refcounts may drop, and the host may have the space back. The lower
        // refcounts reach the disk with the next flush; a crash before then only leaks.
        if refcounts.hasPendingFrees { await readers.waitForEarlierReaders() }
        let released = try await refcounts.releasePendingFrees()
        try await punch(released)
    }

    /// Flushes until nothing is dirty (a flush's frees dirty the refcounts again); for close.
    func flushAll() async throws {
        for _ in 0..<4 where isDirty { try await flush() }
        try await file.flush()
    }

    /// Refcount blocks, then (after a barrier, so it never names a block not yet written) the table, then the
    /// header if the table moved.
    private func writeRefcounts() async throws {
        try await refcounts.writeDirtyBlocks()
        guard refcounts.tableDirty || refcounts.tableMoved else { return }
        try await file.flush()
        try await refcounts.writeTable()
        if refcounts.tableMoved {
            try await file.flush()
            try await writeHeader(refcounts.headerFields, at: Qcow2Header.refcountTableFieldsOffset)
            try await file.flush()
            refcounts.headerWritten()
        }
    }

    private func writeL1(at offset: Int64, clusters: Int?) async throws {
        let words = l1.words
        let bytes = clusters.map { $0 * layout.clusterSize } ?? words.count * 8
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: max(bytes, 8), alignment: 4096)
        defer { buffer.deallocate() }
        buffer.initializeMemory(as: UInt8.self, repeating: 0)
        for (i, word) in words.enumerated() { buffer.storeBytes(of: word.bigEndian, toByteOffset: i * 8, as: UInt64.self) }
        try await file.write(UnsafeRawBufferPointer(rebasing: buffer[..<bytes]), at: offset)
    }

    /// Gives freed clusters' space back to the host, merging neighbours into one call.
    private func punch(_ clusters: [Int64]) async throws {
        var index = 0
        let sorted = clusters.sorted()
        while index < sorted.count {
            var end = index + 1
            while end < sorted.count && sorted[end] == sorted[end - 1] + 1 { end += 1 }
            let offset = sorted[index] << Int64(layout.clusterBits)
            let length = Int64(end - index) << Int64(layout.clusterBits)
            // Advisory: a file system that cannot punch keeps the bytes, which nothing references any more.
            _ = try? await file.fallocate(mode: FallocateMode.punchHole | FallocateMode.keepSize, offset: offset,
                                          length: length)
            index = end
        }
    }
}
