#if canImport(Glibc)
import Glibc
#endif

/// Threads for CPU-bound work (decompression), apart from the I/O threads.
///
/// Inflating a 2 MiB cluster takes milliseconds; on the I/O threads it would hold up the tasks that resume when
/// host I/O completes, so every request would wait behind someone else's decompression.
public enum ComputePool {
    /// One thread per core: decompression cannot go faster than the cores.
    public static let executor = IOExecutor(threads: max(2, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))),
                                                name: "imgfs-compute")

    /// Runs `body` on a compute thread and returns its result.
    public static func run<T>(_ body: @escaping () throws -> T) async throws -> T {
        try await executor.performOnOwnThread(body)
    }
}
