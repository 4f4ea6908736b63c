import CDeflate

/// Raw-deflate (RFC 1951, no zlib header) decompression of one block of known output size, via libdeflate.
public enum DeflateDecompressor {
    // Reused: allocating a decompressor per cluster costs more than small inflates.
    private static let pool = ResourcePool<OpaquePointer>(limit: 64, make: { libdeflate_alloc_decompressor() },
                                                          destroy: { libdeflate_free_decompressor($0) })

    /// Inflates `input` into all of `output`; fails unless the stream produces exactly `output.count` bytes.
    ///
    /// `input` may be longer than the stream (qcow2 stores an upper bound of the compressed size), so the
    /// `_ex` entry point is used: it stops at the stream's final block and reports how much it consumed.
    public static func decompress(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) throws {
        guard let inputBase = input.baseAddress, let outputBase = output.baseAddress else {
            throw BlockError.corrupt("empty deflate stream or output")
        }
        var consumed = 0
        var produced = 0
        let result = try pool.with { decompressor in
            libdeflate_deflate_decompress_ex(decompressor, inputBase, input.count, outputBase, output.count,
                                             &consumed, &produced)
        }
        guard result == LIBDEFLATE_SUCCESS else {
            throw BlockError.corrupt("deflate stream is invalid (libdeflate result \(result.rawValue))")
        }
        guard produced == output.count else {
            throw BlockError.corrupt("deflate stream produced \(produced) bytes, expected \(output.count)")
        }
    }
}
