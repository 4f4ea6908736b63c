/// An L1 table in memory: the active image's changes as writes allocate L2 tables; a snapshot's never does.
///
/// Lookups read one entry under a short lock; writers change entries under the image's metadata mutex, so an
/// entry always names either the old or the new L2 table, both of which hold what the guest last wrote.
final class Qcow2L1Table: Sendable {
    private let entries: Locked<[UInt64]>

    init(_ words: [UInt64]) { entries = Locked(words) }

    var count: Int { entries.withLock { $0.count } }

    /// The entry at `index`, or nil past the end of the table.
    func entry(_ index: Int64) -> UInt64? {
        entries.withLock { words in index >= 0 && index < Int64(words.count) ? words[Int(index)] : nil }
    }

    func set(_ index: Int, to value: UInt64) {
        entries.withLock { $0[index] = value }
    }

    /// Adds unallocated entries up to `count`.
    func grow(to count: Int) {
        entries.withLock { words in
            if count > words.count { words.append(contentsOf: repeatElement(0, count: count - words.count)) }
        }
    }

    var words: [UInt64] { entries.withLock { $0 } }
}
