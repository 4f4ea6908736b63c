#if canImport(Glibc)
import Glibc
#endif

/// A plain pthread mutex for short critical sections in classes.
public final class PthreadLock: @unchecked Sendable {
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    public init() { pthread_mutex_init(mutex, nil) }
    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }
    public func lock() { pthread_mutex_lock(mutex) }
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

    @inline(__always)
    public func withLock<T>(_ body: (inout State) throws -> T) rethrows -> T {
        lock.lock()
        defer { lock.unlock() }
        return try body(&state)
    }
}
