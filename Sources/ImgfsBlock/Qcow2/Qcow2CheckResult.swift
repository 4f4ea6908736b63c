/// What a qcow2 consistency check found, counted as `qemu-img check` counts.
public struct Qcow2CheckResult: Sendable, Equatable {
    public var checkErrors = 0
    public var leaks = 0
    public var corruptions = 0
    /// One past the last cluster that is referenced or has a refcount.
    public var imageEndOffset: Int64 = 0
    /// Guest clusters of the virtual disk.
    public var totalClusters: Int64 = 0
    public var allocatedClusters: Int64 = 0
    public var fragmentedClusters: Int64 = 0
    public var compressedClusters: Int64 = 0
    /// One line per problem, like qemu-img's stderr; capped so a hostile image cannot flood memory.
    public var messages: [String] = []
    public var omittedMessages = 0

    public init() {}

    static let maxMessages = 1000

    mutating func report(_ message: String) {
        if messages.count < Self.maxMessages { messages.append(message) } else { omittedMessages += 1 }
    }
}
