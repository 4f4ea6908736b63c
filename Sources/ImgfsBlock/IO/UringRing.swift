import CUring
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The io_uring behind `UringIOEngine`: submission from any thread, completion on a thread of its own, which is
/// also a task executor.
///
/// Tasks that prefer this executor resume on the completion thread itself when their I/O completes: no hand-off
/// to another thread, which on two cores cost more CPU than the read (a third of the daemon's time was thread
/// switches). Work enqueued from elsewhere wakes the thread with a NOP. Jobs here must never block.
///
/// Submitters queue requests; whichever finds nobody submitting takes the duty and moves everything queued into
/// the SQ with one `io_uring_enter`, so concurrent submitters batch instead of each holding a lock across a
/// system call (which, for page-cache hits, copies the data inline). At most as many requests as the CQ holds are
/// in the kernel at once: the CQ then cannot overflow, and each batch fits the SQ. Requests beyond that wait in
/// the queue and are submitted by the completion thread as room frees up.
final class UringRing: TaskExecutor, @unchecked Sendable {
    private final class Request {
        let operation: UringOperation
        /// The task awaiting the result; nil for a wake-up NOP or a callback.
        let continuation: UnsafeContinuation<Int32, Never>?
        let callback: ((Int32) -> Void)?
        init(_ operation: UringOperation, _ continuation: UnsafeContinuation<Int32, Never>?,
             callback: ((Int32) -> Void)? = nil) {
            self.operation = operation
            self.continuation = continuation
            self.callback = callback
        }
    }

    private let ring = UnsafeMutablePointer<io_uring>.allocate(capacity: 1)
    private let submissionSlots: Int
    private let maxInFlight: Int
    private let lock = PthreadLock()
    // Guarded by `lock`.
    private var queued: [Request] = []
    private var queuedHead = 0
    private var submitting = false
    private var inFlight = 0
    // Jobs of tasks that prefer this executor, and whether the completion thread sleeps in the kernel; both
    // guarded by `lock`.
    private var jobs: [UnownedJob] = []
    private var sleeping = false
    /// The completion thread, set by itself as it starts: its own submissions wait for it to next go to sleep.
    private let loopThread = Atomic<UInt>(0)
    // Written before the completion thread starts and after it has been joined.
    private var thread = pthread_t()
    private var threadRunning = false

    init(entries: UInt32) throws {
        let rc = io_uring_queue_init(entries, ring, 0)
        if rc < 0 {
            ring.deallocate()
            throw BlockError.system(errno: -rc, operation: "io_uring_queue_init", path: "io_uring")
        }
        submissionSlots = Int(ring.pointee.sq.ring_entries)
        maxInFlight = Int(ring.pointee.cq.ring_entries)
        queued.reserveCapacity(maxInFlight)
    }

    deinit {
        io_uring_queue_exit(ring)
        ring.deallocate()
    }

    func startCompletionThread() throws {
        let retained = Unmanaged.passRetained(self)
        let rc = pthread_create(&thread, nil, { raw in
            let ring = Unmanaged<UringRing>.fromOpaque(raw!).takeRetainedValue()
            ring.completionLoop()
            return nil
        }, retained.toOpaque())
        if rc != 0 {
            retained.release()
            throw BlockError.system(errno: rc, operation: "pthread_create", path: "io_uring")
        }
        threadRunning = true
    }

    /// Ends the completion thread; only once nothing is in flight (every request's caller holds the engine).
    func stop() {
        guard threadRunning else { return }
        lock.lock()
        precondition(!submitting && inFlight == 0 && queuedHead == queued.count, "io_uring stopped with requests in flight")
        submitting = true
        lock.unlock()
        let sqe = io_uring_get_sqe(ring)!
        io_uring_prep_nop(sqe)
        io_uring_sqe_set_data(sqe, nil)  // no request: the completion thread's signal to end
        submitPrepared()
        pthread_join(thread, nil)
        threadRunning = false
    }

    var inFlightCount: Int { lock.withLock { inFlight } }

    func enqueue(_ job: consuming ExecutorJob) {
        let unowned = UnownedJob(job)
        lock.lock()
        jobs.append(unowned)
        let wake = sleeping
        sleeping = false
        lock.unlock()
        // The completion thread queues for itself without waking itself; anyone else rings once.
        if wake { queue(Request(.nop, nil)) }
    }

    /// Whether the caller runs on the completion thread.
    var onCompletionThread: Bool { loopThread.load(ordering: .relaxed) == UInt(pthread_self()) }

    /// Adds a request to the submission queue, taking the submit duty if nobody holds it.
    ///
    /// The completion thread never submits here: it submits everything its jobs queued in one call before it
    /// sleeps, and the kernel then runs each miss's completion work on that thread as it waits, not on another.
    private func queue(_ request: Request) {
        let deferred = onCompletionThread
        lock.lock()
        queued.append(request)
        if submitting || deferred {
            lock.unlock()
            return
        }
        submitting = true
        submitQueued()
    }

    /// Runs the operation and returns the kernel's result: a count, or minus errno.
    func perform(_ operation: UringOperation) async -> Int32 {
        await withUnsafeContinuation { continuation in
            queue(Request(operation, continuation))
        }
    }

    /// Runs the operation and calls `callback` with the kernel's result on the completion thread, before any task
    /// resumed by the same batch runs. For loops that serve a device with no task per request: the callback must
    /// not block.
    func submit(_ operation: UringOperation, then callback: @escaping (Int32) -> Void) {
        queue(Request(operation, nil, callback: callback))
    }

    /// Moves queued requests into the kernel while there is room. Called with the lock held and the submit duty
    /// taken; returns with the lock released and the duty given up.
    private func submitQueued() {
        var batch: [Request] = []
        while true {
            let room = min(maxInFlight - inFlight, submissionSlots)
            let waiting = queued.count - queuedHead
            if room <= 0 || waiting == 0 {
                submitting = false
                lock.unlock()
                return
            }
            let take = min(room, waiting)
            batch.append(contentsOf: queued[queuedHead..<(queuedHead + take)])
            queuedHead += take
            if queuedHead == queued.count {
                queued.removeAll(keepingCapacity: true)
                queuedHead = 0
            } else if queuedHead > 1024 {
                queued.removeFirst(queuedHead)
                queuedHead = 0
            }
            inFlight += take
            lock.unlock()
            for request in batch {
                // The SQ is empty after every submitPrepared() and a batch never exceeds it, so a slot is free.
                let sqe = io_uring_get_sqe(ring)!
                request.operation.prepare(sqe)
                io_uring_sqe_set_data(sqe, Unmanaged.passRetained(request).toOpaque())
            }
            batch.removeAll(keepingCapacity: true)
            submitPrepared()
            lock.lock()
        }
    }

    /// Hands every prepared SQE to the kernel.
    private func submitPrepared() {
        while io_uring_sq_ready(ring) > 0 {
            let rc = io_uring_submit(ring)
            if rc > 0 || rc == -EINTR { continue }
            if rc == 0 || rc == -EAGAIN || rc == -EBUSY {
                // The kernel is short of memory or still holds completions to post; both clear as the completion
                // thread reaps, so wait a moment rather than spin.
                usleep(50)
                continue
            }
            preconditionFailure("io_uring_submit: \(String(cString: strerror(-rc)))")
        }
    }

    private func completionLoop() {
        nameCurrentThread("imgfs-uring")
        loopThread.store(UInt(pthread_self()), ordering: .relaxed)
        let capacity = 128
        let cqes = UnsafeMutablePointer<UnsafeMutablePointer<io_uring_cqe>?>.allocate(capacity: capacity)
        defer { cqes.deallocate() }
        var finished: [(Request, Int32)] = []
        finished.reserveCapacity(capacity)
        var stopping = false
        let me = asUnownedTaskExecutor()
        while !stopping {
            // Run what tasks queued here, submit what they asked for, then sleep in the kernel only if nothing new
            // came meanwhile.
            while true {
                lock.lock()
                if jobs.isEmpty {
                    // With the kernel full, completions make room and the code after them submits.
                    if !submitting && queuedHead < queued.count && inFlight < maxInFlight {
                        submitting = true
                        submitQueued()
                        continue
                    }
                    sleeping = true
                    lock.unlock()
                    break
                }
                let batch = jobs
                jobs.removeAll(keepingCapacity: true)
                lock.unlock()
                for job in batch { job.runSynchronously(on: me) }
            }
            var first: UnsafeMutablePointer<io_uring_cqe>?
            let rc = io_uring_wait_cqe(ring, &first)
            if rc == -EINTR || rc == -EAGAIN { continue }
            precondition(rc == 0, "io_uring_wait_cqe: \(String(cString: strerror(-rc)))")
            // Also flushes completions the kernel kept aside if the CQ ever overflowed.
            let count = Int(io_uring_peek_batch_cqe(ring, cqes, UInt32(capacity)))
            for index in 0..<count {
                let cqe = cqes[index]!
                if let data = io_uring_cqe_get_data(cqe) {
                    finished.append((Unmanaged<Request>.fromOpaque(data).takeRetainedValue(), cqe.pointee.res))
                } else {
                    stopping = true
                }
            }
            io_uring_cq_advance(ring, UInt32(count))
            lock.lock()
            sleeping = false
            inFlight -= finished.count
            let mustSubmit = !submitting && queuedHead < queued.count
            if mustSubmit { submitting = true }
            lock.unlock()
            for (request, result) in finished {
                if let continuation = request.continuation {
                    continuation.resume(returning: result)
                } else {
                    request.callback?(result)
                }
            }
            finished.removeAll(keepingCapacity: true)
            if mustSubmit {
                lock.lock()
                submitQueued()
            }
        }
    }
}
