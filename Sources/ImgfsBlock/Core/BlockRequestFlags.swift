/// Per-request options, as QEMU's BdrvRequestFlags carry them.
public struct BlockRequestFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    /// Forced unit access: the write is durable when it completes (the node flushes after it where the driver
    /// cannot do better).
    public static let fua = BlockRequestFlags(rawValue: 1 << 0)
    /// Waits for every overlapping request in flight, and holds later overlapping ones until it ends (allocating
    /// writes, copy-on-write, copy-on-read).
    public static let serialising = BlockRequestFlags(rawValue: 1 << 1)
    /// Copies what the backing chain supplies into this node as it is read.
    public static let copyOnRead = BlockRequestFlags(rawValue: 1 << 2)
    /// Fail with `.unsupported` instead of emulating (writing zero bytes for a write-zeroes, say).
    public static let noFallback = BlockRequestFlags(rawValue: 1 << 3)
    /// A write-zeroes may free the storage behind the range.
    public static let mayUnmap = BlockRequestFlags(rawValue: 1 << 4)
}
