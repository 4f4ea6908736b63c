import ImgfsBlock

/// Reusable request buffers: a fresh 1 MiB allocation per request costs an mmap/munmap pair and halves throughput.
final class BufferPool: @unchecked Sendable {
    let bufferSize: Int
    private let capacity: Int
    private var free: [UnsafeMutableRawPointer] = []
    private let lock = PthreadLock()

    init(bufferSize: Int, capacity: Int) {
        self.bufferSize = bufferSize
        self.capacity = capacity
    }

    /// A buffer of at least `count` bytes; give it back with `recycle`.
    func take(_ count: Int) -> UnsafeMutableRawPointer {
        if count <= bufferSize {
            lock.lock()
            let reused = free.popLast()
            lock.unlock()
            if let reused { return reused }
            return UnsafeMutableRawPointer.allocate(byteCount: bufferSize, alignment: 64)
        }
        return UnsafeMutableRawPointer.allocate(byteCount: count, alignment: 64)
    }

    func recycle(_ buffer: UnsafeMutableRawPointer, count: Int) {
        if count <= bufferSize {
            lock.lock()
            if free.count < capacity {
                free.append(buffer)
                lock.unlock()
                return
            }
            lock.unlock()
        }
        buffer.deallocate()
    }
}
