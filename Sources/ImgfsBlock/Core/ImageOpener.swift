/// How an image and its chain are opened.
public struct OpenOptions: Sendable {
    /// Open the top image read-only (backing images are always read-only).
    public var readOnly: Bool = false
    /// The top image's format; nil probes it (and a probed raw image then refuses writes that would make it
    /// probe as another format).
    public var format: ImageFormat?
    /// How the images are locked against other processes (QEMU's image locking).
    public var locking: LockingPolicy = .exclusiveWriter
    /// What every image of the mount holds in caches and tables is paid from this.
    public var memoryBudget: MemoryBudget = .unlimited
    public var pathPolicy: PathPolicy
    /// Longest backing chain accepted, counting the top image.
    public var maxChainDepth: Int = 64
    /// Bytes of L2 tables (and similar metadata) a driver may cache per image; nil lets the driver choose.
    public var metadataCacheBytes: Int?

    /// Whether images are locked as QEMU locks them, or left unlocked for a short look.
    public enum LockingPolicy: Sendable {
        /// A writer keeps every other writer and consistent reader out; readers keep writers out.
        case exclusiveWriter
        /// Readers keep nobody out (QEMU's force-share); only for read-only opens.
        case forceShare
        /// No locks at all (`imgfs info`).
        case none
    }

    public init(readOnly: Bool = false, format: ImageFormat? = nil, pathPolicy: PathPolicy,
                maxChainDepth: Int = 64, metadataCacheBytes: Int? = nil, locking: LockingPolicy = .exclusiveWriter) {
        self.readOnly = readOnly
        self.locking = locking
        self.format = format
        self.pathPolicy = pathPolicy
        self.maxChainDepth = maxChainDepth
        self.metadataCacheBytes = metadataCacheBytes
    }
}

/// What a format driver's opener receives.
public struct DriverOpenContext: Sendable {
    public let file: HostFile
    public let readOnly: Bool
    public let options: OpenOptions
    /// The format was probed, not named: a raw driver must then keep writes from changing what it probes as.
    public let probed: Bool

    public init(file: HostFile, readOnly: Bool, options: OpenOptions, probed: Bool = false) {
        self.file = file
        self.readOnly = readOnly
        self.options = options
        self.probed = probed
    }
}

/// Opens images and their backing chains, applying the untrusted-input rules in one place.
public enum ImageOpener {
    /// Opens `path` and every backing file it names.
    public static func open(_ path: String, options: OpenOptions) async throws -> BlockNode {
        var visited: [HostFile.Identity: String] = [:]
        return try await openLayer(path: path, format: options.format, readOnly: options.readOnly, depth: 1,
                                   visited: &visited, options: options)
    }

    /// Reads the first bytes of `file` and names its format.
    public static func probe(_ file: HostFile) async throws -> ImageFormat {
        let header = UnsafeMutableRawBufferPointer.allocate(byteCount: 512, alignment: 16)
        defer { header.deallocate() }
        let n = try await file.read(into: header, at: 0)
        return ImageFormat.probe(header: UnsafeRawBufferPointer(rebasing: header[..<n]))
    }

    /// `opened` is a backing file `ChildOpener` has already opened (and recorded in `visited`).
    private static func openLayer(path: String, opened: HostFile? = nil, format: ImageFormat?, readOnly: Bool, depth: Int,
                                  visited: inout [HostFile.Identity: String], options: OpenOptions) async throws -> BlockNode {
        guard depth <= options.maxChainDepth else {
            throw BlockError.chain("\(path): backing chain deeper than \(options.maxChainDepth) images")
        }
        var readOnly = readOnly || !(format?.isWritableByImgfs ?? true)
        // Probing only reads, and a format imgfs cannot write needs no write access (the file may be 0444): open
        // for reading, and reopen for writing once the format is known to allow it.
        var file: HostFile
        if let opened {
            file = opened
        } else {
            file = try HostFile.open(path, readOnly: readOnly || format == nil)
            try ChildOpener.recordVisit(file, as: path, in: &visited)
        }
        let identity = try file.identity()
        var warnings: [String] = []
        let chosen: ImageFormat
        if let format {
            chosen = format
        } else {
            chosen = try await probe(file)
            try checkNameAgrees(path, probed: chosen)
            if chosen == .raw && !readOnly {
                warnings.append("\(path): no format given, probed as raw; writes that would make it look like " +
                                "another format are refused (pass --format raw to allow them)")
            }
        }
        if !chosen.isWritableByImgfs { readOnly = true }
        if !readOnly && file.isReadOnly {
            file = try HostFile.open(path, readOnly: false)
            guard try file.identity() == identity else {
                throw BlockError.chain("\(path) was replaced while it was being opened")
            }
        }
        try ImageLock.lock(file, mode: lockMode(readOnly: readOnly, options: options))
        let context = DriverOpenContext(file: file, readOnly: readOnly, options: options, probed: format == nil)
        let driver = try await DriverRegistry.open(chosen, context)
        var backing: BlockNode?
        if let reference = driver.backingReference {
            let child = try ChildOpener.openChild(named: reference.name, referencedBy: file, readOnly: true,
                                                  policy: options.pathPolicy, visited: &visited)
            backing = try await openLayer(path: child.path, opened: child.file, format: reference.format, readOnly: true,
                                          depth: depth + 1, visited: &visited, options: options)
        }
        return BlockNode(path: path, driver: driver, file: file, backing: backing, readOnly: readOnly,
                         warnings: warnings)
    }

    private static func lockMode(readOnly: Bool, options: OpenOptions) -> ImageLock.Mode {
        switch options.locking {
        case .none: return .none
        case .forceShare where readOnly: return .forceShare
        case .exclusiveWriter, .forceShare: return readOnly ? .readOnly : .readWrite
        }
    }

    /// A file named like a format it is not is refused rather than shown as raw garbage (a truncated download, a
    /// file of the wrong kind); naming the format overrides this.
    private static func checkNameAgrees(_ path: String, probed: ImageFormat) throws {
        guard let dot = path.lastIndex(of: "."), !path[dot...].contains("/") else { return }
        let suffix = path[path.index(after: dot)...].lowercased()
        guard let named = ImageFormat(rawValue: suffix), named != .raw, named != probed else { return }
        throw BlockError.invalidImage(path: path, reason: "named .\(suffix) but its content is not \(named.rawValue) " +
                                      "(it probes as \(probed.rawValue)); pass --format \(probed.rawValue) to use it as that")
    }
}

/// The format drivers by format.
public enum DriverRegistry {
    public static func open(_ format: ImageFormat, _ context: DriverOpenContext) async throws -> BlockDriver {
        switch format {
        case .raw: return try RawDriver(file: context.file, guardsProbe: context.probed)
        case .qcow2: return try await Qcow2Driver.open(context)
        case .vmdk: throw BlockError.unsupported("\(context.file.path): the VMDK driver is not built yet")
        }
    }
}
