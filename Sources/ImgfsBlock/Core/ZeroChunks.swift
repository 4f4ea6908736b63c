/// Zero bytes written as data, for drivers whose host cannot zero a range any other way.
enum ZeroChunks {
    /// The most zero bytes handed to `write` at once: one buffer of this size serves any length.
    static let maxChunk = 1 << 20

    /// Calls `write(offset, zeros)` for consecutive chunks covering `length` bytes from `offset`.
    static func write(at offset: Int64, length: Int64,
                      _ write: (Int64, UnsafeRawBufferPointer) async throws -> Void) async throws {
        guard length > 0 else { return }
        let chunk = Int(min(length, Int64(maxChunk)))
        let zeros = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 4096)
        defer { zeros.deallocate() }
        zeros.initializeMemory(as: UInt8.self, repeating: 0)
        var done: Int64 = 0
        while done < length {
            let count = Int(min(Int64(chunk), length - done))
            try await write(offset + done, UnsafeRawBufferPointer(rebasing: zeros[..<count]))
            done += Int64(count)
        }
    }
}
