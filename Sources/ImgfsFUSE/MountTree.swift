import CFuseBridge
import ImgfsBlock
#if canImport(Glibc)
import Glibc
#endif

/// One file shown in the mount: a block node's disk as flat bytes.
public final class ExportedFile: Sendable {
    /// Where the node comes from: held for the whole mount, or opened while the file is open.
    public enum Source: Sendable {
        case node(BlockNode)
        case lazy(LazyBlockNode)
    }

    public let name: String
    public let source: Source
    public let isReadOnly: Bool

    public init(name: String, node: BlockNode, readOnly: Bool) {
        self.name = name
        self.source = .node(node)
        self.isReadOnly = readOnly || node.isReadOnly
    }

    /// A read-only file whose node is opened on first open and closed after the last close.
    public init(name: String, lazy: LazyBlockNode) {
        self.name = name
        self.source = .lazy(lazy)
        self.isReadOnly = true
    }

    /// The node held for the whole mount, if this file has one.
    public var fixedNode: BlockNode? {
        if case .node(let node) = source { return node }
        return nil
    }

    public var length: Int64 {
        switch source {
        case .node(let node): return node.length
        case .lazy(let lazy): return lazy.length
        }
    }

    /// The node for one open of the file; pair with `close(_:)`.
    func open() async throws -> BlockNode {
        switch source {
        case .node(let node): return node
        case .lazy(let lazy): return try await lazy.acquire()
        }
    }

    func close() async {
        if case .lazy(let lazy) = source { await lazy.release() }
    }
}

/// A directory of the mount as the user describes it: files and subdirectories by name.
public struct MountDirectory: Sendable {
    public var files: [ExportedFile]
    public var directories: [(name: String, content: MountDirectory)]

    public init(files: [ExportedFile] = [], directories: [(name: String, content: MountDirectory)] = []) {
        self.files = files
        self.directories = directories
    }
}

/// The inodes of a mount, fixed when it starts: only file sizes change (by truncate).
final class MountTree: Sendable {
    /// A directory's entries in readdir order, and by name for lookup (a snapshot directory may hold 65,536).
    struct Directory: Sendable {
        let parent: UInt64
        let children: [(name: String, ino: UInt64)]
        let byName: [String: UInt64]
        let subdirectoryCount: Int
    }

    enum Inode: Sendable {
        case directory(Directory)
        case file(ExportedFile)
    }

    static let rootInode: UInt64 = 1
    let inodes: [UInt64: Inode]
    let owner: (uid: UInt32, gid: UInt32)
    let mountTime: Int64

    init(root: MountDirectory) {
        var inodes: [UInt64: Inode] = [:]
        var next: UInt64 = Self.rootInode
        func add(_ directory: MountDirectory, parent: UInt64) -> UInt64 {
            let ino = next
            next += 1
            var children: [(name: String, ino: UInt64)] = []
            for file in directory.files {
                inodes[next] = .file(file)
                children.append((file.name, next))
                next += 1
            }
            for (name, sub) in directory.directories {
                children.append((name, add(sub, parent: ino)))
            }
            let byName = Dictionary(children.map { ($0.name, $0.ino) }, uniquingKeysWith: { first, _ in first })
            inodes[ino] = .directory(Directory(parent: parent, children: children, byName: byName,
                                               subdirectoryCount: directory.directories.count))
            return ino
        }
        _ = add(root, parent: Self.rootInode)
        self.inodes = inodes
        owner = (getuid(), getgid())
        mountTime = Int64(time(nil))
    }

    func file(_ ino: UInt64) -> ExportedFile? {
        if case .file(let f)? = inodes[ino] { return f }
        return nil
    }

    func directory(_ ino: UInt64) -> Directory? {
        if case .directory(let d)? = inodes[ino] { return d }
        return nil
    }

    func lookup(parent: UInt64, name: String) -> UInt64? {
        directory(parent)?.byName[name]
    }

    func attributes(_ ino: UInt64) -> imgfs_attr? {
        switch inodes[ino] {
        case .directory(let d)?:
            return imgfs_attr(ino: ino, mode: UInt32(Glibc.S_IFDIR) | 0o755, nlink: UInt32(2 + d.subdirectoryCount),
                              size: 4096, uid: owner.uid, gid: owner.gid, mtime_sec: mountTime)
        case .file(let f)?:
            return imgfs_attr(ino: ino, mode: UInt32(Glibc.S_IFREG) | (f.isReadOnly ? 0o444 : 0o644), nlink: 1,
                              size: f.length, uid: owner.uid, gid: owner.gid, mtime_sec: mountTime)
        case nil:
            return nil
        }
    }

    var files: [ExportedFile] {
        inodes.values.compactMap { if case .file(let f) = $0 { return f } else { return nil } }
    }
}
