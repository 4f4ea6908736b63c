import Foundation
import Synchronization
import Testing
import ImgfsFUSE
import ImgfsTestSupport
#if canImport(Glibc)
import Glibc
#endif

/// All mount tests, one at a time: they block threads on FUSE I/O and some measure time.
@Suite(.serialized)
struct ImgfsMountTests {}

// MARK: - Linux calls Swift's Glibc does not export

@_silgen_name("fallocate")
private func c_fallocate(_ fd: Int32, _ mode: Int32, _ offset: Int, _ length: Int) -> Int32

/// fallocate(2); returns 0 or -1 with errno set.
func linuxFallocate(_ fd: Int32, mode: Int32, offset: Int64, length: Int64) -> Int32 {
    c_fallocate(fd, mode, Int(offset), Int(length))
}

enum Falloc {
    static let keepSize: Int32 = 0x01
    static let punchHole: Int32 = 0x02
    static let zeroRange: Int32 = 0x10
}

let seekData: Int32 = 3
let seekHole: Int32 = 4

let KiB = 1024
let MiB = 1024 * 1024

// MARK: - Mount table

func mountPoints() -> [String] { MountTable.entries().map(\.mountpoint) }

func fsType(of mountpoint: String) -> String? { MountTable.entry(at: mountpoint)?.fsType }

func isMounted(_ path: String) -> Bool { mountPoints().contains(path) }

func processAlive(_ pid: pid_t) -> Bool {
    if kill(pid, 0) != 0 { return false }
    // A zombie (exited, not reaped) counts as gone.
    if let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
       let close = stat.lastIndex(of: ")") {
        let rest = stat[stat.index(after: close)...].trimmingCharacters(in: .whitespaces)
        if rest.hasPrefix("Z") || rest.hasPrefix("X") { return false }
    }
    return true
}

/// Waits up to `seconds` for `condition`; returns whether it became true.
func waitUntil(seconds: Double, _ condition: () -> Bool) -> Bool {
    let deadline = Date().addingTimeInterval(seconds)
    while Date() < deadline {
        if condition() { return true }
        usleep(10_000)
    }
    return condition()
}

// MARK: - Scratch directory with mounts

/// A temporary directory for one test; `cleanup()` unmounts everything under it (guest mounts first), stops
/// leftover daemons and removes it. Call it from `defer`.
final class Scratch {
    let directory: String
    let binary: String

    init(_ label: String = "t") throws {
        binary = try ImgfsBinary.path()
        let template = "/tmp/imgfs-mt-\(label)-XXXXXX"
        var chars = Array(template.utf8CString)
        guard let made = mkdtemp(&chars) else { throw TestFailure("mkdtemp failed: \(errnoText())") }
        directory = String(cString: made)
    }

    func path(_ name: String) -> String { directory + "/" + name }

    /// Creates (if needed) and returns a directory under the scratch directory.
    func dir(_ name: String) throws -> String {
        let p = path(name)
        try FileManager.default.createDirectory(atPath: p, withIntermediateDirectories: true)
        return p
    }

    /// Runs `imgfs ARGS`.
    @discardableResult
    func imgfs(_ arguments: [String], check: Bool = true) throws -> ToolResult {
        try runTool(binary, arguments, check: check)
    }

    /// `imgfs mount [extra] IMAGE MOUNTPOINT` (daemonized, logging to a file in the scratch directory).
    func mount(_ image: String, at mountpoint: String, _ extra: [String] = []) throws {
        // The log level first, so that `extra` may ask for another (the last one given counts).
        let args = ["mount", "--log-level", "info"] + extra + ["--log-file", path("daemon.log"), image, mountpoint]
        let result = try imgfs(args, check: false)
        if result.status != 0 {
            let log = (try? String(contentsOfFile: path("daemon.log"), encoding: .utf8)) ?? ""
            throw TestFailure("imgfs mount failed (\(result.status)): \(result.stderr)\n\(log)")
        }
        guard fsType(of: mountpoint) == "fuse.imgfs" else {
            throw TestFailure("imgfs mount returned 0 but \(mountpoint) is not a fuse.imgfs mount")
        }
    }

    /// `imgfs unmount MOUNTPOINT`, which waits for the daemon to exit (see `unmountRetryingBusy`).
    func unmount(_ mountpoint: String) throws {
        let result = try unmountRetryingBusy(binary, mountpoint)
        if result.status != 0 {
            throw TestFailure("imgfs unmount \(mountpoint) exited \(result.status): \(result.stderr)")
        }
    }

    func cleanup() {
        let mine = mountPoints().filter { $0.hasPrefix(directory + "/") }
        for mp in mine.reversed() {
            let pid = daemonPid(mountpoint: mp)
            if umount2(mp, 0) != 0 { _ = umount2(mp, Int32(MNT_DETACH)) }
            if let pid {
                if !waitUntil(seconds: 10, { !processAlive(pid) }) { kill(pid, SIGKILL) }
            }
        }
        if mountPoints().contains(where: { $0.hasPrefix(directory + "/") }) { return }  // never remove through a mount
        try? FileManager.default.removeItem(atPath: directory)
    }
}

/// The daemon's pid as `imgfs` records it by mountpoint.
func daemonPid(mountpoint: String) -> pid_t? { RuntimeRecord.read(mountpoint: mountpoint) }


// MARK: - File I/O

func writeFile(_ path: String, _ bytes: [UInt8]) throws {
    let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
    guard fd >= 0 else { throw TestFailure("open \(path): \(errnoText())") }
    defer { close(fd) }
    try pwriteFully(fd, bytes, at: 0)
}

func readFile(_ path: String) throws -> [UInt8] {
    let fd = open(path, O_RDONLY)
    guard fd >= 0 else { throw TestFailure("open \(path): \(errnoText())") }
    defer { close(fd) }
    var st = stat()
    fstat(fd, &st)
    return try preadFully(fd, count: Int(st.st_size), at: 0)
}

func fileSize(_ path: String) -> Int64? {
    var st = stat()
    guard stat(path, &st) == 0 else { return nil }
    return Int64(st.st_size)
}

func openOrThrow(_ path: String, _ flags: Int32) throws -> Int32 {
    let fd = open(path, flags)
    guard fd >= 0 else { throw TestFailure("open \(path): \(errnoText())") }
    return fd
}

/// Reads until `count` bytes or end of file; returns what was read.
func preadFully(_ fd: Int32, count: Int, at offset: Int64) throws -> [UInt8] {
    var buffer = [UInt8](repeating: 0, count: count)
    var done = 0
    try buffer.withUnsafeMutableBytes { raw in
        while done < count {
            let n = pread(fd, raw.baseAddress! + done, count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw TestFailure("pread \(count)@\(offset): \(errnoText())")
            }
            if n == 0 { break }
            done += n
        }
    }
    buffer.removeSubrange(done...)
    return buffer
}

/// Reads `count` bytes from the start of `fd` in 4 KiB preads into one aligned page (so O_DIRECT works); the
/// bytes, and the first failure if a read came back short.
func readInPages(_ fd: Int32, count: Int) -> (bytes: [UInt8], failure: String?) {
    let page = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
    defer { page.deallocate() }
    var bytes = [UInt8](repeating: 0, count: count)
    var failure: String?
    bytes.withUnsafeMutableBytes { out in
        for offset in stride(from: 0, to: count, by: 4096) {
            let want = min(4096, count - offset)
            let n = pread(fd, page, want, off_t(offset))
            if n != want { failure = "pread \(want)@\(offset) returned \(n) (\(errnoText()))"; return }
            (out.baseAddress! + offset).copyMemory(from: page, byteCount: want)
        }
    }
    return (bytes, failure)
}

func pwriteFully(_ fd: Int32, _ bytes: [UInt8], at offset: Int64) throws {
    var done = 0
    try bytes.withUnsafeBytes { raw in
        while done < bytes.count {
            let n = pwrite(fd, raw.baseAddress! + done, bytes.count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw TestFailure("pwrite \(bytes.count)@\(offset): \(errnoText())")
            }
            if n == 0 { throw TestFailure("pwrite \(bytes.count)@\(offset) wrote nothing") }
            done += n
        }
    }
}

/// memcmp-fast equality; on a mismatch, a description of the first difference.
func difference(_ a: [UInt8], _ b: [UInt8]) -> String? {
    if a.count == b.count {
        let same = a.withUnsafeBytes { x in b.withUnsafeBytes { y in
            a.isEmpty || memcmp(x.baseAddress!, y.baseAddress!, a.count) == 0 } }
        if same { return nil }
    }
    let n = min(a.count, b.count)
    var lo = 0
    var step = 1 << 20
    // find the first differing chunk with memcmp, then the byte
    a.withUnsafeBytes { x in b.withUnsafeBytes { y in
        while lo < n {
            let len = min(step, n - lo)
            if memcmp(x.baseAddress! + lo, y.baseAddress! + lo, len) != 0 {
                if len == 1 { return }
                step = max(1, len / 16)
                continue
            }
            lo += len
        }
    } }
    if lo >= n { return "sizes differ: \(a.count) vs \(b.count) bytes (common prefix equal)" }
    return "first difference at byte \(lo): \(a[lo]) vs \(b[lo]) (sizes \(a.count), \(b.count))"
}

func isAllZero(_ bytes: [UInt8]) -> Bool {
    bytes.withUnsafeBytes { raw in
        var i = 0
        let p = raw.baseAddress
        guard let p else { return true }
        let zeros = [UInt8](repeating: 0, count: 65536)
        return zeros.withUnsafeBytes { z in
            while i < raw.count {
                let len = min(65536, raw.count - i)
                if memcmp(p + i, z.baseAddress!, len) != 0 { return false }
                i += len
            }
            return true
        }
    }
}

// MARK: - Threads

/// Runs blocking work on a fresh thread and awaits its result (keeps blocking calls off the cooperative pool).
func onThread<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { continuation in
        let thread = Thread {
            do { continuation.resume(returning: try body()) } catch { continuation.resume(throwing: error) }
        }
        thread.start()
    }
}

/// A value shared between threads.
final class Shared<T: Sendable>: Sendable {
    private let mutex: Mutex<T>
    init(_ value: T) { mutex = Mutex(value) }
    var value: T {
        get { mutex.withLock { $0 } }
    }
    func set(_ value: T) { mutex.withLock { $0 = value } }
    func update<R>(_ body: (inout T) -> R) -> R { mutex.withLock { body(&$0) } }
}

/// `imgfs unmount MOUNTPOINT` with the `binary` given. A mount can stay busy for a moment after its last file is
/// closed (the kernel drops its references asynchronously, a system-wide sync holds it), so a busy refusal is
/// retried for a few seconds before the result is returned.
func unmountRetryingBusy(_ binary: String, _ mountpoint: String) throws -> ToolResult {
    var result = try runTool(binary, ["unmount", mountpoint], check: false)
    let deadline = Date().addingTimeInterval(5)
    while result.status != 0 && result.stderr.contains("busy") && Date() < deadline {
        usleep(100_000)
        result = try runTool(binary, ["unmount", mountpoint], check: false)
    }
    return result
}
