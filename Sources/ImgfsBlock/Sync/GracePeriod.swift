import Synchronization

/// Lets a writer wait until every reader that started before it has finished, while readers take no lock: RCU's
/// grace period, for async tasks.
///
/// A qcow2 read looks a cluster up and then reads the host bytes the entry named; an overwrite of a compressed
/// cluster drops the old cluster's refcount at the next flush, after which the space may be allocated again. The
/// flush waits here first, so a read that looked up the old entry never reads reallocated bytes.
///
/// Readers count themselves in one of two phases. `waitForEarlierReaders` opens the other phase and waits until
/// the old one has no readers left. A reader that read the phase before the switch but counted itself after it
/// started its lookup after the switch, so it already sees what the writer changed before calling; it is waited
/// for all the same, which costs nothing but time. Calls to `waitForEarlierReaders` must not overlap.
public final class GracePeriod: Sendable {
    private let phase = Atomic<Int>(0)
    private let evenReaders = Atomic<Int>(0)
    private let oddReaders = Atomic<Int>(0)
    private let waiter = Locked<UnsafeContinuation<Void, Never>?>(nil)

    /// A reader's registration, handed back to `leave`.
    public struct Reader: Sendable {
        fileprivate let phase: Int
    }

    public init() {}

    /// Registers a reader; call before looking anything up, and `leave` once done with what was found.
    public func enter() -> Reader {
        let current = phase.load(ordering: .sequentiallyConsistent) & 1
        _ = add(1, to: current)
        return Reader(phase: current)
    }

    public func leave(_ reader: Reader) {
        if add(-1, to: reader.phase) == 0 { wakeWaiter() }
    }

    /// Returns once every reader registered before this call has left.
    public func waitForEarlierReaders() async {
        let old = phase.add(1, ordering: .sequentiallyConsistent).oldValue & 1
        while count(old) != 0 {
            await withUnsafeContinuation { (continuation: UnsafeContinuation<Void, Never>) in
                waiter.withLock { $0 = continuation }
                // The last reader may have left before the continuation was stored, finding nobody to wake.
                if count(old) == 0 { wakeWaiter() }
            }
        }
    }

    /// How many waits have begun, for tests.
    var currentPhase: Int { phase.load(ordering: .sequentiallyConsistent) }

    /// Adds `delta` to the phase's count and returns the new count.
    private func add(_ delta: Int, to phase: Int) -> Int {
        phase == 0 ? evenReaders.add(delta, ordering: .sequentiallyConsistent).newValue
                   : oddReaders.add(delta, ordering: .sequentiallyConsistent).newValue
    }

    private func count(_ phase: Int) -> Int {
        phase == 0 ? evenReaders.load(ordering: .sequentiallyConsistent)
                   : oddReaders.load(ordering: .sequentiallyConsistent)
    }

    /// Resumes the waiter, if any, exactly once (it re-checks its count).
    private func wakeWaiter() {
        waiter.withLock { stored -> UnsafeContinuation<Void, Never>? in
            defer { stored = nil }
            return stored
        }?.resume()
    }
}
