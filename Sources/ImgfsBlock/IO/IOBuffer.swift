/// Memory for I/O that outlives one call (write-back, block jobs, copy-on-write): owned, aligned, freed when
/// the last reference goes, and paid for from a memory budget while it lives.
public final class IOBuffer: @unchecked Sendable {
    /// The bytes; valid as long as this object is.
    public let bytes: UnsafeMutableRawBufferPointer
    private let budget: MemoryBudget?

    /// A buffer of `count` bytes (zeroed), aligned for O_DIRECT; with a budget, waits for its share first.
    public init(count: Int, alignment: Int = 4096, budget: MemoryBudget? = nil) async {
        if let budget { await budget.reserveForRequest(count) }
        self.budget = budget
        bytes = UnsafeMutableRawBufferPointer.allocate(byteCount: count, alignment: alignment)
        bytes.initializeMemory(as: UInt8.self, repeating: 0)
    }

    deinit {
        bytes.deallocate()
        budget?.release(bytes.count)
    }

    public var count: Int { bytes.count }
    public var readOnly: UnsafeRawBufferPointer { UnsafeRawBufferPointer(bytes) }
}
