import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// The `imgfs` binary under test, for tests that run the CLI.
public enum ImgfsBinary {
    /// `IMGFS_BIN`, else `<package root>/.build/debug/imgfs`.
    public static func path(filePath: String = #filePath) throws -> String {
        if let env = ProcessInfo.processInfo.environment["IMGFS_BIN"], !env.isEmpty {
            guard access(env, X_OK) == 0 else {
                throw TestFailure("IMGFS_BIN=\(env) is not an executable file")
            }
            return env
        }
        // Tests/ImgfsTestSupport/ImgfsBinary.swift → package root
        let root = URL(fileURLWithPath: filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent()
        let candidate = root.appendingPathComponent(".build/debug/imgfs").path
        guard access(candidate, X_OK) == 0 else {
            throw TestFailure("imgfs binary not found at \(candidate): run `swift build` first (or set IMGFS_BIN)")
        }
        return candidate
    }
}
