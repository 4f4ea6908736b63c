/// The files and nodes a node is built on, by role, owned by the node; drivers reach them only through here.
///
/// Links can be repointed while the node is live (a block job's commit or stream changes the backing file), so
/// every reader of a link sees either the old child or the new one, never a driver's stale copy.
public final class BlockChildren: Sendable {
    /// What a child is to its parent (QEMU's child roles).
    public enum Role: Sendable, Hashable {
        /// The host file holding the image's own metadata and data.
        case file
        /// The image below in the chain: what unallocated ranges read from.
        case backing
        /// An external data file (qcow2's data-file feature).
        case dataFile
        /// One extent of a multi-extent image (VMDK), by position.
        case extent(Int)
    }

    /// The protocol layer (nil for a view, such as a snapshot, that shares its image's children).
    public let file: HostFile?
    private let links: Locked<[Role: BlockNode]>

    public init(file: HostFile?, backing: BlockNode? = nil) {
        self.file = file
        var links: [Role: BlockNode] = [:]
        if let backing { links[.backing] = backing }
        self.links = Locked(links)
    }

    public var backing: BlockNode? { self[.backing] }

    public subscript(role: Role) -> BlockNode? {
        links.withLock { $0[role] }
    }

    /// Points `role` at another node (or at none); returns the one it replaces.
    @discardableResult
    public func repoint(_ role: Role, to node: BlockNode?) -> BlockNode? {
        links.withLock { links in
            let old = links[role]
            links[role] = node
            return old
        }
    }

    /// Every child node, for walks over the graph (close, drain).
    public var nodes: [(Role, BlockNode)] {
        links.withLock { links in links.map { ($0.key, $0.value) } }
    }
}
