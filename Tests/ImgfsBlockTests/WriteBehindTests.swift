import Testing
@testable import ImgfsBlock

@Suite struct WriteBehindTests {
    private let mib: Int64 = 1 << 20

    /// One pass of 1 MiB writes: write-back starts behind it every 16 MiB, over exactly the new ground.
    @Test func followsASequentialPass() {
        var mark = WriteBehind()
        var started: [Range<Int64>] = []
        for i in Int64(0)..<64 {
            if let range = mark.note(offset: i * mib, count: Int(mib)) {
                started.append(range)
                mark.finished()
            }
        }
        #expect(started == [0..<(16 * mib), (16 * mib)..<(32 * mib), (32 * mib)..<(48 * mib), (48 * mib)..<(64 * mib)])
    }

    /// Writing the same region again starts nothing more: its pages would be written out twice.
    @Test func aSecondPassOverTheSameRegionStartsNothing() {
        var mark = WriteBehind()
        for i in Int64(0)..<32 { if mark.note(offset: i * mib, count: Int(mib)) != nil { mark.finished() } }
        for i in Int64(0)..<32 { #expect(mark.note(offset: i * mib, count: Int(mib)) == nil) }
    }

    @Test func smallWritesNeverCount() {
        var mark = WriteBehind()
        for i in Int64(0)..<10_000 { #expect(mark.note(offset: i * 4096, count: 4096) == nil) }
        #expect(mark.end == 0)
    }

    /// While a start is under way the next waits; the one after it covers what came meanwhile.
    @Test func oneStartAtATime() {
        var mark = WriteBehind()
        var first: Range<Int64>?
        for i in Int64(0)..<40 {
            let range = mark.note(offset: i * mib, count: Int(mib))
            if i == 15 { first = range } else { #expect(range == nil) }
        }
        #expect(first == 0..<(16 * mib))
        mark.finished()
        #expect(mark.note(offset: 40 * mib, count: Int(mib)) == (16 * mib)..<(41 * mib))
    }

    /// A write far ahead starts write-back up to it (the clean pages below cost nothing), and the next step is
    /// measured from there.
    @Test func aJumpAhead() {
        var mark = WriteBehind()
        #expect(mark.note(offset: 1 << 30, count: Int(mib)) == 0..<((1 << 30) + mib))
        mark.finished()
        #expect(mark.note(offset: (1 << 30) + mib, count: Int(mib)) == nil)
    }
}
