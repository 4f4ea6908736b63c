import CZstd

/// Zstandard decompression of one block of known output size; the input may hold several frames and padding.
public enum ZstdDecompressor {
    // Reused: creating a zstd context costs far more than decompressing one cluster.
    private static let pool = ResourcePool<OpaquePointer>(limit: 64, make: { ZSTD_createDCtx() },
                                                          destroy: { ZSTD_freeDCtx($0) })

    /// Decompresses frames from `input` until `output` is exactly full.
    ///
    /// qcow2 stores an upper bound of the compressed size, so bytes after the last needed frame are ignored;
    /// a frame that would overflow `output`, or input that ends before `output` is full, is corruption.
    public static func decompress(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) throws {
        guard let inputBase = input.baseAddress, let outputBase = output.baseAddress else {
            throw BlockError.corrupt("empty zstd stream or output")
        }
        try pool.with { context in try decompress(input, inputBase, into: output, outputBase, context: context) }
    }

    private static func decompress(_ input: UnsafeRawBufferPointer, _ inputBase: UnsafeRawPointer,
                                   into output: UnsafeMutableRawBufferPointer, _ outputBase: UnsafeMutableRawPointer,
                                   context: OpaquePointer) throws {
        var consumed = 0
        var produced = 0
        while produced < output.count {
            guard consumed < input.count else {
                throw BlockError.corrupt("zstd data ended after \(produced) of \(output.count) bytes")
            }
            let frameSize = ZSTD_findFrameCompressedSize(inputBase + consumed, input.count - consumed)
            if ZSTD_isError(frameSize) != 0 || frameSize == 0 {
                throw BlockError.corrupt("zstd frame at byte \(consumed) is invalid: \(errorName(frameSize))")
            }
            let written = ZSTD_decompressDCtx(context, outputBase + produced, output.count - produced,
                                              inputBase + consumed, frameSize)
            if ZSTD_isError(written) != 0 {
                throw BlockError.corrupt("zstd frame at byte \(consumed) failed: \(errorName(written))")
            }
            consumed += frameSize
            produced += written
        }
    }

    private static func errorName(_ code: Int) -> String {
        guard let name = ZSTD_getErrorName(code) else { return "error \(code)" }
        return String(cString: name)
    }
}
