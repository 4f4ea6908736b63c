/// A least-recently-used cache whose entries are paid for from a mount's `MemoryBudget`.
///
/// An insert that does not fit evicts this cache's own oldest entries until it does, or is simply not kept: a
/// cache is an optimisation, and the budget is a promise.
public final class BudgetedCache<Key: Hashable & Sendable, Value: Sendable>: Sendable {
    /// Entries kept at most, whatever the budget.
    public let capacity: Int
    /// Bytes one entry costs.
    public let entryBytes: Int
    private let budget: MemoryBudget
    private let entries: Locked<LRUList<Key, Value>>

    public init(capacity: Int, entryBytes: Int, budget: MemoryBudget) {
        self.capacity = max(1, capacity)
        self.entryBytes = entryBytes
        self.budget = budget
        entries = Locked(LRUList(capacity: max(1, capacity)))
    }

    deinit {
        budget.release(count * entryBytes)
    }

    public func value(for key: Key) -> Value? {
        entries.withLock { $0.value(for: key) }
    }

    /// Keeps `value` if the budget allows, evicting older entries of this cache to make room.
    public func insert(_ value: Value, for key: Key) {
        var evicted: [Value] = []
        entries.withLock { lru in
            if lru.value(for: key) != nil {
                if let old = lru.insert(value, for: key) { evicted.append(old) }
                return
            }
            while !budget.tryReserveForCache(entryBytes) {
                guard let old = lru.removeLeastRecent() else { return }
                budget.release(entryBytes)
                evicted.append(old)
            }
            // At capacity the list reuses its oldest slot: that entry's share pays for this one.
            if let old = lru.insert(value, for: key) {
                budget.release(entryBytes)
                evicted.append(old)
            }
        }
        _ = evicted  // released here, outside the lock
    }

    public var count: Int { entries.withLock { $0.count } }
}
