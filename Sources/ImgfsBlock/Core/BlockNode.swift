/// One image in a chain: a format driver over its host file, with an optional backing node below it.
///
/// The FUSE layer and the CLI talk to nodes, never to drivers: the node clamps ranges to the disk, zero-fills
/// reads past a shorter backing file, refuses writes when read-only, and walks the chain for block status.
public final class BlockNode: Sendable {
    /// The image file's path as the user or the parent image named it (after path-policy resolution).
    public let path: String
    public let driver: BlockDriver
    /// The protocol layer (nil for views such as a snapshot that share their parent's file).
    public let file: HostFile?
    public let backing: BlockNode?
    public let isReadOnly: Bool
    /// Whether closing this node closes its backing chain; a view (a snapshot) shares its image's chain.
    private let ownsBacking: Bool
    /// What the user should hear about this image: problems that did not stop the open, probing.
    public let warnings: [String]

    public init(path: String, driver: BlockDriver, file: HostFile?, backing: BlockNode?, readOnly: Bool,
                ownsBacking: Bool = true, warnings: [String] = []) {
        self.path = path
        self.warnings = warnings + driver.openWarnings
        self.driver = driver
        self.file = file
        self.backing = backing
        self.ownsBacking = ownsBacking
        self.isReadOnly = readOnly || driver.isReadOnly
        if let backing { driver.attachBacking(backing) }
    }

    public var length: Int64 { driver.length }
    public var format: ImageFormat { driver.format }

    /// Reads inside the disk; the range must not pass `length`.
    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        try checkRange(offset, Int64(buffer.count))
        if buffer.isEmpty { return }
        try await driver.read(at: offset, into: buffer)
    }

    /// Reads up to `buffer.count` bytes, fewer where the disk ends (it may have shrunk since the caller looked);
    /// returns how many were read.
    public func readUpTo(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws -> Int {
        guard offset >= 0 else { throw BlockError.outOfRange(offset: offset, length: Int64(buffer.count), size: length) }
        let count = Int(max(0, min(Int64(buffer.count), length - offset)))
        if count > 0 { try await driver.read(at: offset, into: UnsafeMutableRawBufferPointer(rebasing: buffer[..<count])) }
        return count
    }

    /// Reads any range: bytes past the end of this disk read as zeros. Drivers call this on their backing node.
    public func readZeroPadded(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        let size = length
        let inside = max(0, min(Int64(buffer.count), size - offset))
        if inside < Int64(buffer.count) {
            UnsafeMutableRawBufferPointer(rebasing: buffer[Int(inside)...]).initializeMemory(as: UInt8.self, repeating: 0)
        }
        if inside > 0 {
            try await driver.read(at: offset, into: UnsafeMutableRawBufferPointer(rebasing: buffer[..<Int(inside)]))
        }
    }

    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer) async throws {
        guard !isReadOnly else { throw BlockError.readOnly }
        try checkRange(offset, Int64(buffer.count))
        if buffer.isEmpty { return }
        try await driver.write(at: offset, from: buffer)
    }

    public func writeZeroes(at offset: Int64, length: Int64, mayUnmap: Bool) async throws {
        guard !isReadOnly else { throw BlockError.readOnly }
        try checkRange(offset, length)
        if length == 0 { return }
        try await driver.writeZeroes(at: offset, length: length, mayUnmap: mayUnmap)
    }

    public func discard(at offset: Int64, length: Int64) async throws {
        guard !isReadOnly else { throw BlockError.readOnly }
        try checkRange(offset, length)
        if length == 0 { return }
        try await driver.discard(at: offset, length: length)
    }

    public func flush() async throws {
        if isReadOnly { return }
        try await driver.flush()
    }

    public func truncate(to newLength: Int64) async throws {
        guard !isReadOnly else { throw BlockError.readOnly }
        guard newLength >= 0 else { throw BlockError.outOfRange(offset: newLength, length: 0, size: length) }
        try await driver.truncate(to: newLength)
    }

    /// Block status through the chain, as `qemu-img map` and SEEK_DATA/SEEK_HOLE need it.
    public func chainBlockStatus(at offset: Int64, length: Int64) async throws -> ChainBlockStatus {
        var node: BlockNode? = self
        var depth = 0
        var limit = min(length, self.length - offset)
        guard limit > 0 else { throw BlockError.outOfRange(offset: offset, length: length, size: self.length) }
        while let current = node {
            if offset >= current.length {
                return ChainBlockStatus(kind: .hole, length: limit, depth: depth, hostOffset: nil)
            }
            let status = try await current.driver.blockStatus(at: offset, length: min(limit, current.length - offset))
            let run = max(1, min(limit, status.length))
            switch status.kind {
            case .data: return ChainBlockStatus(kind: .data, length: run, depth: depth, hostOffset: status.hostOffset)
            case .zero: return ChainBlockStatus(kind: .zero, length: run, depth: depth, hostOffset: nil)
            case .unallocated:
                limit = run
                node = current.backing
                depth += 1
            }
        }
        return ChainBlockStatus(kind: .hole, length: limit, depth: depth, hostOffset: nil)
    }

    /// Closes this node and every node below it that it owns.
    public func close() async throws {
        try await driver.close()
        // The descriptor lives as long as any reference to the file, but the image is free for others now.
        if let file { ImageLock.unlock(file) }
        if ownsBacking { try await backing?.close() }
    }

    /// The nodes of the chain from this one down.
    public var chain: [BlockNode] {
        var nodes: [BlockNode] = []
        var node: BlockNode? = self
        while let current = node {
            nodes.append(current)
            node = current.backing
        }
        return nodes
    }

    private func checkRange(_ offset: Int64, _ count: Int64) throws {
        let size = length
        if offset < 0 || count < 0 || offset > size || count > size - offset {
            throw BlockError.outOfRange(offset: offset, length: count, size: size)
        }
    }
}
