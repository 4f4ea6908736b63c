#if canImport(Glibc)
import Glibc
#endif

// Glibc declares these only under _GNU_SOURCE, which Swift's Glibc module does not define. They are plain C ABI
// symbols of libc, so they are declared here rather than pulled in through another C target.

@_silgen_name("fallocate")
private func libcFallocate(_ fd: Int32, _ mode: Int32, _ offset: Int64, _ length: Int64) -> Int32

/// fallocate(2).
func linuxFallocate(_ fd: Int32, mode: Int32, offset: Int64, length: Int64) -> Int32 {
    libcFallocate(fd, mode, offset, length)
}

/// lseek(2) whence values from linux/fs.h, stable ABI.
enum LinuxSeek {
    static let data: Int32 = 3
    static let hole: Int32 = 4
}
