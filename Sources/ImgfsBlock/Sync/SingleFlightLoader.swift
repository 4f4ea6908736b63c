/// Runs at most one load per key at a time: callers that ask for a key while its load is running share its result.
///
/// Meant for caches whose misses are expensive (a qcow2 L2 table is one cluster of I/O): the cache looks itself up
/// first and calls `load` only on a miss, so concurrent misses on one table cost a single read. Nothing is kept
/// once a load ends — caching the value is the caller's business — and a failure reaches every caller that was
/// waiting for that load, while the next call starts a fresh one.
///
/// Cancellation: waiting callers cannot be cancelled. If the task running the load is cancelled and the load
/// throws `CancellationError`, waiters that are not cancelled themselves start a new load instead of failing with
/// someone else's cancellation.
public final class SingleFlightLoader<Key: Hashable & Sendable, Value: Sendable>: Sendable {
    private enum Outcome: Sendable {
        case loaded(Value)
        case failed(any Error)
        /// The load finished between the caller's two looks at the table; it should try again.
        case retry
    }

    private let flights = Locked<[Key: [UnsafeContinuation<Outcome, Never>]]>([:])

    public init() {}

    /// The value for `key`: from the load already running for it, or from `loader`, run by this caller.
    public func load(
        _ key: Key,
        isolation: isolated (any Actor)? = #isolation,
        using loader: () async throws -> Value
    ) async throws -> Value {
        while true {
            let isLeader = flights.withLock { flights -> Bool in
                if flights[key] != nil { return false }
                flights[key] = []
                return true
            }
            if isLeader {
                let result: Result<Value, any Error>
                do { result = .success(try await loader()) } catch { result = .failure(error) }
                let waiters = flights.withLock { $0.removeValue(forKey: key) } ?? []
                let outcome: Outcome
                switch result {
                case .success(let value): outcome = .loaded(value)
                case .failure(let error): outcome = .failed(error)
                }
                for waiter in waiters { waiter.resume(returning: outcome) }
                return try result.get()
            }
            let outcome = await withUnsafeContinuation { (continuation: UnsafeContinuation<Outcome, Never>) in
                let joined = flights.withLock { flights -> Bool in
                    guard flights[key] != nil else { return false }
                    flights[key]!.append(continuation)
                    return true
                }
                if !joined { continuation.resume(returning: .retry) }
            }
            switch outcome {
            case .loaded(let value):
                return value
            case .failed(let error):
                if error is CancellationError && !Task.isCancelled { continue }
                throw error
            case .retry:
                continue
            }
        }
    }

    /// Whether a load for `key` is running.
    public func isLoading(_ key: Key) -> Bool {
        flights.withLock { $0[key] != nil }
    }

    /// Callers waiting for the running load of `key` (for tests and diagnostics).
    func waiterCount(for key: Key) -> Int {
        flights.withLock { $0[key]?.count ?? 0 }
    }
}
