import Synchronization

/// How host files read what the page cache does not hold: through it (buffered) or around it (O_DIRECT).
public enum HostReadPolicy {
    private static let direct = Atomic<Bool>(false)

    /// Whether aligned reads that miss the page cache go to the disk with O_DIRECT.
    public static var directMisses: Bool { direct.load(ordering: .relaxed) }

    /// Sets the policy for every host file of the process; call before opening images.
    public static func configure(directMisses: Bool) {
        direct.store(directMisses, ordering: .relaxed)
    }

    /// O_DIRECT needs the buffer, offset and length aligned to the device's block size; 4 KiB covers them all.
    static let alignment = 4096

    static func isDirectAligned(_ buffer: UnsafeMutableRawBufferPointer, _ offset: Int64) -> Bool {
        guard let base = buffer.baseAddress, !buffer.isEmpty else { return false }
        return Int(bitPattern: base) % alignment == 0 && buffer.count % alignment == 0 && offset % Int64(alignment) == 0
    }
}
