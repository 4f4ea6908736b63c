import ArgumentParser
import ImgfsBlock
import ImgfsFUSE
#if canImport(Glibc)
import Glibc
#endif

/// `imgfs unmount MOUNTPOINT`.
struct UnmountCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "unmount",
        abstract: "Unmount, after the daemon has flushed everything to the image.",
        discussion: "Returns once the daemon has written back and exited.\n\nExample: imgfs unmount /mnt/x")

    @Argument(help: "The directory an image is mounted on.") var mountpoint: String
    @Flag(name: .long, help: "Detach now even if files are open; the daemon exits after the last close.")
    var lazy = false
    @Option(name: .long, help: "Seconds to wait for the daemon to finish.") var timeout = 120

    func run() throws {
        guard let path = PathPolicy.realPath(mountpoint) else {
            Diagnostics.error("\(mountpoint): no such directory")
            throw ExitStatus.mountError
        }
        guard MountTable.isImgfsMount(path) else {
            Diagnostics.error("\(path): not an imgfs mount")
            throw ExitStatus.mountError
        }
        let pid = RuntimeRecord.read(mountpoint: path)
        if let failure = unmount(path) {
            Diagnostics.error("\(path): \(failure)")
            throw ExitStatus.mountError
        }
        guard let pid, !lazy else { return }
        // The daemon flushes after the kernel lets go of the mount; wait for it so the image is complete.
        var waited = 0
        while isRunning(pid) && waited < timeout * 100 {
            usleep(10_000)
            waited += 1
        }
        if isRunning(pid) {
            Diagnostics.error("\(path): unmounted, but daemon \(pid) has not exited after \(timeout) s")
            throw ExitStatus.mountError
        }
    }

    /// Whether the daemon still runs. An exited daemon stays a zombie until its parent (init, as it was detached)
    /// reaps it, which some container inits do late or never; kill(pid, 0) succeeds on a zombie, /proc tells.
    private func isRunning(_ pid: pid_t) -> Bool {
        guard kill(pid, 0) == 0 else { return false }
        let fd = open("/proc/\(pid)/stat", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return true }
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: 512)
        let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        guard n > 0, let paren = buffer[..<n].lastIndex(of: UInt8(ascii: ")")), paren + 2 < n else { return true }
        let state = buffer[paren + 2]
        return state != UInt8(ascii: "Z") && state != UInt8(ascii: "X")
    }

    private func unmount(_ path: String) -> String? {
        if getuid() == 0 {
            if umount2(path, lazy ? Int32(MNT_DETACH) : 0) == 0 { return nil }
            let e = errno
            return String(cString: strerror(e)) + (e == EBUSY ? " (is a file still open? try --lazy)" : "")
        }
        var pid = pid_t()
        let args = ["fusermount3", "-u"] + (lazy ? ["-z"] : []) + [path]
        let argv = args.map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        guard posix_spawnp(&pid, "fusermount3", nil, nil, argv, environ) == 0 else { return "cannot run fusermount3" }
        var status: Int32 = 0
        waitpid(pid, &status, 0)
        return status == 0 ? nil : "fusermount3 -u failed (is a file still open? try --lazy)"
    }
}
