import Testing
@testable import ImgfsBlock

/// The mount's memory budget: caches pay and evict, requests wait their turn.
@Suite struct MemoryBudgetTests {
    @Test func cachesStayBelowTheHeadroomAndEvictTheirOwnEntries() {
        let budget = MemoryBudget(limit: 10_000, requestHeadroom: 4_000)
        let cache = BudgetedCache<Int, Int>(capacity: 100, entryBytes: 1_000, budget: budget)
        for key in 0..<20 { cache.insert(key, for: key) }
        // 6 entries fit below the headroom; the newest are kept.
        #expect(cache.count == 6 && budget.used == 6_000)
        #expect(cache.value(for: 19) == 19 && cache.value(for: 0) == nil)
        // Another cache finds nothing left, and does without.
        let other = BudgetedCache<Int, Int>(capacity: 100, entryBytes: 1_000, budget: budget)
        other.insert(1, for: 1)
        #expect(other.count == 0 && budget.used == 6_000)
    }

    @Test func capacityStillBoundsACacheWithBudgetToSpare() {
        let budget = MemoryBudget.unlimited
        let cache = BudgetedCache<Int, Int>(capacity: 3, entryBytes: 10, budget: budget)
        for key in 0..<10 { cache.insert(key, for: key) }
        #expect(cache.count == 3 && budget.used == 30)
    }

    @Test func requestsWaitForTheBudgetInOrder() async {
        let budget = MemoryBudget(limit: 1_000, requestHeadroom: 1_000)
        await budget.reserveForRequest(800)
        let order = Locked<[Int]>([])
        let first = Task {
            await budget.reserveForRequest(600)
            order.withLock { $0.append(1) }
        }
        while budget.waiting < 1 { await Task.yield() }
        let second = Task {
            await budget.reserveForRequest(100)
            order.withLock { $0.append(2) }
        }
        while budget.waiting < 2 { await Task.yield() }
        // 100 bytes would fit, but the earlier, larger request is not overtaken.
        #expect(order.withLock { $0 }.isEmpty)
        // Room for the first only: it goes, the second still waits behind it. (Released together, both would go
        // at once and their tasks could record themselves in either order.)
        budget.release(400)
        await first.value
        #expect(order.withLock { $0 } == [1])
        #expect(budget.waiting == 1)
        budget.release(400)
        await second.value
        #expect(order.withLock { $0 } == [1, 2])
        #expect(budget.used == 700 && budget.peak <= 1_000)
    }
}
