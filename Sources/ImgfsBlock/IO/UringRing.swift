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
/// switches). Work handed over from elsewhere wakes the thread through an eventfd it always has a read posted on.
/// Jobs here must never block.
///
/// Submitters queue requests; whichever finds nobody submitting takes the duty and moves everything queued into
/// the SQ with one `io_uring_enter`, so concurrent submitters batch instead of each holding a lock across a
/// system call (which, for page-cache hits, copies the data inline). At most as many requests as the CQ holds are
/// in the kernel at once: the CQ then cannot overflow, and each batch fits the SQ. Requests beyond that wait in
/// the queue and are submitted by the completion thread as room frees up.
final class UringRing: TaskExecutor, @unchecked Sendable {
    private final class Request {
        let operation: UringOperation
        /// The task awaiting the result; nil when `callback` takes it instead.
        let continuation: UnsafeContinuation<Int32, Never>?
        let callback: ((Int32) -> Void)?
        /// The completion thread's standing read of its wake-up eventfd, not a caller's request.
        let isWake: Bool
        init(_ operation: UringOperation, _ continuation: UnsafeContinuation<Int32, Never>?,
             callback: ((Int32) -> Void)? = nil, isWake: Bool = false) {
            self.operation = operation
            self.continuation = continuation
            self.callback = callback
            self.isWake = isWake
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
    /// How much of `inFlight` is the wake-up read (0 or 1): it takes a completion slot, but is no caller's.
    private var wakeInFlight = 0
    // Jobs of tasks that prefer this executor, and whether the completion thread sleeps in the kernel; both
    // guarded by `lock`.
    private var jobs: [UnownedJob] = []
    private var sleeping = false
    /// Written to wake the completion thread without entering the ring: it always has a read of it posted.
    private let wakeFD: Int32
    private let wakeValue = UnsafeMutablePointer<UInt64>.allocate(capacity: 1)
    /// The completion thread, set by itself as it starts: its own submissions wait for it to next go to sleep.
    private let loopThread = Atomic<UInt>(0)
    // Written before the completion thread starts and after it has been joined.
    private var thread = pthread_t()
    private var threadRunning = false

    init(entries: UInt32) throws {
        wakeFD = eventfd(0, Int32(EFD_CLOEXEC))
        if wakeFD < 0 {
            ring.deallocate()
            wakeValue.deallocate()
            throw BlockError.system(errno: errno, operation: "eventfd", path: "io_uring")
        }
        let rc = io_uring_queue_init(entries, ring, 0)
        if rc < 0 {
            ring.deallocate()
            wakeValue.deallocate()
            Glibc.close(wakeFD)
            throw BlockError.system(errno: -rc, operation: "io_uring_queue_init", path: "io_uring")
        }
        submissionSlots = Int(ring.pointee.sq.ring_entries)
        maxInFlight = Int(ring.pointee.cq.ring_entries)
        queued.reserveCapacity(maxInFlight)
    }

    deinit {
        io_uring_queue_exit(ring)
        ring.deallocate()
        Glibc.close(wakeFD)
        wakeValue.deallocate()
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
        precondition(!submitting && inFlight == wakeInFlight && queuedHead == queued.count,
                     "io_uring stopped with requests in flight")
        submitting = true
        lock.unlock()
        let sqe = io_uring_get_sqe(ring)!
        io_uring_prep_nop(sqe)
        io_uring_sqe_set_data(sqe, nil)  // no request: the completion thread's signal to end
        submitPrepared()
        pthread_join(thread, nil)
        threadRunning = false
    }

    var inFlightCount: Int { lock.withLock { inFlight - wakeInFlight } }

    func enqueue(_ job: consuming ExecutorJob) {
        let unowned = UnownedJob(job)
        handToCompletionThread { jobs.append(unowned) }
    }

    /// Adds work for the completion thread (under the lock) and wakes it if it sleeps in the ring. The completion
    /// thread itself never sleeps while it adds work, so it never wakes itself; anyone else rings once.
    private func handToCompletionThread(_ add: () -> Void) {
        lock.lock()
        add()
        let wake = sleeping
        sleeping = false
        lock.unlock()
        if wake { wakeCompletionThread() }
    }

    /// Whether the caller runs on the completion thread.
    private var onCompletionThread: Bool { loopThread.load(ordering: .relaxed) == UInt(pthread_self()) }

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
    /// resumed by the same batch runs. For reads served with no task per request: the callback must not block.
    ///
    /// The completion thread submits it: the kernel then runs a miss's completion work on that thread as it waits
    /// in the ring, and the thread reaps and calls back with no other thread woken. Submitted by the caller, the
    /// work landed on a FUSE loop thread asleep in `read(/dev/fuse)`, which then had to wake the completion
    /// thread (cold 4 KiB reads at QD32: 6-24% more a second this way, in five paired runs).
    func submit(_ operation: UringOperation, then callback: @escaping (Int32) -> Void) {
        let request = Request(operation, nil, callback: callback)
        handToCompletionThread { queued.append(request) }
    }

    /// Ends the completion thread's sleep in the ring without entering it: a write to the eventfd it reads.
    private func wakeCompletionThread() {
        var one: UInt64 = 1
        _ = Glibc.write(wakeFD, &one, 8)
    }

    /// Keeps a read of the eventfd posted; run on the completion thread.
    private func armWake() {
        queue(Request(.read(fd: wakeFD, buffer: UnsafeMutableRawPointer(wakeValue), count: 8, offset: 0), nil,
                      callback: { [unowned self] _ in self.armWake() }, isWake: true))
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
            for request in batch where request.isWake { wakeInFlight += 1 }
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
        armWake()
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
            for (request, _) in finished where request.isWake { wakeInFlight -= 1 }
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
