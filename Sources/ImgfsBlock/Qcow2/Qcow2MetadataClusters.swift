/// The host clusters that hold metadata (header, L1 and L2 tables, refcount table and blocks, snapshot and bitmap
/// tables), so that guest data is never written over them, as QEMU's overlap check guarantees.
///
/// A corrupt image can name a metadata cluster as a data cluster (or a refcount too low can offer one for
/// allocation); writing there would destroy the image. Every data write is checked against this set first and
/// fails with EIO instead. Inactive L2 tables (those only snapshots use) are not listed, as in QEMU's default mode.
final class Qcow2MetadataClusters: Sendable {
    private let clusters = Locked<Set<Int64>>([])
    private let clusterBits: Int64

    init(clusterBits: Int) { self.clusterBits = Int64(clusterBits) }

    /// Adds every cluster `bytes` bytes from `offset` touch.
    func insert(_ offset: Int64, bytes: Int64) {
        guard offset >= 0, bytes > 0 else { return }
        clusters.withLock { set in
            for cluster in (offset >> clusterBits)...((offset + bytes - 1) >> clusterBits) { set.insert(cluster) }
        }
    }

    /// Clusters no longer referenced at all are no longer metadata.
    func remove(clusters released: [Int64]) {
        clusters.withLock { set in for cluster in released { set.remove(cluster) } }
    }

    /// Whether writing `bytes` bytes at host `offset` would touch metadata.
    func overlaps(_ offset: Int64, bytes: Int64) -> Bool {
        guard bytes > 0 else { return false }
        return clusters.withLock { set in
            ((offset >> clusterBits)...((offset + bytes - 1) >> clusterBits)).contains { set.contains($0) }
        }
    }
}
