import CFuseBridge
import ImgfsBlock
#if canImport(Glibc)
import Glibc
#endif

/// One file shown in the mount: a block node's disk as flat bytes.
public struct ExportedFile: Sendable {
    public let name: String
    public let node: BlockNode
    public let isReadOnly: Bool

    public init(name: String, node: BlockNode, readOnly: Bool) {
        self.name = name
        self.node = node
        self.isReadOnly = readOnly || node.isReadOnly
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
    enum Inode: Sendable {
        case directory(parent: UInt64, children: [(name: String, ino: UInt64)])
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
            inodes[ino] = .directory(parent: parent, children: [])
            var children: [(name: String, ino: UInt64)] = []
            for file in directory.files {
                inodes[next] = .file(file)
                children.append((file.name, next))
                next += 1
            }
            for (name, sub) in directory.directories {
                children.append((name, add(sub, parent: ino)))
            }
            inodes[ino] = .directory(parent: parent, children: children)
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

    func lookup(parent: UInt64, name: String) -> UInt64? {
        guard case .directory(_, let children)? = inodes[parent] else { return nil }
        return children.first { $0.name == name }?.ino
    }

    func attributes(_ ino: UInt64) -> imgfs_attr? {
        switch inodes[ino] {
        case .directory(_, let children)?:
            let subdirectories = children.filter { if case .directory? = inodes[$0.ino] { return true } else { return false } }
            return imgfs_attr(ino: ino, mode: UInt32(Glibc.S_IFDIR) | 0o755, nlink: UInt32(2 + subdirectories.count),
                              size: 4096, uid: owner.uid, gid: owner.gid, mtime_sec: mountTime)
        case .file(let f)?:
            return imgfs_attr(ino: ino, mode: UInt32(Glibc.S_IFREG) | (f.isReadOnly ? 0o444 : 0o644), nlink: 1,
                              size: f.node.length, uid: owner.uid, gid: owner.gid, mtime_sec: mountTime)
        case nil:
            return nil
        }
    }

    var files: [ExportedFile] {
        inodes.values.compactMap { if case .file(let f) = $0 { return f } else { return nil } }
    }
}
