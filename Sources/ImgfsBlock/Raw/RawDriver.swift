#if canImport(Glibc)
import Glibc
#endif
import Synchronization

/// The raw format: guest offset = host offset; holes in the host file read as zeros.
public final class RawDriver: BlockDriver {
    public let format = ImageFormat.raw
    private let file: HostFile
    private let size: Atomic<Int64>
    /// Whether the format was probed: then no write may make the first sector probe as another format, or a
    /// guest could turn its disk into a qcow2 whose backing file is any file on the host (as QEMU refuses too).
    private let guardsProbe: Bool
    /// Serialises writes to the first sector, so two that are harmless alone cannot combine into a header.
    private let firstSectorLock = PthreadLock()
    static let probeBytes = 512

    public init(file: HostFile, guardsProbe: Bool = false) throws {
        self.file = file
        self.guardsProbe = guardsProbe
        self.size = Atomic(try file.size())
    }

    public var length: Int64 { size.load(ordering: .relaxed) }
    /// Follows the host file, which the node reopens to switch modes.
    public var isReadOnly: Bool { file.isReadOnly }
    /// A write is one host write: nothing to allocate, no metadata, no lock.
    public var writesInPlace: Bool { true }
    public func reopen(readOnly: Bool) async throws {}

    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        let n = try await file.read(into: buffer, at: offset)
        if n < buffer.count {
            // The host file shrank under us: what is gone reads as zeros, as a hole would.
            UnsafeMutableRawBufferPointer(rebasing: buffer[n...]).initializeMemory(as: UInt8.self, repeating: 0)
        }
    }

    public func readIfCached(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) -> Bool {
        guard let n = file.readIfCached(into: buffer, at: offset) else { return false }
        if n < buffer.count {
            UnsafeMutableRawBufferPointer(rebasing: buffer[n...]).initializeMemory(as: UInt8.self, repeating: 0)
        }
        return true
    }

    public func directRead(at offset: Int64, length: Int) -> DirectRead? { DirectRead(file: file, hostOffset: offset) }

    public var wholeDiskFile: HostFile? { file }

    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: BlockRequestFlags) async throws {
        if guardsProbe && offset < Int64(Self.probeBytes) { return try await writeFirstSector(at: offset, from: buffer) }
        try await file.write(buffer, at: offset)
    }

    /// Writes a request that touches the first sector once the sector it leaves behind still probes as raw.
    private func writeFirstSector(at offset: Int64, from buffer: UnsafeRawBufferPointer) async throws {
        let file = self.file
        let lock = firstSectorLock
        let data = UncheckedSendable(buffer)
        try await file.executor.perform {
            try lock.withLock {
                let sector = UnsafeMutableRawBufferPointer.allocate(byteCount: Self.probeBytes, alignment: 16)
                defer { sector.deallocate() }
                sector.initializeMemory(as: UInt8.self, repeating: 0)
                _ = try file.preadSome(sector, at: 0)
                let start = Int(offset)
                let count = min(data.value.count, Self.probeBytes - start)
                UnsafeMutableRawBufferPointer(rebasing: sector[start..<(start + count)])
                    .copyMemory(from: UnsafeRawBufferPointer(rebasing: data.value[..<count]))
                let becomes = ImageFormat.probe(header: UnsafeRawBufferPointer(sector))
                guard becomes == .raw else {
                    throw BlockError.notPermitted("\(file.path): refused a write that would make this probed raw " +
                                                  "image look like \(becomes.rawValue) (mount with --format raw to allow it)")
                }
                try file.pwriteAll(data.value, at: offset)
            }
        }
    }

    public func writeZeroes(at offset: Int64, length: Int64, flags: BlockRequestFlags) async throws {
        let keep = FallocateMode.keepSize
        if flags.contains(.mayUnmap),
           try await file.fallocate(mode: FallocateMode.punchHole | keep, offset: offset, length: length) {
            return
        }
        if try await file.fallocate(mode: FallocateMode.zeroRange | keep, offset: offset, length: length) { return }
        if flags.contains(.noFallback) {
            throw BlockError.unsupported("\(file.path): the file system cannot zero a range without writing zeros")
        }
        try await Self.writeZeroBytes(file, offset: offset, length: length)
    }

    public func discard(at offset: Int64, length: Int64) async throws {
        // Discard is advisory; a file system without hole punching simply keeps the data.
        _ = try await file.fallocate(mode: FallocateMode.punchHole | FallocateMode.keepSize, offset: offset,
                                     length: length)
    }

    public func flush() async throws {
        try await file.flush()
    }

    public func blockStatus(at offset: Int64, length: Int64) async throws -> BlockStatus {
        let file = self.file
        return try await file.executor.perform {
            // SEEK_DATA from inside data returns the offset itself; from inside a hole, where data starts.
            let data = try file.seek(LinuxSeek.data, from: offset)
            if data == offset {
                let hole = try file.seek(LinuxSeek.hole, from: offset) ?? (offset + length)
                return BlockStatus(kind: .data, length: max(1, min(length, hole - offset)), hostOffset: offset)
            }
            let end = data ?? (offset + length)
            return BlockStatus(kind: .zero, length: max(1, min(length, end - offset)))
        }
    }

    public func truncate(to newLength: Int64) async throws {
        let file = self.file
        try await file.executor.perform { try file.setSize(newLength) }
        size.store(newLength, ordering: .relaxed)
    }

    public func close() async throws {
        if !isReadOnly { try await flush() }
    }

    public func formatInfo() -> [String: InfoValue] { [:] }

    static func writeZeroBytes(_ file: HostFile, offset: Int64, length: Int64) async throws {
        try await ZeroChunks.write(at: offset, length: length) { try await file.write($1, at: $0) }
    }
}
