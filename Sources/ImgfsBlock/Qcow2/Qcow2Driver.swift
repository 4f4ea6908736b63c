import Synchronization

/// The qcow2 format driver (versions 2 and 3): reads, writes, block status and internal snapshots.
public final class Qcow2Driver: BlockDriver {
    public let format = ImageFormat.qcow2
    private let size: Atomic<Int64>
    public var length: Int64 { size.load(ordering: .acquiring) }
    public let isReadOnly: Bool
    public let backingReference: BackingReference?

    let file: HostFile
    let header: Qcow2Header
    let layout: Qcow2Layout
    let compression: Qcow2CompressionType
    let clusterMap: Qcow2ClusterMap
    let compressedReader: Qcow2CompressedReader
    let snapshotEntries: [Qcow2Snapshot]
    /// What writes change, and the order it reaches the disk in; nil when read-only.
    let metadata: Qcow2Metadata?
    /// The image has persistent dirty bitmaps (which keep it from being resized).
    let hasBitmaps: Bool
    /// The enabled bitmaps a read-write open keeps up to date.
    let bitmaps: Qcow2Bitmaps?
    /// The host file system refused fallocate ZERO_RANGE once; new clusters get their zeros written from then on.
    private let zeroRangeRefused = Atomic<Bool>(false)
    var zeroRangeWorks: Bool { !zeroRangeRefused.load(ordering: .relaxed) }
    func markZeroRangeUnsupported() { zeroRangeRefused.store(true, ordering: .relaxed) }
    public let openWarnings: [String]
    /// The node's children, given at attach: the backing chain is read through them, never a copy.
    private let children = Locked<BlockChildren?>(nil)
    /// Bytes of snapshot L1 tables the open snapshot views of this image hold (bounded by `Qcow2Limits`).
    private let snapshotL1Bytes = Locked(0)
    /// For a snapshot view: the image whose L1 budget its table counts against until it is closed.
    private let parent: Qcow2Driver?
    private let closed = Locked(false)
    private let metadataCacheBytes: Int?
    /// The mount's memory budget, which caches and snapshot tables are paid from.
    private let budget: MemoryBudget

    private init(file: HostFile, header: Qcow2Header, layout: Qcow2Layout, compression: Qcow2CompressionType,
                 length: Int64, l1: [UInt64], readOnly: Bool, backingReference: BackingReference?,
                 snapshots: [Qcow2Snapshot], warnings: [String] = [], metadataCacheBytes: Int?,
                 budget: MemoryBudget, cachesOf parent: Qcow2Driver? = nil,
                 writable: (refcounts: Qcow2Refcounts, l1Offset: Int64)? = nil, hasBitmaps: Bool = false,
                 bitmaps: Qcow2Bitmaps? = nil) {
        self.file = file
        self.header = header
        self.layout = layout
        self.compression = compression
        self.size = Atomic(length)
        self.hasBitmaps = hasBitmaps
        self.bitmaps = bitmaps
        self.isReadOnly = readOnly
        self.backingReference = backingReference
        self.snapshotEntries = snapshots
        self.openWarnings = warnings
        self.parent = parent
        self.metadataCacheBytes = metadataCacheBytes
        self.budget = budget
        // Snapshot views share the image's caches: an L2 table or compressed cluster is the same whichever L1
        // reaches it, snapshots often share them, and the image's memory stays bounded however many views exist.
        let cache = parent?.clusterMap.cache ?? Qcow2L2Cache(
            capacity: Qcow2L2Cache.defaultCapacity(layout: layout, virtualSize: length, requestedBytes: metadataCacheBytes),
            tableBytes: layout.clusterSize, budget: budget)
        let l1Table = Qcow2L1Table(l1)
        clusterMap = Qcow2ClusterMap(layout: layout, l1: l1Table, file: file, cache: cache)
        metadata = writable.map {
            Qcow2Metadata(file: file, layout: layout, l1: l1Table, l1Offset: $0.l1Offset, l2Cache: cache,
                          refcounts: $0.refcounts)
        }
        compressedReader = parent?.compressedReader ?? Qcow2CompressedReader(
            file: file, compression: compression, clusterSize: layout.clusterSize, fileSize: layout.fileSize,
            budget: budget)
    }

    /// Opens and validates a qcow2 image; on a read-write open, clears the autoclear feature bits we do not keep.
    public static func open(_ context: DriverOpenContext) async throws -> Qcow2Driver {
        let file = context.file
        let path = file.path
        func invalid(_ reason: String) -> BlockError { .invalidImage(path: path, reason: reason) }
        let fileSize = try file.size()
        let firstBytes = try await file.readBytes(count: Int(min(fileSize, 112)), at: 0)
        let header: Qcow2Header
        do {
            header = try Qcow2Header(parsing: BigEndianBytes(firstBytes))
        } catch {
            throw invalid(error.reason)
        }
        if !context.readOnly && header.version == 3
            && header.incompatibleFeatures & Qcow2IncompatibleFeature.dirty.mask != 0 {
            // Left dirty by a writer with lazy refcounts that did not close it: as QEMU does, the refcounts are
            // rebuilt (and the bit cleared) before anything is written, then the image is opened afresh.
            _ = try await Qcow2RefcountRebuild.rebuildIfDirty(file: file)
            return try await open(context)
        }
        // Header, extensions and backing file name all live in the first cluster.
        let headerCluster = BigEndianBytes(
            try await file.readBytes(count: Int(min(fileSize, Int64(header.clusterSize))), at: 0))
        let extensions: Qcow2HeaderExtensions
        let validated: Qcow2ValidatedHeader
        do {
            if header.version == 3 && Int(header.headerLength) > headerCluster.count {
                throw Qcow2HeaderError("header_length \(header.headerLength) passes the end of the file")
            }
            let extensionsEnd = header.backingFileOffset != 0 && header.backingFileOffset < UInt64(header.clusterSize)
                ? Int(header.backingFileOffset) : header.clusterSize
            extensions = header.version == 3
                ? try Qcow2HeaderExtensions(parsing: headerCluster, start: Int(header.headerLength), end: extensionsEnd)
                : try Qcow2HeaderExtensions(parsing: headerCluster, start: Qcow2Header.version2Length, end: extensionsEnd)
            validated = try header.validate(fileSize: fileSize, readOnly: context.readOnly,
                                            featureNames: extensions.featureNames)
        } catch let error as Qcow2HeaderError {
            throw invalid(error.reason)
        }

        var backingReference: BackingReference?
        if header.backingFileOffset != 0 && header.backingFileSize > 0 {
            guard let nameBytes = headerCluster.slice(Int(header.backingFileOffset), count: Int(header.backingFileSize)),
                  let name = String(validating: nameBytes, as: UTF8.self) else {
                throw invalid("backing file name is not valid UTF-8")
            }
            var backingFormat: ImageFormat?
            if let formatName = extensions.backingFormat {
                guard let known = ImageFormat(rawValue: formatName) else {
                    throw BlockError.unsupported("\(path): backing file format '\(formatName)'")
                }
                backingFormat = known
            }
            backingReference = BackingReference(name: name, format: backingFormat)
        }

        let layout = Qcow2Layout(header: header, fileSize: fileSize)
        let l1 = try await Qcow2ClusterMap.loadL1(file: file, offset: validated.l1Offset, entries: Int(header.l1Size))
        let snapshotTable = try await Qcow2Snapshot.readTable(file: file, offset: validated.snapshotsOffset,
                                                              count: Int(header.snapshotCount), header: header,
                                                              fileSize: fileSize)
        var effectiveHeader = header
        var writable: (refcounts: Qcow2Refcounts, l1Offset: Int64)?
        var bitmaps: Qcow2Bitmaps?
        if !context.readOnly {
            // Bit 0 says the bitmaps are in sync with the disk, and we keep them so; other autoclear bits promise
            // data we do not keep, so as QEMU does for bits it does not know, they are cleared before any write.
            var kept = header.autoclearFeatures & Qcow2AutoclearFeature.bitmaps
            if kept != 0, let data = extensions.bitmapsData {
                bitmaps = try await Qcow2Bitmaps.open(file: file, layout: layout, extensionData: data,
                                                      diskSize: validated.virtualSize)
            } else {
                kept = 0
            }
            if header.version == 3 && header.autoclearFeatures != kept {
                try await file.writeBytes(BigEndianWriter().u64(kept).bytes, at: Qcow2Header.autoclearFeaturesOffset)
                try await file.flush()
            }
            effectiveHeader.autoclearFeatures = kept
            writable = (try await Qcow2Refcounts.load(file: file, header: header, layout: layout), validated.l1Offset)
        }
        if let metadata = writable.map({ $0.refcounts.metadataClusters }) {
            metadata.insert(validated.snapshotsOffset, bytes: snapshotTable.byteCount)
            for snapshot in snapshotTable.entries {
                metadata.insert(snapshot.l1TableOffset, bytes: Int64(snapshot.l1Size) * 8)
            }
            bitmaps?.recordMetadata(in: metadata)
        }
        return Qcow2Driver(file: file, header: effectiveHeader, layout: layout, compression: validated.compression,
                           length: validated.virtualSize, l1: l1, readOnly: context.readOnly,
                           backingReference: backingReference, snapshots: snapshotTable.entries,
                           warnings: snapshotTable.warnings,
                           metadataCacheBytes: context.options.metadataCacheBytes, budget: context.options.memoryBudget,
                           writable: writable, hasBitmaps: extensions.hasBitmaps, bitmaps: bitmaps)
    }

    public func attach(_ children: BlockChildren) {
        self.children.withLock { $0 = children }
    }

    var backingNode: BlockNode? { children.withLock { $0 }?.backing }

    public var limits: BlockLimits {
        BlockLimits(granularity: layout.clusterSize, optimalTransfer: max(layout.clusterSize, 1 << 20))
    }

    // MARK: Reads

    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        // Registered before the lookups: a cluster this read finds is not freed until the read is done.
        let reader = metadata?.readers.enter()
        defer { if let reader { metadata?.readers.leave(reader) } }
        let backing = backingNode
        var compressed: [CompressedPiece] = []
        var done = 0
        while done < buffer.count {
            let position = offset + Int64(done)
            let run = try await clusterMap.run(at: position, maxLength: Int64(buffer.count - done))
            let count = Int(min(run.length, Int64(buffer.count - done)))
            let target = UnsafeMutableRawBufferPointer(rebasing: buffer[done..<(done + count)])
            switch run.state {
            case .data(let host):
                try await file.readExactly(into: target, at: host)
            case .zero:
                target.initializeMemory(as: UInt8.self, repeating: 0)
            case .unallocated:
                if let backing {
                    try await backing.readZeroPadded(at: position, into: target)
                } else {
                    target.initializeMemory(as: UInt8.self, repeating: 0)
                }
            case .compressed(let descriptor):
                compressed.append(CompressedPiece(descriptor: descriptor, start: Int(position & layout.clusterOffsetMask),
                                                  target: UncheckedSendable(target)))
            }
            done += count
        }
        try await inflate(compressed)
    }

    /// Serves the range only where the L2 tables are cached and every run is plain data already in the page cache,
    /// zeros, or unallocated with no backing file; compressed clusters and backing reads are `read`'s.
    public func readIfCached(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) -> Bool {
        // Plain data can be freed under a read too: a write drops a reference to a cluster it finds without the
        // COPIED flag, and on a damaged image that may be the last one.
        let reader = metadata?.readers.enter()
        defer { if let reader { metadata?.readers.leave(reader) } }
        var backingChecked = false
        var done = 0
        while done < buffer.count {
            let position = offset + Int64(done)
            guard let run = clusterMap.cachedRun(at: position, maxLength: Int64(buffer.count - done)) else {
                return false
            }
            let count = Int(min(run.length, Int64(buffer.count - done)))
            let target = UnsafeMutableRawBufferPointer(rebasing: buffer[done..<(done + count)])
            switch run.state {
            case .data(let host):
                // Short means past the end of the file: corrupt, which `read` reports.
                guard file.readIfCached(into: target, at: host) == count else { return false }
            case .zero:
                target.initializeMemory(as: UInt8.self, repeating: 0)
            case .unallocated:
                if !backingChecked {
                    guard backingNode == nil else { return false }
                    backingChecked = true
                }
                target.initializeMemory(as: UInt8.self, repeating: 0)
            case .compressed:
                return false
            }
            done += count
        }
        return true
    }

    public func directRead(at offset: Int64, length: Int) -> DirectRead? {
        // Registered before the lookup, and left only when the read is done, as `read` does.
        let metadata = self.metadata
        let reader = metadata?.readers.enter()
        guard let run = clusterMap.cachedRun(at: offset, maxLength: Int64(length)), run.length >= Int64(length),
              case .data(let host) = run.state else {
            if let reader { metadata?.readers.leave(reader) }
            return nil
        }
        return DirectRead(file: file, hostOffset: host, release: {
            if let reader { metadata?.readers.leave(reader) }
        })
    }

    /// A compressed cluster's share of a read: which bytes of it go where in the caller's buffer.
    private struct CompressedPiece: Sendable {
        let descriptor: Qcow2CompressedCluster
        let start: Int
        let target: UncheckedSendable<UnsafeMutableRawBufferPointer>
    }

    /// Inflates the clusters of one request; several at once when there are enough, since one request
    /// (a kernel readahead of 1 MiB, say) would otherwise keep a single core busy while the other idles.
    private func inflate(_ pieces: [CompressedPiece]) async throws {
        let reader = compressedReader
        let lanes = min(pieces.count, Self.inflateLanes)
        if lanes <= 1 {
            for piece in pieces { try await reader.read(piece.descriptor, from: piece.start, into: piece.target.value) }
            return
        }
        try await withThrowingTaskGroup(of: Void.self) { group in
            for lane in 0..<lanes {
                group.addTask {
                    for piece in stride(from: lane, to: pieces.count, by: lanes).map({ pieces[$0] }) {
                        try await reader.read(piece.descriptor, from: piece.start, into: piece.target.value)
                    }
                }
            }
            try await group.waitForAll()
        }
    }

    /// How many tasks share one request's decompression.
    private static let inflateLanes = 2

    public func blockStatus(at offset: Int64, length: Int64) async throws -> BlockStatus {
        let first = try await clusterMap.run(at: offset, maxLength: length)
        var covered = first.length
        // Runs stop at L2 table boundaries; keep merging while the state (and host contiguity) continues.
        while covered < length {
            let next = try await clusterMap.run(at: offset + covered, maxLength: length - covered)
            switch (first.state, next.state) {
            case (.zero, .zero), (.unallocated, .unallocated), (.compressed, .compressed):
                break
            case (.data(let host), .data(let nextHost)) where nextHost == host + covered:
                break
            default:
                return Self.status(first.state, length: covered)
            }
            covered += next.length
        }
        return Self.status(first.state, length: min(covered, length))
    }

    private static func status(_ state: Qcow2UnitState, length: Int64) -> BlockStatus {
        switch state {
        case .data(let host): return BlockStatus(kind: .data, length: length, hostOffset: host)
        case .compressed: return BlockStatus(kind: .data, length: length, hostOffset: nil)
        case .zero: return BlockStatus(kind: .zero, length: length)
        case .unallocated: return BlockStatus(kind: .unallocated, length: length)
        }
    }

    // MARK: Writes (Qcow2Writes, Qcow2ZeroWrites, Qcow2Resize)

    func refuseWrite() -> BlockError { .readOnly }

    func setLength(_ newLength: Int64) { size.store(newLength, ordering: .releasing) }

    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: BlockRequestFlags) async throws {
        bitmaps?.mark(offset, length: Int64(buffer.count))
        try await writeData(at: offset, from: buffer)
    }

    public func writeZeroes(at offset: Int64, length: Int64, flags: BlockRequestFlags) async throws {
        bitmaps?.mark(offset, length: length)
        try await zeroRange(at: offset, length: length, flags: flags)
    }

    public func discard(at offset: Int64, length: Int64) async throws {
        bitmaps?.mark(offset, length: length)
        try await discardRange(at: offset, length: length)
    }

    public func truncate(to length: Int64) async throws {
        try await resize(to: length)
    }

    public func flush() async throws {
        guard let metadata else { return }
        try await metadata.mutex.withLock { try await metadata.flush() }
    }

    public func reopen(readOnly: Bool) async throws {
        guard let metadata else {
            if !readOnly {
                throw BlockError.unsupported("\(file.path): opened read-only; mount it read-write to write it")
            }
            return
        }
        if readOnly { try await metadata.mutex.withLock { try await metadata.flushAll() } }
    }

    public func close() async throws {
        if let metadata {
            try await metadata.mutex.withLock {
                if let bitmaps { try await bitmaps.store(metadata: metadata) }
                try await metadata.flushAll()
                try await metadata.trimFile()
            }
        }
        // A snapshot view gives its L1 table's share of the image's budget back, once.
        let alreadyClosed = closed.withLock { closed -> Bool in
            defer { closed = true }
            return closed
        }
        guard let parent, !alreadyClosed else { return }
        parent.releaseSnapshotL1(bytes: clusterMap.l1.count * 8)
    }

    // MARK: Metadata

    public func formatInfo() -> [String: InfoValue] {
        var info: [String: InfoValue] = [
            "compat": .string(header.version == 2 ? "0.10" : "1.1"),
            "cluster-size": .int(Int64(layout.clusterSize)),
            "refcount-bits": .int(Int64(1) << Int64(header.refcountOrder)),
            "compression-type": .string(compression.name),
            "extended-l2": .bool(layout.extendedL2),
            "lazy-refcounts": .bool(header.hasLazyRefcounts),
            "corrupt": .bool(header.isMarkedCorrupt),
            "dirty-flag": .bool(header.incompatibleFeatures & Qcow2IncompatibleFeature.dirty.mask != 0),
        ]
        if let backingReference {
            info["backing-filename"] = .string(backingReference.name)
            if let format = backingReference.format {
                info["backing-filename-format"] = .string(format.rawValue)
            }
        }
        return info
    }

    public var snapshots: [SnapshotDescriptor] { snapshotEntries.map(\.descriptor) }

    public func openSnapshot(_ snapshot: SnapshotDescriptor) async throws -> BlockDriver {
        guard snapshotEntries.indices.contains(snapshot.index),
              snapshotEntries[snapshot.index].descriptor == snapshot else {
            throw BlockError.unsupported("\(file.path): no snapshot with id '\(snapshot.id)' and name '\(snapshot.name)'")
        }
        let entry = snapshotEntries[snapshot.index]
        // An L1 table shorter than the disk leaves the rest unallocated, as QEMU reads it.
        let l1Bytes = entry.l1Size * 8
        let reserved = snapshotL1Bytes.withLock { total -> Bool in
            guard total + l1Bytes <= Qcow2Limits.maxSnapshotL1Bytes else { return false }
            total += l1Bytes
            return true
        }
        guard reserved else {
            throw BlockError.overBudget("\(file.path): snapshot '\(snapshot.name)': the open snapshots' L1 tables together would exceed \(Qcow2Limits.maxSnapshotL1Bytes >> 20) MiB; close another snapshot first")
        }
        guard budget.tryReserveForCache(l1Bytes) else {
            snapshotL1Bytes.withLock { $0 -= l1Bytes }
            throw BlockError.overBudget("\(file.path): snapshot '\(snapshot.name)': its \(l1Bytes >> 10) KiB L1 table does not fit the mount's memory limit; close another snapshot first or raise --memory-limit")
        }
        do {
            let l1 = try await Qcow2ClusterMap.loadL1(file: file, offset: entry.l1TableOffset, entries: entry.l1Size)
            return Qcow2Driver(file: file, header: header, layout: layout, compression: compression,
                               length: entry.descriptor.diskSize, l1: l1, readOnly: true,
                               backingReference: backingReference, snapshots: [],
                               metadataCacheBytes: metadataCacheBytes, budget: budget, cachesOf: self)
        } catch {
            releaseSnapshotL1(bytes: l1Bytes)
            throw error
        }
    }

    private func releaseSnapshotL1(bytes: Int) {
        snapshotL1Bytes.withLock { $0 -= bytes }
        budget.release(bytes)
    }

    /// The refcounts as stored, loaded afresh (for tests and checks).
    func loadRefcounts() async throws -> Qcow2Refcounts {
        try await Qcow2Refcounts.load(file: file, header: header, layout: layout)
    }
}
