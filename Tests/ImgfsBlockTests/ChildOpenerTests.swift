import Foundation
import Testing
@testable import ImgfsBlock

/// Files named inside images are opened beneath a permitted directory, whatever the tree does meanwhile.
@Suite struct ChildOpenerTests {
    /// openat2 where the kernel has it, and always the walk that replaces it on kernels that do not.
    static let methods: [ChildOpener.Method] = LinuxOpenat2.isAvailable ? [.beneath, .componentWalk] : [.componentWalk]

    /// A scratch directory holding a referrer ("top", its content is never read) and a file "base.raw".
    private struct Tree {
        let scratch: QemuScratch
        let referrer: HostFile

        init() throws {
            scratch = try QemuScratch()
            _ = FileManager.default.createFile(atPath: scratch.path("top"), contents: Data())
            _ = FileManager.default.createFile(atPath: scratch.path("base.raw"), contents: Data(repeating: 7, count: 512))
            referrer = try HostFile.open(scratch.path("top"), readOnly: true)
        }

        func open(_ name: String, _ method: ChildOpener.Method, allow: [String] = [],
                  beforeOpen: (() -> Void)? = nil) throws -> (path: String, file: HostFile) {
            var visited: [HostFile.Identity: String] = [:]
            return try ChildOpener.openChild(named: name, referencedBy: referrer, readOnly: true,
                                             policy: try PathPolicy(allowedDirectories: allow), visited: &visited,
                                             method: method, beforeOpen: beforeOpen)
        }

        func link(_ name: String, to target: String) throws {
            try FileManager.default.createSymbolicLink(atPath: scratch.path(name), withDestinationPath: target)
        }
    }

    private func refusal(_ body: () throws -> Any) -> String? {
        do {
            _ = try body()
            return nil
        } catch BlockError.pathRefused(_, let reason) {
            return reason
        } catch {
            return "unexpected: \(error)"
        }
    }

    @Test(arguments: methods) func symlinksThatStayInsideOpen(method: ChildOpener.Method) throws {
        let tree = try Tree()
        let base = try #require(PathPolicy.realPath(tree.scratch.path("base.raw")))
        try tree.link("relative.raw", to: "base.raw")
        try tree.link("absolute.raw", to: tree.scratch.path("base.raw"))
        try FileManager.default.createDirectory(atPath: tree.scratch.path("sub"), withIntermediateDirectories: false)
        try tree.link("sub/up.raw", to: "../base.raw")
        for name in ["base.raw", "relative.raw", "absolute.raw", "sub/up.raw", "sub/../base.raw", tree.scratch.path("base.raw")] {
            let child = try tree.open(name, method)
            #expect(child.path == base, "\(name)")
            #expect(child.file.path == base)
            #expect(try child.file.size() == 512)
        }
    }

    @Test(arguments: methods) func namesThatLeadOutAreRefused(method: ChildOpener.Method) throws {
        let tree = try Tree()
        let outside = try QemuScratch()
        _ = FileManager.default.createFile(atPath: outside.path("o.raw"), contents: Data(count: 512))
        try tree.link("out.raw", to: outside.path("o.raw"))
        try tree.link("etc", to: "/etc")
        let up = "../" + outside.directory.lastPathComponent + "/o.raw"
        for name in ["out.raw", up, outside.path("o.raw"), "/etc/passwd", "etc/passwd", "../../../../../../etc/passwd"] {
            let reason = refusal { try tree.open(name, method) }
            #expect(reason?.contains("resolves to") == true && reason?.contains("--allow-path DIR") == true,
                    "\(name): \(reason ?? "opened")")
        }
        // Allowing the outside directory lets exactly its files in.
        let outsideReal = try #require(PathPolicy.realPath(outside.path("o.raw")))
        for name in ["out.raw", up, outside.path("o.raw")] {
            #expect(try tree.open(name, method, allow: [outside.directory.path]).path == outsideReal)
        }
        #expect(refusal { try tree.open("etc/passwd", method, allow: [outside.directory.path]) } != nil)
    }

    @Test(arguments: methods) func missingAndNonRegularNamesAreClearErrors(method: ChildOpener.Method) throws {
        let tree = try Tree()
        #expect {
            _ = try tree.open("gone.raw", method)
        } throws: { "\($0)".contains("does not exist") && "\($0)".contains("gone.raw") }
        #expect(mkfifo(tree.scratch.path("f.raw"), 0o600) == 0)
        #expect { _ = try tree.open("f.raw", method) } throws: { "\($0)".contains("FIFO") }
        for name in ["json:{}", "nbd://h/x", ""] {
            #expect(refusal { try tree.open(name, method) } != nil)
        }
    }

    /// A directory component replaced by a symlink to /etc after the name was checked: the open must not follow it.
    @Test(arguments: methods) func componentSwappedAfterTheCheckCannotLeadOut(method: ChildOpener.Method) throws {
        for symlinkTarget in ["/etc", "relative"] {
            let tree = try Tree()
            let sub = tree.scratch.path("sub")
            try FileManager.default.createDirectory(atPath: sub, withIntermediateDirectories: false)
            _ = FileManager.default.createFile(atPath: sub + "/passwd", contents: Data(count: 512))
            #expect(try tree.open("sub/passwd", method).path.hasSuffix("/sub/passwd"))
            let target = symlinkTarget == "/etc"
                ? "/etc" : String(repeating: "../", count: sub.split(separator: "/").count) + "etc"
            let swap = {
                guard (try? FileManager.default.destinationOfSymbolicLink(atPath: sub)) == nil else { return }
                try? FileManager.default.moveItem(atPath: sub, toPath: sub + ".checked")
                try? FileManager.default.createSymbolicLink(atPath: sub, withDestinationPath: target)
            }
            let reason = refusal { try tree.open("sub/passwd", method, beforeOpen: swap) }
            #expect(reason?.contains("resolves") == true && reason?.contains("outside") == true, "\(reason ?? "opened")")
        }
    }

    /// The same swap inside an allowed directory, where the name is only known by its canonical path: here the check
    /// passes and the open alone must refuse.
    @Test(arguments: methods) func swapInsideAnAllowedDirectoryIsRefusedByTheOpen(method: ChildOpener.Method) throws {
        let tree = try Tree()
        let outside = try QemuScratch()
        let sub = outside.path("sub")
        try FileManager.default.createDirectory(atPath: sub, withIntermediateDirectories: false)
        _ = FileManager.default.createFile(atPath: sub + "/passwd", contents: Data(count: 512))
        let allow = [outside.directory.path]
        #expect(try tree.open(sub + "/passwd", method, allow: allow).file.size() == 512)
        var opensAttempted = 0
        let swap = {
            opensAttempted += 1
            try? FileManager.default.moveItem(atPath: sub, toPath: sub + ".checked")
            try? FileManager.default.createSymbolicLink(atPath: sub, withDestinationPath: "/etc")
        }
        let reason = refusal { try tree.open(sub + "/passwd", method, allow: allow, beforeOpen: swap) }
        #expect(opensAttempted == 1)
        #expect(reason?.contains("resolves outside") == true && reason?.contains("--allow-path DIR") == true,
                "\(reason ?? "opened")")
    }

    /// Names resolve against the directory that holds the referrer, not whatever its path names later.
    @Test func referrerDirectorySwappedAwayIsRefused() throws {
        let scratch = try QemuScratch()
        let images = scratch.path("images")
        try FileManager.default.createDirectory(atPath: images, withIntermediateDirectories: false)
        _ = FileManager.default.createFile(atPath: images + "/top", contents: Data())
        let referrer = try HostFile.open(images + "/top", readOnly: true)
        try FileManager.default.moveItem(atPath: images, toPath: images + ".moved")
        try FileManager.default.createSymbolicLink(atPath: images, withDestinationPath: "/etc")
        var visited: [HostFile.Identity: String] = [:]
        #expect {
            _ = try ChildOpener.openChild(named: "passwd", referencedBy: referrer, readOnly: true,
                                          policy: try PathPolicy(), visited: &visited)
        } throws: { "\($0)".contains("moved or replaced") }
    }

    @Test func chainThroughSymlinksOpensEndToEnd() async throws {
        let scratch = try QemuScratch()
        try scratch.qemuImg("create", "-q", "-f", "raw", scratch.path("base.raw"), "1M")
        try FileManager.default.createSymbolicLink(atPath: scratch.path("link.raw"), withDestinationPath: "base.raw")
        try scratch.qemuImg("create", "-q", "-f", "qcow2", "-u", "-b", "link.raw", "-F", "raw", scratch.path("top.qcow2"), "1M")
        let node = try await openImage(scratch.path("top.qcow2"))
        #expect(node.backing?.path == PathPolicy.realPath(scratch.path("base.raw")))
    }
}
