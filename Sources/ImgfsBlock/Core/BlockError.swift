#if canImport(Glibc)
import Glibc
#endif

/// Every failure the block layer reports; each maps to one errno for the FUSE reply.
public enum BlockError: Error, Sendable, CustomStringConvertible, Equatable {
    /// A host system call failed.
    case system(errno: Int32, operation: String, path: String)
    /// The image's metadata is invalid; found while opening.
    case invalidImage(path: String, reason: String)
    /// Metadata found invalid during I/O: only the affected range fails (EIO).
    case corrupt(String)
    /// The image uses a feature imgfs does not implement.
    case unsupported(String)
    /// A write was attempted on a read-only node.
    case readOnly
    /// A request lies outside the virtual disk.
    case outOfRange(offset: Int64, length: Int64, size: Int64)
    /// A path named inside an image was refused by the untrusted-path policy.
    case pathRefused(path: String, reason: String)
    /// Opening a backing chain failed (loop, depth, missing file).
    case chain(String)
    /// Another process holds the image in a way that conflicts with this open (QEMU-compatible locks).
    case locked(path: String, reason: String)
    /// The write would change what the image is taken for (a probed raw image's first sector).
    case notPermitted(String)
    /// The request needs more memory than its budget has left (snapshot L1 tables, say).
    case overBudget(String)

    /// The errno a FUSE reply carries for this error.
    public var errno: Int32 {
        switch self {
        case .system(let e, _, _): return e
        case .invalidImage, .corrupt, .chain: return EIO
        case .unsupported: return EOPNOTSUPP
        case .readOnly: return EROFS
        case .outOfRange: return EINVAL
        case .pathRefused: return EACCES
        case .locked: return EBUSY
        case .notPermitted: return EPERM
        case .overBudget: return ENOMEM
        }
    }

    public var description: String {
        switch self {
        case .system(let e, let op, let path):
            return "\(path): \(op) failed: \(String(cString: strerror(e)))"
        case .invalidImage(let path, let reason): return "\(path): invalid image: \(reason)"
        case .corrupt(let reason): return "corrupt image metadata: \(reason)"
        case .unsupported(let what): return "unsupported: \(what)"
        case .readOnly: return "read-only"
        case .outOfRange(let o, let l, let s): return "request \(o)+\(l) outside the disk of \(s) bytes"
        case .pathRefused(let path, let reason): return "refused path '\(path)': \(reason)"
        case .chain(let reason): return reason
        case .locked(let path, let reason): return "\(path): cannot lock the image: \(reason)"
        case .notPermitted(let reason), .overBudget(let reason): return reason
        }
    }
}
