/// How an open of a file whose host file the kernel may read itself (FUSE passthrough) is answered.
///
/// The kernel lets an inode's opens be all passthrough or all through its page cache: a plain open of an inode open
/// for passthrough fails with EINVAL, a passthrough open of one open through its page cache with ETXTBSY. So once
/// the file's host file is registered as a backing file, every open names it, and the opens the daemon must still
/// serve say so with FOPEN_DIRECT_IO, which the kernel honours before passthrough for reads and writes (only mmap
/// then maps the host file). No open ever waits on, or fails for, another.
struct PassthroughOpen: Equatable {
    /// The registered backing file the open names.
    let backing: Int32
    /// The daemon serves reads and writes (FOPEN_DIRECT_IO) and mmap maps the host file; otherwise the kernel reads
    /// the host file itself and no read reaches the daemon.
    let isServedByDaemon: Bool

    /// The answer to an open of a file registered as `backing`.
    ///
    /// Writable opens are served by the daemon: their writes must meet the end of the disk, a probed raw image's
    /// first-sector guard and whatever the node tracks. So is an O_DIRECT open of an image the host page cache
    /// mostly holds (`directOnCachedImage`, asked only for read-only opens): through passthrough each of its reads
    /// would be an O_DIRECT read of the image file, which goes to the disk (warm 4 KiB QD32 fell from 214k to 91k
    /// reads a second here), while the daemon serves it from that cache.
    static func answer(backing: Int32, writable: Bool, directOnCachedImage: () -> Bool) -> PassthroughOpen {
        PassthroughOpen(backing: backing, isServedByDaemon: writable || directOnCachedImage())
    }
}
