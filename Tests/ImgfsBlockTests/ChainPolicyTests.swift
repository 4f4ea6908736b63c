import Foundation
import Testing
@testable import ImgfsBlock

/// The untrusted-input rules applied when opening chains: path policy, loops, depth, probing.
@Suite struct ChainPolicyTests {
    private func openError(_ path: String, allow: [String] = [], format: ImageFormat? = nil) async -> BlockError? {
        do {
            _ = try await ImageOpener.open(path, options: OpenOptions(
                readOnly: true, format: format, pathPolicy: try PathPolicy(allowedDirectories: allow)))
            return nil
        } catch {
            return error as? BlockError
        }
    }

    private func overlay(_ scratch: QemuScratch, _ name: String, backing: String, format: String = "raw") throws {
        try scratch.qemuImg("create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", format, scratch.path(name), "1M")
    }

    @Test func backingInTheSameDirectoryOpens() async throws {
        let scratch = try QemuScratch()
        try scratch.qemuImg("create", "-q", "-f", "raw", scratch.path("base.raw"), "1M")
        try overlay(scratch, "rel.qcow2", backing: "base.raw")
        try overlay(scratch, "abs.qcow2", backing: scratch.path("base.raw"))
        #expect(await openError(scratch.path("rel.qcow2")) == nil)
        // An absolute name is fine while it stays inside the image's directory.
        #expect(await openError(scratch.path("abs.qcow2")) == nil)
    }

    @Test func escapingBackingNamesAreRefused() async throws {
        let outside = try QemuScratch()
        let scratch = try QemuScratch()
        try outside.qemuImg("create", "-q", "-f", "raw", outside.path("o.raw"), "1M")
        let relativeOut = "../" + outside.directory.lastPathComponent + "/o.raw"
        try overlay(scratch, "passwd.qcow2", backing: "/etc/passwd")
        try overlay(scratch, "dotdot.qcow2", backing: relativeOut)
        try FileManager.default.createSymbolicLink(atPath: scratch.path("link.raw"), withDestinationPath: outside.path("o.raw"))
        try overlay(scratch, "symlink.qcow2", backing: "link.raw")
        for image in ["passwd.qcow2", "dotdot.qcow2", "symlink.qcow2"] {
            guard case .pathRefused(_, let reason)? = await openError(scratch.path(image)) else {
                Issue.record("\(image) was not refused")
                continue
            }
            #expect(reason.contains("--allow-path"))
        }
        // The user may allow the outside directory; /etc stays refused.
        #expect(await openError(scratch.path("dotdot.qcow2"), allow: [outside.directory.path]) == nil)
        #expect(await openError(scratch.path("symlink.qcow2"), allow: [outside.directory.path]) == nil)
        #expect(await openError(scratch.path("passwd.qcow2"), allow: [outside.directory.path]) != nil)
    }

    @Test func protocolAndJsonNamesAreRefused() throws {
        let policy = try PathPolicy()
        for name in ["json:{\"file.filename\":\"/etc/passwd\"}", "nbd://localhost/x", "http://example.com/a.img",
                     "file:base.raw", "ssh:host:/x"] {
            #expect(throws: BlockError.self) { try policy.resolve(name, referencedBy: "/tmp/a.qcow2") }
            do {
                _ = try policy.resolve(name, referencedBy: "/tmp/a.qcow2")
            } catch BlockError.pathRefused(_, let reason) {
                #expect(reason.contains("json") || reason.contains("protocol"))
            } catch {
                Issue.record("\(name): unexpected \(error)")
            }
        }
    }

    @Test func backingLoopIsAClearError() async throws {
        let scratch = try QemuScratch()
        try scratch.qemuImg("create", "-q", "-f", "qcow2", scratch.path("a.qcow2"), "1M")
        try overlay(scratch, "b.qcow2", backing: "a.qcow2", format: "qcow2")
        try scratch.qemuImg("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", scratch.path("a.qcow2"))
        guard case .chain(let message)? = await openError(scratch.path("a.qcow2")) else {
            Issue.record("loop not reported as a chain error")
            return
        }
        #expect(message.contains("loop"))
        // A self-reference is a loop too.
        try scratch.qemuImg("rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", scratch.path("a.qcow2"))
        guard case .chain(let selfLoop)? = await openError(scratch.path("a.qcow2")) else {
            Issue.record("self-loop not reported")
            return
        }
        #expect(selfLoop.contains("loop"))
    }

    @Test func missingBackingIsAClearError() async throws {
        let scratch = try QemuScratch()
        try overlay(scratch, "m.qcow2", backing: "gone.raw")
        guard case .chain(let message)? = await openError(scratch.path("m.qcow2")) else {
            Issue.record("missing backing not reported")
            return
        }
        #expect(message.contains("gone.raw") && message.contains("does not exist"))
    }

    @Test func chainDepthIsCapped() async throws {
        let scratch = try QemuScratch()
        try scratch.qemuImg("create", "-q", "-f", "raw", scratch.path("l0.img"), "1M")
        for level in 1...4 {
            try overlay(scratch, "l\(level).img", backing: "l\(level - 1).img", format: level == 1 ? "raw" : "qcow2")
        }
        let shallow = OpenOptions(readOnly: true, pathPolicy: try PathPolicy(), maxChainDepth: 4)
        await #expect(throws: BlockError.self) { _ = try await ImageOpener.open(scratch.path("l4.img"), options: shallow) }
        let deep = OpenOptions(readOnly: true, pathPolicy: try PathPolicy(), maxChainDepth: 5)
        let node = try await ImageOpener.open(scratch.path("l4.img"), options: deep)
        #expect(node.chain.count == 5)
        #expect(node.chain.last?.format == .raw)
    }

    @Test func probedRawRefusesOnlyWritesThatChangeItsFormat() async throws {
        let scratch = try QemuScratch()
        try scratch.qemuImg("create", "-q", "-f", "raw", scratch.path("p.img"), "1M")
        let probed = try await ImageOpener.open(scratch.path("p.img"), options: OpenOptions(pathPolicy: try PathPolicy()))
        #expect(probed.format == .raw && !probed.isReadOnly)
        #expect(probed.warnings.contains { $0.contains("--format raw") })
        // Ordinary writes to the first sector pass; one that completes a qcow2 magic, even in two steps, does not.
        try await write(probed, at: 0, Array("hello".utf8))
        try await write(probed, at: 0, [0x51, 0x46])
        await #expect {
            try await write(probed, at: 2, [0x49, 0xFB])
        } throws: { error in
            guard case BlockError.notPermitted(let reason) = error else { return false }
            return reason.contains("qcow2") && (error as? BlockError)?.errno == EPERM
        }
        await #expect(throws: BlockError.self) { try await write(probed, at: 0, Array("# Disk DescriptorFile".utf8)) }
        try await write(probed, at: 4096, [0x51, 0x46, 0x49, 0xFB])  // past the first sector anything goes
        #expect(try await readNode(probed, at: 0, count: 4) == [0x51, 0x46, 0x6C, 0x6C])
        try await probed.close()
        // Named as raw, the same write is the user's business.
        let named = try await ImageOpener.open(scratch.path("p.img"),
                                               options: OpenOptions(format: .raw, pathPolicy: try PathPolicy()))
        #expect(named.warnings.isEmpty)
        try await write(named, at: 0, [0x51, 0x46, 0x49, 0xFB])
        #expect(try await readNode(named, at: 0, count: 4) == [0x51, 0x46, 0x49, 0xFB])
    }

    @Test func fileNamedAsAFormatItIsNotIsRefused() async throws {
        let scratch = try QemuScratch()
        for name in ["d.qcow2", "d.vmdk", "empty.QCOW2"] {
            let bytes = name.hasPrefix("empty") ? [] : [UInt8](repeating: 0x5A, count: 4096)
            _ = FileManager.default.createFile(atPath: scratch.path(name), contents: Data(bytes))
            await #expect {
                _ = try await ImageOpener.open(scratch.path(name), options: OpenOptions(readOnly: true, pathPolicy: try PathPolicy()))
            } throws: { error in
                "\(error)".contains("its content is not") && "\(error)".contains("--format raw")
            }
            let forced = try await ImageOpener.open(scratch.path(name), options: OpenOptions(
                readOnly: true, format: .raw, pathPolicy: try PathPolicy()))
            #expect(forced.length == Int64(bytes.count))
        }
    }

    @Test func fifoIsRefusedWithoutBlocking() async throws {
        let scratch = try QemuScratch()
        #expect(mkfifo(scratch.path("f.img"), 0o600) == 0)
        // As the image, and as a backing file named inside one.
        await #expect {
            _ = try await ImageOpener.open(scratch.path("f.img"), options: OpenOptions(readOnly: true, pathPolicy: try PathPolicy()))
        } throws: { "\($0)".contains("FIFO") }
        try overlay(scratch, "top.qcow2", backing: "f.img", format: "raw")
        await #expect {
            _ = try await ImageOpener.open(scratch.path("top.qcow2"), options: OpenOptions(readOnly: true, pathPolicy: try PathPolicy()))
        } throws: { "\($0)".contains("FIFO") }
    }

    @Test func recordedBackingFormatIsNotReprobed() async throws {
        let scratch = try QemuScratch()
        // A raw backing file whose bytes look like a qcow2 header: the recorded "raw" must win.
        try scratch.qemuImg("create", "-q", "-f", "qcow2", scratch.path("looks-qcow2.raw"), "1M")
        try overlay(scratch, "top.qcow2", backing: "looks-qcow2.raw", format: "raw")
        let node = try await ImageOpener.open(scratch.path("top.qcow2"),
                                              options: OpenOptions(readOnly: true, pathPolicy: try PathPolicy()))
        #expect(node.backing?.format == .raw)
        #expect(node.backing?.isReadOnly == true)
    }
}
