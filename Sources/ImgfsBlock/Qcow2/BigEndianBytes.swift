/// Bounds-checked big-endian field access over bytes read from an untrusted image.
struct BigEndianBytes: Sendable {
    let bytes: [UInt8]

    init(_ bytes: [UInt8]) { self.bytes = bytes }

    var count: Int { bytes.count }

    /// Whether `count` bytes starting at `offset` exist (without overflowing).
    func contains(_ offset: Int, count: Int) -> Bool {
        offset >= 0 && count >= 0 && offset <= bytes.count && count <= bytes.count - offset
    }

    func u8(_ offset: Int) -> UInt8? {
        contains(offset, count: 1) ? bytes[offset] : nil
    }

    func u16(_ offset: Int) -> UInt16? {
        guard contains(offset, count: 2) else { return nil }
        return UInt16(bytes[offset]) << 8 | UInt16(bytes[offset + 1])
    }

    func u32(_ offset: Int) -> UInt32? {
        guard contains(offset, count: 4) else { return nil }
        var value: UInt32 = 0
        for i in 0..<4 { value = value << 8 | UInt32(bytes[offset + i]) }
        return value
    }

    func u64(_ offset: Int) -> UInt64? {
        guard contains(offset, count: 8) else { return nil }
        var value: UInt64 = 0
        for i in 0..<8 { value = value << 8 | UInt64(bytes[offset + i]) }
        return value
    }

    func slice(_ offset: Int, count: Int) -> ArraySlice<UInt8>? {
        contains(offset, count: count) ? bytes[offset..<(offset + count)] : nil
    }
}

extension HostFile {
    /// Reads exactly `count` bytes at `offset` into a new array (the caller bounds `count` first).
    func readBytes(count: Int, at offset: Int64) async throws -> [UInt8] {
        if count == 0 { return [] }
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: count, alignment: 16)
        defer { buffer.deallocate() }
        try await readExactly(into: buffer, at: offset)
        return [UInt8](buffer)
    }

    /// Writes all of `bytes` at `offset`.
    func writeBytes(_ bytes: [UInt8], at offset: Int64) async throws {
        if bytes.isEmpty { return }
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: bytes.count, alignment: 16)
        defer { buffer.deallocate() }
        buffer.copyBytes(from: bytes)
        try await write(UnsafeRawBufferPointer(buffer), at: offset)
    }
}
