/// What a tracked request does; informational only, since `isSerialising` alone decides who waits for whom.
public enum TrackedRequestKind: Sendable, Hashable {
    case read, write, writeZeroes, discard, copyOnRead, truncate, flush
}

/// One request registered with a node's `TrackedRequests`, from `begin` until `end`.
public struct TrackedRequest: Sendable, Hashable {
    public let offset: Int64
    public let length: Int64
    public let kind: TrackedRequestKind
    public let isSerialising: Bool
    /// The range other requests are checked against: the request's own bytes, rounded out to the alignment when
    /// it is serialising (a copy-on-write touches the whole cluster, not just the bytes asked for).
    public let overlapRange: Range<Int64>
    /// Arrival order; a request only ever waits for requests with a smaller id.
    let id: UInt64
}

/// The in-flight requests of one block node, and the waiting that keeps conflicting ones apart (QEMU's tracked
/// requests in block/io.c).
///
/// Rules, in arrival order (`begin` registers a request before it waits, so later arrivals see it):
/// - a serialising request (allocating write, copy-on-write, copy-on-read, truncate) waits until every
///   overlapping request that arrived before it has ended, its own range rounded out to `alignment`;
/// - any other request waits only for overlapping serialising requests that arrived before it.
/// Since waits only ever point at earlier arrivals there are no deadlock cycles, and conflicting requests run in
/// the order they arrived: no later request overtakes an earlier one it conflicts with. Ranges are half-open, so
/// zero-length requests (a flush) never conflict but are still counted by drains.
///
/// Draining: `drain()` waits for every request that had begun when it was called; requests arriving meanwhile
/// proceed and are not waited for (so a busy node cannot starve it). A drained section (`beginDrain()` /
/// `endDrain()`, or `drained { }`) is QEMU's bdrv_drained_begin/end: it waits until nothing is in flight and
/// holds every request that arrives until the last overlapping section ends; held requests then run in arrival
/// order. A task must not drain while it has a request of the same node in flight: it would wait for itself.
///
/// Cancellation is not supported: a cancelled task still waits for its turn, and every successful `begin` must be
/// paired with exactly one `end` (use `withTracked`).
///
/// The common case, no serialising request in flight, costs one short lock, an append and a removal from a small
/// sorted array; nothing is allocated unless a request has to wait.
public final class TrackedRequests: Sendable {
    private struct Entry {
        let id: UInt64
        let range: Range<Int64>
        let isSerialising: Bool
        /// Earlier requests this one still waits for; exact, because the set of earlier requests never grows.
        var blockers: Int
        /// Arrived during a drained section; may not start before it ends.
        var isHeld: Bool
        /// Set once the waiting task has suspended; nil while it runs or before it got to suspend.
        var continuation: UnsafeContinuation<Void, Never>?

        var mustWait: Bool { blockers > 0 || isHeld }
    }

    private struct DrainWaiter {
        /// Waits until no running (non-held) request with an id below this remains.
        let before: UInt64
        let continuation: UnsafeContinuation<Void, Never>
    }

    private struct State {
        /// Sorted by id, because ids are appended in increasing order and removals keep the order.
        var entries: [Entry] = []
        var nextID: UInt64 = 0
        var serialisingCount = 0
        var waitingCount = 0
        var drainDepth = 0
        var drainWaiters: [DrainWaiter] = []

        func index(of id: UInt64) -> Int {
            var low = 0
            var high = entries.count
            while low < high {
                let middle = (low + high) / 2
                if entries[middle].id < id { low = middle + 1 } else { high = middle }
            }
            precondition(low < entries.count && entries[low].id == id, "TrackedRequests.end() of an unknown request")
            return low
        }

        /// How many registered requests a new one over `range` must wait for: the one overlap rule for both
        /// `begin` and `tryBegin`. A serialising request waits for every overlap, any request for overlapping
        /// serialising ones.
        func blockers(of range: Range<Int64>, serialising: Bool) -> Int {
            guard serialising || serialisingCount > 0 else { return 0 }
            var count = 0
            for other in entries where (serialising || other.isSerialising) && other.range.overlaps(range) {
                count += 1
            }
            return count
        }

        func hasRunningRequest(before: UInt64) -> Bool {
            for entry in entries {
                if entry.id >= before { return false }
                if !entry.isHeld { return true }
            }
            return false
        }

        /// Drain waiters whose requests have all ended, removed from the list.
        mutating func satisfiedDrainWaiters(into woken: inout [UnsafeContinuation<Void, Never>]) {
            guard !drainWaiters.isEmpty else { return }
            var waiters = drainWaiters
            waiters.removeAll { waiter in
                if hasRunningRequest(before: waiter.before) { return false }
                woken.append(waiter.continuation)
                return true
            }
            drainWaiters = waiters
        }
    }

    private let state: Locked<State>

    public init() {
        var initial = State()
        // Room for the kernel's usual queue depth, so the hot path does not grow the array.
        initial.entries.reserveCapacity(128)
        state = Locked(initial)
    }

    /// Registers a request for `length` bytes at `offset` and waits until it may run (see the type's rules).
    /// `alignment` (cluster or grain size) only matters for serialising requests.
    public func begin(
        offset: Int64,
        length: Int64,
        kind: TrackedRequestKind,
        serialising: Bool = false,
        alignment: Int64 = 1
    ) async -> TrackedRequest {
        let range = Self.overlapRange(offset: offset, length: length, serialising: serialising, alignment: alignment)
        let (request, mustWait) = state.withLock { state -> (TrackedRequest, Bool) in
            let id = state.nextID
            state.nextID += 1
            let blockers = state.blockers(of: range, serialising: serialising)
            let entry = Entry(id: id, range: range, isSerialising: serialising, blockers: blockers,
                              isHeld: state.drainDepth > 0, continuation: nil)
            state.entries.append(entry)
            if serialising { state.serialisingCount += 1 }
            if entry.mustWait { state.waitingCount += 1 }
            let request = TrackedRequest(offset: offset, length: length, kind: kind, isSerialising: serialising,
                                         overlapRange: range, id: id)
            return (request, entry.mustWait)
        }
        if mustWait {
            await withUnsafeContinuation { (continuation: UnsafeContinuation<Void, Never>) in
                // Requests may have ended between the registration and here; then nobody will resume us.
                let ready = state.withLock { state -> Bool in
                    let index = state.index(of: request.id)
                    if state.entries[index].mustWait {
                        state.entries[index].continuation = continuation
                        return false
                    }
                    return true
                }
                if ready { continuation.resume() }
            }
        }
        return request
    }

    /// Registers a request only if it may run at once: nil, and nothing registered, when `begin` would have to
    /// wait (a conflicting earlier request, or a drained section). For callers that must not suspend, such as a
    /// FUSE loop thread serving a cached read; pair a non-nil result with `end`.
    public func tryBegin(
        offset: Int64,
        length: Int64,
        kind: TrackedRequestKind,
        serialising: Bool = false,
        alignment: Int64 = 1
    ) -> TrackedRequest? {
        let range = Self.overlapRange(offset: offset, length: length, serialising: serialising, alignment: alignment)
        return state.withLock { state -> TrackedRequest? in
            if state.drainDepth > 0 || state.blockers(of: range, serialising: serialising) > 0 { return nil }
            let id = state.nextID
            state.nextID += 1
            state.entries.append(Entry(id: id, range: range, isSerialising: serialising, blockers: 0, isHeld: false,
                                       continuation: nil))
            if serialising { state.serialisingCount += 1 }
            return TrackedRequest(offset: offset, length: length, kind: kind, isSerialising: serialising,
                                  overlapRange: range, id: id)
        }
    }

    /// The range a request is checked against: its own, rounded out to `alignment` when it serialises.
    private static func overlapRange(offset: Int64, length: Int64, serialising: Bool, alignment: Int64) -> Range<Int64> {
        precondition(offset >= 0 && length >= 0 && length <= Int64.max - offset, "tracked range out of bounds")
        precondition(alignment > 0, "alignment must be positive")
        let range = offset..<(offset + length)
        return serialising ? roundOut(range, to: alignment) : range
    }

    /// Registers a truncate from `oldLength` to `newLength`: serialising, over everything from the lower of the
    /// two to the end of the address space, so it waits for every request touching the bytes that appear or go.
    public func beginTruncate(from oldLength: Int64, to newLength: Int64, alignment: Int64 = 1) async -> TrackedRequest {
        let start = max(0, min(oldLength, newLength))
        return await begin(offset: start, length: Int64.max - start, kind: .truncate, serialising: true,
                           alignment: alignment)
    }

    /// Unregisters `request` and lets the requests and drains that waited only for it go on.
    public func end(_ request: TrackedRequest) {
        var woken: [UnsafeContinuation<Void, Never>] = []
        state.withLock { state in
            let index = state.index(of: request.id)
            let ended = state.entries.remove(at: index)
            precondition(!ended.mustWait, "TrackedRequests.end() before begin() returned")
            if ended.isSerialising { state.serialisingCount -= 1 }
            if state.waitingCount > 0 {
                // Only later arrivals (from `index` on, after the removal) can have counted this request.
                for later in index..<state.entries.count {
                    guard state.entries[later].blockers > 0,
                          ended.isSerialising || state.entries[later].isSerialising,
                          ended.range.overlaps(state.entries[later].range) else { continue }
                    state.entries[later].blockers -= 1
                    if !state.entries[later].mustWait {
                        state.waitingCount -= 1
                        if let continuation = state.entries[later].continuation {
                            state.entries[later].continuation = nil
                            woken.append(continuation)
                        }
                    }
                }
            }
            state.satisfiedDrainWaiters(into: &woken)
        }
        for continuation in woken { continuation.resume() }
    }

    /// Runs `body` as a tracked request (begin, body, end).
    public func withTracked<T>(
        offset: Int64,
        length: Int64,
        kind: TrackedRequestKind,
        serialising: Bool = false,
        alignment: Int64 = 1,
        isolation: isolated (any Actor)? = #isolation,
        _ body: (TrackedRequest) async throws -> T
    ) async rethrows -> T {
        let request = await begin(offset: offset, length: length, kind: kind, serialising: serialising,
                                  alignment: alignment)
        defer { end(request) }
        return try await body(request)
    }

    /// Runs `body` as a tracked truncate from `oldLength` to `newLength` (see `beginTruncate`).
    public func withTruncate<T>(
        from oldLength: Int64,
        to newLength: Int64,
        alignment: Int64 = 1,
        isolation: isolated (any Actor)? = #isolation,
        _ body: (TrackedRequest) async throws -> T
    ) async rethrows -> T {
        let request = await beginTruncate(from: oldLength, to: newLength, alignment: alignment)
        defer { end(request) }
        return try await body(request)
    }

    /// Waits until every request that had begun when this was called has ended. Requests that begin meanwhile
    /// run and are not waited for; requests held by a drained section count once the section releases them.
    public func drain() async {
        await waitForRunningRequests(before: nil)
    }

    /// Starts a drained section: from now on new requests are held, and this returns once every request already
    /// in flight has ended. Sections may overlap; held requests go on when the last one ends (`endDrain()`).
    public func beginDrain() async {
        state.withLock { $0.drainDepth += 1 }
        await waitForRunningRequests(before: .max)
    }

    /// Ends a drained section; when it was the last one, held requests start in arrival order (subject to the
    /// usual waiting for conflicting earlier requests).
    public func endDrain() {
        var woken: [UnsafeContinuation<Void, Never>] = []
        state.withLock { state in
            precondition(state.drainDepth > 0, "TrackedRequests.endDrain() without beginDrain()")
            state.drainDepth -= 1
            guard state.drainDepth == 0 else { return }
            for index in state.entries.indices where state.entries[index].isHeld {
                state.entries[index].isHeld = false
                if state.entries[index].blockers == 0 {
                    state.waitingCount -= 1
                    if let continuation = state.entries[index].continuation {
                        state.entries[index].continuation = nil
                        woken.append(continuation)
                    }
                }
            }
        }
        for continuation in woken { continuation.resume() }
    }

    /// Runs `body` inside a drained section: nothing else is in flight on this node while it runs.
    public func drained<T>(
        isolation: isolated (any Actor)? = #isolation,
        _ body: () async throws -> T
    ) async rethrows -> T {
        await beginDrain()
        defer { endDrain() }
        return try await body()
    }

    /// Requests registered and not yet ended, including those still waiting for their turn or held by a drain.
    public var inFlightCount: Int { state.withLock { $0.entries.count } }

    /// Requests that have begun but may not run yet: waiting for conflicting ones, or held (for tests).
    var waitingCount: Int { state.withLock { $0.waitingCount } }
    /// Requests held by a drained section (for tests).
    var heldCount: Int { state.withLock { $0.entries.lazy.filter(\.isHeld).count } }
    /// Drains and drained sections waiting for requests to end (for tests).
    var drainWaiterCount: Int { state.withLock { $0.drainWaiters.count } }

    private func waitForRunningRequests(before limit: UInt64?) async {
        await withUnsafeContinuation { (continuation: UnsafeContinuation<Void, Never>) in
            let done = state.withLock { state -> Bool in
                let before = limit ?? state.nextID
                if !state.hasRunningRequest(before: before) { return true }
                state.drainWaiters.append(DrainWaiter(before: before, continuation: continuation))
                return false
            }
            if done { continuation.resume() }
        }
    }

    /// `range` widened to whole multiples of `alignment`, without overflowing at the top of the address space.
    static func roundOut(_ range: Range<Int64>, to alignment: Int64) -> Range<Int64> {
        guard alignment > 1 else { return range }
        let lower = range.lowerBound - range.lowerBound % alignment
        let remainder = range.upperBound % alignment
        let upper: Int64
        if remainder == 0 {
            upper = range.upperBound
        } else if range.upperBound > Int64.max - (alignment - remainder) {
            upper = Int64.max
        } else {
            upper = range.upperBound + (alignment - remainder)
        }
        return lower..<upper
    }
}
