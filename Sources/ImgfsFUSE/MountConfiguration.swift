/// How a FUSE mount is set up.
public struct MountConfiguration: Sendable {
    public var mountpoint: String
    /// Shown as the source in /proc/mounts (`imgfs:<image>`).
    public var sourceName: String
    /// Extra `-o` options passed to libfuse as given.
    public var fuseOptions: [String] = []
    public var allowOther = false
    public var readOnly = false
    /// Threads reading /dev/fuse; requests are answered on I/O threads, so two suffice on two cores.
    public var fuseThreads = 2
    /// Largest read/write request: 1 MiB is libfuse 3.14's limit.
    public var maxRequestBytes = 1 << 20
    /// Install SIGTERM/SIGINT/SIGHUP handlers that end the loop (the daemon); tests leave them off.
    public var handleSignals = false
    /// Keep the kernel's page cache of the file across opens: right for a file only this daemon changes.
    public var keepCache = true
    /// Seconds the kernel may cache attributes and names; only this daemon changes them, and it answers
    /// truncates with the new size.
    public var attributeTimeout: Double = 3600
    /// Let the kernel read raw disks' host files itself for read-only opens (FUSE passthrough, Linux 6.9+, as root);
    /// where it cannot, requests come to the daemon as usual. Writable opens, and O_DIRECT opens of an image the
    /// host page cache mostly holds, are served by the daemon (`PassthroughOpen`).
    public var kernelPassthrough = true

    public init(mountpoint: String, sourceName: String) {
        self.mountpoint = mountpoint
        self.sourceName = sourceName
    }

    /// The argv libfuse parses: fsname/subtype and the user's options.
    var arguments: [String] {
        var options = ["fsname=\(String(sourceName.map { $0 == "," ? "_" : $0 }))", "subtype=imgfs",
                       "default_permissions"]
        if allowOther { options.append("allow_other") }
        if readOnly { options.append("ro") }
        options += fuseOptions
        return ["imgfs", "-o", options.joined(separator: ",")]
    }
}
