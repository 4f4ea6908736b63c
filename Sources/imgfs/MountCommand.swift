import ArgumentParser
import ImgfsBlock
import ImgfsFUSE
import Logging
#if canImport(Glibc)
import Glibc
#endif

/// `imgfs mount IMAGE MOUNTPOINT`.
struct MountCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mount",
        abstract: "Mount an image: MOUNTPOINT/<stem>.raw shows its disk.",
        discussion: """
            Returns once the file is there (the daemon keeps serving in the background), or exits non-zero with a \
            one-line error: 65 for a problem with the image, 71 for a problem with the mount. A qcow2's internal \
            snapshots appear read-only as MOUNTPOINT/snapshots/<name>.raw. Backing files named inside an image must \
            lie in that image's directory unless --allow-path covers them.

            Example: imgfs mount disk.qcow2 /mnt/x && mount -o loop /mnt/x/disk.raw /mnt/guest
            """)

    @Argument(help: "The image file.") var image: String
    @Argument(help: "An existing directory to mount on.") var mountpoint: String
    @Flag(name: .long, help: "Refuse writes (EROFS).") var readOnly = false
    @Flag(name: .long, help: "With --read-only: do not keep writers out (QEMU's -U); reads may see a changing image.")
    var forceShare = false
    @Flag(name: .long, help: "Stay in the foreground (logs go to stderr).") var foreground = false
    @Option(name: .long, help: "Image format (raw, qcow2); probed when absent. A probed raw image refuses writes that would make it probe as another format.")
    var format: ImageFormat?
    @Option(name: .shortAndLong, parsing: .singleValue, help: "FUSE mount options, comma-separated (e.g. allow_other).")
    var options: [String] = []
    @Option(name: .long, parsing: .singleValue, help: "A directory where files named inside images may also live (repeatable).")
    var allowPath: [String] = []
    @Option(name: .long, help: "Bytes of qcow2 L2 tables cached per image (suffixes K, M, G); default: all of the disk's tables, up to 32M (which maps 256 GiB at 64 KiB clusters).")
    var l2CacheSize: ByteCount?
    @Option(name: .long, help: "Memory the daemon may hold for all images: L2 tables, decompressed clusters, snapshot tables and request buffers (suffixes K, M, G; default 512M). Requests wait for their share when it is spent.")
    var memoryLimit: ByteCount = ByteCount(argument: "512M")!
    @Flag(name: .long, inversion: .prefixedNo,
          help: "Read what the host page cache does not hold with O_DIRECT, bypassing it (off by default: slower than buffered reads on the machines measured so far).")
    var directHostReads = false
    @Option(name: .long, help: "Threads doing blocking I/O and decompression.") var ioThreads = 4
    @Option(name: .long, help: "Host I/O engine: uring or threads; default: uring when the kernel allows it (or $IMGFS_IO_ENGINE).")
    var ioEngine: IOEngineKind?
    @Option(name: .long, help: "Threads reading requests from /dev/fuse.") var fuseThreads = 2
    @Flag(name: .long, inversion: .prefixedNo, help: "Let the kernel read a raw image's file itself for read-only opens (FUSE passthrough, where Linux 6.9+ and root allow it; on by default), so reads run at the host file's own rate. Writable opens, and O_DIRECT opens of an image the host page cache mostly holds, are still served by imgfs.")
    var passthrough = true
    @Option(name: .long, help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel: Logger.Level = .warning
    @Option(name: .long, help: "Where the daemon logs (default: nowhere once detached).") var logFile: String?
    @Option(name: .long, help: .hidden) var readyFd: Int32?

    func validate() throws {
        if ioThreads < 1 || ioThreads > 256 { throw ValidationError("--io-threads must be 1...256") }
        if fuseThreads < 1 || fuseThreads > 64 { throw ValidationError("--fuse-threads must be 1...64") }
        if memoryLimit.bytes < 80 << 20 {
            throw ValidationError("--memory-limit must be at least 80M (64M of it is kept for request buffers)")
        }
        if forceShare && !readOnly { throw ValidationError("--force-share needs --read-only") }
        for option in fuseOptions {
            let key = option.split(separator: "=", maxSplits: 1).first.map(String.init) ?? option
            if ["fsname", "subtype"].contains(key) {
                throw ValidationError("-o \(key)= is set by imgfs (it is how `imgfs unmount` knows its mounts)")
            }
        }
    }

    private var fuseOptions: [String] { options.flatMap { $0.split(separator: ",").map(String.init) } }

    func run() throws {
        if !foreground {
            let status = try Daemon.start(logFile: logFile)
            if status != 0 { throw ExitCode(status) }
            return
        }
        let report = ReadyReport(fd: readyFd, logFile: logFile)
        LoggingSystem.bootstrap { label in
            var handler = EscapingLogHandler(StreamLogHandler.standardError(label: label))
            handler.logLevel = logLevel
            return handler
        }
        IOExecutor.configureShared(threads: ioThreads)
        HostReadPolicy.configure(directMisses: directHostReads)
        let server: FuseServer
        let node: BlockNode
        do {
            let engine: IOEngineKind
            do { engine = try SharedIOEngine.configure(ioEngine) } catch {
                report.failure("cannot start the \(ioEngine?.rawValue ?? "host I/O") engine: \(error)",
                               status: ExitStatus.mountError.rawValue)
                throw ExitStatus.mountError
            }
            Logger(label: "imgfs").notice("host I/O engine: \(engine.rawValue)")
            let imagePath = try absolute(image, what: "image")
            let mountPath: String
            switch Mountpoint.check(mountpoint) {
            case .success(let path): mountPath = path
            case .failure(let problem):
                report.failure(problem.description, status: ExitStatus.mountError.rawValue)
                throw ExitStatus.mountError
            }
            var openOptions = OpenOptions(readOnly: readOnly, format: format,
                                          pathPolicy: try PathPolicy(allowedDirectories: allowPath),
                                          locking: forceShare ? .forceShare : .exclusiveWriter)
            openOptions.metadataCacheBytes = l2CacheSize?.bytes
            let budget = MemoryBudget(limit: memoryLimit.bytes)
            openOptions.memoryBudget = budget
            let opts = openOptions
            let readOnly = self.readOnly
            node = try CallerThreadExecutor.run { try await ImageOpener.open(imagePath, options: opts) }
            let root = MountLayout.directory(for: node, readOnly: readOnly)
            var config = MountConfiguration(mountpoint: mountPath, sourceName: "imgfs:\(imagePath)")
            config.fuseOptions = fuseOptions
            config.readOnly = readOnly || node.isReadOnly
            config.fuseThreads = fuseThreads
            config.kernelPassthrough = passthrough
            config.handleSignals = true
            server = FuseServer(root: root, configuration: config, budget: budget)
            do { try server.mount() } catch {
                report.failure("\(error)", status: ExitStatus.mountError.rawValue)
                throw ExitStatus.mountError
            }
            RuntimeRecord.write(mountpoint: mountPath, pid: getpid())
            defer { RuntimeRecord.remove(mountpoint: mountPath) }
            // Before ready: until then stderr reaches the user's terminal (through the parent, in the background).
            for warning in node.chain.flatMap(\.warnings) { Diagnostics.warning(warning) }
            chdir("/")
            report.ready()
            try server.runOnCurrentThread()
            try CallerThreadExecutor.run { try await node.close() }
        } catch let error as ExitCode {
            throw error
        } catch {
            report.failure("\(error)", status: ExitStatus.imageError.rawValue)
            throw ExitStatus.imageError
        }
    }

    private func absolute(_ path: String, what: String) throws -> String {
        guard let real = PathPolicy.realPath(path) else {
            throw BlockError.system(errno: ENOENT, operation: "open", path: path)
        }
        return real
    }
}

extension ImageFormat: ExpressibleByArgument {}
extension IOEngineKind: ExpressibleByArgument {}

/// A byte count given as `65536`, `64K`, `32M` or `1G`.
struct ByteCount: ExpressibleByArgument {
    let bytes: Int

    init?(argument: String) {
        let units: [Character: Int] = ["K": 1 << 10, "M": 1 << 20, "G": 1 << 30]
        var text = argument.uppercased()
        var scale = 1
        if let last = text.last, let unit = units[last] {
            scale = unit
            text.removeLast()
        }
        guard let value = Int(text), value >= 0, value <= Int.max / scale else { return nil }
        bytes = value * scale
    }
}
extension Logger.Level: @retroactive ExpressibleByArgument {}

/// Tells the waiting parent (or the terminal, in the foreground) how the mount went.
struct ReadyReport {
    static let readyLine = "imgfs-ready"
    static let failurePrefix = "imgfs-failed "
    let fd: Int32?
    let logFile: String?

    func ready() {
        guard let fd else { return }
        send(Self.readyLine + "\n", to: fd)
        close(fd)
        // From now on stderr (the parent's pipe until here) goes to the log.
        let log = open(logFile ?? "/dev/null", O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
        if log >= 0 {
            dup2(log, 2)
            close(log)
        }
    }

    func failure(_ message: String, status: Int32) {
        if let fd {
            // One line whatever the message quotes from the image, and a NUL must not cut it short.
            send("\(Self.failurePrefix)\(status) \(TerminalText.escape(message))\n", to: fd)
            close(fd)
        } else {
            Diagnostics.error(message)
        }
    }

    private func send(_ text: String, to fd: Int32) {
        var bytes = Array(text.utf8)
        _ = bytes.withUnsafeMutableBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
    }
}
