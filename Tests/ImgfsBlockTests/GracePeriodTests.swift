import ImgfsTestSupport
import Synchronization
import Testing
@testable import ImgfsBlock

@Suite(.timeLimit(.minutes(1)))
struct GracePeriodTests {
    @Test func withNoReadersTheWaitReturnsAtOnce() async throws {
        let grace = GracePeriod()
        let reader = grace.enter()
        grace.leave(reader)
        try await finish(Task { await grace.waitForEarlierReaders() })
    }

    /// The wait ends when the readers that were in before it leave, however many arrive meanwhile.
    @Test(arguments: SyncTestExecutor.allCases)
    func waitsForEarlierReadersOnly(executor: SyncTestExecutor) async throws {
        let grace = GracePeriod()
        let early = (0..<3).map { _ in grace.enter() }
        let done = Atomic<Bool>(false)
        let waiting = spawn(on: executor) {
            await grace.waitForEarlierReaders()
            done.store(true, ordering: .sequentiallyConsistent)
        }
        // A reader that comes once the wait has begun, and stays until the end.
        try await eventually { grace.currentPhase == 1 }
        let late = grace.enter()
        for reader in early.dropLast() { grace.leave(reader) }
        try await Task.sleep(for: .milliseconds(20))
        let returnedEarly = done.load(ordering: .sequentiallyConsistent)
        #expect(!returnedEarly, "returned while an earlier reader was still in")
        grace.leave(early.last!)
        try await finish(waiting)
        grace.leave(late)
    }

    /// Readers come and go from many tasks while a writer waits again and again: every wait ends (no lost wakeup),
    /// and never before each reader that was in when it began has left. The readers do a fixed amount of work, so
    /// the test never keeps a shared pool busy for long.
    @Test(arguments: SyncTestExecutor.allCases)
    func manyReadersAndRepeatedWaits(executor: SyncTestExecutor) async throws {
        let grace = GracePeriod()
        let readerCount = 8
        // Who is in, how often each has left, and how many readers are done: changed together, under one lock.
        let state = Locked<(inside: Set<Int>, exits: [Int], finished: Int)>(([], [Int](repeating: 0, count: 8), 0))
        let readers = (0..<readerCount).map { index in
            spawn(on: executor) {
                for _ in 0..<300 {
                    let reader = grace.enter()
                    state.withLock { _ = $0.inside.insert(index) }
                    await Task.yield()
                    state.withLock { state in
                        state.inside.remove(index)
                        state.exits[index] += 1
                    }
                    grace.leave(reader)
                }
                state.withLock { $0.finished += 1 }
            }
        }
        while state.withLock({ $0.finished }) < readerCount {
            let before = state.withLock { $0 }
            try await finish(Task { await grace.waitForEarlierReaders() })
            let after = state.withLock { $0.exits }
            for index in before.inside {
                #expect(after[index] > before.exits[index], "reader \(index) was still in when the wait ended")
            }
        }
        for reader in readers { try await finish(reader) }
    }
}
