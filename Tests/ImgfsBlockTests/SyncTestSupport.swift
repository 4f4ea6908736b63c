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

/// How long a test waits for something that should happen at once before calling it a hang. Generous, because
/// the machine may be busy; it only bounds how long a broken primitive takes to fail.
let hangDeadline: Duration = .seconds(30)

/// A primitive under test left a task suspended for good (a lost wakeup, a deadlock).
struct Hang: Error, CustomStringConvertible {
    let what: String
    var description: String { "hang: \(what) did not finish within \(hangDeadline)" }
}

/// Waits until `condition` holds. Polling is for state changes the test cannot be told about directly (a task
/// reaching its suspension point); it gives up with `Hang` after `hangDeadline`.
func eventually(
    _ condition: () -> Bool, sourceLocation: SourceLocation = #_sourceLocation
) async throws {
    let deadline = ContinuousClock.now + hangDeadline
    while !condition() {
        if ContinuousClock.now > deadline { throw Hang(what: "condition at line \(sourceLocation.line)") }
        try await Task.sleep(nanoseconds: 200_000)
    }
}

/// The task's value, or `Hang` after `hangDeadline`. A suite's time limit cannot end a task stuck in a
/// continuation nobody resumes (it ignores cancellation), so without this a lost wakeup would hang the whole run.
func finish<T: Sendable>(
    _ task: Task<T, any Error>, sourceLocation: SourceLocation = #_sourceLocation
) async throws -> T {
    let outcome = Locked<(done: Bool, watchdog: Task<Void, Never>?)>((false, nil))
    let result: Result<T, any Error> = await withCheckedContinuation { continuation in
        let resumeOnce: @Sendable (Result<T, any Error>) -> Void = { result in
            let first = outcome.withLock { state -> Bool in
                defer { state.done = true }
                return !state.done
            }
            if first { continuation.resume(returning: result) }
        }
        let watchdog = Task {
            try? await Task.sleep(for: hangDeadline)
            resumeOnce(.failure(Hang(what: "task awaited at line \(sourceLocation.line)")))
        }
        outcome.withLock { $0.watchdog = watchdog }
        Task { resumeOnce(await task.result) }
    }
    outcome.withLock { $0.watchdog }?.cancel()
    return try result.get()
}
