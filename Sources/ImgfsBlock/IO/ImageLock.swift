#if canImport(Glibc)
import Glibc
#endif

/// What an opener does with an image (QEMU's BLK_PERM bits, in QEMU's bit order).
public struct ImagePermissions: OptionSet, Sendable {
    public let rawValue: Int
    public init(rawValue: Int) { self.rawValue = rawValue }

    public static let consistentRead = ImagePermissions(rawValue: 1 << 0)
    public static let write = ImagePermissions(rawValue: 1 << 1)
    public static let writeUnchanged = ImagePermissions(rawValue: 1 << 2)
    public static let resize = ImagePermissions(rawValue: 1 << 3)
    static let all: [ImagePermissions] = [.consistentRead, .write, .writeUnchanged, .resize]
    static let names = ["consistent read", "write", "write unchanged", "resize"]
}

/// QEMU-compatible image locking, so that imgfs and QEMU refuse each other's conflicting opens both ways.
///
/// As QEMU's file driver does: a shared OFD lock on byte 100+bit for each permission held, and on byte 200+bit for
/// each permission others may not have. A conflict is another open file description holding the opposite byte.
/// OFD locks belong to the open file description, so they go away when the file is closed, however the process
/// ends.
public enum ImageLock {
    static let permissionBase: Int64 = 100
    static let unsharedBase: Int64 = 200

    /// How an image is locked: as a writer, as a reader that needs a consistent image, or sharing everything.
    public enum Mode: Sendable {
        case readWrite
        case readOnly
        /// Reads without keeping writers out (QEMU's force-share, `-U`); nothing is locked.
        case forceShare
        /// No locks at all (a short look, such as `imgfs info`).
        case none
    }

    /// Locks `file` for `mode`, or throws naming the conflict.
    public static func lock(_ file: HostFile, mode: Mode) throws {
        let held: ImagePermissions
        let unshared: ImagePermissions
        switch mode {
        case .readWrite: (held, unshared) = ([.consistentRead, .write, .resize], [.write, .resize])
        case .readOnly: (held, unshared) = ([.consistentRead], [.write, .resize])
        case .forceShare, .none: return
        }
        // Take ours first, then look for others': of two openers racing, at least one sees the other.
        for (bit, permission) in ImagePermissions.all.enumerated() {
            if held.contains(permission) { try setReadLock(file, at: permissionBase + Int64(bit)) }
            if unshared.contains(permission) { try setReadLock(file, at: unsharedBase + Int64(bit)) }
        }
        for (bit, permission) in ImagePermissions.all.enumerated() {
            let name = ImagePermissions.names[bit]
            if held.contains(permission), try isLockedByOthers(file, at: unsharedBase + Int64(bit)) {
                throw BlockError.locked(path: file.path, reason: "another process (QEMU or imgfs) has it open and " +
                                        "does not share \(name) access (lock byte \(unsharedBase + Int64(bit)))")
            }
            if unshared.contains(permission), try isLockedByOthers(file, at: permissionBase + Int64(bit)) {
                let advice = mode == .readOnly ? "; --force-share reads it anyway" : ""
                throw BlockError.locked(path: file.path, reason: "another process (QEMU or imgfs) has it open for " +
                                        "\(name) (lock byte \(permissionBase + Int64(bit)))\(advice)")
            }
        }
    }

    /// Gives up every lock byte `lock` may have taken.
    public static func unlock(_ file: HostFile) {
        var request = range(Int32(F_UNLCK), from: permissionBase,
                            count: unsharedBase + Int64(ImagePermissions.all.count) - permissionBase)
        _ = fcntl(file.descriptor, setOFDLock, &request)
    }

    // Linux's OFD lock commands (fcntl.h under _GNU_SOURCE, which Swift's Glibc does not define).
    private static let getOFDLock: Int32 = 36
    private static let setOFDLock: Int32 = 37

    private static func range(_ type: Int32, from start: Int64, count: Int64 = 1) -> flock {
        var request = flock()
        request.l_type = Int16(type)
        request.l_whence = Int16(SEEK_SET)
        request.l_start = off_t(start)
        request.l_len = off_t(count)
        return request
    }

    private static func setReadLock(_ file: HostFile, at byte: Int64) throws {
        var request = range(Int32(F_RDLCK), from: byte)
        guard fcntl(file.descriptor, setOFDLock, &request) == 0 else {
            let e = errno
            // A writer of another open holds a conflicting write lock on the byte: a conflict, not a failure.
            if e == EAGAIN || e == EACCES {
                throw BlockError.locked(path: file.path, reason: "another process holds lock byte \(byte)")
            }
            throw BlockError.system(errno: e, operation: "lock", path: file.path)
        }
    }

    /// Whether another open file description holds any lock on `byte` (a write-lock probe conflicts with all).
    private static func isLockedByOthers(_ file: HostFile, at byte: Int64) throws -> Bool {
        var probe = range(Int32(F_WRLCK), from: byte)
        guard fcntl(file.descriptor, getOFDLock, &probe) == 0 else {
            throw BlockError.system(errno: errno, operation: "test lock", path: file.path)
        }
        return probe.l_type != Int16(F_UNLCK)
    }
}
