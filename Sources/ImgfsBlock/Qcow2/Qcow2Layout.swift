/// The geometry every qcow2 computation needs, derived once from a validated header.
struct Qcow2Layout: Sendable {
    let clusterBits: Int
    let clusterSize: Int
    let extendedL2: Bool
    /// Guest clusters one L2 table maps.
    let l2Entries: Int
    /// 64-bit words per L2 entry (2 with extended L2 entries).
    let wordsPerL2Entry: Int
    /// Allocation granularity: the subcluster with extended L2 entries, else the cluster.
    let unitBits: Int
    /// The host file's size at open, against which every offset from the image is checked.
    let fileSize: Int64
    /// Version 2 has no zero flag: bit 0 of a standard descriptor is not a zero marker there.
    let version: Int

    init(header: Qcow2Header, fileSize: Int64) {
        clusterBits = Int(header.clusterBits)
        clusterSize = 1 << clusterBits
        extendedL2 = header.hasExtendedL2
        wordsPerL2Entry = extendedL2 ? 2 : 1
        l2Entries = clusterSize / (8 * wordsPerL2Entry)
        unitBits = extendedL2 ? clusterBits - 5 : clusterBits
        self.fileSize = fileSize
        version = Int(header.version)
    }

    var unitSize: Int64 { Int64(1) << Int64(unitBits) }
    /// Guest bytes one L1 entry (one L2 table) maps.
    var bytesPerL2Table: Int64 { Int64(clusterSize) * Int64(l2Entries) }
    var clusterOffsetMask: Int64 { Int64(clusterSize) - 1 }
}
