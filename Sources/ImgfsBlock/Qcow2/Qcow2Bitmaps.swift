/// One entry of the bitmap directory, as stored, with its position in the directory.
struct Qcow2BitmapDirectoryEntry: Sendable {
    static let inUse: UInt32 = 1
    static let auto: UInt32 = 2
    static let dirtyTrackingType: UInt8 = 1

    /// Byte offset of the entry in the directory (its flags are at +12).
    let position: Int
    let tableOffset: UInt64
    let tableEntries: UInt32
    let flags: UInt32
    let type: UInt8
    let granularityBits: UInt8
    let extraDataSize: UInt32
    let name: String

    /// Parses every entry of a directory; nil when one passes its end.
    static func parse(_ directory: BigEndianBytes, count: UInt32) -> [Qcow2BitmapDirectoryEntry]? {
        var entries: [Qcow2BitmapDirectoryEntry] = []
        var position = 0
        for _ in 0..<count {
            guard let tableOffset = directory.u64(position), let tableEntries = directory.u32(position + 8),
                  let flags = directory.u32(position + 12), let type = directory.u8(position + 16),
                  let granularity = directory.u8(position + 17), let nameSize = directory.u16(position + 18),
                  let extraSize = directory.u32(position + 20), extraSize <= 1 << 20,
                  let nameBytes = directory.slice(position + 24 + Int(extraSize), count: Int(nameSize)) else { return nil }
            entries.append(Qcow2BitmapDirectoryEntry(
                position: position, tableOffset: tableOffset, tableEntries: tableEntries, flags: flags, type: type,
                granularityBits: granularity, extraDataSize: extraSize, name: String(decoding: nameBytes, as: UTF8.self)))
            position += (24 + Int(extraSize) + Int(nameSize) + 7) & ~7
        }
        return entries
    }

    /// Whether a writer must keep this bitmap up to date: enabled (auto), consistent (not in use), a dirty
    /// tracking bitmap whose fields QEMU also accepts, and no extra data we would not understand.
    var isTracked: Bool {
        flags & Self.auto != 0 && flags & Self.inUse == 0 && flags & ~UInt32(7) == 0 && type == Self.dirtyTrackingType
            && (9...31).contains(granularityBits) && extraDataSize == 0
    }
}

/// The persistent dirty bitmaps of a writable image, kept as QEMU keeps them: the enabled ones are marked in use
/// on disk at open, record every range written while mounted, and are stored back (then marked consistent) at a
/// clean close. A crash leaves them marked in use, which tells QEMU they can no longer be trusted.
final class Qcow2Bitmaps: Sendable {
    /// One enabled bitmap in memory.
    final class Tracked: Sendable {
        let entry: Qcow2BitmapDirectoryEntry
        let tableOffset: Int64
        let table: [UInt64]
        let bits: Locked<[UInt8]>

        init(entry: Qcow2BitmapDirectoryEntry, tableOffset: Int64, table: [UInt64], bits: [UInt8]) {
            self.entry = entry
            self.tableOffset = tableOffset
            self.table = table
            self.bits = Locked(bits)
        }
    }

    let tracked: [Tracked]
    let directoryOffset: Int64
    let directoryBytes: Int64

    /// Bitmap bytes held in memory at most, over all bitmaps of an image.
    static let maxBitmapBytes = 64 << 20
    static let maxDirectoryBytes: UInt64 = 64 << 20

    private init(tracked: [Tracked], directoryOffset: Int64, directoryBytes: Int64) {
        self.tracked = tracked
        self.directoryOffset = directoryOffset
        self.directoryBytes = directoryBytes
    }

    /// Loads the enabled bitmaps named by the bitmaps extension's payload and marks them in use on disk (durably,
    /// before any write). Throws when the extension or a tracked bitmap is malformed: the image then cannot be
    /// written without breaking the bitmaps, so it is refused read-write.
    static func open(file: HostFile, layout: Qcow2Layout, extensionData: [UInt8], diskSize: Int64) async throws
        -> Qcow2Bitmaps
    {
        func invalid(_ reason: String) -> BlockError {
            .invalidImage(path: file.path, reason: "\(reason); it can only be opened read-only (mount with --read-only)")
        }
        let data = BigEndianBytes(extensionData)
        guard let count = data.u32(0), let directoryBytes = data.u64(8), let directoryOffset = data.u64(16),
              directoryBytes <= maxDirectoryBytes, directoryOffset % UInt64(layout.clusterSize) == 0,
              let offset = Qcow2Table.checkedOffset(directoryOffset, bytes: directoryBytes, fileSize: layout.fileSize)
        else { throw invalid("the bitmaps extension is malformed") }
        let directory = BigEndianBytes(try await file.readBytes(count: Int(directoryBytes), at: offset))
        guard let entries = Qcow2BitmapDirectoryEntry.parse(directory, count: count) else {
            throw invalid("the bitmap directory is malformed")
        }
        var tracked: [Tracked] = []
        var totalBytes = 0
        for entry in entries where entry.isTracked {
            let granularity = Int64(1) << Int64(entry.granularityBits)
            let bitCount = (diskSize + granularity - 1) / granularity
            let byteCount = Int((bitCount + 7) / 8)
            let clusters = (byteCount + layout.clusterSize - 1) / layout.clusterSize
            totalBytes += byteCount
            guard totalBytes <= maxBitmapBytes else {
                throw invalid("its enabled bitmaps need more than \(maxBitmapBytes >> 20) MiB of memory")
            }
            guard Int(entry.tableEntries) == clusters, entry.tableOffset % UInt64(layout.clusterSize) == 0,
                  let tableOffset = Qcow2Table.checkedOffset(entry.tableOffset, bytes: UInt64(clusters) * 8,
                                                             fileSize: layout.fileSize) else {
                throw invalid("bitmap '\(entry.name)' has an invalid bitmap table")
            }
            let table = try await Qcow2ClusterMap.loadL1(file: file, offset: tableOffset, entries: clusters)
            var bits = [UInt8](repeating: 0, count: byteCount)
            for (index, word) in table.enumerated() {
                let start = index * layout.clusterSize
                let length = min(layout.clusterSize, byteCount - start)
                let host = word & Qcow2L2Entry.offsetMask
                guard word & ~(Qcow2L2Entry.offsetMask | 1) == 0, host == 0 || word & 1 == 0,
                      host == 0 || Int64(host) <= layout.fileSize - Int64(layout.clusterSize) else {
                    throw invalid("bitmap '\(entry.name)' has an invalid table entry \(index)")
                }
                if host != 0 {
                    let chunk = try await file.readBytes(count: length, at: Int64(host))
                    bits.replaceSubrange(start..<(start + length), with: chunk)
                } else if word & 1 != 0 {
                    bits.replaceSubrange(start..<(start + length), with: repeatElement(0xFF, count: length))
                }
            }
            tracked.append(Tracked(entry: entry, tableOffset: tableOffset, table: table, bits: bits))
        }
        let bitmaps = Qcow2Bitmaps(tracked: tracked, directoryOffset: offset, directoryBytes: Int64(directoryBytes))
        try await bitmaps.setInUse(true, file: file)
        try await file.flush()
        return bitmaps
    }

    /// The directory, tables and data clusters of the bitmaps we keep, for the overlap check.
    func recordMetadata(in clusters: Qcow2MetadataClusters) {
        clusters.insert(directoryOffset, bytes: directoryBytes)
        for bitmap in tracked {
            clusters.insert(bitmap.tableOffset, bytes: Int64(bitmap.table.count) * 8)
            for word in bitmap.table where word & Qcow2L2Entry.offsetMask != 0 {
                clusters.insert(Int64(word & Qcow2L2Entry.offsetMask), bytes: 1)
            }
        }
    }

    private func setInUse(_ inUse: Bool, file: HostFile) async throws {
        for bitmap in tracked {
            let flags = inUse ? bitmap.entry.flags | Qcow2BitmapDirectoryEntry.inUse : bitmap.entry.flags
            try await file.writeBytes(BigEndianWriter().u32(flags).bytes,
                                      at: directoryOffset + Int64(bitmap.entry.position) + 12)
        }
    }

    /// Records that the guest range was written.
    func mark(_ offset: Int64, length: Int64) {
        guard length > 0 else { return }
        for bitmap in tracked {
            let shift = Int64(bitmap.entry.granularityBits)
            let first = offset >> shift
            let last = (offset + length - 1) >> shift
            bitmap.bits.withLock { bits in
                for bit in first...last where Int(bit / 8) < bits.count {
                    bits[Int(bit / 8)] |= 1 << UInt8(bit % 8)
                }
            }
        }
    }

    /// Writes every bitmap back and marks it consistent: data clusters (new ones allocated, unchanged layout
    /// otherwise), their refcounts and the tables made durable first, the in-use flag cleared last.
    func store(metadata: Qcow2Metadata) async throws {
        let layout = metadata.layout
        let file = metadata.file
        let clusterSize = layout.clusterSize
        var tables: [[UInt64]] = []
        for bitmap in tracked {
            let bits = bitmap.bits.withLock { $0 }
            var table = bitmap.table
            for index in table.indices {
                let start = index * clusterSize
                let length = min(clusterSize, bits.count - start)
                let chunk = bits[start..<(start + length)]
                let old = Int64(table[index] & Qcow2L2Entry.offsetMask)
                if chunk.allSatisfy({ $0 == 0 }) || (length == clusterSize && chunk.allSatisfy({ $0 == 0xFF })) {
                    table[index] = chunk.first == 0xFF ? 1 : 0
                    if old != 0 { metadata.refcounts.free(old, bytes: Int64(clusterSize)) }
                    continue
                }
                var host = old
                let owned = old != 0 ? try await metadata.refcounts.refcount(ofHostCluster: old >> Int64(layout.clusterBits)) == 1 : false
                if !owned {
                    host = try await metadata.refcounts.allocate(clusters: 1)
                    metadata.metadataClusters.insert(host, bytes: Int64(clusterSize))
                    if old != 0 { metadata.refcounts.free(old, bytes: Int64(clusterSize)) }
                }
                // Unused tail bits stay zero, as the spec requires.
                try await file.writeBytes(Array(chunk) + [UInt8](repeating: 0, count: clusterSize - length), at: host)
                table[index] = UInt64(host)
            }
            tables.append(table)
        }
        // The data of every bitmap and its refcounts are durable before any table names them.
        try await metadata.flush()
        for (bitmap, table) in zip(tracked, tables) {
            var tableBytes: [UInt8] = []
            tableBytes.reserveCapacity(table.count * 8)
            for word in table { withUnsafeBytes(of: word.bigEndian) { tableBytes += $0 } }
            try await file.writeBytes(tableBytes, at: bitmap.tableOffset)
        }
        try await file.flush()
        try await setInUse(false, file: file)
        try await file.flush()
    }
}
