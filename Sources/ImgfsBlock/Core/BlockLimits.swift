/// What requests a driver serves best, as QEMU's BlockLimits tell the layers above.
public struct BlockLimits: Sendable, Equatable {
    /// Offsets and lengths the driver needs aligned (1: any); the node pads others.
    public var requestAlignment: Int
    /// The largest request the driver takes at once (bytes).
    public var maxTransfer: Int
    /// The unit of allocation (qcow2 cluster, VMDK grain; 1 for raw): serialising requests round to it.
    public var granularity: Int
    /// Requests of this size and alignment are the cheapest.
    public var optimalTransfer: Int

    public init(requestAlignment: Int = 1, maxTransfer: Int = 1 << 30, granularity: Int = 1,
                optimalTransfer: Int = 1 << 20) {
        self.requestAlignment = requestAlignment
        self.maxTransfer = maxTransfer
        self.granularity = granularity
        self.optimalTransfer = optimalTransfer
    }
}
