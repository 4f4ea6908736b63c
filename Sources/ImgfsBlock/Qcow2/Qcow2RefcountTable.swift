/// Read-only access to the refcount table and its blocks, for any refcount width (refcount_order 0...6).
struct Qcow2RefcountTable: Sendable {
    let file: HostFile
    let layout: Qcow2Layout
    let refcountOrder: Int
    /// Host offsets of refcount blocks (0: not allocated, all refcounts 0).
    let blockOffsets: [Int64]

    static let reservedMask: UInt64 = 0x1FF

    /// Loads the table named by a validated header (its size is already bounded by the 8 MiB limit).
    static func load(file: HostFile, header: Qcow2Header, layout: Qcow2Layout) async throws -> Qcow2RefcountTable {
        let bytes = Int(header.refcountTableClusters) * layout.clusterSize
        let words: [UInt64]
        if bytes == 0 {
            words = []
        } else {
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: bytes, alignment: 16)
            defer { buffer.deallocate() }
            try await file.readExactly(into: buffer, at: Int64(header.refcountTableOffset))
            words = Qcow2L2Table(bigEndianBytes: UnsafeRawBufferPointer(buffer)).words
        }
        var offsets: [Int64] = []
        offsets.reserveCapacity(words.count)
        for (index, word) in words.enumerated() {
            let offset = word & ~reservedMask
            guard word & reservedMask == 0, offset <= UInt64(Int64.max),
                  Int64(offset) & layout.clusterOffsetMask == 0 else {
                throw BlockError.invalidImage(path: file.path,
                                              reason: "refcount table entry \(index) (0x\(String(word, radix: 16))) is invalid")
            }
            offsets.append(Int64(offset))
        }
        return Qcow2RefcountTable(file: file, layout: layout, refcountOrder: Int(header.refcountOrder),
                                  blockOffsets: offsets)
    }

    var refcountBits: Int { 1 << refcountOrder }
    /// Refcount entries in one refcount block.
    var entriesPerBlock: Int64 { Int64(layout.clusterSize) * 8 / Int64(refcountBits) }

    /// The reference count of the host cluster with index `cluster` (host offset / cluster size).
    func refcount(ofHostCluster cluster: Int64) async throws -> UInt64 {
        guard cluster >= 0 else { return 0 }
        let tableIndex = cluster / entriesPerBlock
        let blockIndex = cluster % entriesPerBlock
        guard tableIndex < Int64(blockOffsets.count) else { return 0 }
        let block = blockOffsets[Int(tableIndex)]
        if block == 0 { return 0 }
        guard block <= layout.fileSize - Int64(layout.clusterSize) else {
            throw BlockError.corrupt("\(file.path): refcount block at \(block) lies past the end of the file")
        }
        let bits = refcountBits
        // Sub-byte refcounts pack from the least significant bit of each byte.
        let bitOffset = blockIndex * Int64(bits)
        let byteCount = max(1, bits / 8)
        let bytes = BigEndianBytes(try await file.readBytes(count: byteCount, at: block + bitOffset / 8))
        switch bits {
        case 1, 2, 4:
            let byte = UInt64(bytes.u8(0) ?? 0)
            let shift = UInt64(bitOffset % 8)
            return (byte >> shift) & ((1 << UInt64(bits)) - 1)
        case 8: return UInt64(bytes.u8(0) ?? 0)
        case 16: return UInt64(bytes.u16(0) ?? 0)
        case 32: return UInt64(bytes.u32(0) ?? 0)
        default: return bytes.u64(0) ?? 0
        }
    }
}
