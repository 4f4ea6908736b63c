/// A lock for async code that suspends waiters instead of blocking threads, like QEMU's CoMutex.
///
/// It may be held across `await`, which a `PthreadLock` must never be. Waiters are served strictly in arrival
/// order: `unlock()` hands ownership straight to the oldest waiter (the mutex never becomes free in between), so
/// a task that just arrived cannot barge ahead of one that has been waiting, and no waiter starves.
///
/// Cancellation is not supported: a cancelled task waiting in `lock()` keeps waiting until it gets the lock.
/// Supporting it would need a per-waiter identity to remove from the queue, and every caller in the block layer
/// must finish the request it started anyway. The mutex is not reentrant and not owner-checked: `unlock()` may be
/// called from another task than the one that locked (QEMU's coroutines sometimes pass a lock along like this).
public final class AsyncMutex: Sendable {
    private struct State {
        var isLocked = false
        var waiters = FIFOQueue<UnsafeContinuation<Void, Never>>()
    }

    private let state = Locked(State())

    public init() {}

    /// Waits until this task owns the mutex.
    public func lock() async {
        if tryLock() { return }
        await withUnsafeContinuation { (continuation: UnsafeContinuation<Void, Never>) in
            // Checked again under the lock: the owner may have unlocked since `tryLock()` failed.
            let acquired = state.withLock { state -> Bool in
                if !state.isLocked {
                    state.isLocked = true
                    return true
                }
                state.waiters.append(continuation)
                return false
            }
            if acquired { continuation.resume() }
        }
    }

    /// Takes the mutex if it is free, without waiting.
    public func tryLock() -> Bool {
        state.withLock { state in
            if state.isLocked { return false }
            state.isLocked = true
            return true
        }
    }

    /// Releases the mutex, handing it to the oldest waiter if there is one.
    public func unlock() {
        let next = state.withLock { state -> UnsafeContinuation<Void, Never>? in
            precondition(state.isLocked, "AsyncMutex.unlock() without lock()")
            // Ownership passes directly to the next waiter: `isLocked` stays true.
            if let next = state.waiters.popFirst() { return next }
            state.isLocked = false
            return nil
        }
        next?.resume()
    }

    /// Runs `body` while owning the mutex.
    public func withLock<T>(
        isolation: isolated (any Actor)? = #isolation,
        _ body: () async throws -> T
    ) async rethrows -> T {
        await lock()
        defer { unlock() }
        return try await body()
    }

    /// Tasks suspended in `lock()` right now (for tests and diagnostics).
    var waiterCount: Int { state.withLock { $0.waiters.count } }
}
