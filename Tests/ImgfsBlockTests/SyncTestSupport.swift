import ImgfsBlock
import Testing

// Helpers for the Sync suites: gates, barriers and polling built on continuations, so tests order events
// explicitly instead of relying on timing.

/// Where a test's tasks run: Swift's default pool or our I/O threads. Both must work.
enum SyncTestExecutor: String, CaseIterable, Sendable, CustomTestStringConvertible {
    case cooperative, io
    var testDescription: String { rawValue }
}

/// Starts `body` as a task on the chosen executor.
@discardableResult
func spawn<T: Sendable>(
    on executor: SyncTestExecutor, _ body: @escaping @Sendable () async throws -> T
) -> Task<T, any Error> {
    switch executor {
    case .cooperative: Task { try await body() }
    case .io: Task(executorPreference: IOExecutor.shared) { try await body() }
    }
}

/// A one-shot gate: `wait()` suspends until `open()` has been called (before or after).
final class Gate: Sendable {
    private let state = Locked<(isOpen: Bool, waiters: [CheckedContinuation<Void, Never>])>((false, []))

    func open() {
        let waiters = state.withLock { state in
            state.isOpen = true
            defer { state.waiters = [] }
            return state.waiters
        }
        for waiter in waiters { waiter.resume() }
    }

    func wait() async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let isOpen = state.withLock { state in
                if !state.isOpen { state.waiters.append(continuation) }
                return state.isOpen
            }
            if isOpen { continuation.resume() }
        }
    }
}

/// Lets `count` tasks through only once all of them have arrived: proof that they are inside at the same time.
final class Barrier: Sendable {
    private let state: Locked<(remaining: Int, waiters: [CheckedContinuation<Void, Never>])>

    init(count: Int) { state = Locked((count, [])) }

    func arriveAndWait() async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let release = state.withLock { state -> [CheckedContinuation<Void, Never>] in
                state.remaining -= 1
                state.waiters.append(continuation)
                guard state.remaining == 0 else { return [] }
                defer { state.waiters = [] }
                return state.waiters
            }
            for waiter in release { waiter.resume() }
        }
    }
}

/// An append-only log of events from many tasks.
final class EventLog<Event: Sendable>: Sendable {
    private let events = Locked<[Event]>([])
    func append(_ event: Event) { events.withLock { $0.append(event) } }
    var all: [Event] { events.withLock { $0 } }
    var count: Int { events.withLock { $0.count } }
}

/// A value mutated only by whoever holds some outer lock under test (deliberately unsynchronised).
final class UnguardedBox<Value>: @unchecked Sendable {
    var value: Value
    init(_ value: Value) { self.value = value }
}

/// Waits until `condition` holds. Polling is for state changes the test cannot be told about directly (a task
/// reaching its suspension point); the suite's time limit turns a condition that never holds into a failure.
func eventually(_ condition: () -> Bool) async throws {
    while !condition() {
        try await Task.sleep(nanoseconds: 200_000)
    }
}
