import ArgumentParser
import ImgfsBlock

/// `imgfs info IMAGE`.
struct InfoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "info",
        abstract: "Describe an image: format, sizes, backing chain, snapshots.",
        discussion: "Field names follow `qemu-img info --output=json`.\n\nExample: imgfs info --output=json --backing-chain disk.qcow2")

    enum Output: String, ExpressibleByArgument { case human, json }

    @Argument(help: "The image file.") var image: String
    @Option(name: .long, help: "human or json.") var output: Output = .human
    @Flag(name: .long, help: "Describe every image of the backing chain.") var backingChain = false
    @Option(name: .long, help: "Image format; probed when absent.") var format: ImageFormat?
    @Option(name: .long, parsing: .singleValue, help: "A directory where backing files may also live (repeatable).")
    var allowPath: [String] = []

    func run() throws {
        // A short look takes no image locks, so it works beside a running VM as `qemu-img info -U` does.
        let options = OpenOptions(readOnly: true, format: format, pathPolicy: try PathPolicy(allowedDirectories: allowPath),
                                  locking: .none)
        let path = image
        let node: BlockNode
        do {
            node = try CallerThreadExecutor.run { try await ImageOpener.open(path, options: options) }
        } catch {
            Diagnostics.error("\(error)")
            throw ExitStatus.imageError
        }
        let nodes = backingChain ? node.chain : [node]
        for warning in nodes.flatMap(\.warnings) { Diagnostics.warning(warning) }
        switch output {
        case .json:
            print(backingChain ? ImageInfo.describeChain(node).json() : ImageInfo.describe(node).json())
        case .human:
            print(nodes.map { human(ImageInfo.describe($0)) }.joined(separator: "\n"))
        }
        try CallerThreadExecutor.run { try await node.close() }
    }

    private func human(_ info: InfoValue) -> String {
        var lines: [String] = []
        if case .string(let name)? = info["filename"] { lines.append("image: \(name)") }
        if case .string(let format)? = info["format"] { lines.append("file format: \(format)") }
        if case .int(let size)? = info["virtual-size"] { lines.append("virtual size: \(size) bytes") }
        if case .int(let size)? = info["actual-size"] { lines.append("disk size: \(size) bytes") }
        if case .int(let size)? = info["cluster-size"] { lines.append("cluster_size: \(size)") }
        if case .string(let backing)? = info["backing-filename"] { lines.append("backing file: \(backing)") }
        if case .string(let format)? = info["backing-filename-format"] { lines.append("backing file format: \(format)") }
        if case .array(let snapshots)? = info["snapshots"] {
            lines.append("Snapshot list:")
            for snapshot in snapshots {
                if case .string(let id)? = snapshot["id"], case .string(let name)? = snapshot["name"] {
                    lines.append("  \(id)  \(name)")
                }
            }
        }
        if case .object(let specific)? = info["format-specific"], case .object(let data)? = InfoValue.object(specific)["data"] {
            lines.append("Format specific information:")
            for (key, value) in data { lines.append("    \(key): \(value.json(indent: 4))") }
        }
        // Each line may quote the image's own strings: escaped, it stays one line.
        return lines.map(TerminalText.escape).joined(separator: "\n")
    }
}
