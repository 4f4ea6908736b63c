#if canImport(Glibc)
import Glibc
#endif

/// Opens the files an image names (backing files; next, VMDK extents and external data files) so that the open
/// itself, not only a check before it, stays inside the directories `PathPolicy` permits.
///
/// A check of a path followed by an open of the same path leaves a window in which a directory component can be
/// replaced by a symlink that leads out (to /etc, say): the check sees the old tree, the open the new one. Here the
/// referrer's directory and each allowed directory are held as descriptors and the name is opened relative to one
/// of them with openat2's RESOLVE_BENEATH, so the kernel refuses every step that would leave it, whenever the tree
/// changes.
public enum ChildOpener {
    /// How a name is opened beneath a directory descriptor.
    enum Method: Sendable {
        /// openat2 with RESOLVE_BENEATH: symlinks that stay inside are followed, any escape fails with EXDEV.
        case beneath
        /// Without openat2 (kernels before 5.6, seccomp filters that deny it): PathPolicy's realpath check, then the
        /// canonical path it produced is opened one component at a time with openat and O_NOFOLLOW from the
        /// directory descriptor. A canonical path has no symlinks and no "..", so a component swapped for a
        /// symlink after the check fails the open (ENOTDIR, ELOOP) instead of being followed. Comparing a stat of
        /// the checked path with an fstat of the opened file would not do: that stat follows the same swappable
        /// components as the open.
        case componentWalk
    }

    static let defaultMethod: Method = LinuxOpenat2.isAvailable ? .beneath : .componentWalk

    /// Opens the file `name` found inside `referrer`, or throws why not (a refused or missing name, a loop).
    ///
    /// The returned path is the file's canonical path where it can be known; it is the referrer of the files the
    /// child names in turn. `visited` is the chain's set of files: a file already in it is a loop.
    public static func openChild(named name: String, referencedBy referrer: HostFile, readOnly: Bool,
                                 policy: PathPolicy,
                                 visited: inout [HostFile.Identity: String]) throws -> (path: String, file: HostFile) {
        try openChild(named: name, referencedBy: referrer, readOnly: readOnly, policy: policy, visited: &visited,
                      method: defaultMethod, beforeOpen: nil)
    }

    /// `beforeOpen` runs just before each open beneath a directory, after every check: tests swap the tree there.
    static func openChild(named name: String, referencedBy referrer: HostFile, readOnly: Bool, policy: PathPolicy,
                          visited: inout [HostFile.Identity: String], method: Method,
                          beforeOpen: (() -> Void)?) throws -> (path: String, file: HostFile) {
        try policy.checkName(name)
        let home = try Directory(PathPolicy.directory(of: referrer.path))
        try home.verifyHolds(referrer)
        let child = try open(name, referencedBy: referrer.path, home: home, readOnly: readOnly, policy: policy,
                             method: method, beforeOpen: beforeOpen)
        try recordVisit(child.file, as: child.path, in: &visited)
        return child
    }

    /// The chain's one loop rule: no file may appear in it twice, whatever names lead to it.
    static func recordVisit(_ file: HostFile, as path: String, in visited: inout [HostFile.Identity: String]) throws {
        let identity = try file.identity()
        if let earlier = visited[identity] {
            throw BlockError.chain("backing chain loop: \(path) is the same file as \(earlier), which it backs")
        }
        visited[identity] = path
    }

    private static func open(_ name: String, referencedBy referrer: String, home: Directory, readOnly: Bool,
                             policy: PathPolicy, method: Method,
                             beforeOpen: (() -> Void)?) throws -> (path: String, file: HostFile) {
        let flags = HostFile.openFlags(readOnly: readOnly)
        let joined = PathPolicy.joined(name, referencedBy: referrer)
        let homeCanonical = policy.permittedDirectories(referencedBy: referrer)[0]
        // The name as written, beneath the referrer's directory: the kernel follows the symlinks that stay inside.
        // qemu-img writes absolute names, so one that lies inside the directory is taken relative to it.
        if method == .beneath,
           let relative = name.hasPrefix("/") ? (relativePath(name, inside: home.path)
                                                 ?? relativePath(name, inside: homeCanonical)) : name {
            beforeOpen?()
            let fd = openBeneath(home.descriptor, relative, flags: flags)
            if fd >= 0 {
                let path = procPath(of: fd) ?? joined
                return (path, try HostFile.open(adopting: fd, path: path, readOnly: readOnly))
            }
            switch errno {
            case ENOENT: throw PathPolicy.missing(name, referencedBy: referrer, lookedFor: joined)
            // It leaves the directory (or goes through an absolute symlink): perhaps into an allowed directory,
            // perhaps back inside; the canonical path decides below.
            case EXDEV: break
            case let e: throw BlockError.system(errno: e, operation: "open", path: joined)
            }
        }
        // The canonical path, found by the policy's check, opened beneath the permitted directory that holds it.
        guard let real = PathPolicy.realPath(joined) else {
            throw PathPolicy.missing(name, referencedBy: referrer, lookedFor: joined)
        }
        guard let permitted = policy.permittedDirectory(containing: real, referencedBy: referrer),
              let relative = relativePath(real, inside: permitted) else {
            throw policy.refusal(name, referencedBy: referrer, resolvedTo: real)
        }
        let directory = permitted == homeCanonical ? home : try Directory(permitted)
        beforeOpen?()
        let fd = method == .beneath ? openBeneath(directory.descriptor, relative, flags: flags)
                                    : openComponents(directory.descriptor, relative, flags: flags)
        if fd >= 0 {
            return (real, try HostFile.open(adopting: fd, path: real, readOnly: readOnly))
        }
        switch errno {
        case ENOENT: throw PathPolicy.missing(name, referencedBy: referrer, lookedFor: joined)
        // The tree changed since the check, and the open would have left the directory.
        case EXDEV, ELOOP, ENOTDIR: throw policy.refusal(name, referencedBy: referrer, resolvedTo: nil)
        case let e: throw BlockError.system(errno: e, operation: "open", path: real)
        }
    }

    /// openat2 beneath `directory`; -1 with errno on failure.
    private static func openBeneath(_ directory: Int32, _ relative: String, flags: Int32) -> Int32 {
        // EAGAIN: a rename or mount raced with a ".." step, and the kernel would rather retry than guess.
        for _ in 0..<16 {
            let fd = LinuxOpenat2.open(directory, relative, flags: flags,
                                       resolve: LinuxOpenat2.resolveBeneath | LinuxOpenat2.resolveNoMagicLinks)
            if fd >= 0 || (errno != EAGAIN && errno != EINTR) { return fd }
        }
        return -1
    }

    /// openat of each component of a canonical relative path in turn, following no symlink; -1 with errno.
    private static func openComponents(_ directory: Int32, _ relative: String, flags: Int32) -> Int32 {
        let components = relative.split(separator: "/").map(String.init)
        var current = directory
        defer { if current != directory { Glibc.close(current) } }
        for component in components.dropLast() {
            let next = Glibc.openat(current, component, LinuxOpenat2.pathOnly | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
            if next < 0 { return -1 }
            if current != directory { Glibc.close(current) }
            current = next
        }
        return Glibc.openat(current, components.last ?? ".", flags | O_NOFOLLOW)
    }

    /// `path` relative to `directory`, or nil when it does not lie inside it (lexically).
    private static func relativePath(_ path: String, inside directory: String) -> String? {
        guard PathPolicy.isInside(path, directory) else { return nil }
        if path == directory { return "." }
        let rest = path.dropFirst(directory == "/" ? 1 : directory.count + 1)
        return rest.isEmpty ? "." : String(rest)
    }

    /// What the kernel says `fd` is: the path the open actually reached, nil without /proc.
    private static func procPath(of fd: Int32) -> String? {
        var buffer = [UInt8](repeating: 0, count: Int(PATH_MAX))
        let n = buffer.withUnsafeMutableBufferPointer { bytes in
            bytes.baseAddress!.withMemoryRebound(to: CChar.self, capacity: bytes.count) {
                readlink("/proc/self/fd/\(fd)", $0, bytes.count)
            }
        }
        guard n > 0, n < buffer.count, buffer[0] == UInt8(ascii: "/") else { return nil }
        return String(decoding: buffer[..<n], as: UTF8.self)
    }

    /// A directory held open, so that what lies beneath it is reached from it and not from its path again.
    private final class Directory {
        let path: String
        let descriptor: Int32

        init(_ path: String) throws {
            descriptor = Glibc.open(path, LinuxOpenat2.pathOnly | O_DIRECTORY | O_CLOEXEC)
            guard descriptor >= 0 else { throw BlockError.system(errno: errno, operation: "open", path: path) }
            self.path = path
        }

        deinit { Glibc.close(descriptor) }

        /// The directory opened is the one that holds `file`: had a component of its path been swapped after the
        /// file was opened, the names it holds would be resolved in the wrong place.
        func verifyHolds(_ file: HostFile) throws {
            let base = file.path.split(separator: "/", omittingEmptySubsequences: true).last.map(String.init) ?? file.path
            var st = stat()
            guard fstatat(descriptor, base, &st, 0) == 0,
                  try HostFile.Identity(device: UInt64(st.st_dev), inode: UInt64(st.st_ino)) == file.identity() else {
                throw BlockError.chain("\(file.path) was moved or replaced while the files it names were being opened")
            }
        }
    }
}
