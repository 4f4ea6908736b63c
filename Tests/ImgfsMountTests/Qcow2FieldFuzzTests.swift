import Foundation
import Testing
import ImgfsBlock
import ImgfsTestSupport
#if canImport(Glibc)
import Glibc
#endif

/// Field-level fuzzing of qcow2 metadata: every aligned field of every metadata structure gets boundary values.
///
/// Pass means: no trap and no hang; `imgfs info` either describes the image or refuses it in one line with exit
/// 65; a read fails (EIO) only inside the guest range the damaged field maps, and reads everywhere else equal the
/// undamaged image; snapshot views and a mounted subset read without taking the daemon down.
extension ImgfsMountTests {
@Suite(.serialized)
struct Qcow2FieldFuzzTests {
    /// One field of one metadata structure, and the guest bytes that depend on it (nil: any, the whole image).
    struct Field {
        let offset: Int
        let width: Int
        let damages: Range<Int64>?
        let what: String
    }

    /// A pristine image, its fields, and what qemu-img reads from it.
    struct BaseImage {
        let name: String
        let bytes: [UInt8]
        let clusterSize: Int
        /// Fields by structure (header, extension area, L1, L2, refcounts, snapshot table).
        let groups: [[Field]]
        let contents: [UInt8]
    }

    static let values: [UInt64] = [0, 1, 2, 0x1FF, 0x200, 1 << 31, (1 << 32) - 1, 1 << 32, 1 << 56, 1 << 62,
                                   1 << 63, (1 << 63) | 0x10000, UInt64.max, UInt64.max - 1]

    @Test("2,000+ seeded field mutants: no trap, no hang, one-line refusals, EIO only where damaged",
          .timeLimit(.minutes(10)))
    func fieldFuzz() async throws {
        let scratch = try Scratch("fuzz")
        defer { scratch.cleanup() }
        let bases = try [
            makeBase(scratch, "v3.qcow2", options: "cluster_size=4096", snapshot: true, compressed: true),
            makeBase(scratch, "v2.qcow2", options: "compat=0.10,cluster_size=4096", snapshot: true, compressed: false),
            makeBase(scratch, "ext.qcow2", options: "extended_l2=on,cluster_size=65536", snapshot: false, compressed: false),
        ]
        var generator = SplitMix64(seed: 0x0F0F_2026)
        let mutants = 2100
        var opened = 0, refused = 0, damagedReads = 0, mounted = 0, writtenMutants = 0
        let mnt = try scratch.dir("mnt")
        for round in 0..<mutants {
            let base = bases[round % bases.count]
            // A structure first, then one of its fields: L2 entries far outnumber header fields.
            let group = base.groups[Int(generator.next() % UInt64(base.groups.count))]
            let field = group[Int(generator.next() % UInt64(group.count))]
            let original = field.bytes(of: base.bytes)
            let pick = generator.next() % UInt64(Self.values.count + 3)
            let value: UInt64 = pick < UInt64(Self.values.count) ? Self.values[Int(pick)]
                : pick == UInt64(Self.values.count) ? original ^ 1
                : pick == UInt64(Self.values.count + 1) ? original &+ UInt64(base.clusterSize) : UInt64(base.bytes.count)
            var bytes = base.bytes
            field.store(value, into: &bytes)
            let path = scratch.path("m-\(base.name)")
            try writeFile(path, bytes)
            let context = "mutant \(round): \(base.name) \(field.what) at \(field.offset) = 0x\(String(value, radix: 16))"
            if ProcessInfo.processInfo.environment["IMGFS_FUZZ_TRACE"] != nil { FileHandle.standardError.write(Data((context + "\n").utf8)) }

            // The CLI: described, or refused in one clean line with 65 (never a signal).
            let info = try scratch.imgfs(["info", "--format", "qcow2", path], check: false)
            #expect(info.status == 0 || info.status == 65, "\(context): info exited \(info.status)")
            if info.status == 65 {
                #expect(info.stderr.split(separator: "\n").count == 1, "\(context): \(info.stderr)")
            }

            // The driver: reads outside the damaged range equal the pristine image.
            let node: BlockNode
            do {
                node = try await ImageOpener.open(path, options: OpenOptions(readOnly: true, format: .qcow2,
                                                                             pathPolicy: try PathPolicy(), locking: .none))
            } catch {
                refused += 1
                #expect(info.status == 65, "\(context): opened by info but refused here: \(error)")
                continue
            }
            opened += 1
            let chunk = base.clusterSize
            var offset: Int64 = 0
            while offset < node.length {
                let count = Int(min(Int64(chunk), node.length - offset))
                let range = offset..<(offset + Int64(count))
                let inDamage = field.damages.map { $0.overlaps(range) } ?? true
                do {
                    let got = try await read(node, at: offset, count: count)
                    if !inDamage {
                        let want = Array(base.contents[Int(offset)..<(Int(offset) + count)])
                        #expect(got == want, "\(context): wrong bytes at \(offset) outside the damaged range")
                    }
                } catch {
                    #expect(inDamage, "\(context): \(error) at \(offset), outside the damaged range")
                    damagedReads += 1
                }
                offset += Int64(count)
            }
            _ = try? await node.chainBlockStatus(at: 0, length: node.length)
            for snapshot in node.driver.snapshots {
                guard let view = try? await node.driver.openSnapshot(snapshot) else { continue }
                let viewNode = BlockNode(path: "view", driver: view, file: nil, backing: nil, readOnly: true)
                // A damaged disk size can make a view exabytes long: its first 64 MiB and its last bytes are read.
                var position: Int64 = 0
                let end = min(viewNode.length, 64 << 20)
                while position < end {
                    let count = Int(min(Int64(64 << 10), end - position))
                    _ = try? await read(viewNode, at: position, count: count)
                    position += Int64(count)
                }
                if viewNode.length > end { _ = try? await read(viewNode, at: viewNode.length - 512, count: 512) }
                try? await view.close()
            }
            try await node.close()

            // Every third mutant is written too: no trap, and what a write acknowledged reads back.
            if round % 3 == 0 { writtenMutants += try await fuzzWrites(path, context: context, generator: &generator) }

            // A subset through the real daemon: every file reads (or fails with EIO) and the daemon stays up.
            if round % 50 == 0 {
                try scratch.mount(path, at: mnt, ["--read-only", "--format", "qcow2"])
                mounted += 1
                for file in try mountedFiles(mnt) {
                    let fd = try openOrThrow(file, O_RDONLY)
                    defer { close(fd) }
                    var position: Int64 = 0
                    let size = fileSize(file) ?? 0
                    while position < size {
                        var buffer = [UInt8](repeating: 0, count: 65536)
                        let n = pread(fd, &buffer, 65536, off_t(position))
                        #expect(n > 0 || errno == EIO, "\(context): \(file) at \(position): \(errnoText())")
                        position += 65536
                    }
                }
                guard let pid = daemonPid(mountpoint: mnt) else { throw TestFailure("\(context): no daemon") }
                #expect(processAlive(pid), "\(context): the daemon died")
                try scratch.unmount(mnt)
            }
        }
        #expect(opened > mutants / 4 && refused > mutants / 50 && damagedReads > 0 && mounted >= 30 && writtenMutants > 100,
                "opened \(opened), refused \(refused), failed reads \(damagedReads), mounted \(mounted), written \(writtenMutants)")
    }

    /// Opens a mutant read-write (refusal is fine) and writes, zeroes and grows it at random; every write that
    /// succeeds must read back. Returns 1 if the mutant opened for writing.
    private func fuzzWrites(_ path: String, context: String, generator: inout SplitMix64) async throws -> Int {
        let node: BlockNode
        do {
            node = try await ImageOpener.open(path, options: OpenOptions(readOnly: false, format: .qcow2,
                                                                         pathPolicy: try PathPolicy(), locking: .none))
        } catch {
            return 0
        }
        for step in 0..<6 {
            guard node.length > 0 else { break }
            let count = Int(min(node.length, Int64(1 + generator.next() % 20_000)))
            let offset = Int64(generator.next() % UInt64(node.length - Int64(count) + 1))
            if step == 4 {
                _ = try? await node.writeZeroes(at: offset, length: Int64(count), flags: .mayUnmap)
                continue
            }
            if step == 5 {
                _ = try? await node.truncate(to: node.length + 1 << 20)
                continue
            }
            let data = randomBytes(count, seed: generator.next())
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: count, alignment: 16)
            defer { buffer.deallocate() }
            buffer.copyBytes(from: data)
            guard (try? await node.write(at: offset, from: UnsafeRawBufferPointer(buffer))) != nil else { continue }
            if let back = try? await read(node, at: offset, count: count) {
                let same = back == data
                #expect(same, "\(context): a write at \(offset) (+\(count)) did not read back")
            }
        }
        try? await node.close()
        return 1
    }

    private func read(_ node: BlockNode, at offset: Int64, count: Int) async throws -> [UInt8] {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: count, alignment: 16)
        defer { buffer.deallocate() }
        try await node.read(at: offset, into: buffer)
        return [UInt8](buffer)
    }

    private func mountedFiles(_ mnt: String) throws -> [String] {
        var files = try FileManager.default.contentsOfDirectory(atPath: mnt).filter { $0.hasSuffix(".raw") }
            .map { mnt + "/" + $0 }
        if let snapshots = try? FileManager.default.contentsOfDirectory(atPath: mnt + "/snapshots") {
            files += snapshots.map { mnt + "/snapshots/" + $0 }
        }
        return files
    }

    /// Builds an image with data, zeros, a discard, optionally a compressed cluster and a snapshot, and lists the
    /// fields of its header, extensions, L1 and L2 tables, refcount table and blocks, and snapshot table.
    private func makeBase(_ scratch: Scratch, _ name: String, options: String, snapshot: Bool,
                          compressed: Bool) throws -> BaseImage {
        let path = scratch.path(name)
        try runTool("qemu-img", ["create", "-q", "-f", "qcow2", "-o", options, path, "4M"])
        var commands = ["write -P 0x11 0 192k", "write -P 0x22 1M 64k", "write -P 0x33 3M 100k"]
        if !name.hasPrefix("v2") { commands.append("write -z 64k 64k") }
        if compressed { commands.append("write -c -P 0x44 2M 4k") }
        try runTool("qemu-io", ["-f", "qcow2"] + commands.flatMap { ["-c", $0] } + [path])
        if snapshot {
            try runTool("qemu-img", ["snapshot", "-c", "s1", path])
            try runTool("qemu-io", ["-f", "qcow2", "-c", "write -P 0x55 0 8k", "-c", "discard 1M 64k", path])
        }
        let bytes = try readFile(path)
        let reference = scratch.path(name + ".ref")
        try runTool("qemu-img", ["convert", "-O", "raw", path, reference])
        let contents = try readFile(reference)
        func be(_ offset: Int, _ width: Int) -> UInt64 {
            bigEndianValue(bytes[offset..<(offset + width)])
        }
        let clusterSize = 1 << Int(be(20, 4))
        let extended = options.contains("extended_l2=on")
        let entryBytes = extended ? 16 : 8
        let span = Int64(clusterSize) * Int64(clusterSize / entryBytes)
        var fields: [Field] = []
        // Header fields, then the extension area word by word.
        let headerFields: [(Int, Int)] = [(0, 4), (4, 4), (8, 8), (16, 4), (20, 4), (24, 8), (32, 4), (36, 4),
                                          (40, 8), (48, 8), (56, 4), (60, 4), (64, 8), (72, 8), (80, 8), (88, 8),
                                          (96, 4), (100, 4)]
        for (offset, width) in headerFields { fields.append(Field(offset: offset, width: width, damages: nil, what: "header")) }
        let headerEnd = be(4, 4) == 3 ? Int(be(100, 4)) : 72
        for offset in stride(from: headerEnd, to: min(headerEnd + 256, clusterSize), by: 4) {
            fields.append(Field(offset: offset, width: 4, damages: nil, what: "extension area"))
        }
        // The active L1 table and the L2 tables it names.
        let l1Offset = Int(be(40, 8)), l1Size = Int(be(36, 4))
        for index in 0..<l1Size {
            let guest = Int64(index) * span
            fields.append(Field(offset: l1Offset + 8 * index, width: 8, damages: guest..<(guest + span), what: "L1 entry"))
            let l2 = Int(be(l1Offset + 8 * index, 8) & 0x00FF_FFFF_FFFF_FE00)
            guard l2 != 0 else { continue }
            for entry in 0..<(clusterSize / entryBytes) {
                let cluster = guest + Int64(entry) * Int64(clusterSize)
                for word in stride(from: 0, to: entryBytes, by: 8) {
                    fields.append(Field(offset: l2 + entry * entryBytes + word, width: 8,
                                        damages: cluster..<(cluster + Int64(clusterSize)), what: "L2 entry"))
                }
            }
        }
        // Refcounts: reads never depend on them.
        let refcountTable = Int(be(48, 8))
        for index in 0..<(Int(be(56, 4)) * clusterSize / 8) where be(refcountTable + 8 * index, 8) != 0 || index < 4 {
            fields.append(Field(offset: refcountTable + 8 * index, width: 8, damages: 0..<0, what: "refcount table entry"))
            let block = Int(be(refcountTable + 8 * index, 8) & ~0x1FF)
            guard block != 0 else { continue }
            for word in stride(from: 0, to: 64, by: 2) {
                fields.append(Field(offset: block + word, width: 2, damages: 0..<0, what: "refcount block"))
            }
        }
        // The snapshot table's first entry and its L1 table: the active disk never depends on them.
        if be(60, 4) > 0 {
            let entry = Int(be(64, 8))
            for (offset, width) in [(0, 8), (8, 4), (12, 2), (14, 2), (16, 4), (20, 4), (24, 8), (32, 4), (36, 4),
                                    (40, 8), (48, 8), (56, 8)] {
                fields.append(Field(offset: entry + offset, width: width, damages: 0..<0, what: "snapshot entry"))
            }
            let snapshotL1 = Int(be(entry, 8))
            for index in 0..<Int(be(entry + 8, 4)) {
                fields.append(Field(offset: snapshotL1 + 8 * index, width: 8, damages: 0..<0, what: "snapshot L1 entry"))
            }
        }
        let groups = Dictionary(grouping: fields, by: \.what).sorted { $0.key < $1.key }.map(\.value)
        return BaseImage(name: name, bytes: bytes, clusterSize: clusterSize, groups: groups, contents: contents)
    }
}
}

extension ImgfsMountTests.Qcow2FieldFuzzTests.Field {
    func bytes(of image: [UInt8]) -> UInt64 {
        bigEndianValue(image[offset..<(offset + width)])
    }

    /// Stores the low `width` bytes of `value`, big-endian.
    func store(_ value: UInt64, into image: inout [UInt8]) {
        for index in 0..<width {
            image[offset + index] = UInt8(truncatingIfNeeded: value >> (8 * (width - 1 - index)))
        }
    }
}
