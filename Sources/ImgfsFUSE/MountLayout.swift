import ImgfsBlock

/// Decides what a mount shows for an image: `<stem>.raw`, and `snapshots/<name>.raw` for internal snapshots.
public enum MountLayout {
    /// `disk.qcow2` → `disk.raw`: the image's file name less its last extension, plus `.raw`.
    public static func exportName(forImage path: String) -> String {
        let base = path.split(separator: "/").last.map(String.init) ?? path
        var stem = base
        if let dot = base.lastIndex(of: "."), dot != base.startIndex {
            stem = String(base[..<dot])
        }
        return stem + ".raw"
    }

    /// The directory shown for one opened image, with a read-only file per internal snapshot.
    public static func directory(for node: BlockNode, readOnly: Bool) async throws -> MountDirectory {
        let main = ExportedFile(name: exportName(forImage: node.path), node: node, readOnly: readOnly)
        let snapshots = node.driver.snapshots
        guard !snapshots.isEmpty else { return MountDirectory(files: [main]) }
        let names = snapshotFileNames(snapshots)
        var files: [ExportedFile] = []
        for (snapshot, name) in zip(snapshots, names) {
            let driver = try await node.driver.openSnapshot(snapshot)
            let view = BlockNode(path: "\(node.path)@\(snapshot.name)", driver: driver, file: nil,
                                 backing: node.backing, readOnly: true)
            files.append(ExportedFile(name: name, node: view, readOnly: true))
        }
        return MountDirectory(files: [main], directories: [("snapshots", MountDirectory(files: files))])
    }

    /// File names for snapshots: safe in a directory, unique; a name shared by several gets its id appended.
    public static func snapshotFileNames(_ snapshots: [SnapshotDescriptor]) -> [String] {
        func safe(_ name: String) -> String {
            let cleaned = String(name.map { $0 == "/" || $0 == "\0" ? "_" : $0 })
            return cleaned.isEmpty || cleaned == "." || cleaned == ".." ? "" : cleaned
        }
        var counts: [String: Int] = [:]
        for s in snapshots { counts[safe(s.name), default: 0] += 1 }
        return snapshots.map { s in
            let base = safe(s.name)
            if base.isEmpty { return "id-\(safe(s.id)).raw" }
            return counts[base]! > 1 ? "\(base)-id\(safe(s.id)).raw" : "\(base).raw"
        }
    }
}
