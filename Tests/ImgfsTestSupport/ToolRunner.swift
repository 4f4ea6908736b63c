import Foundation
#if canImport(Glibc)
import Glibc
#endif

@_silgen_name("posix_spawn_file_actions_addchdir_np")
private func c_addchdir(_ actions: UnsafeMutablePointer<posix_spawn_file_actions_t>, _ path: UnsafePointer<CChar>) -> Int32


public struct TestFailure: Error, CustomStringConvertible {
    public let description: String
    public init(_ message: String) { description = message }
}

public func errnoText(_ e: Int32 = errno) -> String { "\(e) (\(String(cString: strerror(e))))" }


public struct ToolResult {
    public let status: Int32
    public let stdout: String
    public let stderr: String
    public var outputData: Data
}

/// Runs a program (absolute path or found on PATH) and returns its status and output.
///
/// posix_spawn + waitpid rather than Foundation's Process: Process learns of the exit through a dispatch source,
/// which never runs when every pool thread is blocked waiting for a process (a deadlock on two cores).
@discardableResult
public func runTool(_ tool: String, _ arguments: [String], cwd: String? = nil, check: Bool = true) throws -> ToolResult {
    let executable: String
    if tool.hasPrefix("/") {
        executable = tool
    } else {
        let dirs = ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        let candidates: [String] = dirs.map { $0 + "/" + tool }
        guard let found = candidates.first(where: { access($0, X_OK) == 0 }) else {
            throw TestFailure("\(tool) is not installed")
        }
        executable = found
    }
    // Files, not pipes: a daemon started by the tool can never hold our pipe open.
    let outPath = "/tmp/imgfs-test-out-\(UUID().uuidString)"
    let errPath = "/tmp/imgfs-test-err-\(UUID().uuidString)"
    defer {
        unlink(outPath)
        unlink(errPath)
    }
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
    posix_spawn_file_actions_addopen(&actions, 1, outPath, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
    posix_spawn_file_actions_addopen(&actions, 2, errPath, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
    if let cwd { _ = c_addchdir(&actions, cwd) }
    let argv = ([executable] + arguments).map { strdup($0) } + [nil]
    defer { argv.forEach { free($0) } }
    var pid = pid_t()
    let rc = posix_spawn(&pid, executable, &actions, nil, argv, environ)
    guard rc == 0 else { throw TestFailure("cannot run \(executable): \(errnoText(rc))") }
    var status: Int32 = 0
    while waitpid(pid, &status, 0) < 0 {
        if errno != EINTR { throw TestFailure("waitpid \(tool): \(errnoText())") }
    }
    // WIFEXITED / WEXITSTATUS, which Swift does not import.
    let exitStatus: Int32 = (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
    let out = (try? Data(contentsOf: URL(fileURLWithPath: outPath))) ?? Data()
    let err = (try? Data(contentsOf: URL(fileURLWithPath: errPath))) ?? Data()
    let result = ToolResult(status: exitStatus, stdout: String(decoding: out, as: UTF8.self),
                            stderr: String(decoding: err, as: UTF8.self), outputData: out)
    if check && result.status != 0 {
        throw TestFailure("\(tool) \(arguments.joined(separator: " ")) exited \(result.status): \(result.stderr)")
    }
    return result
}


/// Starts a program in the background (output discarded) and returns its pid; the caller kills and reaps it.
public func spawnBackground(_ executable: String, _ arguments: [String]) throws -> pid_t {
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    for fd: Int32 in [0, 1, 2] {
        posix_spawn_file_actions_addopen(&actions, fd, "/dev/null", fd == 0 ? O_RDONLY : O_WRONLY, 0)
    }
    let argv = ([executable] + arguments).map { strdup($0) } + [nil]
    defer { argv.forEach { free($0) } }
    var pid = pid_t()
    let rc = posix_spawnp(&pid, executable, &actions, nil, argv, environ)
    guard rc == 0 else { throw TestFailure("cannot run \(executable): \(errnoText(rc))") }
    return pid
}

/// Kills a background process and waits for it.
public func stopBackground(_ pid: pid_t) {
    kill(pid, SIGKILL)
    var status: Int32 = 0
    while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
}
