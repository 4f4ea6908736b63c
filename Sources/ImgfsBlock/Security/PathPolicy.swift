#if canImport(Glibc)
import Glibc
#endif

/// The one rule for file names found inside images (backing files, VMDK extents, external data files).
///
/// Such names are untrusted: an image from the internet may name `/etc/shadow` as its backing file and expose it
/// through the mount (CVE-2008-2004 and its many relatives). A name resolves against the directory of the file
/// that holds it; the result, after symlinks, must stay inside that directory or inside a directory the user
/// allowed. `json:` and protocol-prefixed names (`nbd:`, `http:`, `file:`...) are refused outright.
public struct PathPolicy: Sendable, Equatable {
    /// Directories (canonical) where named files may also live.
    public private(set) var allowedDirectories: [String]

    public init(allowedDirectories: [String] = []) throws {
        self.allowedDirectories = try allowedDirectories.map { dir in
            guard let real = PathPolicy.realPath(dir) else {
                throw BlockError.pathRefused(path: dir, reason: "allowed directory does not exist")
            }
            return real
        }
    }

    /// Resolves `name`, found inside the image at `referrer`, to a canonical path, or throws why not.
    ///
    /// Only a check: a path can change before it is opened. Opening goes through `ChildOpener`.
    public func resolve(_ name: String, referencedBy referrer: String) throws -> String {
        try checkName(name)
        let joined = Self.joined(name, referencedBy: referrer)
        guard let real = Self.realPath(joined) else {
            throw Self.missing(name, referencedBy: referrer, lookedFor: joined)
        }
        guard permittedDirectory(containing: real, referencedBy: referrer) != nil else {
            throw refusal(name, referencedBy: referrer, resolvedTo: real)
        }
        return real
    }

    /// The rules on the name itself, before anything is looked up.
    func checkName(_ name: String) throws {
        guard !name.isEmpty else { throw BlockError.pathRefused(path: name, reason: "empty file name") }
        guard !name.utf8.contains(0) else { throw BlockError.pathRefused(path: name, reason: "NUL in file name") }
        if name.hasPrefix("json:") {
            throw BlockError.pathRefused(path: name, reason: "json: pseudo-protocol names are not accepted")
        }
        if let prefix = Self.protocolPrefix(of: name) {
            throw BlockError.pathRefused(path: name, reason: "protocol '\(prefix):' is not accepted; only plain file names are")
        }
    }

    /// The canonical directories a file named by `referrer` may lie in: the referrer's own first.
    func permittedDirectories(referencedBy referrer: String) -> [String] {
        let home = Self.directory(of: referrer)
        return [Self.realPath(home) ?? home] + allowedDirectories
    }

    /// The permitted directory that holds the canonical path `real`, if any.
    func permittedDirectory(containing real: String, referencedBy referrer: String) -> String? {
        permittedDirectories(referencedBy: referrer).first { Self.isInside(real, $0) }
    }

    /// Why a name that leads out is refused; `real` is nil when the open, not the check, found it leading out.
    func refusal(_ name: String, referencedBy referrer: String, resolvedTo real: String?) -> BlockError {
        let home = permittedDirectories(referencedBy: referrer)[0]
        let target = real.map { "resolves to \($0), outside" } ?? "resolves outside"
        return .pathRefused(
            path: name,
            reason: "named by \(referrer), it \(target) \(home); use --allow-path DIR to permit it")
    }

    static func missing(_ name: String, referencedBy referrer: String, lookedFor joined: String) -> BlockError {
        .chain("\(referrer): file '\(name)' it names does not exist (looked for \(joined))")
    }

    /// `name` as a path: relative names are relative to the referrer's directory.
    static func joined(_ name: String, referencedBy referrer: String) -> String {
        name.hasPrefix("/") ? name : directory(of: referrer) + "/" + name
    }

    /// "nbd:..." style prefix, if any: letters, digits, '+', '.', '-' before the first ':' and no '/' before it.
    static func protocolPrefix(of name: String) -> String? {
        guard let colon = name.firstIndex(of: ":") else { return nil }
        let prefix = name[..<colon]
        guard !prefix.isEmpty else { return nil }
        let ok = prefix.allSatisfy { $0.isLetter || $0.isNumber || $0 == "+" || $0 == "." || $0 == "-" || $0 == "_" }
        return ok ? String(prefix) : nil
    }

    static func directory(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        if slash == path.startIndex { return "/" }
        return String(path[..<slash])
    }

    static func isInside(_ path: String, _ directory: String) -> Bool {
        if directory == "/" { return true }
        return path == directory || path.hasPrefix(directory + "/")
    }

    /// realpath(3): absolute, symlinks resolved; nil when the file does not exist.
    public static func realPath(_ path: String) -> String? {
        guard let resolved = Glibc.realpath(path, nil) else { return nil }
        defer { free(resolved) }
        return String(cString: resolved)
    }
}
