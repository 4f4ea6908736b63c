import ArgumentParser
import ImgfsBlock

/// `imgfs check [-r leaks|all] IMAGE`: a consistency check, and repair, with `qemu-img check`'s counts and exit
/// statuses.
struct CheckCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check",
        abstract: "Check a qcow2 image's metadata for leaks and corruptions; repair them with --repair.",
        discussion: """
            Exit status as qemu-img check: 0 no problems, 1 the check could not complete, 2 corruptions, \
            3 leaked clusters only, 63 the format has no check (raw). JSON field names follow `qemu-img check --output=json`. \
            With --repair the image is opened read-write and locked as QEMU locks it, the status is that of the \
            check after the repair, and the refcounts are rewritten as a new refcount structure.
            """)

    enum Output: String, ExpressibleByArgument { case human, json }

    @Argument(help: "The image file.") var image: String
    @Option(name: .long, help: "human or json.") var output: Output = .human
    @Option(name: .long, help: "Image format; probed when absent.") var format: ImageFormat?
    @Option(name: [.customShort("r"), .long],
            help: "Repair: leaks (lower refcounts above the references) or all (every refcount and OFLAG_COPIED).")
    var repair: Qcow2RepairMode?

    func run() throws {
        let path = image
        let requested = format
        let mode = repair
        let outcome: (ImageFormat, Qcow2CheckResult?, Qcow2RepairOutcome?)
        do {
            // A plain check takes no image locks, like `info`: it only reads, and may look at an image a VM has
            // open. A repair writes, so it must keep QEMU out and be kept out by it.
            outcome = try CallerThreadExecutor.run {
                let file = try HostFile.open(path, readOnly: mode == nil)
                if mode != nil { try ImageLock.lock(file, mode: .readWrite) }
                let format = if let requested { requested } else { try await ImageOpener.probe(file) }
                guard format == .qcow2 else { return (format, nil, nil) }
                guard let mode else { return (format, try await Qcow2Check.check(file: file), nil) }
                let repaired = try await Qcow2RefcountRebuild.repair(file: file, mode: mode)
                return (format, repaired.after, repaired)
            }
        } catch {
            Diagnostics.error("Could not \(mode == nil ? "check" : "repair") '\(path)': \(error)")
            throw ExitCode(1)
        }
        guard let result = outcome.1 else {
            // qemu-img's words and status (63) for formats without a check.
            Diagnostics.error("This image format (\(outcome.0.rawValue)) does not support checks")
            throw ExitCode(63)
        }
        let fixed = outcome.2.map { $0.leaksFixed > 0 || $0.corruptionsFixed > 0 } ?? false
        // As qemu-img: what the first check found, then what the check of the repaired image finds.
        if fixed, let before = outcome.2?.before { printMessages(before) }
        printMessages(result)
        switch output {
        case .json: print(json(result, repaired: fixed ? outcome.2 : nil))
        case .human:
            if fixed, let repaired = outcome.2 {
                print("The following inconsistencies were found and repaired:\n\n"
                      + "    \(repaired.leaksFixed) leaked clusters\n    \(repaired.corruptionsFixed) corruptions\n\n"
                      + "Double checking the fixed image now...")
            }
            print(human(result), terminator: "")
        }
        if result.checkErrors > 0 {
            Diagnostics.error("Check failed")
            throw ExitCode(1)
        }
        if result.corruptions > 0 { throw ExitCode(2) }
        if result.leaks > 0 { throw ExitCode(3) }
    }

    private func printMessages(_ result: Qcow2CheckResult) {
        for message in result.messages { Diagnostics.write(TerminalText.escape(message) + "\n") }
        if result.omittedMessages > 0 {
            Diagnostics.write("(\(result.omittedMessages) more messages left out)\n")
        }
    }

    /// qemu-img leaves out the optional fields that are zero; so do we, so the two outputs compare equal.
    private func json(_ result: Qcow2CheckResult, repaired: Qcow2RepairOutcome?) -> String {
        var fields: [(String, InfoValue)] = []
        if result.imageEndOffset != 0 { fields.append(("image-end-offset", .int(result.imageEndOffset))) }
        if result.compressedClusters != 0 { fields.append(("compressed-clusters", .int(result.compressedClusters))) }
        if result.totalClusters != 0 { fields.append(("total-clusters", .int(result.totalClusters))) }
        if let fixed = repaired?.corruptionsFixed, fixed != 0 { fields.append(("corruptions-fixed", .int(Int64(fixed)))) }
        fields.append(("check-errors", .int(Int64(result.checkErrors))))
        if result.leaks != 0 { fields.append(("leaks", .int(Int64(result.leaks)))) }
        if let fixed = repaired?.leaksFixed, fixed != 0 { fields.append(("leaks-fixed", .int(Int64(fixed)))) }
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
        let hundredths = Int((value * 100).rounded(.toNearestOrEven))
        let fraction = hundredths % 100
        return "\(hundredths / 100).\(fraction < 10 ? "0" : "")\(fraction)"
    }
}

extension Qcow2RepairMode: ExpressibleByArgument {}
