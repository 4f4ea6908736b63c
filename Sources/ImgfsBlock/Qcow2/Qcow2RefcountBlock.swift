/// One refcount block in memory: a cluster of refcounts `1 << order` bits wide, packed as the spec lays them out
/// (widths below a byte from the least significant bit of each byte, wider ones big-endian).
struct Qcow2RefcountBlock: Sendable {
    private(set) var bytes: [UInt8]
    let order: Int

    init(bytes: [UInt8], order: Int) {
        self.bytes = bytes
        self.order = order
    }

    init(zeroedClusterSize size: Int, order: Int) {
        self.init(bytes: [UInt8](repeating: 0, count: size), order: order)
    }

    var bits: Int { 1 << order }
    var count: Int { bytes.count * 8 / bits }
    /// The largest refcount the width holds.
    var maximum: UInt64 { bits == 64 ? .max : (1 << UInt64(bits)) - 1 }

    subscript(index: Int) -> UInt64 {
        get {
            let bitOffset = index * bits
            let byte = bitOffset / 8
            switch bits {
            case 1, 2, 4: return (UInt64(bytes[byte]) >> UInt64(bitOffset % 8)) & maximum
            default:
                var value: UInt64 = 0
                for i in 0..<(bits / 8) { value = value << 8 | UInt64(bytes[byte + i]) }
                return value
            }
        }
        set {
            let value = newValue & maximum
            let bitOffset = index * bits
            let byte = bitOffset / 8
            switch bits {
            case 1, 2, 4:
                let shift = UInt8(bitOffset % 8)
                let mask = UInt8(truncatingIfNeeded: maximum) << shift
                bytes[byte] = bytes[byte] & ~mask | UInt8(truncatingIfNeeded: value) << shift
            default:
                let width = bits / 8
                for i in 0..<width {
                    bytes[byte + i] = UInt8(truncatingIfNeeded: value >> UInt64(8 * (width - 1 - i)))
                }
            }
        }
    }
}
