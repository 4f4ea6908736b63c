#if canImport(Glibc)
import Glibc
#endif

/// A plain pthread mutex for short critical sections in classes.
///
/// Never held across an `await`: the task may resume on another thread (unlocking a pthread mutex from a thread
/// that does not own it is undefined) and, while suspended, it would block every thread that wants the lock.
/// `lock()`/`unlock()` are therefore unavailable from async code; `withLock` stays available because its body is
/// synchronous, so the compiler already rules out a suspension inside it. Use `AsyncMutex` to hold a lock across
/// an `await`.
public final class PthreadLock: @unchecked Sendable {
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    public init() { pthread_mutex_init(mutex, nil) }
    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }
    @available(*, noasync, message: "a pthread lock must not be held across await; use withLock or AsyncMutex")
    public func lock() { pthread_mutex_lock(mutex) }
    @available(*, noasync, message: "a pthread lock must not be held across await; use withLock or AsyncMutex")
    public func unlock() { pthread_mutex_unlock(mutex) }
    @inline(__always)
    public func withLock<T>(_ body: () throws -> T) rethrows -> T {
        lock()
        defer { unlock() }
        return try body()
    }
}

/// State behind a pthread mutex.
///
/// Preferred over Synchronization.Mutex on hot paths: its slow path spins, and with more I/O threads than cores
/// the spinning thread often waits for one that is not even running (a quarter of all CPU time in a profile).
public final class Locked<State>: @unchecked Sendable {
    private let lock = PthreadLock()
    private var state: State

    public init(_ state: State) { self.state = state }

    /// Callable from async code: `body` is synchronous, so the lock is released before the caller can suspend.
    @inline(__always)
    public func withLock<T>(_ body: (inout State) throws -> T) rethrows -> T {
        lock.lock()
        defer { lock.unlock() }
        return try body(&state)
    }
}
