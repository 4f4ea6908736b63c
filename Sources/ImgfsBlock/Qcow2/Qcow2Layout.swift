import Synchronization

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
    /// Where the host file ends for the driver; every offset from the image is checked against it.
    let hostEnd: Qcow2HostEnd
    /// Version 2 has no zero flag: bit 0 of a standard descriptor is not a zero marker there.
    let version: Int

    init(header: Qcow2Header, fileSize: Int64) {
        clusterBits = Int(header.clusterBits)
        clusterSize = 1 << clusterBits
        extendedL2 = header.hasExtendedL2
        wordsPerL2Entry = extendedL2 ? 2 : 1
        l2Entries = clusterSize / (8 * wordsPerL2Entry)
        unitBits = extendedL2 ? clusterBits - 5 : clusterBits
        hostEnd = Qcow2HostEnd(fileSize)
        version = Int(header.version)
    }

    /// The host file's size at open, grown by every cluster allocated since.
    var fileSize: Int64 { hostEnd.bytes }
    var unitSize: Int64 { Int64(1) << Int64(unitBits) }
    /// Guest bytes one L1 entry (one L2 table) maps.
    var bytesPerL2Table: Int64 { Int64(clusterSize) * Int64(l2Entries) }
    var clusterOffsetMask: Int64 { Int64(clusterSize) - 1 }
}

/// The end of the host file as the driver sees it: its size at open, raised by each allocation, so that entries
/// naming new clusters (not yet written, or written past the size seen at open) are not taken for corruption.
final class Qcow2HostEnd: Sendable {
    private let end: Atomic<Int64>

    init(_ bytes: Int64) { end = Atomic(bytes) }

    var bytes: Int64 { end.load(ordering: .acquiring) }

    /// Moves the end to `bytes` if that is further.
    func raise(to bytes: Int64) {
        _ = end.max(bytes, ordering: .acquiringAndReleasing)
    }
}
