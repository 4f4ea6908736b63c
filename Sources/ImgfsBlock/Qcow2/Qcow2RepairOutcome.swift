/// What `qemu-img check -r` may change: leaked clusters only, or every refcount and OFLAG_COPIED error.
public enum Qcow2RepairMode: String, Sendable, CaseIterable {
    /// Lowers refcounts that exceed the references; refcounts below them stay (they are corruptions).
    case leaks
    /// Every refcount becomes the number of references, and OFLAG_COPIED follows it.
    case all
}

/// What a repair found, what it changed, and what the check says afterwards.
public struct Qcow2RepairOutcome: Sendable, Equatable {
    public let before: Qcow2CheckResult
    public let after: Qcow2CheckResult
    /// Whether a new refcount table and blocks were written (and the header switched to them).
    public let rebuilt: Bool
    /// L1 and L2 entries whose OFLAG_COPIED bit was set or cleared.
    public let copiedFlagsFixed: Int

    /// qemu-img's "leaks-fixed": leaks the check no longer finds.
    public var leaksFixed: Int { max(0, before.leaks - after.leaks) }
    /// qemu-img's "corruptions-fixed": corruptions the check no longer finds.
    public var corruptionsFixed: Int { max(0, before.corruptions - after.corruptions) }
}
