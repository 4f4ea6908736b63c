/// A fixed-capacity map that forgets its least recently used entry; O(1) lookups, inserts and evictions.
///
/// Entries live in an array linked by indices (most recent at `head`) so no per-entry nodes are allocated.
struct LRUList<Key: Hashable, Value> {
    private struct Slot {
        var key: Key
        /// nil once removed, so a freed slot holds no memory.
        var value: Value?
        var previous: Int
        var next: Int
    }

    let capacity: Int
    private var slots: [Slot] = []
    /// Slots emptied by `removeLeastRecent`, reused before the array grows.
    private var free: [Int] = []
    private var index: [Key: Int] = [:]
    private var head = -1
    private var tail = -1

    init(capacity: Int) {
        self.capacity = max(1, capacity)
    }

    var count: Int { index.count }

    mutating func value(for key: Key) -> Value? {
        guard let slot = index[key] else { return nil }
        moveToFront(slot)
        return slots[slot].value
    }

    /// Removes the least recently used entry and returns its value (nil when empty).
    mutating func removeLeastRecent() -> Value? {
        guard tail >= 0 else { return nil }
        let slot = tail
        unlink(slot)
        index.removeValue(forKey: slots[slot].key)
        let value = slots[slot].value
        slots[slot].value = nil
        free.append(slot)
        return value
    }

    /// Inserts or replaces; returns the value it displaced, so the caller can release it outside any lock.
    @discardableResult
    mutating func insert(_ value: Value, for key: Key) -> Value? {
        if let slot = index[key] {
            let old = slots[slot].value
            slots[slot].value = value
            moveToFront(slot)
            return old
        }
        var evicted: Value?
        let slot: Int
        if let reused = free.popLast() {
            slot = reused
            slots[slot].key = key
            slots[slot].value = value
        } else if slots.count < capacity {
            slot = slots.count
            slots.append(Slot(key: key, value: value, previous: -1, next: -1))
        } else {
            // Reuse the least recently used slot.
            slot = tail
            unlink(slot)
            index.removeValue(forKey: slots[slot].key)
            evicted = slots[slot].value
            slots[slot].key = key
            slots[slot].value = value
        }
        index[key] = slot
        linkAtFront(slot)
        return evicted
    }

    private mutating func moveToFront(_ slot: Int) {
        if slot == head { return }
        unlink(slot)
        linkAtFront(slot)
    }

    private mutating func unlink(_ slot: Int) {
        let previous = slots[slot].previous
        let next = slots[slot].next
        if previous >= 0 { slots[previous].next = next } else { head = next }
        if next >= 0 { slots[next].previous = previous } else { tail = previous }
        slots[slot].previous = -1
        slots[slot].next = -1
    }

    private mutating func linkAtFront(_ slot: Int) {
        slots[slot].previous = -1
        slots[slot].next = head
        if head >= 0 { slots[head].previous = slot }
        head = slot
        if tail < 0 { tail = slot }
    }
}
