/// A bounded stack of reusable resources (request buffers, decompression contexts) that are costly to make.
///
/// Taking pops one or makes one; giving back keeps it while fewer than `limit` wait, else destroys it.
public final class ResourcePool<Resource>: @unchecked Sendable {
    private let idle = Locked<[Resource]>([])
    private let make: () -> Resource?
    private let destroy: (Resource) -> Void
    public let limit: Int

    public init(limit: Int, make: @escaping () -> Resource?, destroy: @escaping (Resource) -> Void) {
        self.limit = limit
        self.make = make
        self.destroy = destroy
    }

    /// A pooled resource, or a new one; nil only when making one failed.
    public func take() -> Resource? {
        idle.withLock { $0.popLast() } ?? make()
    }

    /// A pooled resource, or nil when none is idle (the caller makes one, on its own terms).
    public func takeIdle() -> Resource? {
        idle.withLock { $0.popLast() }
    }

    public func recycle(_ resource: Resource) {
        let kept = idle.withLock { stack -> Bool in
            guard stack.count < limit else { return false }
            stack.append(resource)
            return true
        }
        if !kept { destroy(resource) }
    }
}

extension ResourcePool {
    /// Runs `body` with a resource taken from the pool, and gives it back after.
    func with<T>(_ body: (Resource) throws -> T) throws -> T {
        guard let resource = take() else {
            throw BlockError.system(errno: 12, operation: "allocate a pooled resource", path: "")
        }
        defer { recycle(resource) }
        return try body(resource)
    }
}
