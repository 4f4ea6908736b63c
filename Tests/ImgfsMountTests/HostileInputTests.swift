import Foundation
import Testing
import ImgfsBlock
import ImgfsFUSE
import ImgfsTestSupport
#if canImport(Glibc)
import Glibc
#endif

/// What a hostile user or image does to the CLI and the daemon (issue 11's regressions), through the real binary.
extension ImgfsMountTests {
@Suite(.serialized)
struct HostileInputTests {
    private func qemuImg(_ arguments: String...) throws { try runTool("qemu-img", arguments) }

    private func patch(_ path: String, at offset: UInt64, _ bytes: [UInt8]) throws {
        let fd = try openOrThrow(path, O_WRONLY)
        defer { close(fd) }
        try pwriteFully(fd, bytes, at: Int64(offset))
    }

    /// A failed command's stderr must be exactly one line, free of control characters.
    private func expectOneCleanLine(_ result: ToolResult, status: Int32, mentioning text: String,
                                    sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(result.status == status, "exit \(result.status): \(result.stderr)", sourceLocation: sourceLocation)
        let lines = result.stderr.split(separator: "\n", omittingEmptySubsequences: false).dropLast()
        #expect(lines.count == 1, "stderr: \(result.stderr)", sourceLocation: sourceLocation)
        #expect(!result.stderr.utf8.contains { $0 < 0x20 && $0 != 0x0A }, "control bytes in \(result.stderr)",
                sourceLocation: sourceLocation)
        #expect(result.stderr.contains(text), "stderr: \(result.stderr)", sourceLocation: sourceLocation)
    }

    @Test("a header offset of 2^63 never traps imgfs info or mount")
    func hugeOffsetsDoNotTrap() throws {
        let scratch = try Scratch("trap")
        defer { scratch.cleanup() }
        let image = scratch.path("c.qcow2")
        // With no snapshots the offset is never used: the image opens.
        try qemuImg("create", "-q", "-f", "qcow2", image, "8M")
        try patch(image, at: 64, bigEndianBytes(UInt64(1) << 63))
        #expect(try scratch.imgfs(["info", image], check: false).status == 0)
        // With an L1 table there, it is refused in one line.
        try patch(image, at: 40, bigEndianBytes(UInt64(1) << 63))
        expectOneCleanLine(try scratch.imgfs(["info", image], check: false), status: 65, mentioning: "l1_table_offset")
        let mnt = try scratch.dir("mnt")
        expectOneCleanLine(try scratch.imgfs(["mount", image, mnt], check: false), status: 65,
                           mentioning: "l1_table_offset")
    }

    @Test("a FIFO as the image or as its backing file fails at once")
    func fifoImage() throws {
        let scratch = try Scratch("fifo")
        defer { scratch.cleanup() }
        #expect(mkfifo(scratch.path("f.img"), 0o600) == 0)
        try qemuImg("create", "-q", "-f", "qcow2", "-u", "-b", "f.img", "-F", "raw", scratch.path("top.qcow2"), "1M")
        let mnt = try scratch.dir("mnt")
        for image in ["f.img", "top.qcow2"] {
            let start = Date()
            let result = try scratch.imgfs(["mount", scratch.path(image), mnt], check: false)
            #expect(Date().timeIntervalSince(start) < 10)
            expectOneCleanLine(result, status: 65, mentioning: "FIFO")
            #expect(!isMounted(mnt))
        }
    }

    @Test("the mountpoint must be a directory with no imgfs mount on it")
    func mountpointChecks() throws {
        let scratch = try Scratch("mp")
        defer { scratch.cleanup() }
        let image = scratch.path("d.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", image, "8M")
        expectOneCleanLine(try scratch.imgfs(["mount", image, image], check: false), status: 71,
                           mentioning: "not a directory")
        let mnt = try scratch.dir("mnt")
        try scratch.mount(image, at: mnt, ["--read-only"])
        expectOneCleanLine(try scratch.imgfs(["mount", "--read-only", image, mnt], check: false), status: 71,
                           mentioning: "already mounted")
        try scratch.unmount(mnt)
        // A mount whose daemon died is named as such.
        try scratch.mount(image, at: mnt, ["--read-only"])
        if let pid = daemonPid(mountpoint: mnt) {
            kill(pid, SIGKILL)
            _ = waitUntil(seconds: 10) { !processAlive(pid) }
        }
        expectOneCleanLine(try scratch.imgfs(["mount", image, mnt], check: false), status: 71,
                           mentioning: "daemon is gone")
        _ = umount2(mnt, Int32(MNT_DETACH))
    }

    @Test("strings from an image reach the terminal escaped, in one line")
    func imageStringsAreEscaped() throws {
        let scratch = try Scratch("esc")
        defer { scratch.cleanup() }
        let image = scratch.path("s.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", image, "8M")
        let evil = "evil\n\u{1b}]0;pwned\u{07}\u{1b}[2J"
        try qemuImg("snapshot", "-c", evil, image)
        let info = try scratch.imgfs(["info", image])
        #expect(!info.stdout.utf8.contains(0x1B) && !info.stdout.utf8.contains(0x07))
        #expect(info.stdout.contains("evil\\x0a\\x1b]0;pwned\\x07\\x1b[2J"))
        let json = try scratch.imgfs(["info", "--output", "json", image])
        #expect(json.stdout.contains("evil\\n\\u001b]0;pwned\\u0007\\u001b[2J"))
        // A backing name with a newline, escapes and a NUL-free tail: the refusal is one line and whole.
        let top = scratch.path("top.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", "-u", "-b", "no\nsuch\u{1b}[2Jfile", "-F", "raw", top, "1M")
        let mnt = try scratch.dir("mnt")
        expectOneCleanLine(try scratch.imgfs(["mount", top, mnt], check: false), status: 65,
                           mentioning: "no\\x0asuch\\x1b[2Jfile")
    }

    @Test("snapshot file names are unique whatever the names and ids")
    func snapshotFileNamesAreInjective() throws {
        func snapshot(_ index: Int, _ id: String, _ name: String) -> SnapshotDescriptor {
            SnapshotDescriptor(index: index, id: id, name: name, diskSize: 0, vmStateSize: 0, dateSeconds: 0,
                               dateNanoseconds: 0, vmClockNanoseconds: 0, icount: nil)
        }
        let long = String(repeating: "ü", count: 300)
        let cases: [[SnapshotDescriptor]] = [
            [snapshot(0, "5", ""), snapshot(1, "1", "id-5")],
            [snapshot(0, "1", "a"), snapshot(1, "2", "a"), snapshot(2, "3", "a-id1")],
            [snapshot(0, "1", "a/b"), snapshot(1, "2", "a_b"), snapshot(2, "3", ".."), snapshot(3, "4", ".")],
            [snapshot(0, "7", "x"), snapshot(1, "7", "x"), snapshot(2, "7", "x-id7")],
            [snapshot(0, "", ""), snapshot(1, "", ""), snapshot(2, "", "id-")],
            [snapshot(0, long, long), snapshot(1, long, long + "x")],
        ]
        for snapshots in cases {
            let names = MountLayout.snapshotFileNames(snapshots)
            #expect(Set(names).count == names.count, "\(names)")
            #expect(names.allSatisfy { !$0.contains("/") && $0 != "." && $0 != ".." && $0.utf8.count <= 255 })
        }
        #expect(MountLayout.snapshotFileNames([snapshot(0, "1", "plain")]) == ["plain.raw"])
    }

    @Test("snapshots sharing a name show each its own data")
    func duplicateSnapshotNames() throws {
        let scratch = try Scratch("dup")
        defer { scratch.cleanup() }
        let image = scratch.path("s.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", image, "4M")
        try runTool("qemu-io", ["-f", "qcow2", "-c", "write -P 0x11 0 64k", image])
        try qemuImg("snapshot", "-c", "a1", image)
        try runTool("qemu-io", ["-f", "qcow2", "-c", "write -P 0x22 0 64k", image])
        try qemuImg("snapshot", "-c", "a2", image)
        // Rename "a2" to "a1" in the table: the second entry's name is its last two bytes before padding.
        let table = try readFile(image)
        guard let at = findLast(Array("a2".utf8), in: table) else { throw TestFailure("no 'a2' in the image") }
        try patch(image, at: UInt64(at), Array("a1".utf8))
        let mnt = try scratch.dir("mnt")
        try scratch.mount(image, at: mnt, ["--read-only"])
        defer { try? scratch.unmount(mnt) }
        let files = try FileManager.default.contentsOfDirectory(atPath: mnt + "/snapshots").sorted()
        #expect(files == ["a1-id1.raw", "a1-id2.raw"])
        for (file, byte) in [("a1-id1.raw", UInt8(0x11)), ("a1-id2.raw", UInt8(0x22))] {
            let fd = try openOrThrow(mnt + "/snapshots/" + file, O_RDONLY)
            defer { close(fd) }
            #expect(try preadFully(fd, count: 65536, at: 0) == [UInt8](repeating: byte, count: 65536), "\(file)")
        }
    }

    private func findLast(_ needle: [UInt8], in haystack: [UInt8]) -> Int? {
        guard haystack.count >= needle.count else { return nil }
        for start in stride(from: haystack.count - needle.count, through: 0, by: -1)
        where haystack[start..<(start + needle.count)].elementsEqual(needle) {
            return start
        }
        return nil
    }

    @Test("reads racing truncates are short reads, never errors")
    func readRacingTruncate() async throws {
        let scratch = try Scratch("race")
        defer { scratch.cleanup() }
        let image = scratch.path("d.img")
        try writeFile(image, randomBytes(8 * MiB, seed: 21))
        let mnt = try scratch.dir("mnt")
        try scratch.mount(image, at: mnt, ["--format", "raw"])
        defer { try? scratch.unmount(mnt) }
        let file = mnt + "/d.raw"
        let stop = Shared(false)
        let truncator = Task {
            try await onThread {
                var grow = false
                while !stop.value {
                    _ = truncate(file, off_t(grow ? 8 * MiB : 4 * MiB))
                    grow.toggle()
                }
            }
        }
        let errors = try await onThread { () -> [Int32] in
            let fd = open(file, O_RDONLY | 0o40000)  // O_DIRECT: every read reaches the daemon
            guard fd >= 0 else { return [errno] }
            defer { close(fd) }
            let buffer = UnsafeMutableRawPointer.allocate(byteCount: 65536, alignment: 4096)
            defer { buffer.deallocate() }
            var failures: [Int32] = []
            var generator = SplitMix64(seed: 5)
            let deadline = Date().addingTimeInterval(2)
            while Date() < deadline {
                let offset = 4 * MiB - 65536 + Int(generator.next() % UInt64(4 * MiB / 4096)) * 4096
                if pread(fd, buffer, 65536, off_t(offset)) < 0 { failures.append(errno) }
            }
            return failures
        }
        stop.set(true)
        try await truncator.value
        let first = errors.first ?? 0
        #expect(errors.isEmpty, "\(errors.count) reads failed, first errno \(first)")
    }

    @Test("snapshot L1 tables are loaded only while their file is open")
    func snapshotL1sAreLazy() throws {
        let scratch = try Scratch("lazy")
        defer { scratch.cleanup() }
        let image = scratch.path("s.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", "-o", "preallocation=full", image, "40M")
        for n in 0..<17 { try qemuImg("snapshot", "-c", "s\(n)", image) }
        // Every snapshot names the same 32 MiB L1 table (all of the file from 64 KiB).
        let bytes = try readFile(image)
        func field(_ offset: Int, _ count: Int) -> UInt64 { bigEndianValue(bytes[offset..<(offset + count)]) }
        var entry = Int(field(64, 8))
        for _ in 0..<17 {
            try patch(image, at: UInt64(entry), bigEndianBytes(UInt64(65536)))
            try patch(image, at: UInt64(entry + 8), bigEndianBytes(UInt32(4 << 20)))
            entry += (40 + Int(field(entry + 36, 4)) + Int(field(entry + 12, 2)) + Int(field(entry + 14, 2)) + 7) / 8 * 8
        }
        let mnt = try scratch.dir("mnt")
        // A limit above the image's own 512 MiB cap on open snapshot tables, so that cap is what refuses.
        try scratch.mount(image, at: mnt, ["--read-only", "--memory-limit", "1G"])
        defer { try? scratch.unmount(mnt) }
        guard let pid = daemonPid(mountpoint: mnt) else { throw TestFailure("no daemon pid") }
        #expect(try FileManager.default.contentsOfDirectory(atPath: mnt + "/snapshots").count == 17)
        let idle = try residentMiB(pid)
        #expect(idle < 100, "RSS \(idle) MiB with no snapshot open")
        var open: [Int32] = []
        defer { open.forEach { close($0) } }
        for n in 0..<16 { open.append(try openOrThrow(mnt + "/snapshots/s\(n).raw", O_RDONLY)) }
        #expect(try residentMiB(pid) > idle + 16 * 30)
        errno = 0
        let refused = Glibc.open(mnt + "/snapshots/s16.raw", O_RDONLY)
        #expect(refused < 0 && errno == ENOMEM, "17th open: \(refused) \(errnoText())")
        if refused >= 0 { close(refused) }
        open.forEach { close($0) }
        open.removeAll()
        #expect(waitUntil(seconds: 5) { ((try? residentMiB(pid)) ?? 0) < idle + 50 })
        let last = try openOrThrow(mnt + "/snapshots/s16.raw", O_RDONLY)
        close(last)
    }

    private func residentMiB(_ pid: pid_t) throws -> Int {
        let status = try String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)
        guard let line = status.split(separator: "\n").first(where: { $0.hasPrefix("VmRSS:") }),
              let kb = Int(line.split(separator: " ", omittingEmptySubsequences: true)[1]) else {
            throw TestFailure("no VmRSS for \(pid)")
        }
        return kb / 1024
    }

    @Test("the memory limit holds through a long random-read run over a 1 TiB sparse qcow2")
    func memoryLimitHolds() async throws {
        let scratch = try Scratch("budget")
        defer { scratch.cleanup() }
        let image = scratch.path("big.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", image, "1T")
        // One 4 KiB write per 512 MiB: 2,048 L2 tables of 64 KiB, 128 MiB of metadata if all were cached.
        let writes = (0..<2048).flatMap { ["-c", "write -P \($0 % 250 + 1) \($0 * 512)M 4k"] }
        try runTool("qemu-io", ["-f", "qcow2"] + writes + [image])
        let mnt = try scratch.dir("mnt")
        // The L2 cache alone may take 256 MiB; the mount's limit of 96 MiB must win.
        try scratch.mount(image, at: mnt, ["--read-only", "--l2-cache-size", "256M", "--memory-limit", "96M"])
        defer { try? scratch.unmount(mnt) }
        guard let pid = daemonPid(mountpoint: mnt) else { throw TestFailure("no daemon pid") }
        let file = mnt + "/big.raw"
        let wrong = try await onThread { () -> Int in
            let group = DispatchGroup()
            let wrong = Shared(0)
            for thread in 0..<4 {
                group.enter()
                Thread {
                    defer { group.leave() }
                    let fd = open(file, O_RDONLY | 0o40000)  // O_DIRECT
                    guard fd >= 0 else { return wrong.update { $0 += 1 } }
                    defer { close(fd) }
                    var generator = SplitMix64(seed: UInt64(thread + 1))
                    let buffer = UnsafeMutableRawPointer.allocate(byteCount: 65536, alignment: 4096)
                    defer { buffer.deallocate() }
                    let deadline = Date().addingTimeInterval(4)
                    while Date() < deadline {
                        let span = Int(generator.next() % 2048)
                        let offset = off_t(span) << 29
                        if pread(fd, buffer, 65536, offset) != 65536
                            || buffer.load(as: UInt8.self) != UInt8(span % 250 + 1)
                            || buffer.load(fromByteOffset: 8192, as: UInt8.self) != 0 {
                            wrong.update { $0 += 1 }
                        }
                    }
                }.start()
            }
            group.wait()
            return wrong.value
        }
        #expect(wrong == 0)
        let status = try String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)
        let peak = status.split(separator: "\n").first { $0.hasPrefix("VmHWM:") }
            .flatMap { Int($0.split(separator: " ", omittingEmptySubsequences: true)[1]) }.map { $0 / 1024 } ?? 0
        // The whole daemon, code and stacks included, stays within the limit (caching every table would take
        // 128 MiB of them alone).
        #expect(peak > 0 && peak < 96, "peak RSS \(peak) MiB with --memory-limit 96M")
    }

    @Test("65,536 snapshots mount and list in linear time")
    func manySnapshots() throws {
        let scratch = try Scratch("many")
        defer { scratch.cleanup() }
        var timings: [Int: Double] = [:]
        for count in [8192, 65536] {
            let image = scratch.path("m\(count).qcow2")
            try qemuImg("create", "-q", "-f", "qcow2", image, "1M")
            let size = UInt64(fileSize(image) ?? 0)
            let tableOffset = (size + 65535) / 65536 * 65536
            var table: [UInt8] = []
            for n in 0..<count {
                let id = Array("\(n + 1)".utf8), name = Array("s\(n)".utf8)
                var entry = bigEndianBytes(UInt64(0)) + bigEndianBytes(UInt32(0))
                entry += bigEndianBytes(UInt16(id.count)) + bigEndianBytes(UInt16(name.count))
                entry += [UInt8](repeating: 0, count: 16) + bigEndianBytes(UInt32(0)) + bigEndianBytes(UInt32(16))
                entry += bigEndianBytes(UInt64(0)) + bigEndianBytes(UInt64(1 << 20)) + id + name
                entry += [UInt8](repeating: 0, count: (8 - entry.count % 8) % 8)
                table += entry
            }
            try patch(image, at: tableOffset, table)
            try patch(image, at: 60, bigEndianBytes(UInt32(count)))
            try patch(image, at: 64, bigEndianBytes(tableOffset))
            let mnt = try scratch.dir("mnt\(count)")
            let start = Date()
            try scratch.mount(image, at: mnt, ["--read-only"])
            let listing = try runTool("ls", ["-l", mnt + "/snapshots"]).stdout
            timings[count] = Date().timeIntervalSince(start)
            #expect(listing.split(separator: "\n").count == count + 1)
            try scratch.unmount(mnt)
        }
        // Linear would be 8x; quadratic, 64x. Allow for noise, and for fixed costs dominating the small case.
        let (small, large) = (timings[8192]!, timings[65536]!)
        #expect(large < max(small * 20, 4), "8,192: \(small) s, 65,536: \(large) s")
    }

    @Test("image locks keep imgfs and QEMU from conflicting opens, both ways")
    func imageLocking() throws {
        let scratch = try Scratch("lock")
        defer { scratch.cleanup() }
        let image = scratch.path("d.img")
        try writeFile(image, randomBytes(4 * MiB, seed: 3))
        let (a, b) = (try scratch.dir("a"), try scratch.dir("b"))
        try scratch.mount(image, at: a, ["--format", "raw"])
        // QEMU may not write it, nor may a second imgfs, read-write or read-only.
        let qemuWrite = try runTool("qemu-io", ["-f", "raw", "-c", "write 0 512", image], check: false)
        #expect(qemuWrite.status != 0 && qemuWrite.stderr.contains("lock"), "\(qemuWrite.stderr)")
        expectOneCleanLine(try scratch.imgfs(["mount", "--format", "raw", image, b], check: false), status: 65,
                           mentioning: "cannot lock")
        expectOneCleanLine(try scratch.imgfs(["mount", "--read-only", "--format", "raw", image, b], check: false),
                           status: 65, mentioning: "cannot lock")
        // --force-share reads it anyway.
        try scratch.mount(image, at: b, ["--read-only", "--force-share", "--format", "raw"])
        try scratch.unmount(b)
        try scratch.unmount(a)
        // Read-only mounts share with each other.
        try scratch.mount(image, at: a, ["--read-only", "--format", "raw"])
        try scratch.mount(image, at: b, ["--read-only", "--format", "raw"])
        try scratch.unmount(b)
        try scratch.unmount(a)
        // A running QEMU writer keeps imgfs out.
        let holder = try spawnBackground("qemu-io", ["-f", "raw", "-c", "sleep 20000", image])
        defer { stopBackground(holder) }
        #expect(waitUntil(seconds: 10) { (try? String(contentsOfFile: "/proc/locks", encoding: .utf8))?.contains("OFDLCK") == true })
        expectOneCleanLine(try scratch.imgfs(["mount", "--format", "raw", image, a], check: false), status: 65,
                           mentioning: "cannot lock")
    }

    @Test("a probed raw image is writable but keeps its format; a misnamed one is refused")
    func probing() throws {
        let scratch = try Scratch("probe")
        defer { scratch.cleanup() }
        let image = scratch.path("d.img")
        try writeFile(image, randomBytes(MiB, seed: 4))
        let mnt = try scratch.dir("mnt")
        let mounted = try scratch.imgfs(["mount", image, mnt])
        #expect(mounted.stderr.contains("warning") && mounted.stderr.contains("--format raw"), "\(mounted.stderr)")
        #expect(mounted.stderr.split(separator: "\n").count == 1)
        do {
            let fd = try openOrThrow(mnt + "/d.raw", O_RDWR)
            defer { close(fd) }
            try pwriteFully(fd, Array("hello".utf8), at: 0)
            errno = 0
            let magic: [UInt8] = [0x51, 0x46, 0x49, 0xFB]
            #expect(pwrite(fd, magic, 4, 0) < 0 && errno == EPERM, "\(errnoText())")
            try pwriteFully(fd, [0x51, 0x46, 0x49, 0xFB], at: 512)
        }
        try scratch.unmount(mnt)
        #expect(Array(try readFile(image)[0..<5]) == Array("hello".utf8))
        try scratch.mount(image, at: mnt, ["--format", "raw"])
        do {
            let fd = try openOrThrow(mnt + "/d.raw", O_RDWR)
            defer { close(fd) }
            try pwriteFully(fd, [0x51, 0x46, 0x49, 0xFB], at: 0)
        }
        try scratch.unmount(mnt)
        // Random bytes named .qcow2 are refused, unless the user says raw.
        let misnamed = scratch.path("d.qcow2")
        try writeFile(misnamed, randomBytes(MiB, seed: 5))
        expectOneCleanLine(try scratch.imgfs(["mount", misnamed, mnt], check: false), status: 65,
                           mentioning: "--format raw")
        try scratch.mount(misnamed, at: mnt, ["--format", "raw", "--read-only"])
        try scratch.unmount(mnt)
    }

    @Test("small CLI edges: fsname/subtype options refused, a busy unmount hints at --lazy")
    func cliEdges() throws {
        let scratch = try Scratch("cli")
        defer { scratch.cleanup() }
        let image = scratch.path("d.img")
        try writeFile(image, randomBytes(MiB, seed: 6))
        let mnt = try scratch.dir("mnt")
        let subtype = try scratch.imgfs(["mount", "-o", "subtype=x", image, mnt], check: false)
        #expect(subtype.status != 0 && subtype.stderr.contains("subtype"))
        #expect(!isMounted(mnt))
        try scratch.mount(image, at: mnt, ["--format", "raw"])
        let fd = try openOrThrow(mnt + "/d.raw", O_RDONLY)
        let busy = try scratch.imgfs(["unmount", mnt], check: false)
        close(fd)
        #expect(busy.status == 71 && busy.stderr.contains("--lazy"), "\(busy.stderr)")
        try scratch.unmount(mnt)
    }
}
}
