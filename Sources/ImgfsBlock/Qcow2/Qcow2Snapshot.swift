/// One entry of the qcow2 snapshot table, with the L1 table it points to.
struct Qcow2Snapshot: Sendable {
    let descriptor: SnapshotDescriptor
    /// 0 when `l1Size` is 0: an empty table's offset is never read, whatever the image says.
    let l1TableOffset: Int64
    let l1Size: Int

    /// QEMU's limit on a snapshot entry's extra data.
    static let maxExtraDataBytes: UInt32 = 1024
    static let fixedEntryBytes = 40

    /// The usable entries of a snapshot table, and why any were left out.
    struct Table: Sendable {
        var entries: [Qcow2Snapshot] = []
        var warnings: [String] = []
        /// Bytes from the table's offset to the end of its last entry read (what QEMU's check counts).
        var byteCount: Int64 = 0
        /// Entries the count promises past the end of the file.
        var missingEntries = 0
        /// Version 3 entries whose extra data lacks the VM state and disk size fields the spec requires.
        var incompleteEntries = 0
    }

    /// Parses `count` entries starting at `offset`; every length is bounded before it is used.
    ///
    /// A bad entry costs only itself (or, when the table's own structure is broken, itself and the entries after
    /// it): the active disk does not depend on snapshots, and `qemu-img convert` reads it regardless.
    static func readTable(file: HostFile, offset: Int64, count: Int, header: Qcow2Header, fileSize: Int64)
        async throws -> Table
    {
        var table = Table()
        if count == 0 { return table }
        var reader = WindowedReader(file: file, fileSize: fileSize)
        var position = offset
        var index = 0
        func leaveOut(_ reason: String) {
            table.warnings.append("\(file.path): snapshot table entry \(index) left out: \(reason)")
        }
        while index < count {
            guard let fixed = try await reader.bytes(at: position, count: fixedEntryBytes) else {
                table.warnings.append("\(file.path): nb_snapshots is \(count) but the snapshot table ends after " +
                                      "\(index) entries at the end of the file; the rest are left out")
                table.missingEntries = count - index
                break
            }
            let idSize = Int(fixed.u16(12) ?? 0)
            let nameSize = Int(fixed.u16(14) ?? 0)
            let extraSize = fixed.u32(36) ?? 0
            let variableBytes = Int(extraSize) + idSize + nameSize
            if header.version >= 3 && extraSize < 16 { table.incompleteEntries += 1 }
            // Past the extra data size nothing of the entry is trusted, but its length still finds the next one.
            let variable = extraSize <= maxExtraDataBytes
                ? try await reader.bytes(at: position + Int64(fixedEntryBytes), count: variableBytes) : nil
            if extraSize <= maxExtraDataBytes && variable == nil {
                leaveOut("its id, name or extra data lie past the end of the file; the entries after it are left out too")
                table.missingEntries = count - index
                break
            }
            if let variable {
                switch parse(fixed: fixed, variable: variable, extraSize: Int(extraSize), idSize: idSize,
                             nameSize: nameSize, index: table.entries.count, header: header, fileSize: fileSize) {
                case .success(let snapshot): table.entries.append(snapshot)
                case .failure(let problem): leaveOut(problem.reason)
                }
            } else {
                leaveOut("extra data size \(extraSize) exceeds \(maxExtraDataBytes)")
            }
            let entryBytes = Int64(fixedEntryBytes) + Int64(variableBytes)
            table.byteCount = position + entryBytes - offset
            position += (entryBytes + 7) & ~7
            index += 1
        }
        return table
    }

    /// One entry; `index` is its place among the usable entries (what `SnapshotDescriptor.index` means).
    private static func parse(fixed: BigEndianBytes, variable: BigEndianBytes, extraSize extra: Int, idSize: Int,
                              nameSize: Int, index: Int, header: Qcow2Header, fileSize: Int64)
        -> Result<Qcow2Snapshot, L2EntryProblem>
    {
        let l1Offset = fixed.u64(0) ?? 0
        let l1Size = fixed.u32(8) ?? 0
        guard l1Size <= Qcow2Limits.maxL1Entries else {
            return .failure(.init("l1_size \(l1Size) exceeds \(Qcow2Limits.maxL1Entries)"))
        }
        // Even an empty table's offset must be sane (QEMU refuses to load the snapshot otherwise), but only a
        // table with entries must lie inside the file.
        guard l1Offset % UInt64(header.clusterSize) == 0, l1Offset <= UInt64(Int64.max) else {
            return .failure(.init("L1 table offset \(l1Offset) is invalid"))
        }
        var checkedL1Offset: Int64 = 0
        if l1Size > 0 {
            guard let offset = Qcow2Table.checkedOffset(l1Offset, bytes: UInt64(l1Size) * 8, fileSize: fileSize) else {
                return .failure(.init("L1 table at \(l1Offset) lies past the end of the file"))
            }
            checkedL1Offset = offset
        }
        let vmStateLarge = extra >= 8 ? variable.u64(0) : nil
        // Version 3 requires the disk size in the extra data, but QEMU reads entries without it (falling back to
        // the header's size), and so do we.
        let diskSize = (extra >= 16 ? variable.u64(8) : nil) ?? header.size
        let icountRaw = extra >= 24 ? variable.u64(16) : nil
        guard let size = Int64(exactly: diskSize) else { return .failure(.init("disk size \(diskSize) is too large")) }
        let vmStateRaw = vmStateLarge ?? UInt64(fixed.u32(32) ?? 0)
        guard let vmState = Int64(exactly: vmStateRaw) else {
            return .failure(.init("VM state size \(vmStateRaw) is too large"))
        }
        let id = String(decoding: variable.slice(extra, count: idSize) ?? [], as: UTF8.self)
        let name = String(decoding: variable.slice(extra + idSize, count: nameSize) ?? [], as: UTF8.self)
        // QEMU writes all-ones when no instruction count was recorded.
        let icount: Int64? = icountRaw.flatMap { $0 == UInt64.max ? nil : Int64(bitPattern: $0) }
        let descriptor = SnapshotDescriptor(
            index: index, id: id, name: name, diskSize: size & ~511, vmStateSize: vmState,
            dateSeconds: fixed.u32(16) ?? 0, dateNanoseconds: fixed.u32(20) ?? 0,
            vmClockNanoseconds: fixed.u64(24) ?? 0, icount: icount)
        return .success(Qcow2Snapshot(descriptor: descriptor, l1TableOffset: checkedL1Offset, l1Size: Int(l1Size)))
    }
}

/// Reads small pieces of a file that mostly follow each other through one larger buffered read.
///
/// A table of 65,536 snapshot entries would otherwise cost two system calls an entry.
private struct WindowedReader {
    let file: HostFile
    let fileSize: Int64
    private var windowStart: Int64 = 0
    private var window: [UInt8] = []
    static let windowBytes = 256 << 10

    init(file: HostFile, fileSize: Int64) {
        self.file = file
        self.fileSize = fileSize
    }

    /// `count` bytes at `offset`, or nil when they pass the end of the file.
    mutating func bytes(at offset: Int64, count: Int) async throws -> BigEndianBytes? {
        guard offset >= 0, offset <= fileSize, Int64(count) <= fileSize - offset else { return nil }
        let inWindow = offset >= windowStart && offset - windowStart + Int64(count) <= Int64(window.count)
        if !inWindow {
            let length = Int(min(Int64(max(count, Self.windowBytes)), fileSize - offset))
            window = try await file.readBytes(count: length, at: offset)
            windowStart = offset
        }
        let start = Int(offset - windowStart)
        return BigEndianBytes(Array(window[start..<(start + count)]))
    }
}
