import Foundation
import Testing
import ImgfsTestSupport
#if canImport(Glibc)
import Glibc
#endif

/// Mount-level tests of raw images through the real `imgfs` daemon.
extension ImgfsMountTests {
@Suite(.serialized)
struct RawMountTests {
    /// Builds `disk.img` with `bytes`, mounts it (`--format raw` unless `extra` says otherwise) and runs `body`
    /// with the mounted file's path; always unmounts and removes the scratch directory.
    private func withRawMount(_ bytes: [UInt8], extra: [String] = ["--format", "raw"], label: String,
                              _ body: (_ scratch: Scratch, _ image: String, _ mnt: String, _ file: String) throws -> Void) throws {
        let scratch = try Scratch(label)
        defer { scratch.cleanup() }
        let image = scratch.path("disk.img")
        try writeFile(image, bytes)
        let mnt = try scratch.dir("mnt")
        try scratch.mount(image, at: mnt, extra)
        try body(scratch, image, mnt, mnt + "/disk.raw")
        if isMounted(mnt) { try scratch.unmount(mnt) }
    }

    @Test("reads equal the image: aligned, unaligned, across 1 MiB, at and past EOF")
    func reads() throws {
        let size = 24 * MiB + 12_345
        let model = randomBytes(size, seed: 1)
        try withRawMount(model, label: "read") { _, image, _, file in
            #expect(fileSize(file) == Int64(size))
            let fd = try openOrThrow(file, O_RDONLY)
            defer { close(fd) }
            let host = try openOrThrow(image, O_RDONLY)
            defer { close(host) }
            let cases: [(offset: Int, count: Int, what: String)] = [
                (0, 4096, "first page"),
                (3 * MiB, 64 * KiB, "aligned 64 KiB"),
                (5 * MiB, MiB, "aligned 1 MiB"),
                (12_345, 77_777, "unaligned"),
                (1, 1, "one byte"),
                (MiB - 1000, 5000, "across 1 MiB boundary"),
                (7 * MiB - 3, 2 * MiB + 7, "across two 1 MiB boundaries"),
                (size - 4096, 4096, "last 4 KiB"),
            ]
            for c in cases {
                let got = try preadFully(fd, count: c.count, at: Int64(c.offset))
                let want = try preadFully(host, count: c.count, at: Int64(c.offset))
                #expect(got.count == c.count, "\(c.what): short read \(got.count)")
                #expect(difference(got, want) == nil, "\(c.what): \(difference(got, want) ?? "")")
                #expect(difference(got, Array(model[c.offset..<(c.offset + c.count)])) == nil, "\(c.what) vs model")
            }
            // A single read(2) at EOF returns what is left; past EOF returns 0.
            var buffer = [UInt8](repeating: 0xAA, count: 8192)
            let atEnd = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress, 8192, off_t(size - 100)) }
            #expect(atEnd == 100)
            #expect(Array(buffer[..<100]) == Array(model[(size - 100)...]))
            let exactlyEnd = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress, 8192, off_t(size)) }
            #expect(exactlyEnd == 0)
            let past = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress, 8192, off_t(size + 12_345)) }
            #expect(past == 0)
            // The whole file in odd-sized chunks.
            var whole: [UInt8] = []
            whole.reserveCapacity(size)
            var offset = 0
            while true {
                let chunk = try preadFully(fd, count: 1_000_003, at: Int64(offset))
                if chunk.isEmpty { break }
                whole += chunk
                offset += chunk.count
            }
            #expect(difference(whole, model) == nil, "whole file: \(difference(whole, model) ?? "")")
        }
    }

    @Test("seeded random writes read back through the mount and land in the host file")
    func writes() throws {
        let size = 8 * MiB + 777
        var model = randomBytes(size, seed: 2)
        try withRawMount(model, label: "write") { scratch, image, mnt, file in
            let fd = try openOrThrow(file, O_RDWR)
            var rng = SplitMix64(seed: 22)
            let sizes = [1, 511, 512, 513, 4095, 4096, 4097, 65_537, 131_072, MiB + 3, 3 * MiB - 1]
            for i in 0..<120 {
                let count = i < sizes.count ? sizes[i] : Int.random(in: 1...300_000, using: &rng)
                let offset = Int.random(in: 0...(size - count), using: &rng)
                let data = randomBytes(count, seed: 1000 + UInt64(i))
                try pwriteFully(fd, data, at: Int64(offset))
                model.replaceSubrange(offset..<(offset + count), with: data)
                // Read a window around it back at once.
                let lo = max(0, offset - 100), hi = min(size, offset + count + 100)
                let back = try preadFully(fd, count: hi - lo, at: Int64(lo))
                #expect(difference(back, Array(model[lo..<hi])) == nil, "write \(i) \(count)@\(offset)")
            }
            // The very last bytes of the disk.
            try pwriteFully(fd, [1, 2, 3], at: Int64(size - 3))
            model.replaceSubrange((size - 3)..<size, with: [1, 2, 3])
            // A disk does not grow by writing: a write across the end is short, one past it fails with ENOSPC.
            let across = [UInt8](repeating: 0x5c, count: 10_000)
            let crossed = across.withUnsafeBytes { pwrite(fd, $0.baseAddress, 10_000, off_t(size - 100)) }
            #expect(crossed == 100, "write across the end wrote \(crossed)")
            if crossed == 100 { model.replaceSubrange((size - 100)..<size, with: across[..<100]) }
            errno = 0
            let past = across.withUnsafeBytes { pwrite(fd, $0.baseAddress, 10, off_t(size + 5)) }
            #expect(past == -1 && errno == ENOSPC, "write past the end: \(past) \(errnoText())")
            #expect(fileSize(file) == Int64(size))
            let all = try preadFully(fd, count: size + 10, at: 0)
            #expect(difference(all, model) == nil, "mount after writes: \(difference(all, model) ?? "")")
            close(fd)
            try scratch.unmount(mnt)
            let host = try readFile(image)
            #expect(difference(host, model) == nil, "host after unmount: \(difference(host, model) ?? "")")
        }
    }

    @Test("fsync returns 0 and the writes are in the host file")
    func fsyncReachesHost() throws {
        let size = 4 * MiB
        var model = randomBytes(size, seed: 3)
        try withRawMount(model, label: "fsync") { _, image, _, file in
            let fd = try openOrThrow(file, O_RDWR)
            defer { close(fd) }
            let data = randomBytes(300_001, seed: 33)
            try pwriteFully(fd, data, at: 123_457)
            model.replaceSubrange(123_457..<(123_457 + data.count), with: data)
            #expect(fsync(fd) == 0, "fsync: \(errnoText())")
            #expect(fdatasync(fd) == 0, "fdatasync: \(errnoText())")
            let host = try readFile(image)
            #expect(difference(host, model) == nil, "host after fsync: \(difference(host, model) ?? "")")
        }
    }

    @Test("SEEK_DATA/SEEK_HOLE on a sparse raw image agree with the host file")
    func seekDataHole() throws {
        let scratch = try Scratch("seek")
        defer { scratch.cleanup() }
        let image = scratch.path("sparse.img")
        try runTool("truncate", ["-s", "64M", image])
        let hfd = try openOrThrow(image, O_RDWR)
        defer { close(hfd) }
        try pwriteFully(hfd, randomBytes(MiB, seed: 4), at: Int64(8 * MiB))
        try pwriteFully(hfd, randomBytes(MiB + 5000, seed: 5), at: Int64(40 * MiB))
        fsync(hfd)
        let mnt = try scratch.dir("mnt")
        try scratch.mount(image, at: mnt, ["--format", "raw"])
        let fd = try openOrThrow(mnt + "/sparse.raw", O_RDONLY)
        let size = 64 * MiB
        let offsets = [0, 1, 4096, 8 * MiB - 1, 8 * MiB, 8 * MiB + 100, 9 * MiB - 1, 9 * MiB, 20 * MiB,
                       40 * MiB - 1, 40 * MiB, 40 * MiB + 5, 41 * MiB, 41 * MiB + 4999, 41 * MiB + 8192,
                       63 * MiB, size - 1, size, size + 4096]
        var dataSeen = 0
        for whence in [seekData, seekHole] {
            for offset in offsets {
                errno = 0
                let want = lseek(hfd, off_t(offset), whence)
                let wantErrno = want < 0 ? errno : 0
                errno = 0
                let got = lseek(fd, off_t(offset), whence)
                let gotErrno = got < 0 ? errno : 0
                let name = whence == seekData ? "SEEK_DATA" : "SEEK_HOLE"
                #expect(got == want, "\(name) from \(offset): mount \(got) host \(want)")
                #expect(gotErrno == wantErrno, "\(name) from \(offset): errno mount \(gotErrno) host \(wantErrno)")
                if whence == seekData && want >= 0 { dataSeen += 1 }
            }
        }
        // Sanity: the host file system really is sparse here, so the comparison meant something.
        #expect(lseek(hfd, 0, seekData) == off_t(8 * MiB))
        #expect(dataSeen > 0)
        close(fd)
        try scratch.unmount(mnt)
    }

    @Test("fallocate PUNCH_HOLE|KEEP_SIZE and ZERO_RANGE leave zeros and keep the size")
    func fallocateZeros() throws {
        let size = 8 * MiB + 100
        var model = randomBytes(size, seed: 6)
        try withRawMount(model, label: "falloc") { scratch, image, mnt, file in
            let fd = try openOrThrow(file, O_RDWR)
            let ranges: [(mode: Int32, offset: Int, length: Int, what: String)] = [
                (Falloc.punchHole | Falloc.keepSize, 2 * MiB, MiB, "aligned punch"),
                (Falloc.punchHole | Falloc.keepSize, 5000, 10_000, "unaligned punch"),
                (Falloc.punchHole | Falloc.keepSize, 4 * MiB - 1, 2, "2-byte punch across 4 MiB"),
                (Falloc.zeroRange, 6 * MiB + 123, 300_000, "unaligned zero range"),
                (Falloc.zeroRange | Falloc.keepSize, 7 * MiB, 64 * KiB, "aligned zero range, keep size"),
                (Falloc.punchHole | Falloc.keepSize, size - 50, 50, "punch of the last bytes"),
            ]
            for r in ranges {
                // Read the range first so the kernel has it cached: fallocate must not leave stale pages.
                _ = try preadFully(fd, count: r.length, at: Int64(r.offset))
                let rc = linuxFallocate(fd, mode: r.mode, offset: Int64(r.offset), length: Int64(r.length))
                #expect(rc == 0, "\(r.what): fallocate failed: \(errnoText())")
                if rc == 0 {
                    model.replaceSubrange(r.offset..<(r.offset + r.length),
                                          with: [UInt8](repeating: 0, count: r.length))
                }
                let back = try preadFully(fd, count: r.length, at: Int64(r.offset))
                #expect(isAllZero(back) && back.count == r.length, "\(r.what): not zeros through the mount")
                var st = stat()
                fstat(fd, &st)
                #expect(Int(st.st_size) == size, "\(r.what): size changed to \(st.st_size)")
            }
            // A disk grows only by truncate: a zero range that would extend it is refused and changes nothing.
            #expect(linuxFallocate(fd, mode: Falloc.zeroRange, offset: Int64(size - 10), length: 100) == -1)
            #expect(errno == EOPNOTSUPP)
            var after = stat()
            fstat(fd, &after)
            #expect(Int(after.st_size) == size)
            let all = try preadFully(fd, count: size, at: 0)
            #expect(difference(all, model) == nil, "mount: \(difference(all, model) ?? "")")
            let hostNow = try readFile(image)
            #expect(difference(hostNow, model) == nil, "host while mounted: \(difference(hostNow, model) ?? "")")
            close(fd)
            try scratch.unmount(mnt)
            #expect(fileSize(image) == Int64(size))
            let host = try readFile(image)
            #expect(difference(host, model) == nil, "host after unmount: \(difference(host, model) ?? "")")
        }
    }

    @Test("ftruncate grows and shrinks a raw image")
    func truncateGrowShrink() throws {
        let size = 4 * MiB
        let model = randomBytes(size, seed: 7)
        try withRawMount(model, label: "trunc") { scratch, image, mnt, file in
            let fd = try openOrThrow(file, O_RDWR)
            // Grow.
            let grown = 12 * MiB + 4321
            #expect(ftruncate(fd, off_t(grown)) == 0, "grow: \(errnoText())")
            var st = stat()
            fstat(fd, &st)
            #expect(Int(st.st_size) == grown)
            #expect(fileSize(file) == Int64(grown))
            #expect(fileSize(image) == Int64(grown))
            let tail = try preadFully(fd, count: grown - size + 10, at: Int64(size))
            #expect(tail.count == grown - size)
            #expect(isAllZero(tail), "grown region is not zero")
            let head = try preadFully(fd, count: size, at: 0)
            #expect(difference(head, model) == nil)
            // Writes into the grown part work.
            try pwriteFully(fd, [9, 8, 7], at: Int64(grown - 3))
            // Shrink, unaligned.
            let shrunk = MiB + 1234
            #expect(ftruncate(fd, off_t(shrunk)) == 0, "shrink: \(errnoText())")
            fstat(fd, &st)
            #expect(Int(st.st_size) == shrunk)
            #expect(fileSize(file) == Int64(shrunk))
            #expect(fileSize(image) == Int64(shrunk))
            let after = try preadFully(fd, count: 2 * MiB, at: 0)
            #expect(difference(after, Array(model[..<shrunk])) == nil)
            // Grow again: what was cut off must come back as zeros, not as the old bytes.
            #expect(ftruncate(fd, off_t(2 * MiB)) == 0)
            let regrown = try preadFully(fd, count: 2 * MiB, at: 0)
            #expect(difference(Array(regrown[..<shrunk]), Array(model[..<shrunk])) == nil)
            #expect(isAllZero(Array(regrown[shrunk...])), "regrown region shows stale data")
            close(fd)
            // truncate(2) by path too.
            #expect(truncate(file, off_t(3 * MiB)) == 0, "truncate by path: \(errnoText())")
            #expect(fileSize(file) == Int64(3 * MiB))
            try scratch.unmount(mnt)
            #expect(fileSize(image) == Int64(3 * MiB))
            let host = try readFile(image)
            #expect(difference(Array(host[..<shrunk]), Array(model[..<shrunk])) == nil)
            #expect(isAllZero(Array(host[shrunk...])))
        }
    }

    @Test("raw mounts let the kernel read the image itself for read-only opens (FUSE passthrough) where Linux 6.9+ and root allow it; writable opens and O_DIRECT opens of a cached image are served by the daemon beside them",
          arguments: [true, false])
    func passthrough(readOnly: Bool) throws {
        var model = randomBytes(16 * MiB, seed: 9)
        var name = utsname()
        uname(&name)
        let release = withUnsafeBytes(of: &name.release) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        let version = release.split(whereSeparator: { !$0.isNumber }).prefix(2).compactMap { Int($0) }
        let kernelHasIt = version.count == 2 && (version[0], version[1]) >= (6, 9)
        let direct = O_RDONLY | 0o40000  // O_DIRECT: nothing is served from FUSE's cache
        let servedByDaemon = "an O_DIRECT open served by the daemon"
        for extra in [[], ["--passthrough"], ["--no-passthrough"]] {
            // A writable image is probed, so its first-sector guard is there to be kept.
            let args = (readOnly ? ["--read-only", "--format", "raw"] : []) + ["--log-level", "debug"] + extra
            try withRawMount(model, extra: args, label: "pt") { scratch, image, mnt, file in
                guard let pid = daemonPid(mountpoint: mnt) else { throw TestFailure("no daemon for \(mnt)") }
                let log = { (try? String(contentsOfFile: scratch.path("daemon.log"), encoding: .utf8)) ?? "" }
                let served = { log().components(separatedBy: servedByDaemon).count - 1 }
                // Cold: the image's pages dropped from the host page cache, then O_DIRECT reads of every page.
                let (got, failed, spent) = try coldDirectRead(file, image: image, count: model.count, daemon: pid)
                #expect(failed == nil, "\(extra): \(failed ?? "")")
                #expect(difference(got, model) == nil, "\(extra)")
                let passthrough = log().contains("kernel passthrough: the kernel reads")
                let expected = kernelHasIt && geteuid() == 0 && extra != ["--no-passthrough"]
                #expect(passthrough == expected, "\(extra) on Linux \(release) as uid \(geteuid()): passthrough \(passthrough)\n\(log())")
                #expect(served() == 0, "a cold image's O_DIRECT open was kept from passthrough")
                // 4096 reads served by the daemon cost it tens of milliseconds; through the kernel, nothing.
                if passthrough { #expect(spent <= 2, "the daemon spent \(spent) ticks on reads the kernel should serve") }
                guard passthrough else { return }

                // Warm: an O_DIRECT open is served by the daemon from the host page cache, and buffered opens
                // beside it still pass through, whichever came first (the kernel would refuse a plain open beside
                // a passthrough one).
                _ = try readFile(image)
                let warm = try openOrThrow(file, direct)
                #expect(served() == 1, "an O_DIRECT open of a cached image went to passthrough")
                let buffered = try openOrThrow(file, O_RDONLY)
                #expect(difference(try preadFully(buffered, count: model.count, at: 0), model) == nil)
                #expect(difference(readInPages(warm, count: model.count).bytes, model) == nil)
                close(buffered)
                close(warm)
                let first = try openOrThrow(file, O_RDONLY)
                let second = try openOrThrow(file, direct)
                #expect(served() == 2, "an O_DIRECT open beside a passthrough open was not served by the daemon")
                #expect(difference(readInPages(second, count: model.count).bytes, model) == nil)
                #expect(difference(try preadFully(first, count: model.count, at: 0), model) == nil)
                close(second)
                close(first)
                guard !readOnly else { return }

                // Writable: a writer opened beside a reader that passes through is served by the daemon, so its
                // writes meet the disk's checks, and the reader sees them, by read and by mmap.
                let reader = try openOrThrow(file, O_RDONLY)
                let writer = try openOrThrow(file, O_RDWR)
                let patch = randomBytes(3 * 4096, seed: 10)
                try pwriteFully(writer, patch, at: 4096)
                model.replaceSubrange(4096..<(4096 + patch.count), with: patch)
                #expect(difference(try preadFully(reader, count: model.count, at: 0), model) == nil, "read beside a writer")
                #expect(mappedBytes(reader, count: model.count).map { difference($0, model) } == .some(nil),
                        "mmap beside a writer")
                errno = 0
                let qcow2Magic: [UInt8] = [0x51, 0x46, 0x49, 0xFB, 0, 0, 0, 3]
                let guarded = pwrite(writer, qcow2Magic, qcow2Magic.count, 0)
                #expect(guarded < 0 && errno == EPERM, "a qcow2 header over a probed raw's first sector: \(guarded), \(errnoText())")
                #expect(pwrite(writer, qcow2Magic, qcow2Magic.count, off_t(model.count)) <= 0, "a write past the end")
                // A reader opened while the writer is open passes through too.
                let (again, failedAgain, spentAgain) = try coldDirectRead(file, image: image, count: model.count, daemon: pid)
                #expect(failedAgain == nil && difference(again, model) == nil, "\(failedAgain ?? "")")
                #expect(spentAgain <= 2, "the daemon spent \(spentAgain) ticks on a reader beside a writer")
                #expect(served() == 2)
                close(writer)
                close(reader)
                try scratch.unmount(mnt)
                #expect(difference(try readFile(image), model) == nil, "the image after the writes")
            }
        }
    }

    /// Drops `image` from the host page cache, then reads `file` in O_DIRECT pages: the bytes, a failure, and the
    /// CPU ticks the daemon `pid` spent meanwhile.
    private func coldDirectRead(_ file: String, image: String, count: Int,
                                daemon pid: pid_t) throws -> (bytes: [UInt8], failure: String?, ticks: Int) {
        try dropHostPageCache(image)
        let before = try cpuTicks(pid)
        let fd = try openOrThrow(file, O_RDONLY | 0o40000)
        defer { close(fd) }
        let (got, failed) = readInPages(fd, count: count)
        return (got, failed, try cpuTicks(pid) - before)
    }

    /// The first `count` bytes of `fd` through a shared read-only mapping, or nil where mmap fails.
    private func mappedBytes(_ fd: Int32, count: Int) -> [UInt8]? {
        guard let map = mmap(nil, count, PROT_READ, MAP_SHARED, fd, 0), map != MAP_FAILED else { return nil }
        defer { munmap(map, count) }
        return Array(UnsafeRawBufferPointer(start: map, count: count))
    }

    /// Writes the file's dirty pages and asks the kernel to forget its cached ones.
    private func dropHostPageCache(_ path: String) throws {
        let fd = try openOrThrow(path, O_RDONLY)
        defer { close(fd) }
        _ = fsync(fd)
        _ = posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)
    }

    /// User and system CPU time of a process so far, in clock ticks.
    private func cpuTicks(_ pid: pid_t) throws -> Int {
        let stat = try String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8)
        // Fields after the command name, which is in parentheses and may hold spaces: utime and stime are 14 and 15.
        guard let close = stat.lastIndex(of: ")") else { throw TestFailure("unreadable /proc/\(pid)/stat") }
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        guard fields.count > 13, let user = Int(fields[11]), let system = Int(fields[12]) else {
            throw TestFailure("unreadable /proc/\(pid)/stat")
        }
        return user + system
    }

    @Test("--read-only images refuse writable opens with EROFS")
    func readOnly() throws {
        let model = randomBytes(2 * MiB, seed: 8)
        for extra in [["--read-only", "--format", "raw"], ["--read-only"]] {
            try withRawMount(model, extra: extra, label: "ro") { _, image, _, file in
                for flags in [O_RDWR, O_WRONLY, O_WRONLY | O_TRUNC] {
                    errno = 0
                    let fd = open(file, flags)
                    let e = errno
                    if fd >= 0 { close(fd) }
                    #expect(fd < 0 && e == EROFS, "\(extra) open flags \(flags): fd \(fd) errno \(errnoText(e))")
                }
                #expect(truncate(file, 0) != 0 && errno == EROFS, "\(extra): truncate by path")
                // Reads still work and the host file is untouched.
                let fd = try openOrThrow(file, O_RDONLY)
                defer { close(fd) }
                let back = try preadFully(fd, count: model.count, at: 0)
                #expect(difference(back, model) == nil)
                #expect(linuxFallocate(fd, mode: Falloc.punchHole | Falloc.keepSize, offset: 0, length: 4096) != 0)
                #expect(difference(try readFile(image), model) == nil)
            }
        }
        // Probed or named, a raw image without --read-only is writable.
        for extra in [["--format", "raw"], []] {
            try withRawMount(model, extra: extra, label: "rw") { _, _, _, file in
                let fd = open(file, O_RDWR)
                #expect(fd >= 0, "\(extra) should be writable: \(errnoText())")
                if fd >= 0 { close(fd) }
            }
        }
    }
}
}
