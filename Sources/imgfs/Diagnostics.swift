#if canImport(Glibc)
import Glibc
#endif

/// One-line messages on stderr (fd 2: glibc's `stderr` is not concurrency-safe in Swift 6).
///
/// Messages may quote an image's own strings, so each is escaped into exactly one line.
enum Diagnostics {
    static func error(_ message: String) {
        write("imgfs: \(TerminalText.escape(message))\n")
    }

    static func warning(_ message: String) {
        write("imgfs: warning: \(TerminalText.escape(message))\n")
    }

    static func write(_ text: String) {
        var bytes = Array(text.utf8)
        var offset = 0
        while offset < bytes.count {
            let n = bytes.withUnsafeMutableBytes { Glibc.write(2, $0.baseAddress! + offset, $0.count - offset) }
            if n <= 0 { return }
            offset += n
        }
    }
}
