/// The image formats imgfs knows, by the names qemu-img uses.
public enum ImageFormat: String, Sendable, CaseIterable {
    case raw
    case qcow2
    case vmdk

    /// Whether imgfs's driver writes this format yet; images of other formats open read-only.
    public var isWritableByImgfs: Bool {
        switch self {
        case .raw, .qcow2: return true
        case .vmdk: return false
        }
    }

    /// Formats recognised by their first bytes. Raw has no magic and is the answer when nothing matches.
    public static func probe(header: UnsafeRawBufferPointer) -> ImageFormat {
        func starts(with magic: [UInt8]) -> Bool {
            header.count >= magic.count && zip(header, magic).allSatisfy { $0 == $1 }
        }
        if starts(with: [0x51, 0x46, 0x49, 0xFB]) { return .qcow2 }  // "QFI\xfb"
        if starts(with: [0x4B, 0x44, 0x4D, 0x56]) { return .vmdk }   // "KDMV" hosted sparse extent
        if starts(with: Array("# Disk DescriptorFile".utf8)) { return .vmdk }
        return .raw
    }
}
