#if canImport(Glibc)
import Glibc
#endif

/// Where a daemon records its pid by mountpoint, so `imgfs unmount` can wait until it has flushed and exited.
public enum RuntimeRecord {
    public static var directory: String {
        if let runtime = getenv("XDG_RUNTIME_DIR") { return String(cString: runtime) + "/imgfs" }
        return getuid() == 0 ? "/run/imgfs" : "/tmp/imgfs-\(getuid())"
    }

    public static func path(mountpoint: String) -> String {
        var escaped = ""
        for ch in mountpoint {
            switch ch {
            case "%": escaped += "%25"
            case "/": escaped += "%2F"
            default: escaped.append(ch)
            }
        }
        return directory + "/" + escaped + ".pid"
    }

    public static func write(mountpoint: String, pid: pid_t) {
        mkdir(directory, 0o700)
        let file = path(mountpoint: mountpoint)
        let fd = open(file, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { return }
        _ = "\(pid)\n".withCString { Glibc.write(fd, $0, strlen($0)) }
        close(fd)
    }

    public static func read(mountpoint: String) -> pid_t? {
        let fd = open(path(mountpoint: mountpoint), O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: 32)
        let n = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
        guard n > 0 else { return nil }
        return pid_t(String(decoding: buffer[..<n], as: UTF8.self).filter { !$0.isWhitespace })
    }

    public static func remove(mountpoint: String) {
        unlink(path(mountpoint: mountpoint))
    }
}
