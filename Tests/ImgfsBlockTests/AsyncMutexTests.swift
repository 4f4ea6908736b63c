import ImgfsTestSupport
import Testing
@testable import ImgfsBlock

@Suite(.timeLimit(.minutes(1)))
struct AsyncMutexTests {
    @Test(arguments: SyncTestExecutor.allCases)
    func mutualExclusionUnderContention(executor: SyncTestExecutor) async throws {
        let mutex = AsyncMutex()
        let counter = UnguardedBox(0)
        let inside = UnguardedBox(0)
        let maxInside = UnguardedBox(0)
        let tasks = (0..<64).map { _ in
            spawn(on: executor) {
                for _ in 0..<200 {
                    await mutex.withLock {
                        inside.value += 1
                        maxInside.value = max(maxInside.value, inside.value)
                        let seen = counter.value
                        await Task.yield()  // another task would run here and clobber the counter if let in
                        counter.value = seen + 1
                        inside.value -= 1
                    }
                }
            }
        }
        for task in tasks { try await finish(task) }
        #expect(counter.value == 64 * 200)
        #expect(maxInside.value == 1)
    }

    @Test(arguments: SyncTestExecutor.allCases)
    func waitersGetTheLockInArrivalOrder(executor: SyncTestExecutor) async throws {
        let mutex = AsyncMutex()
        let order = EventLog<Int>()
        await mutex.lock()
        var tasks: [Task<Void, any Error>] = []
        for index in 0..<16 {
            tasks.append(spawn(on: executor) {
                await mutex.lock()
                order.append(index)
                mutex.unlock()
            })
            try await eventually { mutex.waiterCount == index + 1 }
        }
        mutex.unlock()
        for task in tasks { try await finish(task) }
        #expect(order.all == Array(0..<16))
    }

    @Test func unlockHandsOwnershipToTheWaiterSoNobodyBarges() async throws {
        let mutex = AsyncMutex()
        let release = Gate()
        await mutex.lock()
        let waiter = spawn(on: .io) {
            await mutex.lock()
            await release.wait()
            mutex.unlock()
        }
        try await eventually { mutex.waiterCount == 1 }
        mutex.unlock()
        // Still locked: owned by the waiter from the moment of unlock(), whether or not it has run yet.
        #expect(!mutex.tryLock())
        release.open()
        try await finish(waiter)
        #expect(mutex.tryLock())
        mutex.unlock()
    }

    @Test func withLockReleasesWhenTheBodyThrows() async throws {
        struct Failure: Error {}
        let mutex = AsyncMutex()
        await #expect(throws: Failure.self) {
            try await mutex.withLock { throw Failure() }
        }
        #expect(mutex.tryLock())
        mutex.unlock()
    }
}
