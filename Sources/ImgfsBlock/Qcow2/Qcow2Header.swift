/// The fixed qcow2 header (versions 2 and 3), as stored at offset 0, before any validation.
struct Qcow2Header: Sendable {
    static let magic: UInt32 = 0x5146_49FB  // "QFI\xfb"
    static let version2Length = 72
    static let version3MinimumLength = 104
    /// Offset of the 8-byte size field, followed by crypt_method, l1_size and l1_table_offset.
    static let sizeOffset: Int64 = 24
    /// Offset of refcount_table_offset (8 bytes), followed by refcount_table_clusters (4 bytes).
    static let refcountTableFieldsOffset: Int64 = 48
    /// Offset of the 8-byte incompatible_features field (version 3).
    static let incompatibleFeaturesOffset: Int64 = 72
    /// Offset of the 8-byte autoclear_features field (version 3).
    static let autoclearFeaturesOffset: Int64 = 88

    var magic: UInt32
    var version: UInt32
    var backingFileOffset: UInt64
    var backingFileSize: UInt32
    var clusterBits: UInt32
    var size: UInt64
    var cryptMethod: UInt32
    var l1Size: UInt32
    var l1TableOffset: UInt64
    var refcountTableOffset: UInt64
    var refcountTableClusters: UInt32
    var snapshotCount: UInt32
    var snapshotsOffset: UInt64
    var incompatibleFeatures: UInt64 = 0
    var compatibleFeatures: UInt64 = 0
    var autoclearFeatures: UInt64 = 0
    var refcountOrder: UInt32 = 4
    var headerLength: UInt32 = UInt32(Qcow2Header.version2Length)
    var compressionType: UInt8 = 0

    /// Parses the fields; `bytes` must hold at least the version 2 header (and the v3 part for version 3).
    init(parsing bytes: BigEndianBytes) throws(Qcow2HeaderError) {
        guard let magic = bytes.u32(0), let version = bytes.u32(4) else {
            throw Qcow2HeaderError("file is shorter than a qcow2 header")
        }
        guard magic == Self.magic else { throw Qcow2HeaderError("bad magic 0x\(String(magic, radix: 16))") }
        guard version == 2 || version == 3 else {
            throw Qcow2HeaderError("unsupported qcow2 version \(version)")
        }
        guard bytes.count >= Self.version2Length else {
            throw Qcow2HeaderError("file is shorter than a qcow2 header")
        }
        self.magic = magic
        self.version = version
        backingFileOffset = bytes.u64(8) ?? 0
        backingFileSize = bytes.u32(16) ?? 0
        clusterBits = bytes.u32(20) ?? 0
        size = bytes.u64(24) ?? 0
        cryptMethod = bytes.u32(32) ?? 0
        l1Size = bytes.u32(36) ?? 0
        l1TableOffset = bytes.u64(40) ?? 0
        refcountTableOffset = bytes.u64(48) ?? 0
        refcountTableClusters = bytes.u32(56) ?? 0
        snapshotCount = bytes.u32(60) ?? 0
        snapshotsOffset = bytes.u64(64) ?? 0
        guard (9...21).contains(clusterBits) else {
            throw Qcow2HeaderError("cluster_bits \(clusterBits) is outside 9...21")
        }
        guard version == 3 else { return }
        guard let incompatible = bytes.u64(72), let compatible = bytes.u64(80), let autoclear = bytes.u64(88),
              let refcountOrder = bytes.u32(96), let headerLength = bytes.u32(100) else {
            throw Qcow2HeaderError("file is shorter than a version 3 header")
        }
        incompatibleFeatures = incompatible
        compatibleFeatures = compatible
        autoclearFeatures = autoclear
        self.refcountOrder = refcountOrder
        self.headerLength = headerLength
        // Checked before anything reads past the fixed fields, so a bad length is blamed on itself and not on
        // the extension parser that would trip over it.
        guard headerLength >= UInt32(Self.version3MinimumLength) else {
            throw Qcow2HeaderError("header_length \(headerLength) is below the version 3 minimum of 104")
        }
        guard headerLength % 8 == 0 else {
            throw Qcow2HeaderError("header_length \(headerLength) is not a multiple of 8")
        }
        if headerLength > 104 {
            guard let type = bytes.u8(104) else {
                throw Qcow2HeaderError("header_length \(headerLength) passes the end of the file")
            }
            compressionType = type
        }
    }

    var clusterSize: Int { 1 << Int(clusterBits) }
    var hasExtendedL2: Bool { incompatibleFeatures & Qcow2IncompatibleFeature.extendedL2.mask != 0 }
    var hasLazyRefcounts: Bool { compatibleFeatures & 1 != 0 }
    var isMarkedCorrupt: Bool { incompatibleFeatures & Qcow2IncompatibleFeature.corrupt.mask != 0 }
}

/// A reason a header is unusable; the opener turns it into `BlockError.invalidImage` with the path.
struct Qcow2HeaderError: Error {
    let reason: String
    init(_ reason: String) { self.reason = reason }
}

/// The incompatible feature bits qcow2 defines.
enum Qcow2IncompatibleFeature: Int, CaseIterable {
    case dirty = 0
    case corrupt = 1
    case externalDataFile = 2
    case compressionType = 3
    case extendedL2 = 4

    var mask: UInt64 { 1 << UInt64(rawValue) }
    static let knownMask: UInt64 = allCases.reduce(0) { $0 | $1.mask }
}

/// The autoclear feature bits qcow2 defines.
enum Qcow2AutoclearFeature {
    /// The bitmaps extension is consistent with the image.
    static let bitmaps: UInt64 = 1 << 0
    /// The external data file holds a valid raw image.
    static let rawExternalData: UInt64 = 1 << 1
}

/// Compression algorithms of compressed clusters (header field compression_type).
enum Qcow2CompressionType: UInt8, Sendable {
    case zlib = 0
    case zstd = 1

    var name: String { self == .zlib ? "zlib" : "zstd" }
}

/// Limits that bound every allocation sized from header fields.
enum Qcow2Limits {
    /// The largest L1 table accepted (entries); larger ones are refused before allocating.
    static let maxL1Entries: UInt32 = 4 << 20  // QEMU's QCOW_MAX_L1_SIZE, 32 MiB of entries
    /// The most bytes of snapshot L1 tables held at once: snapshots may share one table in the file, so the
    /// file's size alone does not bound them.
    static let maxSnapshotL1Bytes = 512 << 20
    /// QEMU's limit on the refcount table (bytes).
    static let maxRefcountTableBytes: UInt64 = 8 << 20
    static let maxSnapshots: UInt32 = 65536
    /// QEMU's limit on a backing file name.
    static let maxBackingNameBytes: UInt32 = 1023
    /// Host offsets in L1/L2 entries are bits 9-55.
    static let maxHostOffset: UInt64 = 1 << 56
}

extension Qcow2Header {
    /// Checks every field that can be checked without the extensions; returns what the driver may use.
    ///
    /// `featureNames` comes from the feature name table extension so unknown bits can be refused by name.
    func validate(fileSize: Int64, readOnly: Bool, featureNames: [Qcow2FeatureName]) throws(Qcow2HeaderError)
        -> Qcow2ValidatedHeader
    {
        let clusterSize = UInt64(self.clusterSize)
        if version == 3 {
            guard UInt64(headerLength) <= clusterSize else {
                throw Qcow2HeaderError("header_length \(headerLength) exceeds the cluster size")
            }
        }
        guard refcountOrder <= 6 else { throw Qcow2HeaderError("refcount_order \(refcountOrder) is above 6") }
        if version == 2 && refcountOrder != 4 {
            throw Qcow2HeaderError("version 2 images must have refcount_order 4")
        }
        guard cryptMethod == 0 else {
            let name = cryptMethod == 1 ? "AES" : cryptMethod == 2 ? "LUKS" : "method \(cryptMethod)"
            throw Qcow2HeaderError("encrypted images (\(name)) are not supported")
        }
        try checkIncompatibleFeatures(readOnly: readOnly, featureNames: featureNames)

        let compression: Qcow2CompressionType
        if incompatibleFeatures & Qcow2IncompatibleFeature.compressionType.mask != 0 {
            guard headerLength > 104 else {
                throw Qcow2HeaderError("compression type feature set but header_length \(headerLength) lacks the field")
            }
            guard let type = Qcow2CompressionType(rawValue: compressionType) else {
                throw Qcow2HeaderError("unsupported compression_type \(compressionType)")
            }
            compression = type
        } else {
            guard compressionType == 0 else {
                throw Qcow2HeaderError("compression_type \(compressionType) set without the compression type feature bit")
            }
            compression = .zlib
        }

        guard let byteSize = Int64(exactly: size) else { throw Qcow2HeaderError("virtual size \(size) is too large") }
        guard l1Size <= Qcow2Limits.maxL1Entries else {
            throw Qcow2HeaderError("l1_size \(l1Size) exceeds the limit of \(Qcow2Limits.maxL1Entries) entries")
        }
        let entryBytes: UInt64 = hasExtendedL2 ? 16 : 8
        let bytesPerL1Entry = clusterSize * (clusterSize / entryBytes)
        let neededL1 = size / bytesPerL1Entry + (size % bytesPerL1Entry == 0 ? 0 : 1)
        guard UInt64(l1Size) >= neededL1 else {
            throw Qcow2HeaderError("l1_size \(l1Size) is too small for virtual size \(size) (needs \(neededL1))")
        }
        let l1Offset = try checkTable("l1_table_offset", offset: l1TableOffset, bytes: UInt64(l1Size) * 8,
                                      fileSize: fileSize)
        guard UInt64(refcountTableClusters) * clusterSize <= Qcow2Limits.maxRefcountTableBytes else {
            throw Qcow2HeaderError("refcount_table_clusters \(refcountTableClusters) exceeds the 8 MiB limit")
        }
        let refcountOffset = try checkTable("refcount_table_offset", offset: refcountTableOffset,
                       bytes: UInt64(refcountTableClusters) * clusterSize, fileSize: fileSize)
        guard snapshotCount <= Qcow2Limits.maxSnapshots else {
            throw Qcow2HeaderError("nb_snapshots \(snapshotCount) exceeds \(Qcow2Limits.maxSnapshots)")
        }
        // Only the first entry must be there: the table is read entry by entry, and entries missing from its end
        // are left out with a warning, since the active disk does not need them.
        let snapshotTableOffset = try checkTable("snapshots_offset", offset: snapshotsOffset,
                                                 bytes: snapshotCount == 0 ? 0 : 40, fileSize: fileSize)
        if backingFileOffset != 0 {
            guard backingFileSize <= Qcow2Limits.maxBackingNameBytes else {
                throw Qcow2HeaderError("backing_file_size \(backingFileSize) exceeds \(Qcow2Limits.maxBackingNameBytes)")
            }
            guard backingFileOffset < clusterSize,
                  backingFileOffset + UInt64(backingFileSize) <= min(clusterSize, UInt64(fileSize)) else {
                throw Qcow2HeaderError("backing file name at \(backingFileOffset) lies outside the header cluster")
            }
        }
        // QEMU counts the disk in 512-byte sectors and drops a partial last one; so do we, so that what we show
        // equals `qemu-img convert`.
        return Qcow2ValidatedHeader(compression: compression, virtualSize: byteSize & ~511, l1Offset: l1Offset,
                                    refcountTableOffset: refcountOffset, snapshotsOffset: snapshotTableOffset)
    }

    private func checkIncompatibleFeatures(readOnly: Bool, featureNames: [Qcow2FeatureName])
        throws(Qcow2HeaderError)
    {
        let unknown = incompatibleFeatures & ~Qcow2IncompatibleFeature.knownMask
        if unknown != 0 {
            let bit = unknown.trailingZeroBitCount
            if let named = featureNames.first(where: { $0.kind == .incompatible && Int($0.bit) == bit }) {
                throw Qcow2HeaderError("unsupported incompatible feature '\(named.name)' (bit \(bit))")
            }
            throw Qcow2HeaderError("unknown incompatible feature bit \(bit)")
        }
        if incompatibleFeatures & Qcow2IncompatibleFeature.externalDataFile.mask != 0 {
            throw Qcow2HeaderError("external data file not supported yet")
        }
        if isMarkedCorrupt && !readOnly {
            throw Qcow2HeaderError("image is marked corrupt; it can only be opened read-only (mount with --read-only)")
        }
    }

    /// The table's offset as a file offset; 0 for an empty table, whose offset nothing reads.
    private func checkTable(_ field: String, offset: UInt64, bytes: UInt64, fileSize: Int64) throws(Qcow2HeaderError)
        -> Int64
    {
        if bytes == 0 { return 0 }
        guard offset % UInt64(clusterSize) == 0 else {
            throw Qcow2HeaderError("\(field) \(offset) is not cluster-aligned")
        }
        guard let checked = Qcow2Table.checkedOffset(offset, bytes: bytes, fileSize: fileSize) else {
            throw Qcow2HeaderError("\(field) \(offset) (+\(bytes) bytes) lies past the end of the file (\(fileSize) bytes)")
        }
        return checked
    }
}

/// What a validated header lets the driver use: every offset and size already converted and bounded.
struct Qcow2ValidatedHeader: Sendable {
    let compression: Qcow2CompressionType
    /// The disk size in bytes, rounded down to whole 512-byte sectors as QEMU does.
    let virtualSize: Int64
    let l1Offset: Int64
    let refcountTableOffset: Int64
    let snapshotsOffset: Int64
}

/// Bounds checks for tables whose offset and size come from the image.
enum Qcow2Table {
    /// `offset` as a file offset when `bytes` bytes from it lie inside a file of `fileSize` bytes, else nil.
    static func checkedOffset(_ offset: UInt64, bytes: UInt64, fileSize: Int64) -> Int64? {
        guard fileSize >= 0, offset < UInt64(fileSize), bytes <= UInt64(fileSize) - offset else { return nil }
        return Int64(offset)
    }
}
