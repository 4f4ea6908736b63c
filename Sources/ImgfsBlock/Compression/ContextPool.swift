/// Reusable decompression contexts: creating a zstd context costs far more than inflating one cluster.
final class ContextPool: Sendable {
    private let contexts = Locked<[UncheckedSendable<OpaquePointer>]>([])
    private let create: @Sendable () -> OpaquePointer?
    private let destroy: @Sendable (OpaquePointer) -> Void
    private let limit: Int

    init(limit: Int = 64, create: @escaping @Sendable () -> OpaquePointer?,
         destroy: @escaping @Sendable (OpaquePointer) -> Void) {
        self.create = create
        self.destroy = destroy
        self.limit = limit
    }

    /// Runs `body` with a context taken from the pool (or made), and gives it back after.
    func with<T>(_ body: (OpaquePointer) throws -> T) throws -> T {
        let pooled = contexts.withLock { $0.popLast() }
        guard let context = pooled?.value ?? create() else {
            throw BlockError.system(errno: 12, operation: "allocate a decompression context", path: "")
        }
        defer {
            let kept = contexts.withLock { stack -> Bool in
                guard stack.count < limit else { return false }
                stack.append(UncheckedSendable(context))
                return true
            }
            if !kept { destroy(context) }
        }
        return try body(context)
    }
}
