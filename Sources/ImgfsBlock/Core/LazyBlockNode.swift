/// A block node opened when its first user arrives and closed when its last one leaves.
///
/// A qcow2 snapshot's view holds its L1 table in memory; an image may have thousands of snapshots that share one
/// huge table, so views cost memory only while a file is open on them. Concurrent first users share one open.
public final class LazyBlockNode: Sendable {
    /// The disk size, known without opening (from the snapshot table, say).
    public let length: Int64
    private let open: @Sendable () async throws -> BlockNode
    private let state = Locked(State())

    private struct State {
        var users = 0
        var opening: Task<BlockNode, Error>?
    }

    public init(length: Int64, open: @escaping @Sendable () async throws -> BlockNode) {
        self.length = length
        self.open = open
    }

    /// The node, opened if nobody holds it; every successful call needs one `release()`.
    public func acquire() async throws -> BlockNode {
        let task = state.withLock { state -> Task<BlockNode, Error> in
            state.users += 1
            if let opening = state.opening { return opening }
            let opening = Task { try await self.open() }
            state.opening = opening
            return opening
        }
        do {
            return try await task.value
        } catch {
            // A failed open is not kept: the next user tries again.
            _ = takeIfLastUser()
            throw error
        }
    }

    /// Gives a node back; the last user's release closes it.
    public func release() async {
        guard let task = takeIfLastUser(), let node = try? await task.value else { return }
        try? await node.close()
    }

    /// Whether some user holds the node now.
    public var isOpen: Bool { state.withLock { $0.users > 0 } }

    private func takeIfLastUser() -> Task<BlockNode, Error>? {
        state.withLock { state in
            state.users -= 1
            guard state.users == 0 else { return nil }
            defer { state.opening = nil }
            return state.opening
        }
    }
}
