#if canImport(Glibc)
import Glibc
#endif

/// A pool of threads of our own that may block in system calls, usable as a Swift task executor.
///
/// Swift's cooperative pool has one thread per core; a blocking `pread` there stalls every task (on two cores
/// it deadlocked a FUSE mount). Tasks started with this executor as their preference run on these threads, and
/// `HostFile` does its system calls inline when it is already on one; from anywhere else it hops here and back.
public final class IOExecutor: TaskExecutor, @unchecked Sendable {
    private enum Work {
        case job(UnownedJob)
        case block(() -> Void)
    }

    /// The executor every host file uses; set its size with `configureShared(threads:)` before first use.
    public static var shared: IOExecutor {
        sharedLock.lock()
        defer { sharedLock.unlock() }
        if let existing = sharedInstance { return existing }
        let created = IOExecutor(threads: requestedThreads)
        sharedInstance = created
        return created
    }

    /// Chooses how many threads the shared executor starts; has no effect once it exists.
    public static func configureShared(threads: Int) {
        sharedLock.lock()
        requestedThreads = max(1, threads)
        sharedLock.unlock()
    }

    nonisolated(unsafe) private static var sharedInstance: IOExecutor?
    nonisolated(unsafe) private static var requestedThreads = 4
    private static let sharedLock = PthreadLock()

    /// Whether the calling thread belongs to an IOExecutor (so blocking here is allowed).
    public static var isCurrentThreadIOThread: Bool {
        pthread_getspecific(threadKey) != nil
    }

    /// Whether the calling thread runs its own async work to completion and waits for it anyway (a FUSE loop thread
    /// serving a request inline, the CLI's main thread): a plain blocking system call costs it least.
    public static var isCurrentThreadCallerThread: Bool {
        pthread_getspecific(threadKey) == UnsafeMutableRawPointer(bitPattern: 1)
    }

    /// Lets the calling thread (one of ours that may block, such as a FUSE loop thread) do host I/O inline until
    /// `restoreThreadMark` puts back what this returns.
    static func allowBlockingOnCurrentThread() -> UnsafeMutableRawPointer? {
        let previous = pthread_getspecific(threadKey)
        pthread_setspecific(threadKey, UnsafeRawPointer(bitPattern: 1))
        return previous
    }

    static func restoreThreadMark(_ previous: UnsafeMutableRawPointer?) {
        pthread_setspecific(threadKey, previous)
    }

    private static let threadKey: pthread_key_t = {
        var key = pthread_key_t()
        pthread_key_create(&key, nil)
        return key
    }()

    private var queue: [Work] = []
    private var head = 0
    // Heap-allocated so their addresses never move (pthread objects must not be copied).
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let condition = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    public let threadCount: Int

    /// What the threads are called in /proc.
    private let threadName: String

    public init(threads: Int, name: String = "imgfs-io") {
        threadCount = max(1, threads)
        threadName = name
        pthread_mutex_init(mutex, nil)
        pthread_cond_init(condition, nil)
        queue.reserveCapacity(256)
        for index in 0..<threadCount {
            let unmanaged = Unmanaged.passRetained(self)
            var thread = pthread_t()
            let rc = pthread_create(&thread, nil, { raw in
                let executor = Unmanaged<IOExecutor>.fromOpaque(raw!).takeRetainedValue()
                executor.workerLoop()
                return nil
            }, unmanaged.toOpaque())
            precondition(rc == 0, "pthread_create failed for I/O thread \(index)")
            pthread_detach(thread)
        }
    }

    public func enqueue(_ job: consuming ExecutorJob) {
        submit(.job(UnownedJob(job)))
    }

    /// Runs `body` on an I/O thread (inline when already on one) and returns its result.
    public func perform<T>(_ body: @escaping () throws -> T) async throws -> T {
        if Self.isCurrentThreadIOThread { return try body() }
        return try await hop(body)
    }

    /// Runs `body` on one of this executor's own threads (inline only when already on one of them), for CPU work
    /// that must not occupy another pool's threads.
    public func performOnOwnThread<T>(_ body: @escaping () throws -> T) async throws -> T {
        if pthread_getspecific(Self.threadKey) == Unmanaged.passUnretained(self).toOpaque() { return try body() }
        return try await hop(body)
    }

    /// Queues `body` on this executor and suspends until it has run.
    private func hop<T>(_ body: @escaping () throws -> T) async throws -> T {
        let unsafeBody = UncheckedSendable(body)
        let box: UncheckedSendable<T> = try await withUnsafeThrowingContinuation { continuation in
            submit(.block {
                do { continuation.resume(returning: UncheckedSendable(try unsafeBody.value())) }
                catch { continuation.resume(throwing: error) }
            })
        }
        return box.value
    }

    /// Runs `body` on an I/O thread without waiting for it.
    public func execute(_ body: @escaping @Sendable () -> Void) {
        submit(.block(body))
    }

    private func submit(_ work: Work) {
        pthread_mutex_lock(mutex)
        queue.append(work)
        pthread_cond_signal(condition)
        pthread_mutex_unlock(mutex)
    }

    private func workerLoop() {
        nameCurrentThread(threadName)
        pthread_setspecific(Self.threadKey, Unmanaged.passUnretained(self).toOpaque())
        let me = asUnownedTaskExecutor()
        while true {
            pthread_mutex_lock(mutex)
            while head == queue.count {
                pthread_cond_wait(condition, mutex)
            }
            let work = queue[head]
            head += 1
            if head == queue.count {
                queue.removeAll(keepingCapacity: true)
                head = 0
            } else if head > 1024 && head * 2 > queue.count {
                queue.removeFirst(head)
                head = 0
            }
            pthread_mutex_unlock(mutex)
            switch work {
            case .job(let job): job.runSynchronously(on: me)
            case .block(let body): body()
            }
        }
    }
}

/// Wraps a value whose thread safety the surrounding code guarantees (a buffer owned by one request).
public struct UncheckedSendable<Value>: @unchecked Sendable {
    public var value: Value
    public init(_ value: Value) { self.value = value }
}
