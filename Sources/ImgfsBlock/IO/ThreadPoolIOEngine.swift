#if canImport(Glibc)
import Glibc
#endif

/// Host I/O as blocking system calls on `IOExecutor` threads: queue depth equals the thread count.
///
/// The fallback when io_uring is unavailable. On an I/O thread the call runs inline, so a task that already runs
/// there neither allocates a closure nor hops.
public final class ThreadPoolIOEngine: IOEngine {
    public let executor: IOExecutor
    public var kind: IOEngineKind { .threads }

    public init(executor: IOExecutor = .shared) {
        self.executor = executor
    }

    // Each checks for an I/O thread first so the hot path neither allocates a closure nor hops.

    public func read(fd: Int32, into buffer: UnsafeMutableRawBufferPointer, at offset: Int64, path: String)
        async throws -> Int {
        if IOExecutor.isCurrentThreadIOThread {
            return try check(Self.retryingEINTR { Glibc.pread(fd, buffer.baseAddress, buffer.count, off_t(offset)) },
                             "read", path)
        }
        let b = UncheckedSendable(buffer)
        return try await hop("read", path) { Glibc.pread(fd, b.value.baseAddress, b.value.count, off_t(offset)) }
    }

    public func write(fd: Int32, from buffer: UnsafeRawBufferPointer, at offset: Int64, path: String)
        async throws -> Int {
        if IOExecutor.isCurrentThreadIOThread {
            return try check(Self.retryingEINTR { Glibc.pwrite(fd, buffer.baseAddress, buffer.count, off_t(offset)) },
                             "write", path)
        }
        let b = UncheckedSendable(buffer)
        return try await hop("write", path) { Glibc.pwrite(fd, b.value.baseAddress, b.value.count, off_t(offset)) }
    }

    public func readv(fd: Int32, into buffers: [UnsafeMutableRawBufferPointer], at offset: Int64, path: String)
        async throws -> Int {
        let vectors = UncheckedSendable(Self.iovecs(buffers))
        return try await hop("read", path) {
            vectors.value.withUnsafeBufferPointer { Glibc.preadv(fd, $0.baseAddress, Int32($0.count), off_t(offset)) }
        }
    }

    public func writev(fd: Int32, from buffers: [UnsafeRawBufferPointer], at offset: Int64, path: String)
        async throws -> Int {
        let vectors = UncheckedSendable(Self.iovecs(buffers))
        return try await hop("write", path) {
            vectors.value.withUnsafeBufferPointer { Glibc.pwritev(fd, $0.baseAddress, Int32($0.count), off_t(offset)) }
        }
    }

    public func fdatasync(fd: Int32, path: String) async throws {
        _ = try await hop("fdatasync", path) { Int(Glibc.fdatasync(fd)) }
    }

    public func fallocate(fd: Int32, mode: Int32, offset: Int64, length: Int64, path: String) async throws {
        _ = try await hop("fallocate", path) { Int(linuxFallocate(fd, mode: mode, offset: offset, length: length)) }
    }

    /// Runs a call that returns -1 and sets errno on failure on an I/O thread (inline when already on one).
    private func hop(_ operation: String, _ path: String, _ call: @escaping @Sendable () -> Int) async throws -> Int {
        if IOExecutor.isCurrentThreadIOThread { return try check(Self.retryingEINTR(call), operation, path) }
        return try check(try await executor.perform { Self.retryingEINTR(call) }, operation, path)
    }

    private func check(_ result: Int, _ operation: String, _ path: String) throws -> Int {
        if result < 0 { throw BlockError.system(errno: Int32(-result), operation: operation, path: path) }
        return result
    }

    /// The call's result, or minus errno: errno must be read on the thread that made the call.
    private static func retryingEINTR(_ call: () -> Int) -> Int {
        while true {
            let n = call()
            if n >= 0 { return n }
            if errno != EINTR { return -Int(errno) }
        }
    }
}
