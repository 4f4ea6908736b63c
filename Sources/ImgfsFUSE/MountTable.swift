#if canImport(Glibc)
import Glibc
#endif

/// The system's mounts, from /proc/self/mountinfo (read, never stat'ed: a stat of our own mountpoint from the
/// daemon before its loop runs would wait for itself).
public enum MountTable {
    /// One mountinfo line's fields that imgfs uses.
    public struct Entry: Sendable {
        public let device: String      // "major:minor"
        public let mountpoint: String
        public let fsType: String
    }

    public static func entries() -> [Entry] {
        guard let file = fopen("/proc/self/mountinfo", "r") else { return [] }
        defer { fclose(file) }
        var line: UnsafeMutablePointer<CChar>?
        var capacity = 0
        defer { free(line) }
        var result: [Entry] = []
        while getline(&line, &capacity, file) > 0 {
            let fields = String(cString: line!).split(separator: " ")
            guard fields.count > 5, let dash = fields.firstIndex(of: "-"), dash + 1 < fields.count else { continue }
            result.append(Entry(device: String(fields[2]), mountpoint: unescape(String(fields[4])),
                                fsType: String(fields[dash + 1])))
        }
        return result
    }

    /// The newest mount on `path`.
    public static func entry(at path: String) -> Entry? {
        entries().last { $0.mountpoint == path }
    }

    public static func isImgfsMount(_ path: String) -> Bool {
        entry(at: path)?.fsType == "fuse.imgfs"
    }

    /// mountinfo writes space, tab, newline and backslash as \ooo octal escapes.
    static func unescape(_ s: String) -> String {
        var out: [UInt8] = []
        let bytes = Array(s.utf8)
        var i = 0
        while i < bytes.count {
            if bytes[i] == 92, i + 3 < bytes.count,
               let v = UInt8(String(decoding: bytes[(i + 1)...(i + 3)], as: UTF8.self), radix: 8) {
                out.append(v)
                i += 4
            } else {
                out.append(bytes[i])
                i += 1
            }
        }
        return String(decoding: out, as: UTF8.self)
    }
}
