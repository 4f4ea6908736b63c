/// A format driver: turns guest offsets into I/O on its host file, as QEMU's `BlockDriver` does.
///
/// Every method may be called concurrently from many tasks. Buffers belong to the caller until the call returns.
/// Ranges are inside `length` (the node clamps them). Methods a format cannot do throw `.unsupported`.
public protocol BlockDriver: AnyObject, Sendable {
    var format: ImageFormat { get }
    /// The virtual disk size in bytes.
    var length: Int64 { get }
    var isReadOnly: Bool { get }
    /// The backing file this image names, if any; the opener resolves and opens it.
    var backingReference: BackingReference? { get }
    /// What requests the driver serves best.
    var limits: BlockLimits { get }
    /// Whether a write is a single host write with nothing to wait for (no metadata, no locks), so a caller that
    /// must not wait long (a FUSE loop thread) may still do it itself.
    var writesInPlace: Bool { get }

    /// Gives the driver its node's children, once, before any I/O; the driver keeps no copy of any link.
    func attach(_ children: BlockChildren)

    func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws
    /// Reads the range without waiting for anything (I/O, a metadata load, an async lock) and without a thread
    /// switch, when everything it needs is already in memory; returns false, leaving the buffer undefined, when
    /// `read` must do it. Errors are `read`'s to report: here they are a false.
    func readIfCached(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) -> Bool
    /// Where the whole range lies as plain data in one host file, if the driver knows at once (no I/O, no wait):
    /// the read may then go there directly. The range must stay valid until `release` of the answer.
    func directRead(at offset: Int64, length: Int) -> DirectRead?
    /// The host file whose bytes are the whole disk, offset for offset (raw), if there is one.
    var wholeDiskFile: HostFile? { get }
    /// Writes; `.fua` arrives only if the driver handles it (the node flushes after the write otherwise).
    func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: BlockRequestFlags) async throws
    /// Makes the range read as zeros; `.mayUnmap` lets the driver free the storage behind it, `.noFallback`
    /// asks for `.unsupported` rather than writing zero bytes.
    func writeZeroes(at offset: Int64, length: Int64, flags: BlockRequestFlags) async throws
    /// Tells the driver the range's content is no longer needed (advisory; it may read back as anything).
    func discard(at offset: Int64, length: Int64) async throws
    /// Makes every completed write durable.
    func flush() async throws
    /// What this layer holds at `offset`, for up to `length` bytes.
    func blockStatus(at offset: Int64, length: Int64) async throws -> BlockStatus
    func truncate(to length: Int64) async throws
    /// Flushes what must be flushed and releases the driver's resources.
    func close() async throws
    /// Switches between read-only and read-write once the node has drained and reopened its file; throws when
    /// the format cannot be written.
    func reopen(readOnly: Bool) async throws
    /// Whether the driver makes `.fua` writes durable itself.
    var handlesFUA: Bool { get }

    /// Format-specific facts for `imgfs info`, named as `qemu-img info --output=json` names them.
    func formatInfo() -> [String: InfoValue]
    /// Problems found at open that did not stop it (a snapshot left out, say), one line each, for the user.
    var openWarnings: [String] { get }
    /// The image's internal snapshots (qcow2).
    var snapshots: [SnapshotDescriptor] { get }
    /// A read-only driver showing one internal snapshot's disk.
    func openSnapshot(_ snapshot: SnapshotDescriptor) async throws -> BlockDriver
}

extension BlockDriver {
    public var backingReference: BackingReference? { nil }
    public var limits: BlockLimits { BlockLimits() }
    public var writesInPlace: Bool { false }
    public var handlesFUA: Bool { false }
    public func readIfCached(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) -> Bool { false }
    public func directRead(at offset: Int64, length: Int) -> DirectRead? { nil }
    public var wholeDiskFile: HostFile? { nil }
    public func attach(_ children: BlockChildren) {}
    public func reopen(readOnly: Bool) async throws {
        if !readOnly { throw BlockError.unsupported("\(format.rawValue) images cannot be written by imgfs yet") }
    }
    public func formatInfo() -> [String: InfoValue] { [:] }
    public var openWarnings: [String] { [] }
    public var snapshots: [SnapshotDescriptor] { [] }
    public func openSnapshot(_ snapshot: SnapshotDescriptor) async throws -> BlockDriver {
        throw BlockError.unsupported("\(format.rawValue) images have no internal snapshots")
    }
}

/// A backing file as an image names it: untrusted until the path policy accepts it.
public struct BackingReference: Sendable, Equatable {
    public var name: String
    /// The format recorded with the name (qcow2's backing-format extension); nil means probe.
    public var format: ImageFormat?
    public init(name: String, format: ImageFormat?) {
        self.name = name
        self.format = format
    }
}

/// One internal snapshot as listed by `qemu-img snapshot -l`.
public struct SnapshotDescriptor: Sendable, Equatable {
    /// Position in the driver's list of snapshots: ids and names need not be unique, this is.
    public var index: Int
    public var id: String
    public var name: String
    public var diskSize: Int64
    public var vmStateSize: Int64
    public var dateSeconds: UInt32
    public var dateNanoseconds: UInt32
    public var vmClockNanoseconds: UInt64
    public var icount: Int64?

    public init(index: Int, id: String, name: String, diskSize: Int64, vmStateSize: Int64, dateSeconds: UInt32,
                dateNanoseconds: UInt32, vmClockNanoseconds: UInt64, icount: Int64?) {
        self.index = index
        self.id = id
        self.name = name
        self.diskSize = diskSize
        self.vmStateSize = vmStateSize
        self.dateSeconds = dateSeconds
        self.dateNanoseconds = dateNanoseconds
        self.vmClockNanoseconds = vmClockNanoseconds
        self.icount = icount
    }
}

/// A JSON-shaped value for `imgfs info`.
public indirect enum InfoValue: Sendable, Equatable {
    case string(String)
    case int(Int64)
    case bool(Bool)
    case array([InfoValue])
    case object([(String, InfoValue)])

    public static func == (a: InfoValue, b: InfoValue) -> Bool {
        switch (a, b) {
        case (.string(let x), .string(let y)): return x == y
        case (.int(let x), .int(let y)): return x == y
        case (.bool(let x), .bool(let y)): return x == y
        case (.array(let x), .array(let y)): return x == y
        case (.object(let x), .object(let y)):
            return x.count == y.count && zip(x, y).allSatisfy { $0.0 == $1.0 && $0.1 == $1.1 }
        default: return false
        }
    }
}

/// A guest range found to be one contiguous run of plain data in a host file; `release` is called once the read
/// from there is done (a qcow2 driver keeps the clusters from being freed until then).
public struct DirectRead: Sendable {
    public let file: HostFile
    public let hostOffset: Int64
    public let release: (@Sendable () -> Void)?

    public init(file: HostFile, hostOffset: Int64, release: (@Sendable () -> Void)? = nil) {
        self.file = file
        self.hostOffset = hostOffset
        self.release = release
    }
}
