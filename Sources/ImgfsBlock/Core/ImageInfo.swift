/// What `imgfs info` reports of an image, with the field names `qemu-img info --output=json` uses.
public enum ImageInfo {
    /// The description of one node (not its backing chain).
    public static func describe(_ node: BlockNode) -> InfoValue {
        var fields: [(String, InfoValue)] = [
            ("filename", .string(node.path)),
            ("format", .string(node.format.rawValue)),
            ("virtual-size", .int(node.length)),
        ]
        if let file = node.file { fields.append(("actual-size", .int(file.allocatedBytes()))) }
        var specific = node.driver.formatInfo()
        if let clusterSize = specific.removeValue(forKey: "cluster-size") { fields.append(("cluster-size", clusterSize)) }
        if let dirty = specific.removeValue(forKey: "dirty-flag") { fields.append(("dirty-flag", dirty)) }
        if let reference = node.driver.backingReference {
            fields.append(("backing-filename", .string(reference.name)))
            if let backing = node.backing { fields.append(("full-backing-filename", .string(backing.path))) }
            if let format = reference.format { fields.append(("backing-filename-format", .string(format.rawValue))) }
        }
        let snapshots = node.driver.snapshots
        if !snapshots.isEmpty {
            fields.append(("snapshots", .array(snapshots.map { s in
                var entry: [(String, InfoValue)] = [
                    ("id", .string(s.id)), ("name", .string(s.name)),
                    ("vm-state-size", .int(s.vmStateSize)),
                    ("date-sec", .int(Int64(s.dateSeconds))), ("date-nsec", .int(Int64(s.dateNanoseconds))),
                    ("vm-clock-sec", .int(Int64(s.vmClockNanoseconds / 1_000_000_000))),
                    ("vm-clock-nsec", .int(Int64(s.vmClockNanoseconds % 1_000_000_000))),
                ]
                if let icount = s.icount { entry.append(("icount", .int(icount))) }
                return .object(entry)
            })))
        }
        if !specific.isEmpty {
            let data = specific.sorted { $0.key < $1.key }.map { ($0.key, $0.value) }
            fields.append(("format-specific", .object([("type", .string(node.format.rawValue)), ("data", .object(data))])))
        }
        return .object(fields)
    }

    /// The whole chain from `node` down, as `qemu-img info --backing-chain --output=json` lists it.
    public static func describeChain(_ node: BlockNode) -> InfoValue {
        .array(node.chain.map(describe))
    }
}

extension InfoValue {
    /// Pretty-printed JSON, four-space indented like qemu-img's.
    public func json(indent: Int = 0) -> String {
        let pad = String(repeating: " ", count: indent + 4)
        let close = String(repeating: " ", count: indent)
        switch self {
        case .string(let s): return Self.quote(s)
        case .int(let i): return String(i)
        case .bool(let b): return b ? "true" : "false"
        case .array(let items):
            if items.isEmpty { return "[]" }
            return "[\n" + items.map { pad + $0.json(indent: indent + 4) }.joined(separator: ",\n") + "\n" + close + "]"
        case .object(let fields):
            if fields.isEmpty { return "{}" }
            return "{\n" + fields.map { pad + Self.quote($0.0) + ": " + $0.1.json(indent: indent + 4) }
                .joined(separator: ",\n") + "\n" + close + "}"
        }
    }

    static func quote(_ s: String) -> String {
        var out = "\""
        for scalar in s.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            default:
                if scalar.value < 0x20 {
                    let hex = String(scalar.value, radix: 16)
                    out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
                } else {
                    out.unicodeScalars.append(scalar)
                }
            }
        }
        return out + "\""
    }

    /// The value of a field of an object, if this is one.
    public subscript(key: String) -> InfoValue? {
        if case .object(let fields) = self { return fields.first { $0.0 == key }?.1 }
        return nil
    }
}
