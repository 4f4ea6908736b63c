/// A first-in, first-out queue of waiters for the primitives in this folder.
///
/// An array with a moving head: popping is O(1) without shifting, and the storage is reused once the queue runs
/// empty, so a steady trickle of waiters does not allocate.
struct FIFOQueue<Element> {
    private var storage: [Element] = []
    private var head = 0

    var isEmpty: Bool { head == storage.count }
    var count: Int { storage.count - head }

    mutating func append(_ element: Element) {
        storage.append(element)
    }

    mutating func popFirst() -> Element? {
        guard head < storage.count else { return nil }
        let element = storage[head]
        head += 1
        if head == storage.count {
            storage.removeAll(keepingCapacity: true)
            head = 0
        } else if head >= 64 && head * 2 >= storage.count {
            // Reclaim the consumed prefix once it dominates, so a queue that never runs empty stays bounded.
            storage.removeFirst(head)
            head = 0
        }
        return element
    }

    /// Takes every element, oldest first, leaving the queue empty.
    mutating func removeAll() -> [Element] {
        let elements = Array(storage[head...])
        storage.removeAll(keepingCapacity: true)
        head = 0
        return elements
    }
}
