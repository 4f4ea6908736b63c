import Synchronization

/// One L2 table, its big-endian words already converted to host order. Immutable: a writer makes a changed copy,
/// so readers never see a table half-updated.
final class Qcow2L2Table: Sendable {
    let words: [UInt64]

    init(words: [UInt64]) { self.words = words }

    /// The table's bytes as stored: big-endian words.
    func withBigEndianBytes<T>(_ body: (UnsafeRawBufferPointer) async throws -> T) async rethrows -> T {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: words.count * 8, alignment: 4096)
        defer { buffer.deallocate() }
        for (i, word) in words.enumerated() {
            buffer.storeBytes(of: word.bigEndian, toByteOffset: i * 8, as: UInt64.self)
        }
        return try await body(UnsafeRawBufferPointer(buffer))
    }

    /// Decodes a table from the bytes of one cluster.
    init(bigEndianBytes buffer: UnsafeRawBufferPointer) {
        let count = buffer.count / 8
        words = [UInt64](unsafeUninitializedCapacity: count) { storage, initialized in
            for i in 0..<count {
                storage[i] = UInt64(bigEndian: buffer.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self))
            }
            initialized = count
        }
    }
}

/// A bounded least-recently-used cache of L2 tables keyed by their host offset, with the dirty tables of a
/// writable image pinned beside it until they are written.
///
/// Tasks missing the same table at once share one load (a sequential reader's readahead and its next request
/// often miss together), so a table is read once however many wait for it. Dirty tables are never evicted: the
/// metadata flush writes them, in order after the refcounts and data they depend on, and only then lets them go.
final class Qcow2L2Cache: Sendable {
    private let tables: BudgetedCache<Int64, Qcow2L2Table>
    private let loads = SingleFlightLoader<Int64, Qcow2L2Table>()
    private let dirty = Locked(DirtyTables())
    /// How many tables are dirty, readable without the lock: lookups on a read-only image (always 0) skip it.
    private let dirtyTableCount = Atomic<Int>(0)

    private struct DirtyTables {
        var tables: [Int64: Qcow2L2Table] = [:]
        /// Bumped by every change and write-back; a load that saw it move may have read a table while it was being
        /// rewritten, and looks again rather than cache what it read.
        var changes: UInt64 = 0
    }

    /// At most `capacity` tables of `tableBytes` each, paid for from the mount's `budget`.
    init(capacity: Int, tableBytes: Int, budget: MemoryBudget) {
        tables = BudgetedCache(capacity: capacity, entryBytes: tableBytes, budget: budget)
    }

    /// Tables kept at most.
    var capacity: Int { tables.capacity }

    /// The default capacity: enough tables for the whole disk, but at most 32 MiB of them (or the bytes the
    /// user asked for), and never fewer than 4 tables.
    static func defaultCapacity(layout: Qcow2Layout, virtualSize: Int64, requestedBytes: Int?) -> Int {
        let tableBytes = layout.clusterSize
        let tablesForDisk = Int(min(virtualSize / layout.bytesPerL2Table + 1, Int64(Int32.max)))
        let budget = requestedBytes ?? (32 << 20)
        let tablesInBudget = max(4, budget / tableBytes)
        return requestedBytes == nil ? max(4, min(tablesForDisk, tablesInBudget)) : tablesInBudget
    }

    func cached(at offset: Int64) -> Qcow2L2Table? {
        if dirtyTableCount.load(ordering: .acquiring) > 0, let table = dirty.withLock({ $0.tables[offset] }) { return table }
        return tables.value(for: offset)
    }

    /// Replaces the table at `offset` with a changed one, which stays pinned until `markWritten`.
    func update(_ table: Qcow2L2Table, at offset: Int64) {
        dirty.withLock { state in
            state.tables[offset] = table
            state.changes &+= 1
            dirtyTableCount.store(state.tables.count, ordering: .releasing)
        }
    }

    var dirtyCount: Int { dirty.withLock { $0.tables.count } }

    /// The tables changed since they were last written, by offset.
    var dirtyTables: [(offset: Int64, table: Qcow2L2Table)] {
        dirty.withLock { $0.tables.map { ($0.key, $0.value) } }.sorted { $0.offset < $1.offset }
    }

    /// Unpins a table once written, unless it changed again meanwhile.
    func markWritten(_ table: Qcow2L2Table, at offset: Int64) {
        dirty.withLock { state in
            tables.insert(table, for: offset)
            if state.tables[offset] === table { state.tables[offset] = nil }
            state.changes &+= 1
            dirtyTableCount.store(state.tables.count, ordering: .releasing)
        }
    }

    func insert(_ table: Qcow2L2Table, at offset: Int64) {
        tables.insert(table, for: offset)
    }

    var count: Int { tables.count }

    /// The table at `offset`, loading it from `file` on a miss.
    func table(at offset: Int64, clusterSize: Int, file: HostFile) async throws -> Qcow2L2Table {
        if let table = cached(at: offset) { return table }
        return try await loads.load(offset) {
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: clusterSize, alignment: 16)
            defer { buffer.deallocate() }
            while true {
                let before = dirty.withLock { $0.changes }
                // A load that finished while this caller looked for the flight has inserted it already.
                if let table = cached(at: offset) { return table }
                try await file.readExactly(into: buffer, at: offset)
                let table = Qcow2L2Table(bigEndianBytes: UnsafeRawBufferPointer(buffer))
                // A table changed or written meanwhile may have been read half old, half new: look again. Checked
                // and inserted under one lock, so a write-back cannot slip in between and be overwritten.
                let current = dirty.withLock { state -> Bool in
                    guard state.changes == before else { return false }
                    tables.insert(table, for: offset)
                    return true
                }
                if current { return table }
            }
        }
    }
}
