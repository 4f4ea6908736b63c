import ImgfsTestSupport
import Testing
@testable import ImgfsBlock

@Suite(.timeLimit(.minutes(1)))
struct TrackedRequestsTests {
    enum Event: Equatable, Sendable, CustomStringConvertible {
        case enter(Int), exit(Int)
        var description: String {
            switch self {
            case .enter(let id): "enter \(id)"
            case .exit(let id): "exit \(id)"
            }
        }
    }

    /// Starts request `id` in a task: it begins, logs, waits for `gate` (if any), logs and ends.
    private func start(
        _ id: Int, _ tracker: TrackedRequests, on executor: SyncTestExecutor, log: EventLog<Event>,
        offset: Int64, length: Int64, serialising: Bool, alignment: Int64 = 1, gate: Gate? = nil
    ) -> Task<Void, any Error> {
        spawn(on: executor) {
            await tracker.withTracked(offset: offset, length: length, kind: serialising ? .write : .read,
                                      serialising: serialising, alignment: alignment) { _ in
                log.append(.enter(id))
                await Task.yield()
                if let gate { await gate.wait() }
                await Task.yield()
                log.append(.exit(id))
            }
        }
    }

    private func entered(_ id: Int, _ log: EventLog<Event>) -> Bool { log.all.contains(.enter(id)) }

    @Test(arguments: SyncTestExecutor.allCases)
    func overlappingSerialisingRequestsRunOneAfterAnotherInArrivalOrder(executor: SyncTestExecutor) async throws {
        let tracker = TrackedRequests()
        let log = EventLog<Event>()
        let first = Gate()
        var tasks: [Task<Void, any Error>] = []
        for id in 0..<8 {
            // Each range overlaps its neighbours, and all of them overlap the first.
            tasks.append(start(id, tracker, on: executor, log: log, offset: Int64(id) * 100, length: 1000,
                               serialising: true, gate: id == 0 ? first : nil))
            try await eventually { tracker.inFlightCount == id + 1 }
        }
        #expect(tracker.waitingCount == 7)
        first.open()
        for task in tasks { try await finish(task) }
        #expect(log.all == (0..<8).flatMap { [Event.enter($0), .exit($0)] })
        #expect(tracker.inFlightCount == 0)
    }

    @Test(arguments: SyncTestExecutor.allCases)
    func disjointSerialisingRequestsRunTogether(executor: SyncTestExecutor) async throws {
        let tracker = TrackedRequests()
        let bothInside = Barrier(count: 2)
        let tasks = [Int64(0), 4096].map { offset in
            spawn(on: executor) {
                await tracker.withTracked(offset: offset, length: 4096, kind: .write, serialising: true,
                                          alignment: 4096) { _ in
                    await bothInside.arriveAndWait()  // never returns (reported by `finish`) unless both are inside at once
                }
            }
        }
        for task in tasks { try await finish(task) }
    }

    @Test(arguments: SyncTestExecutor.allCases)
    func alignmentMakesRequestsInOneClusterSerialise(executor: SyncTestExecutor) async throws {
        let tracker = TrackedRequests()
        let log = EventLog<Event>()
        let gate = Gate()
        let first = start(0, tracker, on: executor, log: log, offset: 0, length: 512, serialising: true,
                          alignment: 4096, gate: gate)
        try await eventually { entered(0, log) }
        // Bytes 1024..<1536 do not overlap 0..<512, but both lie in the cluster 0..<4096.
        let second = start(1, tracker, on: executor, log: log, offset: 1024, length: 512, serialising: true,
                           alignment: 4096)
        try await eventually { tracker.inFlightCount == 2 }
        #expect(tracker.waitingCount == 1)
        #expect(!entered(1, log))
        gate.open()
        try await finish(first)
        try await finish(second)
        #expect(log.all == [.enter(0), .exit(0), .enter(1), .exit(1)])

        // The same two requests with 512-byte alignment do not conflict.
        let bothInside = Barrier(count: 2)
        let parallel = [Int64(0), 1024].map { offset in
            spawn(on: executor) {
                await tracker.withTracked(offset: offset, length: 512, kind: .write, serialising: true,
                                          alignment: 512) { _ in await bothInside.arriveAndWait() }
            }
        }
        for task in parallel { try await finish(task) }
    }

    @Test(arguments: SyncTestExecutor.allCases)
    func aReadWaitsForAnEarlierOverlappingSerialisingWrite(executor: SyncTestExecutor) async throws {
        let tracker = TrackedRequests()
        let log = EventLog<Event>()
        let gate = Gate()
        let write = start(0, tracker, on: executor, log: log, offset: 0, length: 4096, serialising: true,
                          alignment: 4096, gate: gate)
        try await eventually { entered(0, log) }
        let disjointRead = start(1, tracker, on: executor, log: log, offset: 4096, length: 512, serialising: false)
        try await finish(disjointRead)  // does not wait for the write
        let read = start(2, tracker, on: executor, log: log, offset: 100, length: 10, serialising: false)
        try await eventually { tracker.inFlightCount == 2 }
        #expect(tracker.waitingCount == 1)
        #expect(!entered(2, log))
        gate.open()
        try await finish(write)
        try await finish(read)
        #expect(log.all == [.enter(0), .enter(1), .exit(1), .exit(0), .enter(2), .exit(2)])
    }

    /// W1 runs; R (a read) waits for W1; W2 arrives and waits for W1 and R. When W1 ends, R must run although the
    /// later, overlapping W2 is in flight; waiting for it would deadlock, since W2 waits for R.
    @Test(arguments: SyncTestExecutor.allCases)
    func aReadDoesNotWaitForALaterSerialisingWrite(executor: SyncTestExecutor) async throws {
        let tracker = TrackedRequests()
        let log = EventLog<Event>()
        let firstGate = Gate()
        let readGate = Gate()
        let firstWrite = start(0, tracker, on: executor, log: log, offset: 0, length: 4096, serialising: true,
                               gate: firstGate)
        try await eventually { entered(0, log) }
        let read = start(1, tracker, on: executor, log: log, offset: 0, length: 4096, serialising: false,
                         gate: readGate)
        try await eventually { tracker.inFlightCount == 2 }
        let secondWrite = start(2, tracker, on: executor, log: log, offset: 0, length: 4096, serialising: true)
        try await eventually { tracker.inFlightCount == 3 }
        #expect(tracker.waitingCount == 2)
        firstGate.open()
        try await finish(firstWrite)
        try await eventually { entered(1, log) }
        #expect(!entered(2, log))
        #expect(tracker.waitingCount == 1)
        readGate.open()
        try await finish(read)
        try await finish(secondWrite)
        #expect(log.all == [.enter(0), .exit(0), .enter(1), .exit(1), .enter(2), .exit(2)])
    }

    @Test(arguments: SyncTestExecutor.allCases)
    func drainReturnsOnceEveryEarlierRequestHasEnded(executor: SyncTestExecutor) async throws {
        let tracker = TrackedRequests()
        let log = EventLog<Event>()
        let gates = (0..<3).map { _ in Gate() }
        var requests: [Task<Void, any Error>] = []
        for id in 0..<3 {
            requests.append(start(id, tracker, on: executor, log: log, offset: Int64(id) * 4096, length: 4096,
                                  serialising: false, gate: gates[id]))
        }
        try await eventually { tracker.inFlightCount == 3 }
        let drainDone = Locked(false)
        let drain = spawn(on: executor) {
            await tracker.drain()
            drainDone.withLock { $0 = true }
        }
        try await eventually { tracker.drainWaiterCount == 1 || drainDone.withLock { $0 } }
        #expect(!drainDone.withLock { $0 })

        // A request arriving during drain() runs and is not waited for.
        let lateGate = Gate()
        let late = start(3, tracker, on: executor, log: log, offset: 0, length: 4096, serialising: false,
                         gate: lateGate)
        try await eventually { entered(3, log) }

        for id in 0..<2 {
            gates[id].open()
            try await finish(requests[id])
            #expect(tracker.drainWaiterCount == 1)
            #expect(!drainDone.withLock { $0 })
        }
        gates[2].open()
        try await finish(drain)
        #expect(drainDone.withLock { $0 })
        #expect(tracker.inFlightCount == 1)  // the late request, still running
        lateGate.open()
        try await finish(late)
        await tracker.drain()  // nothing in flight: returns at once
    }

    @Test(arguments: SyncTestExecutor.allCases)
    func aDrainedSectionHoldsNewRequestsUntilItEnds(executor: SyncTestExecutor) async throws {
        let tracker = TrackedRequests()
        let log = EventLog<Event>()
        let runningGate = Gate()
        let sectionGate = Gate()
        let running = start(0, tracker, on: executor, log: log, offset: 0, length: 4096, serialising: false,
                            gate: runningGate)
        try await eventually { entered(0, log) }
        let section = spawn(on: executor) {
            await tracker.drained {
                log.append(.enter(100))
                #expect(tracker.heldCount == tracker.inFlightCount)  // only held requests are registered
                await tracker.drain()  // held requests are not running: no deadlock
                await sectionGate.wait()
                log.append(.exit(100))
            }
        }
        try await eventually { tracker.drainWaiterCount == 1 }
        #expect(!entered(100, log))

        // Arrives while the section waits for request 0: held, although it conflicts with nothing.
        let held = start(1, tracker, on: executor, log: log, offset: 1 << 30, length: 4096, serialising: false)
        try await eventually { tracker.heldCount == 1 }
        runningGate.open()
        try await finish(running)
        try await eventually { entered(100, log) }
        // And one arriving inside the section.
        let alsoHeld = start(2, tracker, on: executor, log: log, offset: 8192, length: 4096, serialising: true)
        try await eventually { tracker.heldCount == 2 }
        #expect(!entered(1, log) && !entered(2, log))

        sectionGate.open()
        try await finish(section)
        try await finish(held)
        try await finish(alsoHeld)
        let events = log.all
        #expect(Array(events.prefix(4)) == [.enter(0), .exit(0), .enter(100), .exit(100)])
        #expect(Set(events.dropFirst(4).map(\.description)) == ["enter 1", "exit 1", "enter 2", "exit 2"])
        #expect(tracker.inFlightCount == 0 && tracker.heldCount == 0 && tracker.waitingCount == 0)
    }

    @Test(arguments: SyncTestExecutor.allCases)
    func aTruncateCoversEverythingFromTheLowerLength(executor: SyncTestExecutor) async throws {
        let tracker = TrackedRequests()
        let log = EventLog<Event>()
        let below = Gate()
        let above = Gate()
        let requestBelow = start(0, tracker, on: executor, log: log, offset: 0, length: 100, serialising: false,
                                 gate: below)
        let requestAbove = start(1, tracker, on: executor, log: log, offset: 6000, length: 100,
                                 serialising: false, gate: above)
        try await eventually { entered(0, log) && entered(1, log) }
        let truncateGate = Gate()
        let truncate = spawn(on: executor) {
            await tracker.withTruncate(from: 8192, to: 4096, alignment: 4096) { request in
                #expect(request.overlapRange == 4096..<Int64.max)
                log.append(.enter(10))
                await truncateGate.wait()
                log.append(.exit(10))
            }
        }
        try await eventually { tracker.waitingCount == 1 }
        below.open()
        try await finish(requestBelow)
        #expect(!entered(10, log))  // still waiting for the request above the new end
        above.open()
        try await finish(requestAbove)
        try await eventually { entered(10, log) }

        // While the truncate runs, a request far past the end waits; one below the lower length does not.
        let far = start(2, tracker, on: executor, log: log, offset: 1 << 40, length: 512, serialising: false)
        let near = start(3, tracker, on: executor, log: log, offset: 512, length: 512, serialising: false)
        try await finish(near)
        try await eventually { tracker.waitingCount == 1 }
        #expect(!entered(2, log))
        truncateGate.open()
        try await finish(truncate)
        try await finish(far)
    }

    /// Random mixes of requests: conflicting requests (overlapping, at least one serialising) are never inside at
    /// the same time, and everything ends.
    @Test(arguments: SyncTestExecutor.allCases)
    func randomRequestsNeverRunConflictingOnesTogether(executor: SyncTestExecutor) async throws {
        for seed in UInt64(1)...10 {
            let tracker = TrackedRequests()
            let active = Locked<[TrackedRequest]>([])
            let violations = Locked(0)
            let tasks = (0..<16).map { worker in
                spawn(on: executor) {
                    var random = SplitMix64(seed: seed &* 31 &+ UInt64(worker))
                    for _ in 0..<100 {
                        let offset = Int64(random.next() % 64) * 512
                        let length = Int64(1 + random.next() % 8) * 512
                        let serialising = random.next() % 4 == 0
                        await tracker.withTracked(offset: offset, length: length, kind: .write,
                                                  serialising: serialising, alignment: 4096) { request in
                            active.withLock { active in
                                let range = request.overlapRange
                                for other in active where other.overlapRange.overlaps(range)
                                    && (other.isSerialising || request.isSerialising) {
                                    violations.withLock { $0 += 1 }
                                }
                                active.append(request)
                            }
                            for _ in 0..<Int(random.next() % 3) { await Task.yield() }
                            active.withLock { active in active.removeAll { $0 == request } }
                        }
                    }
                }
            }
            for task in tasks { try await finish(task) }
            #expect(violations.withLock { $0 } == 0)
            #expect(tracker.inFlightCount == 0 && tracker.waitingCount == 0)
        }
    }

    @Test func tryBeginRegistersOnlyWhatMayRunAtOnce() async throws {
        let tracker = TrackedRequests()
        // Reads never conflict with reads.
        let first = try #require(tracker.tryBegin(offset: 0, length: 4096, kind: .read))
        let second = try #require(tracker.tryBegin(offset: 100, length: 10, kind: .read))
        // A serialising request that would wait for them is refused, and leaves nothing registered.
        #expect(tracker.tryBegin(offset: 0, length: 10, kind: .write, serialising: true, alignment: 4096) == nil)
        #expect(tracker.inFlightCount == 2 && tracker.waitingCount == 0)
        tracker.end(first)
        tracker.end(second)

        let write = try #require(tracker.tryBegin(offset: 0, length: 10, kind: .write, serialising: true,
                                                  alignment: 4096))
        // Overlapping its rounded-out range is a conflict; the next cluster is not.
        #expect(tracker.tryBegin(offset: 4095, length: 1, kind: .read) == nil)
        let beside = try #require(tracker.tryBegin(offset: 4096, length: 10, kind: .read))
        tracker.end(beside)
        tracker.end(write)
        #expect(tracker.inFlightCount == 0)

        // A drained section holds new requests: tryBegin refuses rather than be held.
        await tracker.beginDrain()
        #expect(tracker.tryBegin(offset: 0, length: 1, kind: .read) == nil)
        tracker.endDrain()
        let afterDrain = try #require(tracker.tryBegin(offset: 0, length: 1, kind: .read))
        tracker.end(afterDrain)
        #expect(tracker.inFlightCount == 0 && tracker.heldCount == 0)
    }

    @Test(arguments: SyncTestExecutor.allCases)
    func aLaterSerialisingRequestWaitsForATryBeganRead(executor: SyncTestExecutor) async throws {
        let tracker = TrackedRequests()
        let read = try #require(tracker.tryBegin(offset: 0, length: 4096, kind: .read))
        let writer = spawn(on: executor) {
            await tracker.withTracked(offset: 1000, length: 10, kind: .write, serialising: true) { _ in }
        }
        try await eventually { tracker.waitingCount == 1 }
        // And a drain counts it too.
        let drain = spawn(on: executor) { await tracker.drain() }
        try await eventually { tracker.drainWaiterCount == 1 }
        tracker.end(read)
        try await finish(writer)
        try await finish(drain)
        #expect(tracker.inFlightCount == 0 && tracker.waitingCount == 0)
    }

    @Test func roundingOutStopsAtTheEndOfTheAddressSpace() {
        #expect(TrackedRequests.roundOut(1000..<1100, to: 512) == 512..<1536)
        #expect(TrackedRequests.roundOut(1024..<1536, to: 512) == 1024..<1536)
        #expect(TrackedRequests.roundOut(4096..<Int64.max, to: 4096) == 4096..<Int64.max)
        #expect(TrackedRequests.roundOut(5..<(Int64.max - 3), to: 4096) == 0..<Int64.max)
        #expect(TrackedRequests.roundOut(5..<9, to: 1) == 5..<9)
    }
}
