#if canImport(Glibc)
import Glibc
#endif

/// Starts `imgfs mount --foreground` again as a detached child and waits until it has mounted or failed.
///
/// fork() in a process with threads can leave the child holding another thread's lock; a fresh exec of the same
/// binary has none. The child writes "ready" (or "<status> <message>") to a pipe once the mount exists.
enum Daemon {
    private static let childReadyFd: Int32 = 3
    private static let spawnSetsid: Int16 = 0x80  // POSIX_SPAWN_SETSID, glibc ≥ 2.26

    static func start(logFile: String?) throws -> Int32 {
        var pipeFds: [Int32] = [0, 0]
        guard pipe(&pipeFds) == 0 else {
            Diagnostics.error("cannot create a pipe: \(String(cString: strerror(errno)))")
            return 71
        }
        let (readEnd, writeEnd) = (pipeFds[0], pipeFds[1])
        // Only the child's dup2'd copy (fd 3) may survive exec, or the parent would never see end-of-file.
        _ = fcntl(readEnd, F_SETFD, FD_CLOEXEC)
        _ = fcntl(writeEnd, F_SETFD, FD_CLOEXEC)
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        let log = logFile ?? "/dev/null"
        posix_spawn_file_actions_addopen(&actions, 1, log, O_WRONLY | O_CREAT | O_APPEND, 0o644)
        // Until it is ready the child's stderr is the pipe too, so libfuse's own complaints reach the user;
        // once ready it points stderr at the log.
        posix_spawn_file_actions_adddup2(&actions, writeEnd, 2)
        posix_spawn_file_actions_adddup2(&actions, writeEnd, childReadyFd)
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        posix_spawnattr_setflags(&attributes, spawnSetsid)

        let executable = selfExecutable()
        var arguments = Array(CommandLine.arguments.dropFirst())
        arguments += ["--foreground", "--ready-fd", String(childReadyFd)]
        if let logFile { arguments += ["--log-file", logFile] }
        let argv = ([executable] + arguments).map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        var pid = pid_t()
        let rc = posix_spawn(&pid, executable, &actions, &attributes, argv, environ)
        close(writeEnd)
        guard rc == 0 else {
            close(readEnd)
            Diagnostics.error("cannot start the daemon: \(String(cString: strerror(rc)))")
            return 71
        }
        let answer = readAll(readEnd)
        close(readEnd)
        var status: Int32?
        for line in answer.split(separator: "\n", omittingEmptySubsequences: true) {
            if line == ReadyReport.readyLine { return 0 }
            if line.hasPrefix(ReadyReport.failurePrefix) {
                let rest = line.dropFirst(ReadyReport.failurePrefix.count)
                let space = rest.firstIndex(of: " ") ?? rest.endIndex
                status = Int32(rest[..<space])
                Diagnostics.error(String(rest[space...].drop { $0 == " " }))
            } else {
                Diagnostics.write(TerminalText.escape(String(line)) + "\n")
            }
        }
        var exitStatus: Int32 = 0
        waitpid(pid, &exitStatus, 0)
        if let status { return status }
        Diagnostics.error("the daemon exited before mounting (status \(exitStatus)); run with --foreground to see why")
        return 71
    }

    private static func readAll(_ fd: Int32) -> String {
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            bytes += chunk[..<n]
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    private static func selfExecutable() -> String {
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let n = readlink("/proc/self/exe", &buffer, buffer.count - 1)
        if n > 0 {
            return String(decoding: buffer[..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        }
        return CommandLine.arguments[0]
    }
}
