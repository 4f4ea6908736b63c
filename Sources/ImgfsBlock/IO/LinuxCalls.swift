#if canImport(Glibc)
import Glibc
#endif

// Glibc declares these only under _GNU_SOURCE, which Swift's Glibc module does not define. They are plain C ABI
// symbols of libc, so they are declared here rather than pulled in through another C target.

@_silgen_name("fallocate")
private func libcFallocate(_ fd: Int32, _ mode: Int32, _ offset: Int64, _ length: Int64) -> Int32

@_silgen_name("preadv2")
private func libcPreadv2(_ fd: Int32, _ iov: UnsafePointer<iovec>, _ iovcnt: Int32, _ offset: Int64, _ flags: Int32)
    -> Int

@_silgen_name("sync_file_range")
private func libcSyncFileRange(_ fd: Int32, _ offset: Int64, _ nbytes: Int64, _ flags: UInt32) -> Int32

@_silgen_name("pthread_setname_np")
private func libcPthreadSetname(_ thread: pthread_t, _ name: UnsafePointer<CChar>) -> Int32

@_silgen_name("fstatfs")
private func libcFstatfs(_ fd: Int32, _ buffer: UnsafeMutableRawPointer) -> Int32

@_silgen_name("dup3")
private func libcDup3(_ oldfd: Int32, _ newfd: Int32, _ flags: Int32) -> Int32

/// Names the calling thread in /proc (15 bytes kept), so a profile can tell the daemon's threads apart.
func nameCurrentThread(_ name: String) {
    _ = libcPthreadSetname(pthread_self(), String(decoding: name.utf8.prefix(15), as: UTF8.self))
}

/// dup3(2): makes `newfd` refer to `oldfd`'s open file description, atomically.
func linuxDup3(_ oldfd: Int32, _ newfd: Int32, flags: Int32) -> Int32 {
    libcDup3(oldfd, newfd, flags)
}

/// fstatfs(2)'s f_type, the file system's magic number; nil if the call fails. Swift's Glibc does not export
/// sys/vfs.h; f_type is the struct's first field, a C long, on every Linux ABI.
func linuxFileSystemType(_ fd: Int32) -> Int? {
    // struct statfs is 120 bytes on 64-bit Linux; the buffer leaves room for any ABI's padding.
    withUnsafeTemporaryAllocation(byteCount: 256, alignment: 16) { buffer in
        libcFstatfs(fd, buffer.baseAddress!) == 0 ? buffer.load(as: Int.self) : nil
    }
}

/// cachestat(2) (Linux 6.5+, which glibc 2.36 does not wrap) over the whole file: how many of its pages the page
/// cache holds; nil where the kernel lacks the call.
func linuxCachedPageCount(_ fd: Int32) -> UInt64? {
    // struct cachestat_range { u64 off, len } (len 0: to the end); struct cachestat { u64 nr_cache, nr_dirty,
    // nr_writeback, nr_evicted, nr_recently_evicted }. 451 on every architecture (the unified syscall table).
    let range: (UInt64, UInt64) = (0, 0)
    var counts: (UInt64, UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0, 0)
    let result = withUnsafeBytes(of: range) { r in
        withUnsafeMutableBytes(of: &counts) { c in libcSyscall4(451, Int(fd), r.baseAddress!, c.baseAddress!, 0) }
    }
    return result == 0 ? counts.0 : nil
}

/// preadv2(2) of one buffer with RWF_* flags; returns the count or -1 with errno set.
func linuxPreadv2(_ fd: Int32, _ buffer: UnsafeMutableRawBufferPointer, at offset: Int64, flags: Int32) -> Int {
    var vector = iovec(iov_base: buffer.baseAddress, iov_len: buffer.count)
    return libcPreadv2(fd, &vector, 1, offset, flags)
}

/// open(2) flags Swift's Glibc does not export (asm-generic/fcntl.h values used on x86_64 and arm64).
public enum LinuxOpenFlags {
    /// Transfer straight between the device and the buffer, bypassing the page cache.
    #if arch(arm64)
    public static let direct: Int32 = 0o200000
    #else
    public static let direct: Int32 = 0o40000
    #endif
}

/// preadv2 flags from linux/fs.h, stable ABI.
enum LinuxReadFlags {
    /// Fail with EAGAIN rather than wait for I/O (data not in the page cache, a lock held).
    static let noWait: Int32 = 0x08
}

/// sync_file_range(2) with SYNC_FILE_RANGE_WRITE: starts write-out of the range's dirty pages not already being
/// written, without waiting for it (it may wait for room in the device's queue).
func linuxStartWriteback(_ fd: Int32, offset: Int64, length: Int64) -> Int32 {
    libcSyncFileRange(fd, offset, length, 2)
}

/// fallocate(2).
func linuxFallocate(_ fd: Int32, mode: Int32, offset: Int64, length: Int64) -> Int32 {
    libcFallocate(fd, mode, offset, length)
}

/// lseek(2) whence values from linux/fs.h, stable ABI.
enum LinuxSeek {
    static let data: Int32 = 3
    static let hole: Int32 = 4
}

// syscall(2) is variadic, so Swift cannot import it. glibc's syscall is a register shuffle that reads integer
// arguments only, so a fixed-arity declaration whose arguments are all integers or pointers calls it correctly.
@_silgen_name("syscall")
private func libcSyscall4(_ number: Int, _ a: Int, _ b: UnsafeRawPointer, _ c: UnsafeRawPointer, _ d: Int) -> Int

/// openat2(2) (Linux 5.6), which glibc does not wrap.
enum LinuxOpenat2 {
    /// The same number on every architecture (it postdates the unified syscall table).
    static let number = 437
    /// O_PATH (an fd that names a file without opening it for I/O; needs no read permission on directories).
    static let pathOnly: Int32 = 0o10000000
    /// Every step of the resolution, symlinks and ".." included, must stay beneath the starting directory.
    static let resolveBeneath: UInt64 = 0x08
    /// No /proc/<pid>/fd-style links, which jump anywhere without being symlinks in the usual sense.
    static let resolveNoMagicLinks: UInt64 = 0x02

    /// struct open_how.
    private struct OpenHow {
        var flags: UInt64
        var mode: UInt64
        var resolve: UInt64
    }

    /// The new descriptor, or -1 with errno set.
    static func open(_ directory: Int32, _ path: String, flags: Int32, resolve: UInt64) -> Int32 {
        var how = OpenHow(flags: UInt64(UInt32(bitPattern: flags)), mode: 0, resolve: resolve)
        let result = path.withCString { name in
            withUnsafePointer(to: &how) { howPointer in
                libcSyscall4(number, Int(directory), name, howPointer, MemoryLayout<OpenHow>.size)
            }
        }
        return Int32(truncatingIfNeeded: result)
    }

    /// Whether the kernel (and any seccomp filter) lets openat2 through: ENOSYS on kernels before 5.6, ENOSYS or
    /// EPERM from container runtimes whose filters predate it.
    static let isAvailable: Bool = {
        let fd = open(AT_FDCWD, "/", flags: pathOnly | O_CLOEXEC, resolve: 0)
        if fd >= 0 { Glibc.close(fd) }
        return fd >= 0
    }()
}
