import Synchronization

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
    let capacity: Int
    private let recent: Mutex<LRUList<Qcow2CompressedCluster, Qcow2DecompressedCluster>>

    init(file: HostFile, compression: Qcow2CompressionType, clusterSize: Int, fileSize: Int64) {
        self.file = file
        self.compression = compression
        self.clusterSize = clusterSize
        self.fileSize = fileSize
        // A handful of clusters, but never more than ~8 MiB of 2 MiB clusters.
        capacity = max(2, min(16, (8 << 20) / clusterSize))
        recent = Mutex(LRUList(capacity: capacity))
    }

    /// The whole decompressed cluster described by `descriptor`.
    func cluster(_ descriptor: Qcow2CompressedCluster) async throws -> Qcow2DecompressedCluster {
        if let hit = recent.withLock({ $0.value(for: descriptor) }) { return hit }
        // The stored size is an upper bound that may run past the end of the file; the stream must end before.
        let available = fileSize - descriptor.hostOffset
        let inputCount = Int(min(Int64(descriptor.maxCompressedBytes), available))
        guard inputCount > 0 else {
            throw BlockError.corrupt("\(file.path): compressed cluster at \(descriptor.hostOffset) lies past the end of the file")
        }
        let input = UnsafeMutableRawBufferPointer.allocate(byteCount: inputCount, alignment: 16)
        defer { input.deallocate() }
        try await file.readExactly(into: input, at: descriptor.hostOffset)
        let compression = self.compression
        let clusterSize = self.clusterSize
        var failure: Error?
        let bytes = [UInt8](unsafeUninitializedCapacity: clusterSize) { output, initialized in
            do {
                let raw = UnsafeMutableRawBufferPointer(output)
                switch compression {
                case .zlib: try DeflateDecompressor.decompress(UnsafeRawBufferPointer(input), into: raw)
                case .zstd: try ZstdDecompressor.decompress(UnsafeRawBufferPointer(input), into: raw)
                }
                initialized = clusterSize
            } catch {
                failure = error
                initialized = 0
            }
        }
        if let failure {
            if case BlockError.corrupt(let reason) = failure {
                throw BlockError.corrupt("\(file.path): compressed cluster at \(descriptor.hostOffset): \(reason)")
            }
            throw failure
        }
        let cluster = Qcow2DecompressedCluster(bytes: bytes)
        recent.withLock { $0.insert(cluster, for: descriptor) }
        return cluster
    }
}
