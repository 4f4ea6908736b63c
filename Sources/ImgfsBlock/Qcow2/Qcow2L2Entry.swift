/// What one allocation unit (cluster, or subcluster with extended L2 entries) of the guest disk holds.
enum Qcow2UnitState: Sendable, Equatable {
    /// Stored plainly at this host offset (of the unit's first byte).
    case data(hostOffset: Int64)
    case zero
    /// Not allocated here: the backing file (or zeros) supplies it.
    case unallocated
    /// The whole cluster is compressed.
    case compressed(Qcow2CompressedCluster)
}

/// Where a compressed cluster's data lies: an unaligned host offset and an upper bound of its size.
struct Qcow2CompressedCluster: Sendable, Equatable, Hashable {
    let hostOffset: Int64
    let maxCompressedBytes: Int
}

/// Decoding of L1 and L2 entries (standard and extended) into unit states, with the spec's validity rules.
enum Qcow2L2Entry {
    static let copiedFlag: UInt64 = 1 << 63
    static let compressedFlag: UInt64 = 1 << 62
    static let zeroFlag: UInt64 = 1
    /// Bits 9-55: host offset of a standard cluster or an L2 table.
    static let offsetMask: UInt64 = 0x00FF_FFFF_FFFF_FE00
    /// Bits 1-8 and 56-61 of a standard descriptor.
    static let standardReservedMask: UInt64 = 0x3F00_0000_0000_01FE
    /// Bits 0-8 and 56-62 of an L1 entry.
    static let l1ReservedMask: UInt64 = 0x7F00_0000_0000_01FF

    /// The L2 table offset an L1 entry names (0: unallocated), or a reason it is invalid.
    static func l2TableOffset(l1Entry: UInt64, layout: Qcow2Layout) -> Result<Int64, L2EntryProblem> {
        if l1Entry & l1ReservedMask != 0 { return .failure(.init("L1 entry has reserved bits set")) }
        let offset = Int64(l1Entry & offsetMask)
        if offset == 0 { return .success(0) }
        if offset & layout.clusterOffsetMask != 0 {
            return .failure(.init("L2 table offset \(offset) is not cluster-aligned"))
        }
        if offset > layout.fileSize - Int64(layout.clusterSize) {
            return .failure(.init("L2 table offset \(offset) lies past the end of the file"))
        }
        return .success(offset)
    }

    /// The state of unit `unit` (0 without extended L2) of the cluster described by `entry`/`bitmap`.
    static func state(entry: UInt64, bitmap: UInt64, unit: Int, layout: Qcow2Layout)
        -> Result<Qcow2UnitState, L2EntryProblem>
    {
        if entry & compressedFlag != 0 {
            if layout.extendedL2 && bitmap != 0 {
                return .failure(.init("compressed cluster has a non-zero subcluster bitmap"))
            }
            return compressed(entry: entry, layout: layout).map { .compressed($0) }
        }
        if entry & standardReservedMask != 0 {
            return .failure(.init("L2 entry 0x\(String(entry, radix: 16)) has reserved bits set"))
        }
        let host = Int64(entry & offsetMask)
        if host & layout.clusterOffsetMask != 0 {
            return .failure(.init("data cluster offset \(host) is not cluster-aligned"))
        }
        if layout.extendedL2 {
            let allocated = (bitmap >> UInt64(unit)) & 1 != 0
            let zero = (bitmap >> UInt64(32 + unit)) & 1 != 0
            if allocated && zero { return .failure(.init("subcluster \(unit) is both allocated and zero")) }
            if zero { return .success(.zero) }
            if !allocated { return .success(.unallocated) }
            if host == 0 { return .failure(.init("allocated subcluster \(unit) has no host cluster")) }
            return checkedData(host: host + Int64(unit) << Int64(layout.unitBits), cluster: host, layout: layout)
        }
        if entry & zeroFlag != 0 {
            // Version 2 has no zero clusters; QEMU treats the flag there as corruption, and so do we.
            if layout.version < 3 { return .failure(.init("zero cluster entry in a version 2 image")) }
            return .success(.zero)
        }
        if host == 0 {
            if entry & copiedFlag != 0 {
                return .failure(.init("L2 entry names host offset 0 without an external data file"))
            }
            return .success(.unallocated)
        }
        return checkedData(host: host, cluster: host, layout: layout)
    }

    private static func checkedData(host: Int64, cluster: Int64, layout: Qcow2Layout)
        -> Result<Qcow2UnitState, L2EntryProblem>
    {
        if cluster >= layout.fileSize {
            return .failure(.init("data cluster offset \(cluster) lies past the end of the file"))
        }
        return .success(.data(hostOffset: host))
    }

    /// The host bytes an entry holds a reference to, as QEMU frees them: a compressed cluster's whole sectors, or
    /// a standard entry's host cluster; nil when it references nothing (or is too damaged to say).
    static func hostReference(entry: UInt64, layout: Qcow2Layout) -> (offset: Int64, bytes: Int64)? {
        if entry & compressedFlag != 0 {
            guard case .success(let cluster) = compressed(entry: entry, layout: layout) else { return nil }
            return (cluster.hostOffset & ~511, Int64(cluster.maxCompressedBytes) + (cluster.hostOffset & 511))
        }
        let host = Int64(entry & offsetMask)
        return host == 0 ? nil : (host, Int64(layout.clusterSize))
    }

    /// Splits a compressed descriptor: bits 0..x-1 host offset, x..61 additional 512-byte sectors,
    /// where x = 62 - (cluster_bits - 8).
    static func compressed(entry: UInt64, layout: Qcow2Layout) -> Result<Qcow2CompressedCluster, L2EntryProblem> {
        let x = UInt64(62 - (layout.clusterBits - 8))
        let offsetField = entry & ((1 << x) - 1)
        let sectorField = (entry >> x) & ((1 << (62 - x)) - 1)
        if offsetField >= Qcow2Limits.maxHostOffset {
            return .failure(.init("compressed cluster offset has bits above 55 set"))
        }
        let host = Int64(offsetField)
        if host >= layout.fileSize {
            return .failure(.init("compressed cluster offset \(host) lies past the end of the file"))
        }
        let sectors = Int(sectorField) + 1
        let bytes = sectors * 512 - Int(host & 511)
        return .success(Qcow2CompressedCluster(hostOffset: host, maxCompressedBytes: bytes))
    }
}

/// Why an L1/L2 entry cannot be used; the cluster map adds the guest offset.
struct L2EntryProblem: Error {
    let reason: String
    init(_ reason: String) { self.reason = reason }
}
