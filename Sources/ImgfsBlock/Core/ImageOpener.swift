/// How an image and its chain are opened.
public struct OpenOptions: Sendable {
    /// Open the top image read-only (backing images are always read-only).
    public var readOnly: Bool = false
    /// The top image's format; nil probes it (and a probed raw image is then opened read-only).
    public var format: ImageFormat?
    public var pathPolicy: PathPolicy
    /// Longest backing chain accepted, counting the top image.
    public var maxChainDepth: Int = 64
    /// Bytes of L2 tables (and similar metadata) a driver may cache per image; nil lets the driver choose.
    public var metadataCacheBytes: Int?

    public init(readOnly: Bool = false, format: ImageFormat? = nil, pathPolicy: PathPolicy,
                maxChainDepth: Int = 64, metadataCacheBytes: Int? = nil) {
        self.readOnly = readOnly
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

    public init(file: HostFile, readOnly: Bool, options: OpenOptions) {
        self.file = file
        self.readOnly = readOnly
        self.options = options
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

    private static func openLayer(path: String, format: ImageFormat?, readOnly: Bool, depth: Int,
                                  visited: inout [HostFile.Identity: String], options: OpenOptions) async throws -> BlockNode {
        guard depth <= options.maxChainDepth else {
            throw BlockError.chain("\(path): backing chain deeper than \(options.maxChainDepth) images")
        }
        var readOnly = readOnly || !(format?.isWritableByImgfs ?? true)
        // Probing only reads, and a format imgfs cannot write needs no write access (the file may be 0444): open
        // for reading, and reopen for writing once the format is known to allow it.
        var file = try HostFile.open(path, readOnly: readOnly || format == nil)
        let identity = try file.identity()
        if let earlier = visited[identity] {
            throw BlockError.chain("backing chain loop: \(path) is the same file as \(earlier), which it backs")
        }
        visited[identity] = path
        let chosen: ImageFormat
        if let format {
            chosen = format
        } else {
            chosen = try await probe(file)
            // A probed raw image is never written: a guest could write a header into it that the next probe
            // would obey.
            if chosen == .raw { readOnly = true }
        }
        if !chosen.isWritableByImgfs { readOnly = true }
        if !readOnly && file.isReadOnly {
            file = try HostFile.open(path, readOnly: false)
            guard try file.identity() == identity else {
                throw BlockError.chain("\(path) was replaced while it was being opened")
            }
        }
        let context = DriverOpenContext(file: file, readOnly: readOnly, options: options)
        let driver = try await DriverRegistry.open(chosen, context)
        var backing: BlockNode?
        if let reference = driver.backingReference {
            let resolved = try options.pathPolicy.resolve(reference.name, referencedBy: path)
            backing = try await openLayer(path: resolved, format: reference.format, readOnly: true, depth: depth + 1,
                                          visited: &visited, options: options)
        }
        return BlockNode(path: path, driver: driver, file: file, backing: backing, readOnly: readOnly)
    }
}

/// The format drivers by format.
public enum DriverRegistry {
    public static func open(_ format: ImageFormat, _ context: DriverOpenContext) async throws -> BlockDriver {
        switch format {
        case .raw: return try RawDriver(file: context.file, readOnly: context.readOnly)
        case .qcow2: return try await Qcow2Driver.open(context)
        case .vmdk: throw BlockError.unsupported("\(context.file.path): the VMDK driver is not built yet")
        }
    }
}
