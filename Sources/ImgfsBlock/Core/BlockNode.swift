/// One image in a chain: a format driver over its children (host file, backing node), as QEMU's
/// BlockDriverState is.
///
/// The FUSE layer and the CLI talk to nodes, never to drivers. Every request passes through the node, which
/// clamps it to the disk, refuses writes when read-only, registers it as a tracked request (so serialising
/// requests and truncates wait for what overlaps them, and `drain` knows what is in flight), emulates FUA, and
/// walks the chain for block status. Drivers read their backing through its node too, so whatever a node adds
/// (tracking now, throttling and dirty bitmaps later) sees every request.
public final class BlockNode: Sendable {
    /// The image file's path as the user or the parent image named it (after path-policy resolution).
    public let path: String
    public let driver: BlockDriver
    public let children: BlockChildren
    /// Requests in flight on this node.
    public let requests = TrackedRequests()
    /// What the user should hear about this image: problems that did not stop the open, probing.
    public let warnings: [String]
    /// Whether closing this node closes its children; a view (a snapshot) shares its image's.
    private let ownsChildren: Bool
    private let readOnlyState: Locked<Bool>

    public init(path: String, driver: BlockDriver, children: BlockChildren, readOnly: Bool,
                ownsChildren: Bool = true, warnings: [String] = []) {
        self.path = path
        self.driver = driver
        self.children = children
        self.ownsChildren = ownsChildren
        self.warnings = warnings + driver.openWarnings
        self.readOnlyState = Locked(readOnly || driver.isReadOnly)
        driver.attach(children)
    }

    public convenience init(path: String, driver: BlockDriver, file: HostFile?, backing: BlockNode?,
                            readOnly: Bool, warnings: [String] = []) {
        self.init(path: path, driver: driver, children: BlockChildren(file: file, backing: backing),
                  readOnly: readOnly, warnings: warnings)
    }

    public var length: Int64 { driver.length }
    public var format: ImageFormat { driver.format }
    public var file: HostFile? { children.file }
    public var backing: BlockNode? { children.backing }
    public var isReadOnly: Bool { readOnlyState.withLock { $0 } }
    public var limits: BlockLimits { driver.limits }

    // MARK: Requests

    /// Reads inside the disk; the range must not pass `length`.
    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer,
                     flags: BlockRequestFlags = []) async throws {
        try checkRange(offset, Int64(buffer.count))
        if buffer.isEmpty { return }
        try await tracked(offset, Int64(buffer.count), .read, flags) {
            try await driver.read(at: offset, into: buffer)
        }
    }

    /// Reads up to `buffer.count` bytes, fewer where the disk ends (it may have shrunk since the caller looked);
    /// returns how many were read.
    public func readUpTo(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws -> Int {
        guard offset >= 0 else { throw BlockError.outOfRange(offset: offset, length: Int64(buffer.count), size: length) }
        return try await requests.withTracked(offset: offset, length: Int64(buffer.count), kind: .read) { _ in
            // Looked at once registered: a truncate that shrinks the disk waits for this read, or this read for it.
            let count = Int(max(0, min(Int64(buffer.count), length - offset)))
            if count > 0 { try await driver.read(at: offset, into: UnsafeMutableRawBufferPointer(rebasing: buffer[..<count])) }
            return count
        }
    }

    /// Reads the range at once, on the calling thread, if nothing has to be waited for: no conflicting request in
    /// flight, no drained section, and the driver has everything cached (`BlockDriver.readIfCached`). Returns false
    /// when `read`/`readUpTo` must serve it, also when the disk has shrunk below the range meanwhile.
    public func readIfCached(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) -> Bool {
        guard offset >= 0, let request = requests.tryBegin(offset: offset, length: Int64(buffer.count), kind: .read)
        else { return false }
        defer { requests.end(request) }
        // Looked at once registered, as `readUpTo` does; the short read a shrunk disk needs is its job.
        guard offset <= length, Int64(buffer.count) <= length - offset else { return false }
        return buffer.isEmpty || driver.readIfCached(at: offset, into: buffer)
    }

    /// Starts a read that needs no task: when nothing conflicts in flight and the driver knows at once where the
    /// whole range lies in a host file (`BlockDriver.directRead`), the host read goes straight to the engine and
    /// `completion` runs on the engine's thread with whether it read every byte. Returns false, having started
    /// nothing, when `read`/`readUpTo` must serve it; a false completion asks the same (errors are theirs to report).
    public func startRead(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer,
                          completion: @escaping @Sendable (Bool) -> Void) -> Bool {
        guard offset >= 0, !buffer.isEmpty,
              let request = requests.tryBegin(offset: offset, length: Int64(buffer.count), kind: .read) else { return false }
        guard offset <= length, Int64(buffer.count) <= length - offset,
              let direct = driver.directRead(at: offset, length: buffer.count) else {
            requests.end(request)
            return false
        }
        let requests = self.requests
        let finish: @Sendable () -> Void = {
            direct.release?()
            requests.end(request)
        }
        let started = direct.file.startRead(into: buffer, at: direct.hostOffset) { complete in
            // Still registered while the caller uses the bytes, as in `readUpTo`'s body.
            completion(complete)
            finish()
        }
        if !started { finish() }
        return started
    }

    /// The host file a reader may read instead of this node, bypassing it (the kernel's FUSE passthrough): only
    /// for a node whose disk is that file byte for byte, with no backing file. Those reads are no tracked
    /// requests, which such a node's reads do not need (no copy-on-read, nothing allocated under them); writes
    /// never take this way. A node that comes to limit or watch its reads (I/O limits) must answer nil.
    public var passthroughFile: HostFile? { backing == nil ? driver.wholeDiskFile : nil }

    /// Reads any range: bytes past the end of this disk read as zeros. Drivers call this on their backing node.
    public func readZeroPadded(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        let count = try await readUpTo(at: offset, into: buffer)
        if count < buffer.count {
            UnsafeMutableRawBufferPointer(rebasing: buffer[count...]).initializeMemory(as: UInt8.self, repeating: 0)
        }
    }

    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: BlockRequestFlags = []) async throws {
        try checkWritable()
        try checkRange(offset, Int64(buffer.count))
        if buffer.isEmpty { return }
        try await tracked(offset, Int64(buffer.count), .write, flags) {
            // Checked again once registered: a truncate it waited for may have shrunk the disk under it, and a raw
            // write past the end would grow the file back.
            try checkRange(offset, Int64(buffer.count))
            let emulateFUA = flags.contains(.fua) && !driver.handlesFUA
            try await driver.write(at: offset, from: buffer, flags: emulateFUA ? flags.subtracting(.fua) : flags)
            if emulateFUA { try await driver.flush() }
        }
    }

    public func writeZeroes(at offset: Int64, length: Int64, flags: BlockRequestFlags = []) async throws {
        try checkWritable()
        try checkRange(offset, length)
        if length == 0 { return }
        // Serialising: a zeroed range may give its clusters back, so no write may still be on its way to them.
        try await tracked(offset, length, .writeZeroes, flags.union(.serialising)) {
            try checkRange(offset, length)
            try await driver.writeZeroes(at: offset, length: length, flags: flags.subtracting(.fua))
            if flags.contains(.fua) { try await driver.flush() }
        }
    }

    public func discard(at offset: Int64, length: Int64) async throws {
        try checkWritable()
        try checkRange(offset, length)
        if length == 0 { return }
        try await tracked(offset, length, .discard, .serialising) {
            try checkRange(offset, length)
            try await driver.discard(at: offset, length: length)
        }
    }

    public func flush() async throws {
        if isReadOnly { return }
        try await driver.flush()
    }

    /// Changes the disk's size once every request overlapping the changed range has ended; requests that arrive
    /// meanwhile wait for it.
    public func truncate(to newLength: Int64) async throws {
        try checkWritable()
        guard newLength >= 0 else { throw BlockError.outOfRange(offset: newLength, length: 0, size: length) }
        let alignment = Int64(max(1, limits.granularity))
        try await requests.withTruncate(from: length, to: newLength, alignment: alignment) { _ in
            try await driver.truncate(to: newLength)
        }
    }

    /// Waits until every request that began before the call has ended.
    public func drain() async {
        await requests.drain()
    }

    /// Runs `body` with nothing in flight on this node and every new request held until it returns.
    public func drained<T>(_ body: () async throws -> T) async rethrows -> T {
        try await requests.drained { try await body() }
    }

    /// Switches the node between read-only and read-write: drains it, reopens its host file in the new mode
    /// (the same file, never a new lookup of its name), takes the matching image locks, and tells the driver.
    public func reopen(readOnly: Bool) async throws {
        try await drained {
            guard readOnly != isReadOnly else { return }
            if !readOnly && !driver.format.isWritableByImgfs {
                throw BlockError.unsupported("\(path): \(driver.format.rawValue) images cannot be written by imgfs yet")
            }
            if readOnly { try await driver.flush() }
            if let file = children.file {
                // Released first and explicitly: the old open file description may outlive the swap (io_uring can
                // still hold it), and its locks would then refuse the new ones.
                ImageLock.unlock(file)
                try file.reopen(readOnly: readOnly)
                try ImageLock.lock(file, mode: readOnly ? .readOnly : .readWrite)
            }
            try await driver.reopen(readOnly: readOnly)
            readOnlyState.withLock { $0 = readOnly }
        }
    }

    // MARK: Chain

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
            case .data:
                return ChainBlockStatus(kind: .data, length: run, depth: depth, hostOffset: status.hostOffset,
                                        file: status.file)
            case .zero: return ChainBlockStatus(kind: .zero, length: run, depth: depth, hostOffset: nil)
            case .unallocated:
                limit = run
                node = current.backing
                depth += 1
            }
        }
        return ChainBlockStatus(kind: .hole, length: limit, depth: depth, hostOffset: nil)
    }

    /// Closes this node and, if it owns them, the nodes below it.
    public func close() async throws {
        await drain()
        try await driver.close()
        guard ownsChildren else { return }
        // The descriptor lives as long as any reference to the file, but the image is free for others now.
        if let file = children.file { ImageLock.unlock(file) }
        for (_, child) in children.nodes { try await child.close() }
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

    // MARK: Helpers

    /// Runs `body` as a tracked request; serialising ones cover whole allocation units.
    private func tracked(_ offset: Int64, _ length: Int64, _ kind: TrackedRequestKind, _ flags: BlockRequestFlags,
                         _ body: () async throws -> Void) async throws {
        let serialising = flags.contains(.serialising) || flags.contains(.copyOnRead)
        try await requests.withTracked(offset: offset, length: length, kind: kind, serialising: serialising,
                                       alignment: Int64(max(1, limits.granularity))) { _ in
            try await body()
        }
    }

    private func checkWritable() throws {
        if isReadOnly { throw BlockError.readOnly }
    }

    private func checkRange(_ offset: Int64, _ count: Int64) throws {
        let size = length
        if offset < 0 || count < 0 || offset > size || count > size - offset {
            throw BlockError.outOfRange(offset: offset, length: count, size: size)
        }
    }
}
