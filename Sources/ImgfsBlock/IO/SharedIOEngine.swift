#if canImport(Glibc)
import Glibc
#endif

/// The engine every `HostFile` uses unless given another, chosen once per process.
///
/// Chosen by, in order: `configure(_:)` with a kind, the environment variable `IMGFS_IO_ENGINE` (`uring` or
/// `threads`), else io_uring when the kernel allows it and threads otherwise.
public enum SharedIOEngine {
    public static let environmentVariable = "IMGFS_IO_ENGINE"

    /// The shared engine, created on first use.
    public static var engine: any IOEngine {
        lock.withLock {
            if let existing = instance { return existing }
            let created = (try? make(kind: requestedKind(), strict: false)) ?? ThreadPoolIOEngine()
            instance = created
            return created
        }
    }

    /// Which engine runs host I/O (creating it if needed).
    public static var kind: IOEngineKind { engine.kind }

    /// Creates the shared engine now, of `kind` (nil: the environment variable, else automatic), and returns the
    /// kind that runs. Has no effect once the engine exists. Throws when io_uring is asked for but unavailable.
    @discardableResult
    public static func configure(_ kind: IOEngineKind?) throws -> IOEngineKind {
        try lock.withLock {
            if let existing = instance { return existing.kind }
            let created = try make(kind: kind ?? requestedKind(), strict: kind != nil)
            instance = created
            return created.kind
        }
    }

    /// The kind `IMGFS_IO_ENGINE` asks for; nil when unset or not a kind (automatic).
    public static func requestedKind() -> IOEngineKind? {
        guard let value = getenv(environmentVariable) else { return nil }
        return IOEngineKind(rawValue: String(cString: value))
    }

    /// An engine of the given kind; automatic (nil) prefers io_uring. Unless `strict`, a refused io_uring falls
    /// back to threads.
    public static func make(kind: IOEngineKind?, strict: Bool = true) throws -> any IOEngine {
        switch kind {
        case .threads:
            return ThreadPoolIOEngine()
        case .uring:
            if strict { return try UringIOEngine() }
            return (try? UringIOEngine()) ?? ThreadPoolIOEngine()
        case nil:
            return (try? UringIOEngine()) ?? ThreadPoolIOEngine()
        }
    }

    nonisolated(unsafe) private static var instance: (any IOEngine)?
    private static let lock = PthreadLock()
}
