#if canImport(Glibc)
import Glibc
#endif

/// Runs one async operation to completion on the calling thread, which must be allowed to block.
///
/// For a caller that has to wait anyway (a FUSE loop thread whose request buffer must stay valid until a large
/// write is done), doing the work itself saves two thread switches per request; host I/O runs inline.
public final class CallerThreadExecutor: TaskExecutor, @unchecked Sendable {
    private var jobs: [UnownedJob] = []
    private var finished = false
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let condition = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)

    private init() {
        pthread_mutex_init(mutex, nil)
        pthread_cond_init(condition, nil)
    }

    deinit {
        pthread_cond_destroy(condition)
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
        condition.deallocate()
    }

    /// Runs `operation` on this thread (anything it awaits resumes here too) and returns when it has finished.
    public static func run(_ operation: @escaping @Sendable () async -> Void) {
        IOExecutor.allowBlockingOnCurrentThread()
        let executor = CallerThreadExecutor()
        Task(executorPreference: executor) {
            await operation()
            executor.finish()
        }
        executor.drain()
    }

    public func enqueue(_ job: consuming ExecutorJob) {
        let unowned = UnownedJob(job)
        pthread_mutex_lock(mutex)
        jobs.append(unowned)
        pthread_cond_signal(condition)
        pthread_mutex_unlock(mutex)
    }

    private func finish() {
        pthread_mutex_lock(mutex)
        finished = true
        pthread_cond_signal(condition)
        pthread_mutex_unlock(mutex)
    }

    private func drain() {
        let me = asUnownedTaskExecutor()
        while true {
            pthread_mutex_lock(mutex)
            while jobs.isEmpty && !finished { pthread_cond_wait(condition, mutex) }
            if jobs.isEmpty && finished {
                pthread_mutex_unlock(mutex)
                return
            }
            let batch = jobs
            jobs.removeAll(keepingCapacity: true)
            pthread_mutex_unlock(mutex)
            for job in batch { job.runSynchronously(on: me) }
        }
    }
}
