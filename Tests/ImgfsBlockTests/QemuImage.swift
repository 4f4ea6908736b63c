import Foundation
@testable import ImgfsBlock
import ImgfsTestSupport

/// A temporary directory in which tests build images with qemu-img and qemu-io.
final class QemuScratch {
    let directory: URL

    init() throws {
        directory = FileManager.default.temporaryDirectory
            .appendingPathComponent("imgfs-qcow2-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
    }

    deinit { try? FileManager.default.removeItem(at: directory) }

    func path(_ name: String) -> String { directory.appendingPathComponent(name).path }

    /// Runs a tool in the scratch directory and returns its standard output; a non-zero exit throws with its
    /// standard error.
    @discardableResult
    func run(_ tool: String, _ arguments: [String]) throws -> Data {
        try runTool(tool, arguments, cwd: directory.path).outputData
    }

    func qemuImg(_ arguments: String...) throws { try run("qemu-img", arguments) }

    /// Runs qemu-io commands (e.g. "write -P 0x11 0 64k") on an image.
    func qemuIO(_ image: String, format: String = "qcow2", _ commands: [String]) throws {
        var arguments = ["-f", format]
        for command in commands { arguments += ["-c", command] }
        arguments.append(path(image))
        try run("qemu-io", arguments)
    }

    /// The image's guest contents as qemu-img converts them to raw.
    func rawContents(_ image: String, snapshot: String? = nil) throws -> [UInt8] {
        let output = path("\(image).\(snapshot ?? "active").raw")
        var arguments = ["convert"]
        if let snapshot { arguments += ["-l", "snapshot.name=\(snapshot)"] }
        arguments += ["-O", "raw", path(image), output]
        try run("qemu-img", arguments)
        return [UInt8](try Data(contentsOf: URL(fileURLWithPath: output)))
    }

    /// Overwrites bytes of a file in place (to build corrupt images).
    func patch(_ image: String, at offset: UInt64, _ bytes: [UInt8]) throws {
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: path(image)))
        defer { try? handle.close() }
        try handle.seek(toOffset: offset)
        handle.write(Data(bytes))
    }

    func read(_ image: String, at offset: UInt64, count: Int) throws -> [UInt8] {
        let handle = try FileHandle(forReadingFrom: URL(fileURLWithPath: path(image)))
        defer { try? handle.close() }
        try handle.seek(toOffset: offset)
        return [UInt8](handle.readData(ofLength: count))
    }
}


/// Opens an image read-only through the real opener.
func openImage(_ path: String, readOnly: Bool = true) async throws -> BlockNode {
    try await ImageOpener.open(path, options: OpenOptions(readOnly: readOnly, pathPolicy: try PathPolicy()))
}

/// Opens the qcow2 driver itself read-write, below the opener (which keeps qcow2 read-only until writing lands),
/// to test what the driver does on a read-write open.
func openQcow2DriverReadWrite(_ path: String, engine: any IOEngine = SharedIOEngine.engine) async throws -> Qcow2Driver {
    let file = try HostFile.open(path, readOnly: false, engine: engine)
    return try await Qcow2Driver.open(DriverOpenContext(file: file, readOnly: false,
                                                        options: OpenOptions(pathPolicy: try PathPolicy())))
}

/// Reads `count` bytes at `offset` through the node into an array.
func readNode(_ node: BlockNode, at offset: Int64, count: Int) async throws -> [UInt8] {
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: count, alignment: 16)
    defer { buffer.deallocate() }
    try await node.read(at: offset, into: buffer)
    return [UInt8](buffer)
}

/// Reads the whole disk in chunks of an odd size (so reads straddle cluster and table boundaries).
func readAll(_ node: BlockNode, chunk: Int = 100_003) async throws -> [UInt8] {
    var result = [UInt8]()
    result.reserveCapacity(Int(node.length))
    var offset: Int64 = 0
    while offset < node.length {
        let count = Int(min(Int64(chunk), node.length - offset))
        result += try await readNode(node, at: offset, count: count)
        offset += Int64(count)
    }
    return result
}

/// The first differing offset, for readable failures on megabyte comparisons.
func firstDifference(_ a: [UInt8], _ b: [UInt8]) -> Int? {
    if a.count != b.count { return min(a.count, b.count) }
    return zip(a, b).enumerated().first(where: { $0.element.0 != $0.element.1 })?.offset
}

/// Writes `bytes` at `offset` through the node.
func write(_ node: BlockNode, at offset: Int64, _ bytes: [UInt8], flags: BlockRequestFlags = []) async throws {
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: bytes.count, alignment: 16)
    defer { buffer.deallocate() }
    buffer.copyBytes(from: bytes)
    try await node.write(at: offset, from: UnsafeRawBufferPointer(buffer), flags: flags)
}

/// Runs `BlockNode.startRead`: nil when it declines, else whether it read every byte.
func startDirectRead(_ node: BlockNode, at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async -> Bool? {
    let target = UncheckedSendable(buffer)
    return await withCheckedContinuation { (continuation: CheckedContinuation<Bool?, Never>) in
        let started = node.startRead(at: offset, into: target.value) { complete in continuation.resume(returning: complete) }
        if !started { continuation.resume(returning: nil) }
    }
}

/// Whether the shared engine can start reads with no task (`IOEngine.startRead`): io_uring can, threads cannot.
var engineStartsDirectReads: Bool { SharedIOEngine.kind == .uring }
