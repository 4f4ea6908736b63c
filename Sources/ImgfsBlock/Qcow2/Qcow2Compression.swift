/// A decompressed cluster, shared read-only between readers.
final class Qcow2DecompressedCluster: Sendable {
    let bytes: [UInt8]
    init(bytes: [UInt8]) { self.bytes = bytes }
}

/// Reads and inflates compressed clusters, keeping the last few so sequential small reads inflate each once.
final class Qcow2CompressedReader: Sendable {
    let file: HostFile
    let compression: Qcow2CompressionType
    let clusterSize: Int
    let fileSize: Int64
    private let recent: BudgetedCache<Qcow2CompressedCluster, Qcow2DecompressedCluster>

    init(file: HostFile, compression: Qcow2CompressionType, clusterSize: Int, fileSize: Int64, budget: MemoryBudget) {
        self.file = file
        self.compression = compression
        self.clusterSize = clusterSize
        self.fileSize = fileSize
        // A handful of clusters, but never more than ~8 MiB of 2 MiB clusters.
        recent = BudgetedCache(capacity: max(2, min(16, (8 << 20) / clusterSize)), entryBytes: clusterSize,
                               budget: budget)
    }

    /// Copies the cluster's decompressed bytes from `start` into all of `target`.
    ///
    /// A read of the whole cluster inflates straight into the caller's buffer and skips the cache: large
    /// sequential reads neither copy nor evict what small readers share.
    func read(_ descriptor: Qcow2CompressedCluster, from start: Int, into target: UnsafeMutableRawBufferPointer) async throws {
        if let hit = recent.value(for: descriptor) {
            hit.bytes.withUnsafeBytes { target.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[start..<(start + target.count)])) }
            return
        }
        if start == 0 && target.count == clusterSize {
            return try await inflate(descriptor, into: target)
        }
        let output = UnsafeMutableRawBufferPointer.allocate(byteCount: clusterSize, alignment: 16)
        defer { output.deallocate() }
        try await inflate(descriptor, into: output)
        target.copyMemory(from: UnsafeRawBufferPointer(rebasing: output[start..<(start + target.count)]))
        let bytes = [UInt8](UnsafeRawBufferPointer(output))
        recent.insert(Qcow2DecompressedCluster(bytes: bytes), for: descriptor)
    }

    /// Reads the compressed bytes and inflates exactly one cluster into `output`.
    private func inflate(_ descriptor: Qcow2CompressedCluster, into output: UnsafeMutableRawBufferPointer) async throws {
        // The stored size is an upper bound that may run past the end of the file; the stream must end before.
        let available = fileSize - descriptor.hostOffset
        let inputCount = Int(min(Int64(descriptor.maxCompressedBytes), available))
        guard inputCount > 0 else {
            throw BlockError.corrupt("\(file.path): compressed cluster at \(descriptor.hostOffset) lies past the end of the file")
        }
        let input = UnsafeMutableRawBufferPointer.allocate(byteCount: inputCount, alignment: 16)
        defer { input.deallocate() }
        try await file.readExactly(into: input, at: descriptor.hostOffset)
        let (source, target, compression) = (UncheckedSendable(UnsafeRawBufferPointer(input)), UncheckedSendable(output),
                                             self.compression)
        do {
            try await ComputePool.run {
                switch compression {
                case .zlib: try DeflateDecompressor.decompress(source.value, into: target.value)
                case .zstd: try ZstdDecompressor.decompress(source.value, into: target.value)
                }
            }
        } catch BlockError.corrupt(let reason) {
            throw BlockError.corrupt("\(file.path): compressed cluster at \(descriptor.hostOffset): \(reason)")
        }
    }
}
