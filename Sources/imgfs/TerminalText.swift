/// Text from images made safe for a terminal: control characters become visible escapes.
///
/// Snapshot names, feature names and file names inside an image are the image author's bytes; printed raw, a
/// newline forges an extra line and an escape sequence can retitle or clear the terminal. As qemu-img does,
/// each such character is shown as `\xNN` (`\u{...}` above 0xFF); everything else passes unchanged.
enum TerminalText {
    static func escape(_ text: String) -> String {
        var out = ""
        out.reserveCapacity(text.utf8.count)
        for scalar in text.unicodeScalars {
            if isControl(scalar) {
                out += scalar.value <= 0xFF ? "\\x" + hex(scalar.value, digits: 2) : "\\u{" + hex(scalar.value, digits: 4) + "}"
            } else {
                out.unicodeScalars.append(scalar)
            }
        }
        return out
    }

    /// C0, DEL, C1, line and paragraph separators, and the bidirectional overrides that reorder what follows.
    private static func isControl(_ scalar: Unicode.Scalar) -> Bool {
        switch scalar.value {
        case 0x00...0x1F, 0x7F...0x9F, 0x2028, 0x2029, 0x202A...0x202E, 0x2066...0x2069: return true
        default: return false
        }
    }

    private static func hex(_ value: UInt32, digits: Int) -> String {
        let text = String(value, radix: 16)
        return String(repeating: "0", count: max(0, digits - text.count)) + text
    }
}
