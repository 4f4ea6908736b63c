import Testing
@testable import ImgfsBlock

@Suite(.timeLimit(.minutes(1)))
struct SingleFlightLoaderTests {
    struct LoadFailure: Error, Equatable {}

    @Test(arguments: SyncTestExecutor.allCases)
    func concurrentCallersShareOneLoad(executor: SyncTestExecutor) async throws {
        let loader = SingleFlightLoader<Int64, String>()
        let calls = Locked(0)
        let release = Gate()
        let tasks = (0..<32).map { _ in
            spawn(on: executor) {
                try await loader.load(4096) {
                    calls.withLock { $0 += 1 }
                    await release.wait()
                    return "table"
                }
            }
        }
        // Every caller is either the one running the load or queued behind it before the load may finish.
        try await eventually { loader.waiterCount(for: 4096) == 31 }
        release.open()
        for task in tasks { #expect(try await finish(task) == "table") }
        #expect(calls.withLock { $0 } == 1)
        #expect(!loader.isLoading(4096))
    }

    @Test(arguments: SyncTestExecutor.allCases)
    func aFailureReachesEveryWaiterAndIsNotCached(executor: SyncTestExecutor) async throws {
        let loader = SingleFlightLoader<Int64, String>()
        let calls = Locked(0)
        let release = Gate()
        let tasks = (0..<32).map { _ in
            spawn(on: executor) {
                try await loader.load(0) {
                    calls.withLock { $0 += 1 }
                    await release.wait()
                    throw LoadFailure()
                }
            }
        }
        try await eventually { loader.waiterCount(for: 0) == 31 }
        release.open()
        for task in tasks {
            await #expect(throws: LoadFailure.self) { try await finish(task) }
        }
        #expect(calls.withLock { $0 } == 1)
        let retried = try await loader.load(0) {
            calls.withLock { $0 += 1 }
            return "second try"
        }
        #expect(retried == "second try")
        #expect(calls.withLock { $0 } == 2)
    }

    @Test func differentKeysLoadInParallel() async throws {
        let loader = SingleFlightLoader<Int, Int>()
        let bothInside = Barrier(count: 2)
        let tasks = (0..<2).map { key in
            spawn(on: .io) {
                try await loader.load(key) {
                    await bothInside.arriveAndWait()  // would hang if one key's load waited for the other's
                    return key * 10
                }
            }
        }
        #expect(try await finish(tasks[0]) == 0)
        #expect(try await finish(tasks[1]) == 10)
    }

    @Test func aWaiterRetriesWhenTheLoadingTaskWasCancelled() async throws {
        let loader = SingleFlightLoader<Int, Int>()
        let started = Gate()
        let cancelled = Gate()
        let leader = spawn(on: .io) {
            try await loader.load(1) {
                started.open()
                await cancelled.wait()
                try Task.checkCancellation()
                return 1
            }
        }
        await started.wait()
        let follower = spawn(on: .io) {
            try await loader.load(1) { 2 }
        }
        try await eventually { loader.waiterCount(for: 1) == 1 }
        leader.cancel()
        cancelled.open()
        await #expect(throws: CancellationError.self) { try await finish(leader) }
        #expect(try await finish(follower) == 2)
    }
}
