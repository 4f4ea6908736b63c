/// One entry of the qcow2 snapshot table, with the L1 table it points to.
struct Qcow2Snapshot: Sendable {
    let descriptor: SnapshotDescriptor
    let l1TableOffset: Int64
    let l1Size: Int

    /// QEMU's limit on a snapshot entry's extra data.
    static let maxExtraDataBytes: UInt32 = 1024

    /// Parses `count` entries starting at `offset`; every length is bounded before it is used.
    static func readTable(file: HostFile, offset: Int64, count: Int, header: Qcow2Header, fileSize: Int64)
        async throws -> [Qcow2Snapshot]
    {
        if count == 0 { return [] }
        let path = file.path
        func invalid(_ index: Int, _ reason: String) -> BlockError {
            .invalidImage(path: path, reason: "snapshot table entry \(index): \(reason)")
        }
        var snapshots: [Qcow2Snapshot] = []
        snapshots.reserveCapacity(count)
        var position = offset
        for index in 0..<count {
            guard position <= fileSize - 40 else { throw invalid(index, "lies past the end of the file") }
            let fixed = BigEndianBytes(try await file.readBytes(count: 40, at: position))
            let l1Offset = fixed.u64(0) ?? 0
            let l1Size = fixed.u32(8) ?? 0
            let idSize = Int(fixed.u16(12) ?? 0)
            let nameSize = Int(fixed.u16(14) ?? 0)
            let extraSize = fixed.u32(36) ?? 0
            guard extraSize <= maxExtraDataBytes else {
                throw invalid(index, "extra data size \(extraSize) exceeds \(maxExtraDataBytes)")
            }
            let variableBytes = Int(extraSize) + idSize + nameSize
            guard Int64(variableBytes) <= fileSize - (position + 40) else {
                throw invalid(index, "id, name or extra data lie past the end of the file")
            }
            let variable = BigEndianBytes(try await file.readBytes(count: variableBytes, at: position + 40))
            let extra = Int(extraSize)
            let vmStateLarge = extra >= 8 ? variable.u64(0) : nil
            let diskSize = extra >= 16 ? variable.u64(8) : nil
            let icountRaw = extra >= 24 ? variable.u64(16) : nil
            // Version 3 requires the disk size in the extra data, but QEMU reads entries without it (falling
            // back to the header's size), and so do we.
            guard l1Size <= Qcow2Limits.maxL1Entries else {
                throw invalid(index, "l1_size \(l1Size) exceeds \(Qcow2Limits.maxL1Entries)")
            }
            if l1Size > 0 {
                guard l1Offset % UInt64(header.clusterSize) == 0 else {
                    throw invalid(index, "L1 table offset \(l1Offset) is not cluster-aligned")
                }
                guard l1Offset < UInt64(fileSize), UInt64(l1Size) * 8 <= UInt64(fileSize) - l1Offset else {
                    throw invalid(index, "L1 table at \(l1Offset) lies past the end of the file")
                }
            }
            let size = diskSize ?? header.size
            guard size <= UInt64(Int64.max) else { throw invalid(index, "disk size \(size) is too large") }
            let vmState = vmStateLarge ?? UInt64(fixed.u32(32) ?? 0)
            guard vmState <= UInt64(Int64.max) else { throw invalid(index, "VM state size \(vmState) is too large") }
            let id = String(decoding: variable.slice(extra, count: idSize) ?? [], as: UTF8.self)
            let name = String(decoding: variable.slice(extra + idSize, count: nameSize) ?? [], as: UTF8.self)
            // QEMU writes all-ones when no instruction count was recorded.
            let icount: Int64? = icountRaw.flatMap { $0 == UInt64.max ? nil : Int64(bitPattern: $0) }
            let descriptor = SnapshotDescriptor(
                id: id, name: name, diskSize: Int64(size), vmStateSize: Int64(vmState),
                dateSeconds: fixed.u32(16) ?? 0, dateNanoseconds: fixed.u32(20) ?? 0,
                vmClockNanoseconds: fixed.u64(24) ?? 0, icount: icount)
            snapshots.append(Qcow2Snapshot(descriptor: descriptor, l1TableOffset: Int64(l1Offset), l1Size: Int(l1Size)))
            let entryBytes = 40 + Int64(variableBytes)
            position += (entryBytes + 7) & ~7
        }
        return snapshots
    }
}
