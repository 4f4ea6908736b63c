#if canImport(Glibc)
import Glibc
#endif
/// A small deterministic generator, so seeded tests and fuzz rounds are reproducible.
public struct SplitMix64: RandomNumberGenerator {
    public var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// `count` pseudo-random bytes from `seed`.
public func randomBytes(_ count: Int, seed: UInt64) -> [UInt8] {
    var rng = SplitMix64(seed: seed)
    var bytes = [UInt8](repeating: 0, count: count)
    bytes.withUnsafeMutableBytes { raw in
        let words = count / 8
        let p = raw.baseAddress!
        for i in 0..<words { p.storeBytes(of: rng.next(), toByteOffset: i * 8, as: UInt64.self) }
        var tail = rng.next()
        for i in (words * 8)..<count {
            raw[i] = UInt8(truncatingIfNeeded: tail)
            tail >>= 8
        }
    }
    return bytes
}
