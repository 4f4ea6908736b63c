#if canImport(Glibc)
import Glibc
#endif
import Synchronization

/// A file on the host: the protocol layer under every format driver.
///
/// Thin typed wrappers over `pread`/`pwrite`/`fdatasync`/`fallocate`/`lseek`. The async methods go through an
/// `IOEngine` (io_uring, or an `IOExecutor` thread), never blocking Swift's cooperative pool; the synchronous ones
/// are for code already on a thread that may block.
public final class HostFile: Sendable {
    public let path: String
    public let descriptor: Int32
    private let readOnlyState: Locked<Bool>
    private let direct = Locked(DirectState.unopened)
    public let executor: IOExecutor
    public let engine: any IOEngine
    /// How `readIfCached` probes, learnt at the first RWF_NOWAIT refusal (`CachedReadProbe`).
    private let cachedReadProbe = Atomic<UInt8>(CachedReadProbe.noWait.rawValue)
    private let writeBehind = Locked(WriteBehind())

    /// The (device, inode) pair, used to detect a backing chain that names a file twice.
    public struct Identity: Hashable, Sendable {
        public let device: UInt64
        public let inode: UInt64
    }

    /// Opens a regular file or block device; anything else (a FIFO, a socket, a directory) is refused before it
    /// can block the open or a read.
    public static func open(_ path: String, readOnly: Bool, executor: IOExecutor = .shared,
                            engine: any IOEngine = SharedIOEngine.engine) throws -> HostFile {
        let fd = Glibc.open(path, openFlags(readOnly: readOnly))
        if fd < 0 { throw BlockError.system(errno: errno, operation: "open", path: path) }
        return try open(adopting: fd, path: path, readOnly: readOnly, executor: executor, engine: engine)
    }

    /// The flags every image open uses. O_NONBLOCK keeps open() of a FIFO from waiting for a writer; `open(adopting:)`
    /// clears it once the type is known.
    static func openFlags(readOnly: Bool) -> Int32 {
        (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC | O_NONBLOCK | O_NOCTTY
    }

    /// Wraps `fd`, opened with `openFlags`, after the same checks as `open`; the descriptor is closed if they fail.
    static func open(adopting fd: Int32, path: String, readOnly: Bool, executor: IOExecutor = .shared,
                     engine: any IOEngine = SharedIOEngine.engine) throws -> HostFile {
        var st = stat()
        if fstat(fd, &st) != 0 {
            let e = errno
            Glibc.close(fd)
            throw BlockError.system(errno: e, operation: "stat", path: path)
        }
        let type = st.st_mode & S_IFMT
        guard type == S_IFREG || type == S_IFBLK else {
            Glibc.close(fd)
            if type == S_IFDIR { throw BlockError.system(errno: EISDIR, operation: "open", path: path) }
            throw BlockError.unsupported("\(path): not a regular file or block device (a \(fileTypeName(type)))")
        }
        let flags = fcntl(fd, F_GETFL)
        if flags < 0 || fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) != 0 {
            let e = errno
            Glibc.close(fd)
            throw BlockError.system(errno: e, operation: "fcntl", path: path)
        }
        // Images are read at random: a readahead behind each small miss (128 KiB for 4 KiB wanted) cost a third of
        // the cold random-read rate here, and even a RWF_NOWAIT probe that misses starts one. Large sequential
        // requests (the kernel's FUSE readahead, 1 MiB O_DIRECT reads) do not need it.
        _ = posix_fadvise(fd, 0, 0, POSIX_FADV_RANDOM)
        return HostFile(path: path, descriptor: fd, readOnly: readOnly, executor: executor, engine: engine)
    }

    private static func fileTypeName(_ type: mode_t) -> String {
        switch type {
        case S_IFIFO: return "FIFO"
        case S_IFSOCK: return "socket"
        case S_IFCHR: return "character device"
        case S_IFLNK: return "symbolic link"
        default: return "special file"
        }
    }

    init(path: String, descriptor: Int32, readOnly: Bool, executor: IOExecutor, engine: any IOEngine) {
        self.path = path
        self.descriptor = descriptor
        self.readOnlyState = Locked(readOnly)
        self.executor = executor
        self.engine = engine
    }

    deinit {
        Glibc.close(descriptor)
        if case .open(let fd) = direct.withLock({ $0 }) { Glibc.close(fd) }
    }

    /// Whether the descriptor was opened (or last reopened) read-only.
    public var isReadOnly: Bool { readOnlyState.withLock { $0 } }

    /// Reopens the same file (never its name again: it may have been replaced) in the other mode, in place: the
    /// new open file description takes over this descriptor number atomically, so no request sees it closed.
    /// Its image locks are those of the old description, which go with it; the caller takes new ones.
    public func reopen(readOnly: Bool) throws {
        guard readOnly != isReadOnly else { return }
        let fd = Glibc.open("/proc/self/fd/\(descriptor)", (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC)
        if fd < 0 { throw BlockError.system(errno: errno, operation: "reopen", path: path) }
        defer { Glibc.close(fd) }
        var before = stat(), after = stat()
        guard fstat(descriptor, &before) == 0, fstat(fd, &after) == 0,
              before.st_dev == after.st_dev, before.st_ino == after.st_ino else {
            throw BlockError.chain("\(path) changed while it was being reopened")
        }
        try readOnlyState.withLock { state in
            if linuxDup3(fd, descriptor, flags: O_CLOEXEC) < 0 { throw failure("reopen") }
            _ = posix_fadvise(descriptor, 0, 0, POSIX_FADV_RANDOM)  // advice belongs to the description
            state = readOnly
        }
    }

    public func identity() throws -> Identity {
        var st = stat()
        guard fstat(descriptor, &st) == 0 else { throw failure("stat") }
        return Identity(device: UInt64(st.st_dev), inode: UInt64(st.st_ino))
    }

    /// The file's current size in bytes.
    public func size() throws -> Int64 {
        var st = stat()
        guard fstat(descriptor, &st) == 0 else { throw failure("stat") }
        return Int64(st.st_size)
    }

    /// Bytes the host actually stores for the file (st_blocks), for `info`'s actual-size.
    public func allocatedBytes() -> Int64 {
        var st = stat()
        guard fstat(descriptor, &st) == 0 else { return 0 }
        return Int64(st.st_blocks) * 512
    }

    // MARK: Synchronous calls, for code already on an I/O thread.

    /// Reads as much as the file has; returns the count (short only at end of file).
    public func preadSome(_ buffer: UnsafeMutableRawBufferPointer, at offset: Int64) throws -> Int {
        var done = 0
        while done < buffer.count {
            let n = Glibc.pread(descriptor, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw failure("read")
            }
            if n == 0 { break }
            done += n
        }
        return done
    }

    /// Starts reading the whole buffer through the engine with no task, and calls `completion` on the engine's
    /// thread with whether every byte came; false when the engine cannot (then nothing was started). A short or
    /// failed read is for `read` to do again and report: here it is only a false.
    /// Misses go around the page cache where `read` would send them (`HostReadPolicy`); a refusal of that
    /// alignment comes back false, and `read` then learns it.
    public func startRead(into buffer: UnsafeMutableRawBufferPointer, at offset: Int64,
                          completion: @escaping @Sendable (Bool) -> Void) -> Bool {
        let wanted = buffer.count
        let fd = directDescriptor(for: buffer, at: offset) ?? descriptor
        return engine.startRead(fd: fd, into: buffer, at: offset) { result in completion(Int(result) == wanted) }
    }

    /// Reads exactly `buffer.count` bytes; a short read means the image claims data the file does not hold.
    public func preadExactly(_ buffer: UnsafeMutableRawBufferPointer, at offset: Int64) throws {
        let n = try preadSome(buffer, at: offset)
        if n != buffer.count {
            throw BlockError.corrupt("\(path): \(buffer.count) bytes at offset \(offset) lie past the end of the file")
        }
    }

    /// Reads the range only if the page cache already holds it, without waiting for I/O or locks
    /// (`preadv2(RWF_NOWAIT)`); returns the count (short only at end of file), or nil when the read would block
    /// or fails, for the caller to retry on its async path, which reports errors properly.
    /// A file in memory (tmpfs, ramfs) refuses RWF_NOWAIT but never waits for a disk: it is read plainly.
    public func readIfCached(into buffer: UnsafeMutableRawBufferPointer, at offset: Int64) -> Int? {
        let probe = CachedReadProbe(rawValue: cachedReadProbe.load(ordering: .relaxed)) ?? .unavailable
        if probe == .unavailable { return nil }
        let flags = probe == .noWait ? LinuxReadFlags.noWait : 0
        var done = 0
        while done < buffer.count {
            let rest = UnsafeMutableRawBufferPointer(rebasing: buffer[done...])
            let n = linuxPreadv2(descriptor, rest, at: offset + Int64(done), flags: flags)
            if n < 0 {
                let code = errno
                if code == EINTR { continue }
                if probe == .noWait && (code == EOPNOTSUPP || code == ENOSYS) {
                    let learnt: CachedReadProbe = isInMemoryFileSystem(descriptor) ? .plain : .unavailable
                    cachedReadProbe.store(learnt.rawValue, ordering: .relaxed)
                    if learnt == .plain { return readIfCached(into: buffer, at: offset) }
                }
                return nil
            }
            if n == 0 { break }
            // A short count means the rest is not cached (or the file ends): asking again tells which.
            done += n
        }
        return done
    }

    public func pwriteAll(_ buffer: UnsafeRawBufferPointer, at offset: Int64) throws {
        guard !isReadOnly else { throw BlockError.readOnly }
        var done = 0
        while done < buffer.count {
            let n = Glibc.pwrite(descriptor, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw failure("write")
            }
            done += n
        }
        noteWritten(at: offset, count: buffer.count)
    }

    public func syncData() throws {
        guard !isReadOnly else { return }
        if fdatasync(descriptor) != 0 { throw failure("fdatasync") }
    }

    /// fallocate with the given Linux mode bits; returns false when the file system does not support the mode.
    public func fallocateRange(mode: Int32, offset: Int64, length: Int64) throws -> Bool {
        guard !isReadOnly else { throw BlockError.readOnly }
        while true {
            if linuxFallocate(descriptor, mode: mode, offset: offset, length: length) == 0 { return true }
            if errno == EINTR { continue }
            if errno == EOPNOTSUPP || errno == ENOSYS { return false }
            throw failure("fallocate")
        }
    }

    public func setSize(_ length: Int64) throws {
        guard !isReadOnly else { throw BlockError.readOnly }
        if ftruncate(descriptor, off_t(length)) != 0 { throw failure("truncate") }
    }

    /// `lseek(SEEK_DATA)`/`SEEK_HOLE`; nil when the offset is at or past the end (ENXIO).
    public func seek(_ whence: Int32, from offset: Int64) throws -> Int64? {
        let r = lseek(descriptor, off_t(offset), whence)
        if r < 0 {
            if errno == ENXIO { return nil }
            throw failure("lseek")
        }
        return Int64(r)
    }

    // MARK: Async calls, from any context, through the engine.

    /// Reads as much as the file has; returns the count (short only at end of file).
    ///
    /// With `HostReadPolicy.directMisses` (opt-in), an aligned read the page cache does not hold goes to the disk
    /// with O_DIRECT. The idea: inserting pages caps buffered reads below what a disk does (64–80k against 87–94k
    /// 4 KiB reads a second at QD32 on the host file here). Measured through the mount it lost all the same
    /// (cold QD32 38k direct against 47k buffered), so buffered reads stay the default.
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int64) async throws -> Int {
        if let fd = directDescriptor(for: buffer, at: offset) {
            if let n = readIfCached(into: buffer, at: offset) { return n }
            do {
                return try await readAll(fd: fd, into: buffer, at: offset)
            } catch BlockError.system(let code, _, _) where code == EINVAL {
                // The file system or device wants other alignment: read through the page cache from now on.
                direct.withLock { state in
                    if case .open(let fd) = state { Glibc.close(fd) }
                    state = .unavailable
                }
            }
        }
        return try await readAll(fd: descriptor, into: buffer, at: offset)
    }

    /// The share of the file (0 to 1) the host page cache holds now; nil where the kernel cannot tell (before
    /// Linux 6.5). It walks the file's cached pages: milliseconds for gigabytes, so not per request.
    public func pageCacheShare() -> Double? {
        var st = stat()
        guard fstat(descriptor, &st) == 0, let cached = linuxCachedPageCount(descriptor) else { return nil }
        guard st.st_size > 0 else { return 1 }
        let pages = (Double(st.st_size) / Double(sysconf(Int32(_SC_PAGESIZE)))).rounded(.up)
        return min(1, Double(cached) / pages)
    }

    /// How `readIfCached` reads without waiting for a disk.
    private enum CachedReadProbe: UInt8 {
        /// preadv2(RWF_NOWAIT): fails rather than wait for I/O.
        case noWait
        /// A plain read: the file system keeps every page in memory (tmpfs, ramfs), and refuses RWF_NOWAIT.
        case plain
        /// None: RWF_NOWAIT is refused (an old kernel or an odd file system), so a caller's fast path costs no
        /// failing system call per request from then on.
        case unavailable
    }

    /// Whether the file system under `fd` holds its files in memory, so a read never waits for a device.
    private func isInMemoryFileSystem(_ fd: Int32) -> Bool {
        // TMPFS_MAGIC and RAMFS_MAGIC from linux/magic.h.
        let type = linuxFileSystemType(fd)
        return type == 0x0102_1994 || type == 0x8584_58f6
    }

    /// Whether this file has a second, O_DIRECT open, and what it is.
    private enum DirectState {
        case unopened
        case open(Int32)
        case unavailable
    }

    /// The O_DIRECT descriptor a miss of this range is read through, if `HostReadPolicy` sends misses around the
    /// page cache and the range is aligned for it; opened on first use (through /proc/self/fd: the same file,
    /// never its name again).
    private func directDescriptor(for buffer: UnsafeMutableRawBufferPointer, at offset: Int64) -> Int32? {
        guard HostReadPolicy.directMisses, HostReadPolicy.isDirectAligned(buffer, offset) else { return nil }
        return direct.withLock { state -> Int32? in
            switch state {
            case .open(let fd): return fd
            case .unavailable: return nil
            case .unopened:
                let fd = Glibc.open("/proc/self/fd/\(descriptor)", O_RDONLY | O_CLOEXEC | LinuxOpenFlags.direct)
                state = fd >= 0 ? .open(fd) : .unavailable
                return fd >= 0 ? fd : nil
            }
        }
    }

    private func readAll(fd: Int32, into buffer: UnsafeMutableRawBufferPointer, at offset: Int64) async throws -> Int {
        // A thread that waits for this read anyway does it itself: an engine would only add two thread switches.
        if fd == descriptor && IOExecutor.isCurrentThreadCallerThread { return try preadSome(buffer, at: offset) }
        var done = 0
        while done < buffer.count {
            let rest = UnsafeMutableRawBufferPointer(rebasing: buffer[done...])
            let n = try await retryingEINTR {
                try await engine.read(fd: fd, into: rest, at: offset + Int64(done), path: path)
            }
            if n == 0 { break }
            done += n
        }
        return done
    }

    /// Reads exactly `buffer.count` bytes; a short read means the image claims data the file does not hold.
    public func readExactly(into buffer: UnsafeMutableRawBufferPointer, at offset: Int64) async throws {
        let n = try await read(into: buffer, at: offset)
        if n != buffer.count {
            throw BlockError.corrupt("\(path): \(buffer.count) bytes at offset \(offset) lie past the end of the file")
        }
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: Int64) async throws {
        if IOExecutor.isCurrentThreadCallerThread { return try pwriteAll(buffer, at: offset) }
        guard !isReadOnly else { throw BlockError.readOnly }
        var done = 0
        while done < buffer.count {
            let rest = UnsafeRawBufferPointer(rebasing: buffer[done...])
            let n = try await retryingEINTR {
                try await engine.write(fd: descriptor, from: rest, at: offset + Int64(done), path: path)
            }
            // pwrite returns 0 for a non-empty buffer only on a broken file system; never loop on it.
            if n == 0 { throw BlockError.system(errno: EIO, operation: "write", path: path) }
            done += n
        }
        noteWritten(at: offset, count: buffer.count)
    }

    /// Writes all of `buffers`, in order, as one contiguous range from `offset` (pwritev): copy-on-write padding
    /// and guest data go out in one request.
    public func write(vector buffers: [UnsafeRawBufferPointer], at offset: Int64) async throws {
        guard !isReadOnly else { throw BlockError.readOnly }
        var rest = buffers.filter { !$0.isEmpty }
        var position = offset
        while !rest.isEmpty {
            let pending = rest
            let n = try await retryingEINTR {
                try await engine.writev(fd: descriptor, from: pending, at: position, path: path)
            }
            if n == 0 { throw BlockError.system(errno: EIO, operation: "write", path: path) }
            position += Int64(n)
            rest = Self.advance(rest, by: n)
        }
        noteWritten(at: offset, count: Int(position - offset))
    }

    /// Starts write-back behind large writes that move forward through the file (see `WriteBehind`).
    private func noteWritten(at offset: Int64, count: Int) {
        // The size test first, so small writes (most of them) never take the lock; `note` applies the same rule.
        guard count >= WriteBehind.largeWriteBytes,
              let range = writeBehind.withLock({ $0.note(offset: offset, count: count) }) else { return }
        // Queued on an I/O thread, which the writer does not wait for; the closure holds the file, so its
        // descriptor stays open until the call returns.
        executor.execute {
            _ = linuxStartWriteback(self.descriptor, offset: range.lowerBound, length: range.upperBound - range.lowerBound)
            self.writeBehind.withLock { $0.finished() }
        }
    }

    /// Fills all of `buffers`, in order, from one contiguous range at `offset` (preadv); a short read means the
    /// range passes the end of the file.
    public func readExactly(vector buffers: [UnsafeMutableRawBufferPointer], at offset: Int64) async throws {
        var rest = buffers.filter { !$0.isEmpty }.map { UnsafeRawBufferPointer($0) }
        var position = offset
        while !rest.isEmpty {
            let pending = rest.map { UnsafeMutableRawBufferPointer(mutating: $0) }
            let n = try await retryingEINTR {
                try await engine.readv(fd: descriptor, into: pending, at: position, path: path)
            }
            if n == 0 {
                throw BlockError.corrupt("\(path): a vectored read at offset \(position) lies past the end of the file")
            }
            position += Int64(n)
            rest = Self.advance(rest, by: n)
        }
    }

    /// What is left of a vector after `count` of its bytes were transferred.
    private static func advance(_ buffers: [UnsafeRawBufferPointer], by count: Int) -> [UnsafeRawBufferPointer] {
        var skip = count
        var rest: [UnsafeRawBufferPointer] = []
        for buffer in buffers {
            if skip >= buffer.count {
                skip -= buffer.count
            } else {
                rest.append(UnsafeRawBufferPointer(rebasing: buffer[skip...]))
                skip = 0
            }
        }
        return rest
    }

    public func flush() async throws {
        guard !isReadOnly else { return }
        try await retryingEINTR { try await engine.fdatasync(fd: descriptor, path: path) }
    }

    /// fallocate with the given Linux mode bits; returns false when the file system does not support the mode.
    public func fallocate(mode: Int32, offset: Int64, length: Int64) async throws -> Bool {
        guard !isReadOnly else { throw BlockError.readOnly }
        do {
            try await retryingEINTR {
                try await engine.fallocate(fd: descriptor, mode: mode, offset: offset, length: length, path: path)
            }
            return true
        } catch let BlockError.system(code, _, _) where code == EOPNOTSUPP || code == ENOSYS {
            return false
        }
    }

    /// Engines retry EINTR themselves; this keeps a future engine that does not from failing a request.
    private func retryingEINTR<T>(_ body: () async throws -> T) async throws -> T {
        while true {
            do { return try await body() } catch let BlockError.system(code, _, _) where code == EINTR { continue }
        }
    }

    private func failure(_ operation: String) -> BlockError {
        .system(errno: errno, operation: operation, path: path)
    }
}

/// Linux fallocate mode bits (linux/falloc.h), which Glibc does not export to Swift.
public enum FallocateMode {
    public static let keepSize: Int32 = 0x01
    public static let punchHole: Int32 = 0x02
    public static let zeroRange: Int32 = 0x10
}
