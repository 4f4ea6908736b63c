import Foundation
@testable import ImgfsBlock
import ImgfsTestSupport
import Testing

/// Suites that build and write images with QEMU's tools, one at a time: each blocks a cooperative thread while a
/// tool runs, and several at once would starve the timing-sensitive tests of the sync primitives.
@Suite(.serialized) struct ImageWritingSuites {}

/// The disk a test expects: every write applied to a plain byte array, to compare with `qemu-img convert`.
struct DiskModel {
    var bytes: [UInt8]

    mutating func write(_ data: [UInt8], at offset: Int) {
        bytes.replaceSubrange(offset..<(offset + data.count), with: data)
    }

    mutating func zero(_ offset: Int, _ length: Int) {
        bytes.replaceSubrange(offset..<(offset + length), with: repeatElement(0, count: length))
    }
}

/// Seeded random writes and zero writes through a node, mirrored in `model`: unaligned offsets and lengths from
/// one byte to three clusters, a sixth of them zero writes (half of those allowed to unmap).
func randomWrites(_ node: BlockNode, model: inout DiskModel, seed: UInt64, count: Int, clusterSize: Int,
                  window: Range<Int>? = nil) async throws {
    var rng = SplitMix64(seed: seed)
    let range = window ?? 0..<model.bytes.count
    for i in 0..<count {
        let length = Int.random(in: 1...(3 * clusterSize), using: &rng)
        let offset = Int.random(in: range.lowerBound..<(range.upperBound - length), using: &rng)
        if Int.random(in: 0..<6, using: &rng) == 0 {
            let unmap = Bool.random(using: &rng)
            try await node.writeZeroes(at: Int64(offset), length: Int64(length), flags: unmap ? [.mayUnmap] : [])
            model.zero(offset, length)
        } else {
            let data = randomBytes(length, seed: seed &+ UInt64(i) &* 7919)
            try await write(node, at: Int64(offset), data)
            model.write(data, at: offset)
        }
    }
}

extension QemuScratch {
    /// `qemu-img check` finds no corruption and no leak (its exit status is 0 only then).
    func expectCleanCheck(_ image: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let result = try runTool("qemu-img", ["check", path(image)], cwd: directory.path, check: false)
        #expect(result.status == 0, "qemu-img check: \(result.stdout) \(result.stderr)", sourceLocation: sourceLocation)
    }

    /// The image's guest contents (as qemu-img converts them) equal the model.
    func expectContents(_ image: String, equal model: DiskModel, snapshot: String? = nil,
                        sourceLocation: SourceLocation = #_sourceLocation) throws {
        let raw = try rawContents(image, snapshot: snapshot)
        let difference = firstDifference(raw, model.bytes)
        #expect(difference == nil, "first difference at \(difference ?? -1) of \(model.bytes.count)",
                sourceLocation: sourceLocation)
    }
}
