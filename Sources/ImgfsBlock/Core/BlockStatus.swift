/// What a range of a node holds, as QEMU's block-status reports it.
public struct BlockStatus: Sendable, Equatable {
    /// The state of the range's first bytes, shared by the whole `length`.
    public enum Kind: Sendable, Equatable {
        /// Data stored in this layer.
        case data
        /// Reads as zeros; decided by this layer (zero cluster, hole in a raw file).
        case zero
        /// Not decided here: the backing chain (or zeros, without one) supplies it.
        case unallocated
    }

    public var kind: Kind
    /// Bytes from the queried offset with this same kind; at least 1.
    public var length: Int64
    /// Where the data is in `file`, when it is stored plainly there.
    public var hostOffset: Int64?
    /// The child file `hostOffset` is in (the image's own file, a data file, an extent).
    public var file: HostFile?

    public init(kind: Kind, length: Int64, hostOffset: Int64? = nil, file: HostFile? = nil) {
        self.kind = kind
        self.length = length
        self.hostOffset = hostOffset
        self.file = file
    }

    public static func == (a: BlockStatus, b: BlockStatus) -> Bool {
        a.kind == b.kind && a.length == b.length && a.hostOffset == b.hostOffset && a.file === b.file
    }
}

/// The block status of a range seen through the whole chain.
public struct ChainBlockStatus: Sendable, Equatable {
    public enum Kind: Sendable, Equatable {
        case data
        case zero
        /// Nothing in the chain allocates it; it reads as zeros.
        case hole
    }
    public var kind: Kind
    public var length: Int64
    /// The chain layer that decided it: 0 is the top image.
    public var depth: Int
    public var hostOffset: Int64?
    /// The file `hostOffset` is in.
    public var file: HostFile?

    public static func == (a: ChainBlockStatus, b: ChainBlockStatus) -> Bool {
        a.kind == b.kind && a.length == b.length && a.depth == b.depth && a.hostOffset == b.hostOffset
            && a.file === b.file
    }
}
