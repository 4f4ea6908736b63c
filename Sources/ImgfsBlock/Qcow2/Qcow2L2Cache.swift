/// One L2 table, its big-endian words already converted to host order.
final class Qcow2L2Table: Sendable {
    let words: [UInt64]

    init(words: [UInt64]) { self.words = words }

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

/// A bounded least-recently-used cache of L2 tables keyed by their host offset.
///
/// Tasks missing the same table at once share one load (a sequential reader's readahead and its next request
/// often miss together), so a table is read once however many wait for it.
final class Qcow2L2Cache: Sendable {
    private let tables: BudgetedCache<Int64, Qcow2L2Table>
    private let loads = SingleFlightLoader<Int64, Qcow2L2Table>()

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
        tables.value(for: offset)
    }

    func insert(_ table: Qcow2L2Table, at offset: Int64) {
        tables.insert(table, for: offset)
    }

    var count: Int { tables.count }

    /// The table at `offset`, loading it from `file` on a miss.
    func table(at offset: Int64, clusterSize: Int, file: HostFile) async throws -> Qcow2L2Table {
        if let table = cached(at: offset) { return table }
        return try await loads.load(offset) {
            // A load that finished while this caller looked for the flight has inserted it already.
            if let table = cached(at: offset) { return table }
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: clusterSize, alignment: 16)
            defer { buffer.deallocate() }
            try await file.readExactly(into: buffer, at: offset)
            let table = Qcow2L2Table(bigEndianBytes: UnsafeRawBufferPointer(buffer))
            insert(table, at: offset)
            return table
        }
    }
}
