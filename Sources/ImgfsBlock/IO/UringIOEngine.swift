import CUring
#if canImport(Glibc)
import Glibc
#endif

/// Host I/O through one io_uring: hundreds of requests in flight, however few threads wait for them.
///
/// Any thread submits; one completion thread of our own waits for completions and resumes the waiting tasks.
/// Dropping the engine stops that thread and closes the ring.
public final class UringIOEngine: IOEngine {
    public var kind: IOEngineKind { .uring }
    private let ring: UringRing

    /// Sets up a ring of `entries` submission slots; throws `BlockError.system` when the kernel refuses io_uring
    /// (too old, disabled by `kernel.io_uring_disabled`, or filtered by seccomp).
    public init(entries: UInt32 = 256) throws {
        ring = try UringRing(entries: entries)
        try ring.startCompletionThread()
    }

    deinit { ring.stop() }

    /// Requests submitted and not yet completed, for tests that show the queue depth.
    var inFlight: Int { ring.inFlightCount }

    public var taskExecutor: (any TaskExecutor)? { ring }

    public func read(fd: Int32, into buffer: UnsafeMutableRawBufferPointer, at offset: Int64, path: String)
        async throws -> Int {
        try await complete(.read(fd: fd, buffer: buffer.baseAddress, count: Self.clamp(buffer.count),
                                 offset: UInt64(bitPattern: offset)), "read", path)
    }

    public func write(fd: Int32, from buffer: UnsafeRawBufferPointer, at offset: Int64, path: String)
        async throws -> Int {
        try await complete(.write(fd: fd, buffer: buffer.baseAddress, count: Self.clamp(buffer.count),
                                  offset: UInt64(bitPattern: offset)), "write", path)
    }

    public func readv(fd: Int32, into buffers: [UnsafeMutableRawBufferPointer], at offset: Int64, path: String)
        async throws -> Int {
        let vectors = Self.iovecs(buffers)
        return try await withStableIovecs(vectors) {
            .readv(fd: fd, vectors: $0, count: UInt32(vectors.count), offset: UInt64(bitPattern: offset))
        } run: { try await complete($0, "read", path) }
    }

    public func writev(fd: Int32, from buffers: [UnsafeRawBufferPointer], at offset: Int64, path: String)
        async throws -> Int {
        let vectors = Self.iovecs(buffers)
        return try await withStableIovecs(vectors) {
            .writev(fd: fd, vectors: $0, count: UInt32(vectors.count), offset: UInt64(bitPattern: offset))
        } run: { try await complete($0, "write", path) }
    }

    public func fdatasync(fd: Int32, path: String) async throws {
        _ = try await complete(.fdatasync(fd: fd), "fdatasync", path)
    }

    public func fallocate(fd: Int32, mode: Int32, offset: Int64, length: Int64, path: String) async throws {
        _ = try await complete(.fallocate(fd: fd, mode: mode, offset: offset, length: length), "fallocate", path)
    }

    public func startRead(fd: Int32, into buffer: UnsafeMutableRawBufferPointer, at offset: Int64,
                          completion: @escaping @Sendable (Int32) -> Void) -> Bool {
        ring.submit(.read(fd: fd, buffer: buffer.baseAddress, count: Self.clamp(buffer.count),
                          offset: UInt64(bitPattern: offset)), then: completion)
        return true
    }

    /// Submits until the operation gives an answer other than "try again".
    private func complete(_ operation: UringOperation, _ name: String, _ path: String) async throws -> Int {
        var eagainRetries = 0
        while true {
            let result = await ring.perform(operation)
            if result >= 0 { return Int(result) }
            if result == -EINTR { continue }
            // io_uring normally retries internally (pipes, even O_NONBLOCK ones, wait for data); an EAGAIN that
            // still reaches us is transient, but a bounded number of resubmissions keeps a persistent one from
            // spinning forever.
            if result == -EAGAIN && eagainRetries < 8 {
                eagainRetries += 1
                continue
            }
            throw BlockError.system(errno: -result, operation: name, path: path)
        }
    }

    /// The kernel reads the iovec array at any time until completion, so it lives in memory we own until then.
    private func withStableIovecs(_ vectors: [iovec], _ make: (UnsafePointer<iovec>) -> UringOperation,
                                  run: (UringOperation) async throws -> Int) async throws -> Int {
        let storage = UnsafeMutablePointer<iovec>.allocate(capacity: max(1, vectors.count))
        defer { storage.deallocate() }
        storage.initialize(from: vectors, count: vectors.count)
        return try await run(make(storage))
    }

    /// Linux transfers at most 0x7ffff000 bytes per call; longer buffers get a short count.
    private static func clamp(_ count: Int) -> UInt32 { UInt32(min(count, 0x7fff_f000)) }
}

/// One system call for the ring to run; pointers stay valid until it completes (the caller awaits it).
enum UringOperation {
    case read(fd: Int32, buffer: UnsafeMutableRawPointer?, count: UInt32, offset: UInt64)
    case write(fd: Int32, buffer: UnsafeRawPointer?, count: UInt32, offset: UInt64)
    case readv(fd: Int32, vectors: UnsafePointer<iovec>, count: UInt32, offset: UInt64)
    case writev(fd: Int32, vectors: UnsafePointer<iovec>, count: UInt32, offset: UInt64)
    case fdatasync(fd: Int32)
    case fallocate(fd: Int32, mode: Int32, offset: Int64, length: Int64)
    /// Does nothing; its completion wakes the completion thread for work queued on it.
    case nop

    func prepare(_ sqe: UnsafeMutablePointer<io_uring_sqe>) {
        switch self {
        case .read(let fd, let buffer, let count, let offset):
            io_uring_prep_read(sqe, fd, buffer, count, offset)
        case .write(let fd, let buffer, let count, let offset):
            io_uring_prep_write(sqe, fd, buffer, count, offset)
        case .readv(let fd, let vectors, let count, let offset):
            io_uring_prep_readv(sqe, fd, vectors, count, offset)
        case .writev(let fd, let vectors, let count, let offset):
            io_uring_prep_writev(sqe, fd, vectors, count, offset)
        case .fdatasync(let fd):
            io_uring_prep_fsync(sqe, fd, UInt32(IORING_FSYNC_DATASYNC))
        case .fallocate(let fd, let mode, let offset, let length):
            io_uring_prep_fallocate(sqe, fd, mode, off_t(offset), off_t(length))
        case .nop:
            io_uring_prep_nop(sqe)
        }
    }
}
