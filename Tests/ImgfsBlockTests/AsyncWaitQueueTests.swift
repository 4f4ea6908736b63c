import ImgfsTestSupport
import Testing
@testable import ImgfsBlock

@Suite(.timeLimit(.minutes(1)))
struct AsyncWaitQueueTests {
    /// A waiter checks a flag under the mutex and waits; a signaller sets it under the mutex and signals. Random
    /// yields move the signal into every gap the waiter has; a lost wakeup leaves a round hanging, reported by `finish`.
    @Test(arguments: SyncTestExecutor.allCases)
    func noLostWakeups(executor: SyncTestExecutor) async throws {
        for seed in UInt64(1)...300 {
            var random = SplitMix64(seed: seed)
            let waiterYields = Int(random.next() % 4)
            let signallerYields = Int(random.next() % 4)
            let useSignalAll = random.next() % 2 == 0
            let mutex = AsyncMutex()
            let queue = AsyncWaitQueue()
            let flag = UnguardedBox(false)
            let waiter = spawn(on: executor) {
                for _ in 0..<waiterYields { await Task.yield() }
                await mutex.lock()
                while !flag.value { await queue.wait(releasing: mutex) }
                mutex.unlock()
            }
            let signaller = spawn(on: executor) {
                for _ in 0..<signallerYields { await Task.yield() }
                await mutex.withLock {
                    flag.value = true
                    if useSignalAll { queue.signalAll() } else { queue.signalOne() }
                }
            }
            try await finish(waiter)
            try await finish(signaller)
            #expect(queue.isEmpty)
        }
    }

    /// Consumers wait for items under the mutex, producers add them and signal one consumer each.
    @Test(arguments: SyncTestExecutor.allCases)
    func producersAndConsumers(executor: SyncTestExecutor) async throws {
        for seed in UInt64(1)...20 {
            let mutex = AsyncMutex()
            let queue = AsyncWaitQueue()
            let available = UnguardedBox(0)
            let consumed = UnguardedBox(0)
            let consumers = (0..<8).map { index in
                spawn(on: executor) {
                    var random = SplitMix64(seed: seed &* 100 &+ UInt64(index))
                    for _ in 0..<50 {
                        await mutex.lock()
                        while available.value == 0 { await queue.wait(releasing: mutex) }
                        available.value -= 1
                        consumed.value += 1
                        mutex.unlock()
                        if random.next() % 3 == 0 { await Task.yield() }
                    }
                }
            }
            let producers = (0..<4).map { index in
                spawn(on: executor) {
                    var random = SplitMix64(seed: seed &* 1000 &+ UInt64(index))
                    for _ in 0..<100 {
                        await mutex.withLock {
                            available.value += 1
                            queue.signalOne()
                        }
                        if random.next() % 3 == 0 { await Task.yield() }
                    }
                }
            }
            for task in consumers + producers { try await finish(task) }
            #expect(consumed.value == 400)
            #expect(available.value == 0)
        }
    }

    @Test func aSignalWithNobodyWaitingIsNotRemembered() async throws {
        let queue = AsyncWaitQueue()
        #expect(!queue.signalOne())
        #expect(queue.signalAll() == 0)
        let woken = UnguardedBox(false)
        let waiter = spawn(on: .io) {
            await queue.wait()
            woken.value = true
        }
        try await eventually { queue.waiterCount == 1 }
        #expect(queue.signalOne())
        try await finish(waiter)
        #expect(woken.value)
    }

    @Test(arguments: SyncTestExecutor.allCases)
    func signalOneWakesTheOldestWaiter(executor: SyncTestExecutor) async throws {
        let queue = AsyncWaitQueue()
        let order = EventLog<Int>()
        var tasks: [Task<Void, any Error>] = []
        for index in 0..<8 {
            tasks.append(spawn(on: executor) {
                await queue.wait()
                order.append(index)
            })
            try await eventually { queue.waiterCount == index + 1 }
        }
        for woken in 1...8 {
            #expect(queue.signalOne())
            try await eventually { order.count == woken }
        }
        for task in tasks { try await finish(task) }
        #expect(order.all == Array(0..<8))
    }

    @Test func signalAllWakesEveryWaiter() async throws {
        let queue = AsyncWaitQueue()
        let tasks = (0..<10).map { _ in spawn(on: .io) { await queue.wait() } }
        try await eventually { queue.waiterCount == 10 }
        #expect(queue.signalAll() == 10)
        for task in tasks { try await finish(task) }
        #expect(queue.isEmpty)
    }
}
