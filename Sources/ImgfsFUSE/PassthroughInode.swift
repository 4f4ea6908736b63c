/// One exported file's FUSE passthrough state: its backing-file id and how its open handles are answered.
///
/// The kernel lets an inode's opens be all passthrough or all not (a plain open of an inode open for passthrough
/// fails with EINVAL, a passthrough open of one open through its page cache with ETXTBSY), so the first open
/// decides for every open that overlaps it, and the choice is made again once the last is released.
struct PassthroughInode {
    /// Registered at the first open and kept for the mount's life (the kernel drops it with the connection); 0
    /// where registering failed, nil before it was tried.
    var backingID: Int32?
    var liveOpens = 0
    var livePassthrough = false

    /// The backing id an open is answered with (nil: the daemon serves it), counting the open as live.
    ///
    /// `directOnCachedImage`, asked only when its answer decides: whether this is an O_DIRECT open of an image the
    /// host page cache mostly holds. The daemon serves that one from the page cache; through passthrough each of
    /// its reads would be an O_DIRECT read of the image file, which goes to the disk (warm 4 KiB QD32 fell from
    /// 214k to 91k reads a second here). Every other open passes through.
    mutating func admit(directOnCachedImage: () -> Bool) -> Int32? {
        defer { liveOpens += 1 }
        if liveOpens > 0 { return livePassthrough ? backingID : nil }
        let id = backingID ?? 0
        livePassthrough = id > 0 && !directOnCachedImage()
        return livePassthrough ? id : nil
    }

    /// Counts a release of an open `admit` counted.
    mutating func release() {
        liveOpens = max(0, liveOpens - 1)
    }
}
