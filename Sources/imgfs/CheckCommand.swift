import ArgumentParser
import ImgfsBlock

/// `imgfs check IMAGE`: a read-only consistency check with `qemu-img check`'s counts and exit statuses.
struct CheckCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check",
        abstract: "Check a qcow2 image's metadata for leaks and corruptions (read-only).",
        discussion: """
            Exit status as qemu-img check: 0 no problems, 1 the check could not complete, 2 corruptions, \
            3 leaked clusters only, 63 the format has no check (raw). JSON field names follow `qemu-img check --output=json`.
            """)

    enum Output: String, ExpressibleByArgument { case human, json }

    @Argument(help: "The image file.") var image: String
    @Option(name: .long, help: "human or json.") var output: Output = .human
    @Option(name: .long, help: "Image format; probed when absent.") var format: ImageFormat?

    func run() throws {
        let path = image
        let requested = format
        let outcome: (ImageFormat, Qcow2CheckResult?)
        do {
            // Like `info`, no image locks: a check only reads, and may look at an image a VM has open.
            outcome = try CallerThreadExecutor.run {
                let file = try HostFile.open(path, readOnly: true)
                let format = if let requested { requested } else { try await ImageOpener.probe(file) }
                guard format == .qcow2 else { return (format, nil) }
                return (format, try await Qcow2Check.check(file: file))
            }
        } catch {
            Diagnostics.error("Could not check '\(path)': \(error)")
            throw ExitCode(1)
        }
        guard let result = outcome.1 else {
            // qemu-img's words and status (63) for formats without a check.
            Diagnostics.error("This image format (\(outcome.0.rawValue)) does not support checks")
            throw ExitCode(63)
        }
        for message in result.messages { Diagnostics.write(TerminalText.escape(message) + "\n") }
        if result.omittedMessages > 0 {
            Diagnostics.write("(\(result.omittedMessages) more messages left out)\n")
        }
        switch output {
        case .json: print(json(result))
        case .human: print(human(result), terminator: "")
        }
        if result.checkErrors > 0 {
            Diagnostics.error("Check failed")
            throw ExitCode(1)
        }
        if result.corruptions > 0 { throw ExitCode(2) }
        if result.leaks > 0 { throw ExitCode(3) }
    }

    /// qemu-img leaves out the optional fields that are zero; so do we, so the two outputs compare equal.
    private func json(_ result: Qcow2CheckResult) -> String {
        var fields: [(String, InfoValue)] = []
        if result.imageEndOffset != 0 { fields.append(("image-end-offset", .int(result.imageEndOffset))) }
        if result.compressedClusters != 0 { fields.append(("compressed-clusters", .int(result.compressedClusters))) }
        if result.totalClusters != 0 { fields.append(("total-clusters", .int(result.totalClusters))) }
        fields.append(("check-errors", .int(Int64(result.checkErrors))))
        if result.leaks != 0 { fields.append(("leaks", .int(Int64(result.leaks)))) }
        if result.corruptions != 0 { fields.append(("corruptions", .int(Int64(result.corruptions)))) }
        if result.allocatedClusters != 0 { fields.append(("allocated-clusters", .int(result.allocatedClusters))) }
        fields.append(("filename", .string(image)))
        fields.append(("format", .string("qcow2")))
        if result.fragmentedClusters != 0 { fields.append(("fragmented-clusters", .int(result.fragmentedClusters))) }
        return InfoValue.object(fields).json()
    }

    private func human(_ r: Qcow2CheckResult) -> String {
        var text = ""
        if r.corruptions == 0 && r.leaks == 0 && r.checkErrors == 0 {
            text += "No errors were found on the image.\n"
        } else {
            if r.corruptions > 0 {
                text += "\n\(r.corruptions) errors were found on the image.\n"
                    + "Data may be corrupted, or further writes to the image may corrupt it.\n"
            }
            if r.leaks > 0 {
                text += "\n\(r.leaks) leaked clusters were found on the image.\n"
                    + "This means waste of disk space, but no harm to data.\n"
            }
            if r.checkErrors > 0 { text += "\n\(r.checkErrors) internal errors have occurred during the check.\n" }
        }
        if r.totalClusters != 0 && r.allocatedClusters != 0 {
            let allocated = Double(r.allocatedClusters)
            text += "\(r.allocatedClusters)/\(r.totalClusters) = \(percent(allocated * 100 / Double(r.totalClusters)))% allocated, "
                + "\(percent(Double(r.fragmentedClusters) * 100 / allocated))% fragmented, "
                + "\(percent(Double(r.compressedClusters) * 100 / allocated))% compressed clusters\n"
        }
        if r.imageEndOffset != 0 { text += "Image end offset: \(r.imageEndOffset)\n" }
        return text
    }

    /// Two decimals, as qemu-img's %0.2f prints them.
    private func percent(_ value: Double) -> String {
        let hundredths = Int((value * 100).rounded())
        let fraction = hundredths % 100
        return "\(hundredths / 100).\(fraction < 10 ? "0" : "")\(fraction)"
    }
}
