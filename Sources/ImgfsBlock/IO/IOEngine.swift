#if canImport(Glibc)
import Glibc
#endif

/// Which mechanism carries host I/O: io_uring, or blocking calls on `IOExecutor` threads.
public enum IOEngineKind: String, Sendable, CaseIterable {
    case uring
    case threads
}

/// Async host I/O on file descriptors: one system call's worth per operation.
///
/// Reads and writes may be short; callers that need every byte loop (as `HostFile` does). EINTR never reaches the
/// caller. Failures are `BlockError.system`, naming `path` (only used in the error).
public protocol IOEngine: Sendable {
    var kind: IOEngineKind { get }

    /// Reads up to `buffer.count` bytes; 0 means end of file.
    func read(fd: Int32, into buffer: UnsafeMutableRawBufferPointer, at offset: Int64, path: String) async throws -> Int
    /// Writes up to `buffer.count` bytes; returns how many were written.
    func write(fd: Int32, from buffer: UnsafeRawBufferPointer, at offset: Int64, path: String) async throws -> Int
    /// Reads into the buffers in order, as one transfer starting at `offset`.
    func readv(fd: Int32, into buffers: [UnsafeMutableRawBufferPointer], at offset: Int64, path: String) async throws
        -> Int
    /// Writes the buffers in order, as one transfer starting at `offset`.
    func writev(fd: Int32, from buffers: [UnsafeRawBufferPointer], at offset: Int64, path: String) async throws -> Int
    func fdatasync(fd: Int32, path: String) async throws
    /// fallocate(2) with Linux mode bits (`FallocateMode`).
    func fallocate(fd: Int32, mode: Int32, offset: Int64, length: Int64, path: String) async throws
    /// Where tasks doing I/O through this engine resume cheapest, if the engine has such a place (io_uring's
    /// completion thread); nil means the I/O threads.
    var taskExecutor: (any TaskExecutor)? { get }
    /// Starts one read and calls `completion` with its result (a count, or minus errno) on the engine's own
    /// thread, with no task; false when the engine has no such thread (the caller then uses `read`).
    func startRead(fd: Int32, into buffer: UnsafeMutableRawBufferPointer, at offset: Int64,
                   completion: @escaping @Sendable (Int32) -> Void) -> Bool
}

extension IOEngine {
    public var taskExecutor: (any TaskExecutor)? { nil }

    public func startRead(fd: Int32, into buffer: UnsafeMutableRawBufferPointer, at offset: Int64,
                          completion: @escaping @Sendable (Int32) -> Void) -> Bool { false }

    /// iovecs for the vectored calls; the caller keeps the buffers alive until the call returns.
    static func iovecs(_ buffers: [UnsafeMutableRawBufferPointer]) -> [iovec] {
        buffers.map { iovec(iov_base: $0.baseAddress, iov_len: $0.count) }
    }

    static func iovecs(_ buffers: [UnsafeRawBufferPointer]) -> [iovec] {
        buffers.map { iovec(iov_base: UnsafeMutableRawPointer(mutating: $0.baseAddress), iov_len: $0.count) }
    }
}
