import Foundation
import Testing
import ImgfsTestSupport
#if canImport(Glibc)
import Glibc
#endif

/// Mount-level tests of qcow2 images built with qemu-img and qemu-io, compared with QEMU's own conversion.
extension ImgfsMountTests {
@Suite(.serialized)
struct Qcow2MountTests {
    private func qemuIO(_ image: String, format: String = "qcow2", _ commands: [String]) throws {
        var arguments = ["-f", format]
        for command in commands { arguments += ["-c", command] }
        arguments.append(image)
        try runTool("qemu-io", arguments)
    }

    /// `qemu-img convert -O raw` of the image (or of one of its snapshots) into a new file; returns its path.
    private func reference(_ scratch: Scratch, _ image: String, snapshot: String? = nil) throws -> String {
        let out = scratch.path((image as NSString).lastPathComponent + ".\(snapshot ?? "active").ref")
        var arguments = ["convert"]
        if let snapshot { arguments += ["-l", "snapshot.name=\(snapshot)"] }
        arguments += ["-O", "raw", image, out]
        try runTool("qemu-img", arguments)
        return out
    }

    private func expectSame(_ a: String, _ b: String, _ what: String,
                            sourceLocation: SourceLocation = #_sourceLocation) throws {
        let d = try cmp(a, b)
        #expect(d == nil, "\(what): \(d ?? "")", sourceLocation: sourceLocation)
    }

    /// `cmp` of two files; nil when equal, else cmp's message.
    private func cmp(_ a: String, _ b: String) throws -> String? {
        let result = try runTool("cmp", [a, b], check: false)
        return result.status == 0 ? nil : "cmp \(a) \(b): \(result.stdout)\(result.stderr)"
    }

    @Test("qcow2 (plain, zstd- and zlib-compressed) reads equal qemu-img convert", arguments: ["plain", "zlib", "zstd"])
    func qcow2Contents(variant: String) throws {
        let scratch = try Scratch("q-\(variant)")
        defer { scratch.cleanup() }
        let source = scratch.path("src.qcow2")
        try runTool("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", source, "64M"])
        try qemuIO(source, [
            "write -P 0x11 0 1M",
            "write -P 0x22 3146240 102400",        // 3M+512, 100 KiB: partial clusters at both ends
            "write -P 0x33 62914560 4M",           // the last 4 MiB
            "write -z 262144 131072",              // zeros over data, cluster-aligned
            "write -z 5000 7000",                  // zeros over data, unaligned
            "discard 655360 131072",               // discard two clusters of data
            "write -P 0x44 20971520 65536",
            "write -P 0x55 20971520 100",          // overwrite the start of that cluster
        ])
        let image = scratch.path("disk.qcow2")
        switch variant {
        case "plain": try runTool("cp", [source, image])
        case "zlib": try runTool("qemu-img", ["convert", "-q", "-c", "-O", "qcow2", "-o", "cluster_size=65536", source, image])
        default:
            try runTool("qemu-img", ["convert", "-q", "-c", "-O", "qcow2", "-o", "cluster_size=65536,compression_type=zstd",
                                     source, image])
        }
        let ref = try reference(scratch, image)
        // Sanity: the reference holds what qemu-io wrote.
        let refBytes = try readFile(ref)
        #expect(refBytes.count == 64 * MiB && refBytes[0] == 0x11 && refBytes[6000] == 0 && refBytes[12_000] == 0x11 && refBytes[62_914_560] == 0x33)
        let mnt = try scratch.dir("mnt")
        try scratch.mount(image, at: mnt)
        let file = mnt + "/disk.raw"
        #expect(fileSize(file) == Int64(64 * MiB))
        try expectSame(file, ref, "\(variant)")
        // A few unaligned reads straddling cluster boundaries.
        let fd = try openOrThrow(file, O_RDONLY)
        for (offset, count) in [(65_536 - 10, 20), (3_146_240 - 1, 102_402), (20_971_520 + 99, 2), (64 * MiB - 5, 100)] {
            let got = try preadFully(fd, count: count, at: Int64(offset))
            let end = min(refBytes.count, offset + count)
            #expect(difference(got, Array(refBytes[offset..<end])) == nil, "\(variant) read \(count)@\(offset)")
        }
        close(fd)
        try scratch.unmount(mnt)
    }

    @Test("internal snapshots appear read-only under snapshots/ and equal qemu-img convert -l")
    func internalSnapshots() throws {
        let scratch = try Scratch("snap")
        defer { scratch.cleanup() }
        let image = scratch.path("vm.qcow2")
        try runTool("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", image, "32M"])
        try qemuIO(image, ["write -P 0xa1 0 2M", "write -P 0xa2 10M 1M"])
        try runTool("qemu-img", ["snapshot", "-c", "s1", image])
        try qemuIO(image, ["write -P 0xb1 1M 2M", "write -z 10M 64k", "write -P 0xb2 30M 100000"])
        try runTool("qemu-img", ["snapshot", "-c", "s2", image])
        try qemuIO(image, ["write -P 0xc1 0 64k", "discard 30M 1M", "write -P 0xc2 31M 12345"])
        let refActive = try reference(scratch, image)
        let refS1 = try reference(scratch, image, snapshot: "s1")
        let refS2 = try reference(scratch, image, snapshot: "s2")
        let s1s2 = try cmp(refS1, refS2)
        let s2Active = try cmp(refS2, refActive)
        #expect(s1s2 != nil && s2Active != nil, "snapshots should differ")

        let mnt = try scratch.dir("mnt")
        try scratch.mount(image, at: mnt)
        let listing = try FileManager.default.contentsOfDirectory(atPath: mnt).sorted()
        #expect(listing == ["snapshots", "vm.raw"])
        let snapshots = try FileManager.default.contentsOfDirectory(atPath: mnt + "/snapshots").sorted()
        #expect(snapshots == ["s1.raw", "s2.raw"])
        try expectSame(mnt + "/vm.raw", refActive, "active")
        try expectSame(mnt + "/snapshots/s1.raw", refS1, "s1")
        try expectSame(mnt + "/snapshots/s2.raw", refS2, "s2")
        // The main file shows the latest data.
        let fd = try openOrThrow(mnt + "/vm.raw", O_RDONLY)
        let head = try preadFully(fd, count: 2, at: 0)
        #expect(head == [0xc1, 0xc1])
        close(fd)
        for name in ["s1.raw", "s2.raw"] {
            let path = mnt + "/snapshots/" + name
            var st = stat()
            #expect(stat(path, &st) == 0 && st.st_mode & 0o222 == 0, "\(name) mode \(String(st.st_mode, radix: 8))")
            for flags in [O_RDWR, O_WRONLY] {
                errno = 0
                let fd = open(path, flags)
                let e = errno
                if fd >= 0 { close(fd) }
                #expect(fd < 0 && e == EROFS, "\(name) open \(flags): fd \(fd) errno \(errnoText(e))")
            }
            #expect(truncate(path, 0) != 0, "\(name): truncate succeeded")
        }
        try scratch.unmount(mnt)
    }

    @Test("backing chain raw <- qcow2 <- qcow2 (smaller base) reads equal qemu-img convert")
    func backingChain() throws {
        let scratch = try Scratch("chain")
        defer { scratch.cleanup() }
        let base = scratch.path("base.raw")
        try writeFile(base, randomBytes(8 * MiB + 4096, seed: 20))
        let mid = scratch.path("mid.qcow2")
        try runTool("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", "-b", "base.raw", "-F", "raw",
                                 mid, "24M"], cwd: scratch.directory)
        try qemuIO(mid, ["write -P 0x61 1M 512k", "write -P 0x62 8M 3M", "write -z 2M 64k", "write -P 0x63 20M 4096"])
        let top = scratch.path("top.qcow2")
        try runTool("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", "-b", "mid.qcow2", "-F", "qcow2",
                                 top, "40M"], cwd: scratch.directory)
        try qemuIO(top, ["write -P 0x71 1100k 8k", "write -P 0x72 9M 123", "write -z 4M 256k", "write -P 0x73 30M 1M",
                         "write -P 0x74 39M 1M"])
        let ref = try reference(scratch, top)
        let mnt = try scratch.dir("mnt")
        try scratch.mount(top, at: mnt)
        let file = mnt + "/top.raw"
        #expect(fileSize(file) == Int64(40 * MiB))
        try expectSame(file, ref, "")
        try scratch.unmount(mnt)
    }

    @Test("a warm qcow2 read twice with 4 KiB O_DIRECT reads equals qemu-img convert both times")
    func warmDirectReadsTwice() throws {
        let scratch = try Scratch("warm")
        defer { scratch.cleanup() }
        let base = scratch.path("base.raw")
        try writeFile(base, randomBytes(16 * MiB, seed: 41))
        let image = scratch.path("warm.qcow2")
        try runTool("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", "-b", "base.raw", "-F", "raw",
                                 image, "16M"], cwd: scratch.directory)
        // Every kind of cluster: the first pass warms what the second may serve inline on the loop thread, and
        // compressed clusters and backing reads must keep taking the async path.
        try qemuIO(image, ["write -P 0x11 0 4M", "write -z 1M 256k", "write -c -P 0x22 5M 256k",
                           "write -P 0x33 8M 3M", "discard 9M 128k", "write -P 0x44 12345 6789"])
        let ref = try readFile(try reference(scratch, image))
        _ = try readFile(image)
        _ = try readFile(base)
        let mnt = try scratch.dir("mnt")
        try scratch.mount(image, at: mnt)
        let fd = try openOrThrow(mnt + "/warm.raw", O_RDONLY | 0o40000)  // O_DIRECT: every read reaches the daemon
        for pass in 1...2 {
            let (got, failed) = readInPages(fd, count: ref.count)
            #expect(failed == nil, "pass \(pass): \(failed ?? "")")
            #expect(difference(got, ref) == nil, "pass \(pass)")
        }
        close(fd)
        try scratch.unmount(mnt)
    }

    @Test("cold 4 KiB O_DIRECT reads from 8 threads at once equal qemu-img convert", arguments: ["qcow2", "raw"])
    func coldConcurrentReads(format: String) throws {
        let scratch = try Scratch("cold-\(format)")
        defer { scratch.cleanup() }
        let base = scratch.path("base.raw")
        try writeFile(base, randomBytes(16 * MiB, seed: 43))
        var image = base
        if format == "qcow2" {
            image = scratch.path("cold.qcow2")
            try runTool("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", "-b", "base.raw",
                                     "-F", "raw", image, "16M"], cwd: scratch.directory)
            try qemuIO(image, ["write -P 0x11 0 4M", "write -z 1M 256k", "write -c -P 0x22 5M 256k",
                               "write -P 0x33 8M 3M", "discard 9M 128k", "write -P 0x44 12345 6789"])
        }
        let ref = try readFile(try reference(scratch, image))
        // Misses under load are read with no task (`BlockNode.startRead`): drop the host files' pages, so reads
        // reach the disk, and keep many in flight.
        for path in [base, image] {
            let fd = try openOrThrow(path, O_RDONLY)
            fsync(fd)
            _ = posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)
            close(fd)
        }
        let mnt = try scratch.dir("mnt")
        try scratch.mount(image, at: mnt, format == "raw" ? ["--format", "raw"] : [])
        let exported = mnt + "/" + ((image as NSString).lastPathComponent as NSString).deletingPathExtension + ".raw"
        let fd = try openOrThrow(exported, O_RDONLY | 0o40000)  // O_DIRECT: every read reaches the daemon
        let threads = 8
        let blocks = ref.count / 4096
        let failures = Shared<[String]>([])
        let got = UnsafeMutableRawBufferPointer.allocate(byteCount: ref.count, alignment: 4096)
        defer { got.deallocate() }
        let outAddress = Int(bitPattern: got.baseAddress!)  // an address is Sendable; the lanes write apart
        DispatchQueue.concurrentPerform(iterations: threads) { lane in
            let buffer = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
            defer { buffer.deallocate() }
            // Lanes stride through a shuffled order, so each thread's reads are scattered like random I/O.
            for index in stride(from: lane, to: blocks, by: threads) {
                let offset = ((index &* 2_654_435_761) % blocks) * 4096
                let n = pread(fd, buffer, 4096, off_t(offset))
                if n != 4096 { failures.update { $0.append("pread 4096@\(offset) returned \(n) (\(errnoText()))") }; return }
                (UnsafeMutableRawPointer(bitPattern: outAddress)! + offset).copyMemory(from: buffer, byteCount: 4096)
            }
        }
        close(fd)
        #expect(failures.value == [])
        #expect(difference([UInt8](got), ref) == nil)
        try scratch.unmount(mnt)
    }

    @Test("bad backing chains fail with a clear error and leave nothing mounted")
    func badChains() throws {
        let scratch = try Scratch("bad")
        defer { scratch.cleanup() }
        let dir = scratch.directory
        // A loop: a -> b -> a.
        try runTool("qemu-img", ["create", "-q", "-f", "qcow2", "a.qcow2", "16M"], cwd: dir)
        try runTool("qemu-img", ["create", "-q", "-f", "qcow2", "-u", "-b", "a.qcow2", "-F", "qcow2", "b.qcow2", "16M"], cwd: dir)
        try runTool("qemu-img", ["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2"], cwd: dir)
        // A missing backing file.
        try runTool("qemu-img", ["create", "-q", "-f", "qcow2", "-u", "-b", "missing.qcow2", "-F", "qcow2", "m.qcow2", "16M"], cwd: dir)
        // A backing file outside the image's directory.
        try runTool("qemu-img", ["create", "-q", "-f", "qcow2", "-u", "-b", "/etc/passwd", "-F", "raw", "p.qcow2", "16M"], cwd: dir)
        let inner = try scratch.dir("images")
        try writeFile(scratch.path("outside.raw"), randomBytes(MiB, seed: 30))
        try runTool("qemu-img", ["create", "-q", "-f", "qcow2", "-u", "-b", "../outside.raw", "-F", "raw", "o.qcow2", "2M"],
                    cwd: inner)

        let mnt = try scratch.dir("mnt")
        let cases: [(image: String, extra: [String], mention: String)] = [
            (scratch.path("a.qcow2"), [], "loop"),
            (scratch.path("m.qcow2"), [], "missing.qcow2"),
            (scratch.path("p.qcow2"), [], "/etc/passwd"),
            (scratch.path("p.qcow2"), ["--read-only"], "/etc/passwd"),
            (inner + "/o.qcow2", [], "outside.raw"),
        ]
        for c in cases {
            let result = try scratch.imgfs(["mount"] + c.extra + [c.image, mnt], check: false)
            let name = (c.image as NSString).lastPathComponent
            #expect(result.status == 65, "\(name): exit \(result.status), stderr \(result.stderr)")
            let lines = result.stderr.split(separator: "\n")
            #expect(lines.count == 1, "\(name): stderr should be one line: \(result.stderr)")
            #expect(result.stderr.hasPrefix("imgfs: "), "\(name): \(result.stderr)")
            #expect(result.stderr.contains(c.mention), "\(name): stderr does not mention \(c.mention): \(result.stderr)")
            #expect(!isMounted(mnt), "\(name): something is mounted on \(mnt)")
            #expect(daemonPid(mountpoint: mnt) == nil, "\(name): pid file left behind")
            if isMounted(mnt) { _ = umount2(mnt, Int32(MNT_DETACH)) }
        }
        // The refused path is readable once its directory is allowed.
        try scratch.mount(inner + "/o.qcow2", at: mnt, ["--allow-path", dir, "--read-only"])
        let ref = try reference(scratch, inner + "/o.qcow2")
        try expectSame(mnt + "/o.raw", ref, "allowed outside")
        let ofd = try openOrThrow(mnt + "/o.raw", O_RDONLY)
        let head = try preadFully(ofd, count: 16, at: 0)
        close(ofd)
        #expect(head == Array(randomBytes(16, seed: 30)))
        try scratch.unmount(mnt)
        // --allow-path of some other directory does not help.
        let other = try scratch.dir("other")
        let refused = try scratch.imgfs(["mount", "--allow-path", other, inner + "/o.qcow2", mnt], check: false)
        #expect(refused.status == 65)
        #expect(!isMounted(mnt))
    }

    @Test("SEEK_DATA/SEEK_HOLE on a sparse qcow2 find the allocated clusters")
    func qcow2SeekDataHole() throws {
        let scratch = try Scratch("qseek")
        defer { scratch.cleanup() }
        let image = scratch.path("sparse.qcow2")
        try runTool("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", image, "64M"])
        let c = 65_536
        try qemuIO(image, [
            "write -P 0x01 \(8 * MiB) \(3 * c)",      // 8M .. 8M+192k
            "write -P 0x02 \(20 * MiB + 10) 100",     // allocates the cluster at 20M
            "write -P 0x03 \(40 * MiB + c) \(c)",     // 40M+64k .. 40M+128k
            "write -z \(50 * MiB) \(c)",              // a zero cluster: reads as zeros, a hole
        ])
        let mnt = try scratch.dir("mnt")
        try scratch.mount(image, at: mnt, ["--read-only"])
        let fd = try openOrThrow(mnt + "/sparse.raw", O_RDONLY)
        defer { close(fd) }
        let size = 64 * MiB
        func seek(_ offset: Int, _ whence: Int32) -> (Int, Int32) {
            errno = 0
            let r = lseek(fd, off_t(offset), whence)
            return (Int(r), r < 0 ? errno : 0)
        }
        let expectations: [(from: Int, whence: Int32, want: Int)] = [
            (0, seekData, 8 * MiB),
            (8 * MiB, seekData, 8 * MiB),
            (8 * MiB + 5, seekData, 8 * MiB + 5),
            (0, seekHole, 0),
            (8 * MiB, seekHole, 8 * MiB + 3 * c),
            (8 * MiB + 3 * c, seekData, 20 * MiB),
            (20 * MiB, seekHole, 20 * MiB + c),
            (20 * MiB + c, seekData, 40 * MiB + c),
            (40 * MiB, seekData, 40 * MiB + c),
            (40 * MiB + c + 7, seekHole, 40 * MiB + 2 * c),
            (50 * MiB, seekHole, 50 * MiB),
            (40 * MiB + 2 * c, seekHole, 40 * MiB + 2 * c),
            (size - 1, seekHole, size - 1),
        ]
        for e in expectations {
            let (got, err) = seek(e.from, e.whence)
            let name = e.whence == seekData ? "SEEK_DATA" : "SEEK_HOLE"
            #expect(got == e.want, "\(name) from \(e.from): \(got) (errno \(err)), expected \(e.want)")
        }
        // No data after the last allocated cluster; nothing at or past the end.
        for (from, whence) in [(40 * MiB + 2 * c, seekData), (size - 1, seekData), (size, seekData), (size, seekHole)] {
            let (got, err) = seek(from, whence)
            #expect(got == -1 && err == ENXIO, "whence \(whence) from \(from): \(got) errno \(err), expected ENXIO")
        }
        // The data ranges agree with qemu-img map.
        let map = try runTool("qemu-img", ["map", "--output=json", image])
        let entries = try JSONSerialization.jsonObject(with: map.outputData) as! [[String: Any]]
        let qemuData = entries.filter { ($0["data"] as? Bool) == true }
            .map { (($0["start"] as! NSNumber).intValue, ($0["length"] as! NSNumber).intValue) }
        var ours: [(Int, Int)] = []
        var position = 0
        while position < size {
            let (data, _) = seek(position, seekData)
            if data < 0 { break }
            let (hole, _) = seek(data, seekHole)
            ours.append((data, hole - data))
            position = hole
        }
        #expect(ours.map { "\($0.0)+\($0.1)" } == qemuData.map { "\($0.0)+\($0.1)" })
    }

    @Test("ext4 in a qcow2, loop-mounted through imgfs, reads back the source files")
    func ext4LoopMount() throws {
        let scratch = try Scratch("ext4")
        defer { scratch.cleanup() }
        let src = try scratch.dir("src")
        var files: [String: [UInt8]] = [:]
        let specs: [(String, Int)] = [("empty", 0), ("one", 1), ("page-1", 4095), ("small.bin", 100_000),
                                      ("big.bin", 3 * MiB + 17), ("dir/nested/deep.bin", 777_777), ("dir/x.txt", 12)]
        for (i, (name, count)) in specs.enumerated() {
            let path = src + "/" + name
            try FileManager.default.createDirectory(atPath: (path as NSString).deletingLastPathComponent,
                                                    withIntermediateDirectories: true)
            let bytes = randomBytes(count, seed: 40 + UInt64(i))
            try writeFile(path, bytes)
            files[name] = bytes
        }
        let rawFS = scratch.path("fs.raw")
        try runTool("truncate", ["-s", "64M", rawFS])
        try runTool("mkfs.ext4", ["-q", "-F", "-d", src, rawFS])
        let image = scratch.path("disk.qcow2")
        try runTool("qemu-img", ["convert", "-q", "-O", "qcow2", "-f", "raw", rawFS, image])
        let mnt = try scratch.dir("mnt")
        let guest = try scratch.dir("guest")
        try scratch.mount(image, at: mnt)
        try expectSame(mnt + "/disk.raw", rawFS, "ext4 image")
        try runTool("mount", ["-o", "loop,ro", mnt + "/disk.raw", guest])
        #expect(isMounted(guest))
        for (name, bytes) in files {
            let got = try readFile(guest + "/" + name)
            #expect(difference(got, bytes) == nil, "\(name): \(difference(got, bytes) ?? "")")
        }
        let listing = try FileManager.default.contentsOfDirectory(atPath: guest + "/dir").sorted()
        #expect(listing == ["nested", "x.txt"])
        try runTool("umount", [guest])
        #expect(!isMounted(guest))
        // The loop device lets go of the file asynchronously; imgfs unmount may briefly see EBUSY.
        var lastError = ""
        let unmounted = waitUntil(seconds: 10) {
            do { try scratch.unmount(mnt); return true } catch { lastError = "\(error)"; return false }
        }
        #expect(unmounted, "imgfs unmount after the guest unmount: \(lastError)")
    }

    @Test("imgfs info --output=json agrees with qemu-img info --output=json")
    func infoJSON() throws {
        let scratch = try Scratch("info")
        defer { scratch.cleanup() }
        let dir = scratch.directory
        try writeFile(scratch.path("base.raw"), randomBytes(4 * MiB, seed: 50))
        try runTool("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "cluster_size=131072", "-b", "base.raw", "-F", "raw",
                                 "top.qcow2", "16M"], cwd: dir)
        try qemuIO(scratch.path("top.qcow2"), ["write -P 0x5a 1M 1M"])
        try runTool("qemu-img", ["snapshot", "-c", "first", "top.qcow2"], cwd: dir)
        try qemuIO(scratch.path("top.qcow2"), ["write -P 0x5b 3M 64k"])
        try runTool("qemu-img", ["snapshot", "-c", "second snap", "top.qcow2"], cwd: dir)
        let image = scratch.path("top.qcow2")

        let ours = try scratch.imgfs(["info", "--output=json", image])
        let theirs = try runTool("qemu-img", ["info", "--output=json", image])
        let a = try JSONSerialization.jsonObject(with: ours.outputData) as? [String: Any]
        let b = try JSONSerialization.jsonObject(with: theirs.outputData) as? [String: Any]
        guard let a, let b else {
            Issue.record("not JSON objects: \(ours.stdout) / \(theirs.stdout)")
            return
        }
        func int(_ v: Any?) -> Int? { (v as? NSNumber)?.intValue }
        #expect(int(a["virtual-size"]) == int(b["virtual-size"]) && int(a["virtual-size"]) == 16 * MiB)
        #expect(a["format"] as? String == b["format"] as? String && b["format"] as? String == "qcow2")
        #expect(int(a["cluster-size"]) == int(b["cluster-size"]) && int(b["cluster-size"]) == 131_072)
        #expect(a["backing-filename"] as? String == b["backing-filename"] as? String,
                "backing-filename: \(a["backing-filename"] ?? "nil") vs \(b["backing-filename"] ?? "nil")")
        #expect(b["backing-filename"] as? String == "base.raw")
        #expect(a["backing-filename-format"] as? String == b["backing-filename-format"] as? String)
        func names(_ o: [String: Any]) -> [String] {
            ((o["snapshots"] as? [[String: Any]]) ?? []).compactMap { $0["name"] as? String }
        }
        #expect(names(a) == names(b) && names(b) == ["first", "second snap"], "snapshots \(names(a)) vs \(names(b))")
    }

    @Test("tables and clusters past the end of the file read as EIO (QEMU 7.2 shows zeros); the rest still reads")
    func metadataPastEndOfFileIsEIO() throws {
        let scratch = try Scratch("eof")
        defer { scratch.cleanup() }
        let image = scratch.path("bad.qcow2")
        try runTool("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", image, "1G"])
        try qemuIO(image, ["write -P 0x11 0 1M", "write -P 0x22 4M 64k", "write -P 0x33 600M 64k"])
        let bytes = try readFile(image)
        func be64(_ at: Int) -> UInt64 { bytes[at..<(at + 8)].reduce(0) { $0 << 8 | UInt64($1) } }
        func put64(_ value: UInt64, at: Int) throws {
            let fd = try openOrThrow(image, O_WRONLY)
            defer { close(fd) }
            try pwriteFully(fd, (0..<8).map { UInt8(truncatingIfNeeded: value >> (56 - 8 * UInt64($0))) }, at: Int64(at))
        }
        let l1 = Int(be64(40))
        let l2 = Int(be64(l1) & 0x00ff_ffff_ffff_fe00)
        let far = UInt64(bytes.count + 64 * 65536) & ~0xffff  // cluster-aligned, well past the end of the file
        // The data cluster of guest 4 MiB (L2 index 64) and the L2 table of guest 512 MiB..1 GiB (L1 index 1).
        try put64(far | (1 << 63), at: l2 + 64 * 8)
        try put64(far | (1 << 63), at: l1 + 8)

        let mnt = try scratch.dir("mnt")
        try scratch.mount(image, at: mnt)
        let file = mnt + "/bad.raw"
        let fd = try openOrThrow(file, O_RDONLY | 0o40000)  // O_DIRECT (not exported by Glibc): every read reaches the daemon
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: 65536, alignment: 4096)
        defer { buffer.deallocate() }
        func readErrno(_ offset: Int) -> Int32 {
            pread(fd, buffer, 65536, off_t(offset)) == 65536 ? 0 : errno
        }
        #expect(readErrno(4 * MiB) == EIO, "data cluster past EOF")
        #expect(readErrno(600 * MiB) == EIO, "L2 table past EOF")
        #expect(readErrno(0) == 0 && buffer.load(as: UInt8.self) == 0x11, "good data still reads")
        #expect(readErrno(8 * MiB) == 0, "an unallocated cluster beside the bad one still reads")
        #expect(readErrno(4 * MiB) == EIO, "still EIO, and the daemon still serves")
        #expect(isMounted(mnt))
        close(fd)
        try scratch.unmount(mnt)
    }
}
}
