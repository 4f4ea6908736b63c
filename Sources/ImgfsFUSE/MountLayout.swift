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
    ///
    /// A snapshot's view (and its L1 table) is opened only while its file is open.
    public static func directory(for node: BlockNode, readOnly: Bool) -> MountDirectory {
        let main = ExportedFile(name: exportName(forImage: node.path), node: node, readOnly: readOnly)
        let snapshots = node.driver.snapshots
        guard !snapshots.isEmpty else { return MountDirectory(files: [main]) }
        let files = zip(snapshots, snapshotFileNames(snapshots)).map { snapshot, name in
            ExportedFile(name: name, lazy: LazyBlockNode(length: snapshot.diskSize) {
                let driver = try await node.driver.openSnapshot(snapshot)
                // The view shares the image's children: a repointed backing file is the view's too.
                return BlockNode(path: "\(node.path)@\(snapshot.name)", driver: driver, children: node.children,
                                 readOnly: true, ownsChildren: false)
            })
        }
        return MountDirectory(files: [main], directories: [("snapshots", MountDirectory(files: files))])
    }

    /// Longest parts kept from a snapshot's name and id (bytes), so that `<name>-id<id>-<n>.raw` stays within
    /// NAME_MAX (255).
    static let maxNameBytes = 160
    static let maxIdBytes = 64

    /// File names for snapshots, one per snapshot, all different whatever the names and ids are.
    ///
    /// A snapshot whose name is usable as it stands and shared by no other keeps it (`<name>.raw`). Every other
    /// one (an empty, duplicate, or altered name: `/`, NUL, `.`, `..`, too long) gets `<name>-id<id>.raw` or
    /// `id-<id>.raw`, and a `-<n>` counter if even that is taken. Plain names are handed out first, so a
    /// generated name can never take one.
    public static func snapshotFileNames(_ snapshots: [SnapshotDescriptor]) -> [String] {
        let bases = snapshots.map { safe($0.name, limit: maxNameBytes) }
        var counts: [String: Int] = [:]
        for base in bases { counts[base.text, default: 0] += 1 }
        var names = [String?](repeating: nil, count: snapshots.count)
        var used = Set<String>()
        for (index, base) in bases.enumerated() where base.isExact && counts[base.text] == 1 {
            names[index] = base.text + ".raw"
            used.insert(base.text + ".raw")
        }
        for (index, snapshot) in snapshots.enumerated() where names[index] == nil {
            let id = safe(snapshot.id, limit: maxIdBytes).text
            let stem = bases[index].text.isEmpty ? "id-\(id)" : "\(bases[index].text)-id\(id)"
            var candidate = stem + ".raw"
            var counter = 2
            while used.contains(candidate) {
                candidate = "\(stem)-\(counter).raw"
                counter += 1
            }
            names[index] = candidate
            used.insert(candidate)
        }
        return names.map { $0! }
    }

    /// A name made safe for a directory entry, and whether that left it unchanged.
    private static func safe(_ name: String, limit: Int) -> (text: String, isExact: Bool) {
        var text = String(name.unicodeScalars.map { $0 == "/" || $0 == "\0" ? "_" : Character($0) })
        var exact = text == name
        if text.utf8.count > limit {
            var cut = ""
            for character in text {
                if cut.utf8.count + character.utf8.count > limit { break }
                cut.append(character)
            }
            text = cut
            exact = false
        }
        if text.isEmpty || text == "." || text == ".." { return ("", false) }
        return (text, exact)
    }
}
