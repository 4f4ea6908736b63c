import ImgfsBlock

/// Reusable request buffers: a fresh 1 MiB allocation per request costs an mmap/munmap pair and halves throughput.
final class BufferPool: Sendable {
    let bufferSize: Int
    private let pool: ResourcePool<UnsafeMutableRawPointer>

    init(bufferSize: Int, capacity: Int) {
        self.bufferSize = bufferSize
        pool = ResourcePool(limit: capacity,
                            make: { UnsafeMutableRawPointer.allocate(byteCount: bufferSize, alignment: 64) },
                            destroy: { $0.deallocate() })
    }

    /// A buffer of at least `count` bytes; give it back with `recycle`. Larger-than-usual ones are not pooled.
    func take(_ count: Int) -> UnsafeMutableRawPointer {
        if count <= bufferSize, let buffer = pool.take() { return buffer }
        return UnsafeMutableRawPointer.allocate(byteCount: count, alignment: 64)
    }

    func recycle(_ buffer: UnsafeMutableRawPointer, count: Int) {
        if count <= bufferSize { pool.recycle(buffer) } else { buffer.deallocate() }
    }
}
