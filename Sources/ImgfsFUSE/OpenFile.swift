import ImgfsBlock

/// One open of an exported file: the node it reads and writes, found from the kernel's file handle.
///
/// The handle is a retained pointer to this object, so the hot path finds its node with no lookup and no lock;
/// release gives the reference back (and closes a snapshot view its last user leaves).
final class OpenFile: Sendable {
    let file: ExportedFile
    let node: BlockNode

    init(file: ExportedFile, node: BlockNode) {
        self.file = file
        self.node = node
    }

    var isReadOnly: Bool { file.isReadOnly }

    /// The file handle for the kernel; `release(handle:)` balances it.
    var handle: UInt64 { UInt64(UInt(bitPattern: Unmanaged.passRetained(self).toOpaque())) }

    static func from(handle: UInt64) -> OpenFile {
        Unmanaged<OpenFile>.fromOpaque(UnsafeRawPointer(bitPattern: UInt(handle))!).takeUnretainedValue()
    }

    static func release(handle: UInt64) {
        Unmanaged<OpenFile>.fromOpaque(UnsafeRawPointer(bitPattern: UInt(handle))!).release()
    }

    /// How many of `size` bytes from `offset` lie inside the disk now (0 past its end).
    func bytesInside(offset: Int64, size: Int) -> Int {
        Int(max(0, min(Int64(size), node.length - max(0, offset))))
    }
}
