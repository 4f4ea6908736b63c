import CFuseBridge
import ImgfsBlock
import Logging
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// A FUSE mount serving a `MountTree` of exported block nodes.
///
/// libfuse's threads call the handlers, which answer metadata requests at once and start a task on the
/// `IOExecutor` for anything that touches an image; that task answers when the I/O completes. Many requests are
/// thus in flight at once, and no blocking call ever runs on Swift's cooperative pool.
public final class FuseServer: @unchecked Sendable {
    public let configuration: MountConfiguration
    let tree: MountTree
    /// Where request tasks run after their first suspension: io_uring's completion thread where the engine has
    /// one (a completion resumes its task with no thread switch), else the I/O threads.
    let executor: any TaskExecutor
    let logger: Logger
    let buffers: BufferPool
    let inFlight = Atomic<Int>(0)
    /// Whether a loop thread is serving a request itself right now; at most one does, so another keeps reading
    /// /dev/fuse.
    private let inlineBusy = Atomic<Bool>(false)
    private(set) var session: OpaquePointer?
    /// The backing-file id of each file whose host file the kernel may read itself, by inode: registered at the
    /// file's first open and kept for the mount's life (the kernel drops them with the connection); 0 where
    /// registering failed.
    let passthroughBackings = Locked<[UInt64: Int32]>([:])
    private var handlers = imgfs_fuse_handlers()

    public init(root: MountDirectory, configuration: MountConfiguration, executor: IOExecutor = .shared,
                budget: MemoryBudget = .unlimited, logger: Logger = Logger(label: "imgfs.fuse")) {
        self.configuration = configuration
        self.tree = MountTree(root: root)
        self.executor = SharedIOEngine.engine.taskExecutor ?? executor
        self.logger = logger
        self.buffers = BufferPool(bufferSize: configuration.maxRequestBytes, capacity: 64, budget: budget)
    }

    /// Creates the session and mounts it; the file is visible when this returns.
    public func mount() throws {
        if access("/dev/fuse", R_OK | W_OK) != 0 {
            throw FuseError("cannot use /dev/fuse: \(String(cString: strerror(errno))) (is the fuse module loaded and the device readable and writable by you?)")
        }
        handlers = FuseHandlers.table(context: Unmanaged.passUnretained(self).toOpaque())
        let args = configuration.arguments
        var cStrings = args.map { strdup($0) }
        defer { cStrings.forEach { free($0) } }
        let created: OpaquePointer? = cStrings.withUnsafeMutableBufferPointer { argv in
            argv.baseAddress!.withMemoryRebound(to: UnsafePointer<CChar>?.self, capacity: argv.count) { base in
                imgfs_session_new(&handlers, Int32(args.count), base, UInt32(configuration.maxRequestBytes))
            }
        }
        guard let created else {
            throw FuseError("cannot start a FUSE session with options \(args.dropFirst().joined(separator: " ")) (see the libfuse message above)")
        }
        if configuration.kernelPassthrough { imgfs_session_request_passthrough(created) }
        guard imgfs_session_mount(created, configuration.mountpoint) == 0 else {
            imgfs_session_destroy(created)
            throw FuseError("cannot mount on \(configuration.mountpoint): is it an existing directory you own (or are you root)?")
        }
        session = created
        tuneReadahead()
    }

    /// Serves requests until the mount goes away or a signal ends the loop; then stops, flushes and unmounts.
    public func run() async throws {
        guard session != nil else { throw FuseError("run() before mount()") }
        // The loop blocks its thread: run it on a thread of its own, never on the cooperative pool.
        let failure: Error? = await withCheckedContinuation { continuation in
            Self.spawnThread {
                do {
                    try self.runOnCurrentThread()
                    continuation.resume(returning: nil)
                } catch {
                    continuation.resume(returning: error)
                }
            }
        }
        if let failure { throw failure }
    }

    /// Runs the loop on the calling thread (the daemon's main thread, where signals are delivered), then shuts down.
    public func runOnCurrentThread() throws {
        guard let session else { throw FuseError("run before mount") }
        let rc = imgfs_session_loop(session, UInt32(max(1, configuration.fuseThreads)), configuration.handleSignals ? 1 : 0)
        // libfuse reports the signal that ended the loop as its result; anything else is worth a line.
        if rc != 0 && rc != -EINTR && ![SIGTERM, SIGINT, SIGHUP].contains(rc) {
            logger.warning("FUSE loop ended with \(rc)")
        }
        try CallerThreadExecutor.run { try await self.shutdown() }
    }

    /// Waits for every answered-later request, flushes every writable image, unmounts and frees the session.
    private func shutdown() async throws {
        while inFlight.load(ordering: .acquiring) > 0 {
            try? await Task.sleep(nanoseconds: 1_000_000)
        }
        var firstError: Error?
        for file in tree.files where !file.isReadOnly {
            guard let node = file.fixedNode else { continue }
            do { try await node.flush() } catch {
                logger.error("flush of \(node.path) failed: \(error)")
                firstError = firstError ?? error
            }
        }
        if let session {
            imgfs_session_unmount(session)
            imgfs_session_destroy(session)
            self.session = nil
        }
        if let firstError { throw firstError }
    }

    /// Starts answering a request later: the mount does not shut down while any is pending.
    ///
    /// The task starts on this loop thread and runs until its first suspension (the host I/O submitted), then
    /// resumes on the I/O threads: one thread switch per request fewer than enqueueing it. Nothing before that
    /// point blocks: host I/O goes through the engine and CPU work to the compute pool.
    func beginAsync(_ request: FuseRequest, _ work: @escaping @Sendable () async throws -> Void) {
        inFlight.add(1, ordering: .relaxed)
        Task.immediate(executorPreference: executor) {
            await self.answer(request, work)
            self.inFlight.subtract(1, ordering: .releasing)
        }
    }

    /// Serves `work` on this loop thread when nothing else is in flight, and returns whether it did.
    ///
    /// At queue depth 1 the request waits for the disk whatever happens, and the thread switches to an I/O thread
    /// and back cost as much as the read itself (cold 4 KiB reads ran at 0.65-0.8x qemu-storage-daemon's rate
    /// that way). Under load the async path wins, and one blocked loop thread still leaves another reading; with
    /// a single loop thread nothing would, so it never serves inline (at QD32 it fell to the rate of QD1).
    func serveInlineIfIdle(_ request: FuseRequest, _ work: @escaping @Sendable () async throws -> Void) -> Bool {
        guard configuration.fuseThreads > 1, inFlight.load(ordering: .relaxed) == 0,
              inlineBusy.compareExchange(expected: false, desired: true, ordering: .acquiring).exchanged else {
            return false
        }
        runOnLoopThread(request, work)
        inlineBusy.store(false, ordering: .releasing)
        return true
    }

    /// Does the work on the calling loop thread and returns once it has answered.
    func runOnLoopThread(_ request: FuseRequest, _ work: @escaping @Sendable () async throws -> Void) {
        _ = try? CallerThreadExecutor.run { await self.answer(request, work) }
    }

    /// Runs `work`, which replies on success; a failure is replied with its errno.
    private func answer(_ request: FuseRequest, _ work: @Sendable () async throws -> Void) async {
        do { try await work() } catch {
            let errno = (error as? BlockError)?.errno ?? EIO
            if errno == EIO { logger.error("\(error)") }
            request.fail(errno)
        }
    }

    /// Asks the kernel for 1 MiB readahead on this mount's backing device (128 KiB by default); best effort.
    private func tuneReadahead() {
        guard let device = MountTable.entry(at: configuration.mountpoint)?.device else { return }
        let fd = Glibc.open("/sys/class/bdi/\(device)/read_ahead_kb", O_WRONLY)
        guard fd >= 0 else { return }
        let value = "\(configuration.maxRequestBytes / 1024)\n"
        _ = value.withCString { Glibc.write(fd, $0, strlen($0)) }
        Glibc.close(fd)
    }

    static func spawnThread(_ body: @escaping @Sendable () -> Void) {
        final class Box { let body: @Sendable () -> Void; init(_ b: @escaping @Sendable () -> Void) { body = b } }
        var thread = pthread_t()
        let box = Unmanaged.passRetained(Box(body)).toOpaque()
        let rc = pthread_create(&thread, nil, { raw in
            Unmanaged<Box>.fromOpaque(raw!).takeRetainedValue().body()
            return nil
        }, box)
        precondition(rc == 0, "pthread_create failed")
        pthread_detach(thread)
    }
}

/// A failure to set up or run the mount, with a one-line message.
public struct FuseError: Error, CustomStringConvertible {
    public let description: String
    public init(_ message: String) { description = message }
}
