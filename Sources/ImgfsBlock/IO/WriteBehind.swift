/// Where write-back behind large writes that move forward through a file has been started, and when to start more.
///
/// The kernel starts write-back only once a tenth of memory is dirty, so the flush that ends a large copy found
/// all of it still to write. Started behind the writes instead, the disk works while the guest still writes
/// (sequential 1 MiB writes to a fresh qcow2, then fsync: 1.6-2.5x qemu-storage-daemon with this, 0.9-1.2x
/// without). Only new ground counts: a region written again (a loop over one range, random writes) would have its
/// pages written out twice, and small writes never count.
struct WriteBehind {
    /// Write-back has been started for everything below this offset (that large writes reached).
    private(set) var started: Int64 = 0
    /// The furthest end of a large write.
    private(set) var end: Int64 = 0
    /// A start is under way; the next waits for it.
    private(set) var isStarting = false

    /// Writes at least this large count.
    static let largeWriteBytes = 256 << 10
    /// How much new ground large writes cover before write-back is started over it.
    static let stepBytes: Int64 = 16 << 20

    /// Records a write; returns the range to start write-back over when it is time (the caller then calls
    /// `finished()` once the start returns).
    mutating func note(offset: Int64, count: Int) -> Range<Int64>? {
        guard count >= Self.largeWriteBytes, offset >= 0 else { return nil }
        end = max(end, offset + Int64(count))
        guard end - started >= Self.stepBytes, !isStarting else { return nil }
        // Pages below the mark that no write dirtied cost the kernel nothing to skip.
        defer {
            started = end
            isStarting = true
        }
        return started..<end
    }

    mutating func finished() { isStarting = false }
}
