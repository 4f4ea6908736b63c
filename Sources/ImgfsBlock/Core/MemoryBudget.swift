/// The bytes one mount may hold across every image it shows: metadata caches, snapshot tables, request buffers.
///
/// Caches take what is free up to `limit - requestHeadroom` and give it back by evicting; requests take from the
/// whole limit and wait when it is spent, which is the mount's backpressure. As caches never eat into the
/// headroom, a waiting request always gets its bytes once requests before it finish.
public final class MemoryBudget: Sendable {
    public let limit: Int
    /// Kept for request buffers: caches never use it.
    public let requestHeadroom: Int
    private let state = Locked(State())

    private struct State {
        var used = 0
        var peak = 0
        var waiters: [(bytes: Int, continuation: UnsafeContinuation<Void, Never>)] = []

        mutating func take(_ bytes: Int) {
            used += bytes
            peak = max(peak, used)
        }
    }

    public init(limit: Int, requestHeadroom: Int = 64 << 20) {
        self.limit = max(1, limit)
        self.requestHeadroom = min(max(0, requestHeadroom), self.limit)
    }

    /// No limit worth the name, for tools and tests that open a single image briefly.
    public static var unlimited: MemoryBudget { MemoryBudget(limit: Int.max / 2, requestHeadroom: 0) }

    /// Takes `bytes` for a cache if they fit below the headroom; false means evict or do without.
    public func tryReserveForCache(_ bytes: Int) -> Bool {
        state.withLock { state in
            guard bytes <= limit - requestHeadroom - state.used else { return false }
            state.take(bytes)
            return true
        }
    }

    /// Takes `bytes` for a request, waiting while the budget is spent (one request larger than the whole limit
    /// waits only for an empty budget).
    public func reserveForRequest(_ bytes: Int) async {
        if tryReserveForRequest(bytes) { return }
        await withUnsafeContinuation { continuation in
            let now = state.withLock { state -> Bool in
                // Checked again under the lock the release path takes, so no release goes unseen.
                if state.waiters.isEmpty, fits(bytes, state) {
                    state.take(bytes)
                    return true
                }
                state.waiters.append((bytes, continuation))
                return false
            }
            if now { continuation.resume() }
        }
    }

    /// Takes `bytes` for a request only if they fit now and nobody waits before it.
    public func tryReserveForRequest(_ bytes: Int) -> Bool {
        state.withLock { state in
            guard state.waiters.isEmpty, fits(bytes, state) else { return false }
            state.take(bytes)
            return true
        }
    }

    /// Takes `bytes` at once even past the limit, for a caller that must not wait (a FUSE loop thread copying a
    /// small write); the overdraft is repaid before any waiter is served.
    public func reserveNow(_ bytes: Int) {
        state.withLock { state in
            state.take(bytes)
        }
    }

    public func release(_ bytes: Int) {
        let ready = state.withLock { state -> [UnsafeContinuation<Void, Never>] in
            state.used -= bytes
            var ready: [UnsafeContinuation<Void, Never>] = []
            // First come, first served: a large request at the head is not overtaken by small ones.
            while let first = state.waiters.first, fits(first.bytes, state) {
                state.take(first.bytes)
                ready.append(first.continuation)
                state.waiters.removeFirst()
            }
            return ready
        }
        for continuation in ready { continuation.resume() }
    }

    /// Bytes held now, and the most ever held at once.
    public var used: Int { state.withLock { $0.used } }
    public var peak: Int { state.withLock { $0.peak } }
    /// Requests waiting for their share.
    var waiting: Int { state.withLock { $0.waiters.count } }

    private func fits(_ bytes: Int, _ state: State) -> Bool {
        state.used == 0 || bytes <= limit - state.used
    }
}
