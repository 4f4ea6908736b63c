/// One entry of the feature name table extension: a human name for a feature bit.
struct Qcow2FeatureName: Sendable {
    enum Kind: UInt8, Sendable {
        case incompatible = 0
        case compatible = 1
        case autoclear = 2
    }
    let kind: Kind
    let bit: UInt8
    let name: String
}

/// What the header extensions after the fixed header tell us.
struct Qcow2HeaderExtensions: Sendable {
    static let endMarker: UInt32 = 0
    static let backingFormat: UInt32 = 0xE279_2ACA
    static let featureNameTable: UInt32 = 0x6803_F857
    static let bitmaps: UInt32 = 0x2385_2875
    static let fullDiskEncryption: UInt32 = 0x0537_BE77
    static let externalDataFileName: UInt32 = 0x4441_5441

    var backingFormat: String?
    var featureNames: [Qcow2FeatureName] = []
    var hasBitmaps = false
    /// The bitmaps extension's payload, for `imgfs check` to find the bitmap directory.
    var bitmapsData: [UInt8]?
    var externalDataFileName: String?

    /// Parses extensions from `start` up to `end` (the end of the header cluster or the backing file name).
    ///
    /// Unknown extensions are skipped, as the spec requires; every length is checked against `end` first.
    init(parsing bytes: BigEndianBytes, start: Int, end: Int) throws(Qcow2HeaderError) {
        let limit = min(end, bytes.count)
        var offset = start
        while offset < limit {
            guard offset <= limit - 8, let type = bytes.u32(offset), let length32 = bytes.u32(offset + 4) else {
                throw Qcow2HeaderError("header extension at byte \(offset) is truncated")
            }
            if type == Self.endMarker { return }
            let length = Int(length32)
            let dataStart = offset + 8
            guard length <= limit - dataStart, let data = bytes.slice(dataStart, count: length) else {
                throw Qcow2HeaderError("header extension 0x\(String(type, radix: 16)) of \(length) bytes " +
                                       "passes the end of the header area")
            }
            switch type {
            case Self.backingFormat:
                backingFormat = try Self.text(data, what: "backing format")
            case Self.featureNameTable:
                featureNames = Self.parseFeatureNames(data)
            case Self.bitmaps:
                // Bitmaps do not change what the disk reads; only writers must keep them consistent.
                hasBitmaps = true
                bitmapsData = Array(data)
            case Self.fullDiskEncryption:
                throw Qcow2HeaderError("encrypted images (full disk encryption header) are not supported")
            case Self.externalDataFileName:
                externalDataFileName = try Self.text(data, what: "external data file name")
            default:
                break
            }
            let padded = (length + 7) & ~7
            offset = dataStart + padded
        }
    }

    private static func text(_ data: ArraySlice<UInt8>, what: String) throws(Qcow2HeaderError) -> String {
        // Some writers NUL-pad the string; the name stops at the first NUL.
        let trimmed = data.prefix { $0 != 0 }
        guard let string = String(validating: trimmed, as: UTF8.self) else {
            throw Qcow2HeaderError("\(what) extension is not valid UTF-8")
        }
        return string
    }

    private static func parseFeatureNames(_ data: ArraySlice<UInt8>) -> [Qcow2FeatureName] {
        var names: [Qcow2FeatureName] = []
        var index = data.startIndex
        while data.endIndex - index >= 48 {
            let kindByte = data[index]
            let bit = data[index + 1]
            let nameBytes = data[(index + 2)..<(index + 48)].prefix { $0 != 0 }
            if let kind = Qcow2FeatureName.Kind(rawValue: kindByte) {
                let name = String(decoding: nameBytes, as: UTF8.self)
                names.append(Qcow2FeatureName(kind: kind, bit: bit, name: name))
            }
            index += 48
        }
        return names
    }
}
