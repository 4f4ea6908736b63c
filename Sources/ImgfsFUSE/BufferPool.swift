import ImgfsBlock

/// Reusable request buffers, paid for from the mount's memory budget.
///
/// A fresh 1 MiB allocation per request costs an mmap/munmap pair and halves throughput, so buffers are kept.
/// They are 4 KiB-aligned, so host reads into them may bypass the page cache (`HostReadPolicy`).
/// Every buffer that exists, idle or in use, holds its share of the budget; a request that finds the budget spent
/// waits for another to give its buffer back, which is the mount's backpressure.
final class BufferPool: Sendable {
    let bufferSize: Int
    private let budget: MemoryBudget
    private let pool: ResourcePool<UnsafeMutableRawPointer>

    init(bufferSize: Int, capacity: Int, budget: MemoryBudget) {
        self.bufferSize = bufferSize
        self.budget = budget
        pool = ResourcePool(limit: capacity,
                            make: { UnsafeMutableRawPointer.allocate(byteCount: bufferSize, alignment: 4096) },
                            destroy: { buffer in
                                buffer.deallocate()
                                budget.release(bufferSize)
                            })
    }

    /// A buffer of at least `count` bytes, waiting for budget if need be; give it back with `recycle`.
    func take(_ count: Int) async -> UnsafeMutableRawPointer {
        if count <= bufferSize, let buffer = pool.takeIdle() { return buffer }
        await budget.reserveForRequest(allocationSize(count))
        return UnsafeMutableRawPointer.allocate(byteCount: allocationSize(count), alignment: 4096)
    }

    /// A buffer if one is idle or the budget has room right now; nil rather than wait or overdraw.
    func takeIfFree(_ count: Int) -> UnsafeMutableRawPointer? {
        if count <= bufferSize, let buffer = pool.takeIdle() { return buffer }
        guard budget.tryReserveForRequest(allocationSize(count)) else { return nil }
        return UnsafeMutableRawPointer.allocate(byteCount: allocationSize(count), alignment: 4096)
    }

    /// A buffer now, for a thread that must not wait (a FUSE loop thread copying a write): over budget if need be.
    func takeNow(_ count: Int) -> UnsafeMutableRawPointer {
        if count <= bufferSize, let buffer = pool.takeIdle() { return buffer }
        budget.reserveNow(allocationSize(count))
        return UnsafeMutableRawPointer.allocate(byteCount: allocationSize(count), alignment: 4096)
    }

    func recycle(_ buffer: UnsafeMutableRawPointer, count: Int) {
        if count <= bufferSize {
            pool.recycle(buffer)
        } else {
            buffer.deallocate()
            budget.release(count)
        }
    }

    /// Pooled buffers are all `bufferSize`, so any of them serves any request that fits.
    private func allocationSize(_ count: Int) -> Int { max(count, bufferSize) }
}
