#if canImport(Glibc)
import Glibc
#endif

/// Runs one async operation to completion on the calling thread, which must be allowed to block.
///
/// For a caller that has to wait anyway (a FUSE loop thread whose request buffer must stay valid until a large
/// write is done, the CLI's main thread, the daemon's shutdown), doing the work itself saves two thread switches
/// and a semaphore; host I/O runs inline.
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

    /// Runs `operation` on this thread (anything it awaits resumes here too) and returns its result once it has
    /// finished.
    public static func run<T>(_ operation: @escaping @Sendable () async throws -> T) throws -> T {
        // Only while the work runs: a FUSE loop thread must not count as one that may block afterwards.
        let previousMark = IOExecutor.allowBlockingOnCurrentThread()
        defer { IOExecutor.restoreThreadMark(previousMark) }
        let executor = CallerThreadExecutor()
        // Written by the task before `finish()`, read after `drain()` returns: the mutex orders the two.
        nonisolated(unsafe) var result: Result<T, Error>?
        Task(executorPreference: executor) {
            do { result = .success(try await operation()) } catch { result = .failure(error) }
            executor.finish()
        }
        executor.drain()
        return try result!.get()
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
