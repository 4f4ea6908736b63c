/// Big-endian bytes of a field, for patching images.
public func bigEndianBytes<T: FixedWidthInteger>(_ value: T) -> [UInt8] {
    (0..<(T.bitWidth / 8)).map { UInt8(truncatingIfNeeded: value >> (T.bitWidth - 8 - 8 * $0)) }
}

/// The value of big-endian bytes read from an image.
public func bigEndianValue<C: Collection<UInt8>>(_ bytes: C) -> UInt64 { bytes.reduce(0) { $0 << 8 | UInt64($1) } }
