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

@_silgen_name("dup3")
private func libcDup3(_ oldfd: Int32, _ newfd: Int32, _ flags: Int32) -> Int32

/// dup3(2): makes `newfd` refer to `oldfd`'s open file description, atomically.
func linuxDup3(_ oldfd: Int32, _ newfd: Int32, flags: Int32) -> Int32 {
    libcDup3(oldfd, newfd, flags)
}

/// preadv2(2) of one buffer with RWF_* flags; returns the count or -1 with errno set.
func linuxPreadv2(_ fd: Int32, _ buffer: UnsafeMutableRawBufferPointer, at offset: Int64, flags: Int32) -> Int {
    var vector = iovec(iov_base: buffer.baseAddress, iov_len: buffer.count)
    return libcPreadv2(fd, &vector, 1, offset, flags)
}

/// preadv2 flags from linux/fs.h, stable ABI.
enum LinuxReadFlags {
    /// Fail with EAGAIN rather than wait for I/O (data not in the page cache, a lock held).
    static let noWait: Int32 = 0x08
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
