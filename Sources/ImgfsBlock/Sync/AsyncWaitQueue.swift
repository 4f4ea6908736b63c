/// A queue of suspended tasks waiting for a condition, like QEMU's CoQueue: a condition variable for async code.
///
/// It has no memory: a signal with nobody waiting is lost, so waiters must check their condition under an
/// `AsyncMutex` and wait with `wait(releasing:)`, which enqueues the waiter before it releases the mutex; a
/// signaller that changes the condition under the same mutex therefore always finds the waiter queued. Waiters
/// are woken oldest first. Cancellation is not supported: a cancelled waiter stays queued until signalled.
public final class AsyncWaitQueue: Sendable {
    private let waiters = Locked(FIFOQueue<UnsafeContinuation<Void, Never>>())

    public init() {}

    /// Suspends until `signalOne()` or `signalAll()` wakes this task.
    public func wait() async {
        await withUnsafeContinuation { (continuation: UnsafeContinuation<Void, Never>) in
            waiters.withLock { $0.append(continuation) }
        }
    }

    /// Releases `mutex` (which the caller owns), suspends until signalled, and takes `mutex` again before
    /// returning, like `qemu_co_queue_wait(queue, lock)`. The condition may have changed again by then (another
    /// task can take the mutex first), so callers re-check it in a loop.
    public func wait(releasing mutex: AsyncMutex) async {
        await withUnsafeContinuation { (continuation: UnsafeContinuation<Void, Never>) in
            // Queued first, released second: a signal sent by the next owner of the mutex cannot be lost.
            waiters.withLock { $0.append(continuation) }
            mutex.unlock()
        }
        await mutex.lock()
    }

    /// Wakes the oldest waiter; returns whether there was one.
    @discardableResult
    public func signalOne() -> Bool {
        guard let waiter = waiters.withLock({ $0.popFirst() }) else { return false }
        waiter.resume()
        return true
    }

    /// Wakes every waiter queued at the time of the call; returns how many.
    @discardableResult
    public func signalAll() -> Int {
        let woken = waiters.withLock { $0.removeAll() }
        for waiter in woken { waiter.resume() }
        return woken.count
    }

    /// Whether no task is waiting (QEMU's `qemu_co_queue_empty`).
    public var isEmpty: Bool { waiters.withLock { $0.isEmpty } }

    /// Tasks waiting right now (for tests and diagnostics).
    var waiterCount: Int { waiters.withLock { $0.count } }
}
