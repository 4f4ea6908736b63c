/// A read-only qcow2 consistency check: every reference the image holds, counted against the stored refcounts.
// Counts follow `qemu-img check` so the two can be compared number for number. Not walked: an external data file
// and encryption headers (images with either are refused before counting starts).
public struct Qcow2Check {
    /// The most host clusters checked; two 32-bit counters per cluster are held in memory.
    public static let maxHostClusters = 1 << 28

    private let file: HostFile
    let header: Qcow2Header
    let validated: Qcow2ValidatedHeader
    private let layout: Qcow2Layout
    private let clusterSize: Int64
    private let clusterBits: Int64
    /// Host clusters of the file, rounded up; references just past it (less than a cluster past the end of the
    /// file) are kept aside in `beyondEnd`.
    let fileClusters: Int
    private let refcountBits: Int
    private let refcountMax: UInt64
    /// References counted per host cluster inside the file.
    private(set) var expected: [UInt32]
    private(set) var beyondEnd: [Int64: UInt32] = [:]
    /// Exact stored refcounts of the clusters in `beyondEnd`.
    private(set) var beyondEndStored: [Int64: UInt64] = [:]
    /// Stored refcounts of clusters inside the file, saturated at UInt32.max (only compared with 1).
    private(set) var stored: [UInt32]
    private(set) var result = Qcow2CheckResult()
    private let refcountTable: [UInt64]

    // What the repair needs to know beyond the counts qemu-img reports.
    /// Clusters of which one counted reference is the refcount table or a refcount block (once per reference):
    /// a new refcount structure no longer references them.
    private(set) var refcountStructureReferences: [Int] = []
    private var countingRefcountStructure = false
    /// Problems a new refcount structure fixes: stored counts that differ from the references, refcount table
    /// entries that are unusable, refcount blocks that cannot be read or are shared.
    private(set) var refcountProblems = 0
    /// OFLAG_COPIED in the active L1 and L2 tables disagreeing with the stored refcount.
    private(set) var copiedFlagErrors = 0
    /// Why some references could not be counted (a reference far past the end of the file, a snapshot or bitmap
    /// left out); nil when every one was. Counts derived from an incomplete walk must not be written.
    private(set) var incompleteWalk: String?

    static let offsetMask: UInt64 = 0x00FF_FFFF_FFFF_FE00
    static let l1ReservedMask: UInt64 = 0x7F00_0000_0000_01FF
    static let standardReservedMask: UInt64 = 0x3F00_0000_0000_01FE
    static let refcountReservedMask: UInt64 = 0x1FF
    static let maxBitmapDirectoryBytes: UInt64 = 64 << 20
    static let maxBitmapTableEntries: UInt32 = 1 << 27

    /// Checks the qcow2 image at `path`, opened read-only without locks.
    public static func check(path: String) async throws -> Qcow2CheckResult {
        let file = try HostFile.open(path, readOnly: true)
        return try await check(file: file)
    }

    /// Checks an opened qcow2 image; throws when the header is unusable (nothing can be counted then).
    public static func check(file: HostFile) async throws -> Qcow2CheckResult {
        try await analyze(file: file).result
    }

    /// Runs the check and returns all it computed (the repair reads the counts).
    static func analyze(file: HostFile) async throws -> Qcow2Check {
        let path = file.path
        func invalid(_ reason: String) -> BlockError { .invalidImage(path: path, reason: reason) }
        let fileSize = try file.size()
        let header: Qcow2Header
        let headerCluster: BigEndianBytes
        let extensions: Qcow2HeaderExtensions
        let validated: Qcow2ValidatedHeader
        do {
            header = try Qcow2Header(parsing: BigEndianBytes(try await file.readBytes(count: Int(min(fileSize, 112)), at: 0)))
            headerCluster = BigEndianBytes(try await file.readBytes(count: Int(min(fileSize, Int64(header.clusterSize))), at: 0))
            if header.version == 3 && Int(header.headerLength) > headerCluster.count {
                throw Qcow2HeaderError("header_length \(header.headerLength) passes the end of the file")
            }
            let extensionsEnd = header.backingFileOffset != 0 && header.backingFileOffset < UInt64(header.clusterSize)
                ? Int(header.backingFileOffset) : header.clusterSize
            let start = header.version == 3 ? Int(header.headerLength) : Qcow2Header.version2Length
            extensions = try Qcow2HeaderExtensions(parsing: headerCluster, start: start, end: extensionsEnd)
            validated = try header.validate(fileSize: fileSize, readOnly: true, featureNames: extensions.featureNames)
            // Raw external data promises a data file; without one QEMU refuses the image, and so does the check.
            guard header.version < 3 || header.autoclearFeatures & 2 == 0 else {
                throw Qcow2HeaderError("data-file-raw is set but the image has no external data file")
            }
            // QEMU refuses a misaligned snapshot table offset even when the table is empty, and cannot check then.
            guard header.snapshotsOffset % UInt64(header.clusterSize) == 0 else {
                throw Qcow2HeaderError("snapshot table offset \(header.snapshotsOffset) is invalid")
            }
        } catch let error as Qcow2HeaderError {
            throw invalid(error.reason)
        }
        let clusterSize = Int64(header.clusterSize)
        let clusters = fileSize / clusterSize + (fileSize % clusterSize == 0 ? 0 : 1)
        guard clusters <= Int64(maxHostClusters) else {
            throw BlockError.unsupported("\(path): \(clusters) host clusters exceed the check's limit of \(maxHostClusters)")
        }
        let tableBytes = Int(header.refcountTableClusters) * header.clusterSize
        let table = tableBytes == 0 ? [] : try await Qcow2ClusterMap.loadL1(
            file: file, offset: validated.refcountTableOffset, entries: tableBytes / 8)
        var check = Qcow2Check(file: file, header: header, validated: validated, fileSize: fileSize,
                               clusters: Int(clusters), refcountTable: table)
        try await check.run(extensions: extensions)
        return check
    }

    private init(file: HostFile, header: Qcow2Header, validated: Qcow2ValidatedHeader, fileSize: Int64, clusters: Int,
                 refcountTable: [UInt64]) {
        self.file = file
        self.header = header
        self.validated = validated
        layout = Qcow2Layout(header: header, fileSize: fileSize)
        clusterSize = Int64(header.clusterSize)
        clusterBits = Int64(header.clusterBits)
        fileClusters = clusters
        refcountBits = 1 << Int(header.refcountOrder)
        refcountMax = refcountBits == 64 ? UInt64.max : (1 << UInt64(refcountBits)) - 1
        expected = [UInt32](repeating: 0, count: clusters)
        stored = [UInt32](repeating: 0, count: clusters)
        self.refcountTable = refcountTable
    }

    private mutating func run(extensions: Qcow2HeaderExtensions) async throws {
        let virtualSize = validated.virtualSize
        result.totalClusters = virtualSize / clusterSize + (virtualSize % clusterSize == 0 ? 0 : 1)
        // Stored refcounts first: the OFLAG_COPIED check during the walk compares against them.
        try await loadStoredRefcounts()

        reference(0, bytes: clusterSize)
        try await walkL1(offset: validated.l1Offset, entries: Int(header.l1Size), active: true)
        let snapshots = try await Qcow2Snapshot.readTable(file: file, offset: validated.snapshotsOffset,
                                                          count: Int(header.snapshotCount), header: header,
                                                          fileSize: layout.fileSize)
        // An entry the reader leaves out is one QEMU's check would also refuse to walk; QEMU counts each entry
        // missing at the end of the file as one corruption.
        for warning in snapshots.warnings {
            result.corruptions += 1
            result.report("ERROR \(warning)")
            incompleteWalk = incompleteWalk ?? "a snapshot table entry is unreadable"
        }
        if snapshots.missingEntries > 0 { result.corruptions += snapshots.missingEntries - 1 }
        if snapshots.incompleteEntries > 0 {
            result.corruptions += snapshots.incompleteEntries
            result.report("ERROR \(snapshots.incompleteEntries) snapshot table entries are incomplete")
        }
        for snapshot in snapshots.entries {
            try await walkL1(offset: snapshot.l1TableOffset, entries: snapshot.l1Size, active: false)
        }
        if header.snapshotCount > 0 { reference(validated.snapshotsOffset, bytes: snapshots.byteCount) }
        countingRefcountStructure = true
        reference(validated.refcountTableOffset, bytes: Int64(refcountTable.count) * 8)
        countingRefcountStructure = false
        // QEMU ignores the bitmaps extension unless its autoclear bit says the bitmaps are still in sync.
        if let bitmaps = extensions.bitmapsData, header.autoclearFeatures & 1 != 0 {
            try await walkBitmaps(BigEndianBytes(bitmaps))
        }
        referenceRefcountBlocks()
        try await compare()
    }

    // MARK: Expected references

    /// Counts one reference to every cluster `bytes` bytes from `offset` touch.
    private mutating func reference(_ offset: Int64, bytes: Int64) {
        guard bytes > 0, offset >= 0 else { return }
        // The last cluster may be partly past the end of the file, but QEMU refuses (and counts as a corruption)
        // a reference a whole cluster or more past it, rather than counting it as a reference.
        let (limit, overflow) = offset.addingReportingOverflow(bytes)
        guard !overflow, limit - layout.fileSize < clusterSize else {
            incompleteWalk = incompleteWalk ?? "the image references clusters past the end of the file"
            result.corruptions += 1
            result.report("ERROR: counting reference for region exceeding the end of the file by one cluster or more: " +
                          "offset 0x\(String(offset, radix: 16)) size 0x\(String(bytes, radix: 16))")
            return
        }
        let end = limit - 1
        for cluster in (offset >> clusterBits)...(end >> clusterBits) {
            let current = cluster < Int64(fileClusters) ? expected[Int(cluster)] : beyondEnd[cluster, default: 0]
            if UInt64(current) >= refcountMax || current == UInt32.max {
                incompleteWalk = incompleteWalk ?? "a cluster has more references than its refcount can hold"
                result.corruptions += 1
                result.report("ERROR: overflow cluster offset=0x\(String(cluster << clusterBits, radix: 16))")
                continue
            }
            if cluster < Int64(fileClusters) { expected[Int(cluster)] = current + 1 } else { beyondEnd[cluster] = current + 1 }
            if countingRefcountStructure { refcountStructureReferences.append(Int(cluster)) }
        }
    }

    private mutating func walkL1(offset: Int64, entries: Int, active: Bool) async throws {
        guard entries > 0 else { return }
        reference(offset, bytes: Int64(entries) * 8)
        let l1 = try await Qcow2ClusterMap.loadL1(file: file, offset: offset, entries: entries)
        for (index, entry) in l1.enumerated() where entry != 0 {
            if entry & Self.l1ReservedMask != 0 {
                result.corruptions += 1
                result.report("ERROR found L1 entry with reserved bits set: 0x\(String(entry, radix: 16))")
            }
            let l2Offset = Int64(entry & Self.offsetMask)
            reference(l2Offset, bytes: clusterSize)
            if active, l2Offset != 0 {
                let copied = entry & Qcow2L2Entry.copiedFlag != 0
                // As QEMU, an unreadable refcount is neither reported nor counted here: the comparison counts it.
                if let refcount = try await storedRefcount(cluster: l2Offset >> clusterBits), (refcount == 1) != copied {
                    copiedFlagErrors += 1
                    result.corruptions += 1
                    result.report("ERROR OFLAG_COPIED L2 cluster: l1_index=\(index) " +
                                  "l1_entry=\(String(entry, radix: 16)) refcount=\(refcount)")
                }
            }
            if l2Offset & (clusterSize - 1) != 0 {
                result.corruptions += 1
                result.report("ERROR l2_offset=\(String(l2Offset, radix: 16)): Table is not cluster aligned; L1 entry corrupted")
                // QEMU still walks the table from the offset given, and counts what it finds there.
            }
            if l2Offset == 0 { continue }
            try await walkL2(offset: l2Offset, active: active)
        }
    }

    private mutating func walkL2(offset: Int64, active: Bool) async throws {
        let table = try await readClusterZeroFilled(at: offset)
        let words = layout.wordsPerL2Entry
        // Fragmentation is counted within one L2 table, as QEMU does.
        var nextContiguous: Int64 = 0
        for index in 0..<layout.l2Entries {
            let entry = table[index * words]
            let bitmap = layout.extendedL2 ? table[index * words + 1] : 0
            if entry & Qcow2L2Entry.compressedFlag != 0 {
                try checkCompressed(entry: entry, active: active)
                continue
            }
            // QEMU checks the reserved bits of every standard entry, unallocated ones too.
            if entry & Self.standardReservedMask != 0 {
                result.corruptions += 1
                result.report("ERROR found l2 entry with reserved bits set: 0x\(String(entry, radix: 16))")
            }
            let host = Int64(entry & Self.offsetMask)
            let hasData = layout.extendedL2 ? bitmap & 0xFFFF_FFFF != 0 : entry & Qcow2L2Entry.zeroFlag == 0
            if host == 0 {
                if layout.extendedL2 && bitmap & 0xFFFF_FFFF != 0 {
                    result.corruptions += 1
                    result.report("ERROR: Unallocated cluster has non-zero subcluster allocation bitmap")
                }
                continue
            }
            if layout.extendedL2 && (bitmap >> 32) & bitmap != 0 {
                result.corruptions += 1
                result.report("ERROR offset=\(String(host, radix: 16)): Allocated cluster has corrupted subcluster allocation bitmap")
            }
            if host & (clusterSize - 1) != 0 {
                result.corruptions += 1
                result.report("ERROR offset=\(String(host, radix: 16)): " + (!hasData
                    ? "Preallocated cluster is not properly aligned; L2 entry corrupted."
                    : "Data cluster is not properly aligned; L2 entry corrupted."))
            }
            if active {
                result.allocatedClusters += 1
                if nextContiguous != 0 && host != nextContiguous { result.fragmentedClusters += 1 }
                nextContiguous = host &+ clusterSize
                let copied = entry & Qcow2L2Entry.copiedFlag != 0
                if let refcount = try await storedRefcount(cluster: host >> clusterBits), (refcount == 1) != copied {
                    copiedFlagErrors += 1
                    result.corruptions += 1
                    result.report("ERROR OFLAG_COPIED data cluster: l2_entry=\(String(entry, radix: 16)) refcount=\(refcount)")
                }
            }
            reference(host, bytes: clusterSize)
        }
    }

    /// A compressed stream references every host cluster its bytes touch.
    private mutating func checkCompressed(entry: UInt64, active: Bool) throws {
        if entry & Qcow2L2Entry.copiedFlag != 0 {
            result.corruptions += 1
            result.report("ERROR: coffset=0x\(String(entry, radix: 16)): copied flag must never be set for compressed clusters")
        }
        let shift = UInt64(62 - (clusterBits - 8))
        let body = entry & ~(Qcow2L2Entry.copiedFlag | Qcow2L2Entry.compressedFlag)
        let host = Int64(body & ((1 << shift) - 1))
        let sectors = Int64(body >> shift) + 1
        reference(host, bytes: sectors * 512 - (host & 511))
        if active {
            result.allocatedClusters += 1
            result.compressedClusters += 1
            // QEMU counts every compressed cluster as fragmented.
            result.fragmentedClusters += 1
        }
    }

    private mutating func walkBitmaps(_ data: BigEndianBytes) async throws {
        guard let count = data.u32(0), let directoryBytes = data.u64(8), let directoryOffset = data.u64(16) else {
            result.corruptions += 1
            result.report("ERROR bitmaps extension is shorter than 24 bytes")
            incompleteWalk = incompleteWalk ?? "the bitmaps extension is unreadable"
            return
        }
        guard directoryBytes <= Self.maxBitmapDirectoryBytes,
              let offset = Qcow2Table.checkedOffset(directoryOffset, bytes: directoryBytes, fileSize: layout.fileSize) else {
            result.checkErrors += 1
            result.report("ERROR bitmap directory at \(directoryOffset) (\(directoryBytes) bytes) is unreadable")
            incompleteWalk = incompleteWalk ?? "the bitmap directory is unreadable"
            return
        }
        reference(offset, bytes: Int64(directoryBytes))
        let directory = BigEndianBytes(try await file.readBytes(count: Int(directoryBytes), at: offset))
        var position = 0
        for index in 0..<Int(count) {
            guard let tableOffset = directory.u64(position), let tableEntries = directory.u32(position + 8),
                  let nameSize = directory.u16(position + 18), let extraSize = directory.u32(position + 20) else {
                result.corruptions += 1
                result.report("ERROR bitmap directory entry \(index) passes the end of the directory")
                incompleteWalk = incompleteWalk ?? "a bitmap directory entry is unreadable"
                return
            }
            position += (24 + Int(extraSize) + Int(nameSize) + 7) & ~7
            guard tableEntries <= Self.maxBitmapTableEntries,
                  let table = Qcow2Table.checkedOffset(tableOffset, bytes: UInt64(tableEntries) * 8,
                                                       fileSize: layout.fileSize) else {
                result.corruptions += 1
                result.report("ERROR bitmap \(index): table at \(tableOffset) (\(tableEntries) entries) lies outside the file")
                incompleteWalk = incompleteWalk ?? "a bitmap table lies outside the file"
                continue
            }
            reference(table, bytes: Int64(tableEntries) * 8)
            for word in try await Qcow2ClusterMap.loadL1(file: file, offset: table, entries: Int(tableEntries)) {
                let cluster = Int64(word & Self.offsetMask)
                if cluster != 0 { reference(cluster, bytes: clusterSize) }
            }
        }
    }

    private mutating func referenceRefcountBlocks() {
        let corruptionsBefore = result.corruptions
        defer { refcountProblems += result.corruptions - corruptionsBefore }
        for (index, word) in refcountTable.enumerated() {
            let offset = word & ~Self.refcountReservedMask
            if word & Self.refcountReservedMask != 0 {
                result.corruptions += 1
                result.report("ERROR refcount table entry \(index) has reserved bits set")
                continue
            }
            if offset & UInt64(clusterSize - 1) != 0 {
                result.corruptions += 1
                result.report("ERROR refcount block \(index) is not cluster aligned; refcount table entry corrupted")
                continue
            }
            if offset >> UInt64(clusterBits) >= UInt64(fileClusters) {
                result.corruptions += 1
                result.report("ERROR refcount block \(index) is outside image")
                continue
            }
            guard offset != 0 else { continue }
            let cluster = Int(offset >> UInt64(clusterBits))
            countingRefcountStructure = true
            reference(Int64(offset), bytes: clusterSize)
            countingRefcountStructure = false
            if expected[cluster] != 1 {
                result.corruptions += 1
                result.report("ERROR refcount block \(index) refcount=\(expected[cluster])")
            }
        }
    }

    // MARK: Stored refcounts

    private var entriesPerBlock: Int { Int(clusterSize) * 8 / refcountBits }

    /// Whether a refcount table entry names a block QEMU could not read: misaligned, or past any file length.
    private func isUnreadableBlock(_ word: UInt64) -> Bool {
        let offset = word & ~Self.refcountReservedMask
        return offset & UInt64(clusterSize - 1) != 0 || offset > UInt64(Int64.max) - UInt64(clusterSize)
    }

    private mutating func loadStoredRefcounts() async throws {
        let perBlock = entriesPerBlock
        for (index, word) in refcountTable.enumerated() {
            let first = index * perBlock
            guard first < fileClusters else { break }
            let offset = word & ~Self.refcountReservedMask
            // A block past the end of the file reads as zeros, as it does for QEMU.
            guard offset != 0, !isUnreadableBlock(word), offset < UInt64(layout.fileSize) else { continue }
            let block = try await readBytesZeroFilled(at: Int64(offset), count: Int(clusterSize))
            for entry in 0..<min(perBlock, fileClusters - first) {
                stored[first + entry] = UInt32(clamping: Self.decode(block, index: entry, bits: refcountBits))
            }
        }
    }

    /// The exact stored refcount; nil when its refcount block cannot be read (unaligned, as QEMU refuses).
    private func exactStoredRefcount(cluster: Int64) async throws -> UInt64? {
        guard cluster >= 0 else { return 0 }
        let tableIndex = cluster / Int64(entriesPerBlock)
        guard tableIndex < Int64(refcountTable.count) else { return 0 }
        let offset = refcountTable[Int(tableIndex)] & ~Self.refcountReservedMask
        if offset == 0 { return 0 }
        guard !isUnreadableBlock(offset) else { return nil }
        guard offset < UInt64(layout.fileSize) else { return 0 }
        let block = try await readBytesZeroFilled(at: Int64(offset), count: Int(clusterSize))
        return Self.decode(block, index: Int(cluster % Int64(entriesPerBlock)), bits: refcountBits)
    }

    /// The stored refcount, or nil when its refcount block is unreadable.
    private func storedRefcount(cluster: Int64) async throws -> UInt64? {
        let tableIndex = cluster / Int64(entriesPerBlock)
        if cluster >= 0 && cluster < Int64(fileClusters) && stored[Int(cluster)] < UInt32.max,
           tableIndex >= Int64(refcountTable.count)
            || !isUnreadableBlock(refcountTable[Int(tableIndex)]) {
            return UInt64(stored[Int(cluster)])
        }
        return try await exactStoredRefcount(cluster: cluster)
    }

    /// Refcount `index` of a block; widths below a byte pack from each byte's least significant bit.
    static func decode(_ block: [UInt8], index: Int, bits: Int) -> UInt64 {
        if bits < 8 {
            let bit = index * bits
            return UInt64(block[bit / 8] >> UInt8(bit % 8)) & ((1 << UInt64(bits)) - 1)
        }
        let bytes = bits / 8
        var value: UInt64 = 0
        for i in 0..<bytes { value = value << 8 | UInt64(block[index * bytes + i]) }
        return value
    }

    /// Gives up the per-cluster arrays, so that the repair derives its counts from them without a copy.
    mutating func takeCounts() -> (expected: [UInt32], stored: [UInt32]) {
        defer {
            expected = []
            stored = []
        }
        return (expected, stored)
    }

    // MARK: Comparison

    private mutating func compare() async throws {
        var highest: Int64 = 0
        let perBlock = entriesPerBlock
        for index in 0..<fileClusters {
            let tableIndex = index / perBlock
            if tableIndex < refcountTable.count && isUnreadableBlock(refcountTable[tableIndex]) {
                result.checkErrors += 1
                refcountProblems += 1
                result.report("ERROR: Can't get refcount for cluster \(index)")
                continue
            }
            // Only a saturated value needs its block read again for the exact count.
            let saturated = stored[index]
            let storedValue = saturated < UInt32.max
                ? UInt64(saturated) : try await exactStoredRefcount(cluster: Int64(index)) ?? 0
            compareOne(cluster: Int64(index), stored: storedValue, expected: UInt64(expected[index]), highest: &highest)
        }
        for (index, references) in beyondEnd.sorted(by: { $0.key < $1.key }) {
            guard let storedValue = try await exactStoredRefcount(cluster: index) else {
                result.checkErrors += 1
                refcountProblems += 1
                result.report("ERROR: Can't get refcount for cluster \(index)")
                continue
            }
            beyondEndStored[index] = storedValue
            compareOne(cluster: index, stored: storedValue, expected: UInt64(references), highest: &highest)
        }
        let (end, overflow) = (highest + 1).multipliedReportingOverflow(by: clusterSize)
        result.imageEndOffset = overflow ? Int64.max : end
    }

    private mutating func compareOne(cluster: Int64, stored: UInt64, expected: UInt64, highest: inout Int64) {
        if stored > 0 || expected > 0 { highest = cluster }
        guard stored != expected else { return }
        refcountProblems += 1
        if stored < expected {
            result.corruptions += 1
            result.report("ERROR cluster \(cluster) refcount=\(stored) reference=\(expected)")
        } else {
            result.leaks += 1
            result.report("Leaked cluster \(cluster) refcount=\(stored) reference=\(expected)")
        }
    }

    // MARK: Reads

    /// `count` bytes at `offset`, the part past the end of the file read as zeros (as QEMU's reads see it).
    private func readBytesZeroFilled(at offset: Int64, count: Int) async throws -> [UInt8] {
        guard offset < layout.fileSize else { return [UInt8](repeating: 0, count: count) }
        let available = Int(min(Int64(count), layout.fileSize - offset))
        var bytes = try await file.readBytes(count: available, at: offset)
        if available < count { bytes += [UInt8](repeating: 0, count: count - available) }
        return bytes
    }

    private func readClusterZeroFilled(at offset: Int64) async throws -> [UInt64] {
        let bytes = try await readBytesZeroFilled(at: offset, count: Int(clusterSize))
        return bytes.withUnsafeBytes { Qcow2L2Table(bigEndianBytes: $0).words }
    }
}
