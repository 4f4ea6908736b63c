import Dispatch
import ImgfsBlock

/// Runs async block-layer work from the CLI's synchronous commands, on the I/O executor.
func runBlocking<T>(_ body: @escaping @Sendable () async throws -> T) throws -> T {
    let done = DispatchSemaphore(value: 0)
    let result = UncheckedResult<T>()
    Task(executorPreference: IOExecutor.shared) {
        do { result.value = .success(try await body()) } catch { result.value = .failure(error) }
        done.signal()
    }
    done.wait()
    return try result.value!.get()
}

/// A result handed from a task to the waiting thread; the semaphore orders the accesses.
private final class UncheckedResult<T>: @unchecked Sendable {
    var value: Result<T, Error>?
}
