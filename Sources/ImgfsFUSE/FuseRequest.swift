import CFuseBridge
#if canImport(Glibc)
import Glibc
#endif

/// One kernel request, answered exactly once from whichever thread finishes it.
struct FuseRequest: @unchecked Sendable {
    // fuse_req_t is safe to answer from any thread; Swift only sees an opaque pointer.
    let raw: fuse_req_t

    func fail(_ errno: Int32) { _ = fuse_reply_err(raw, errno) }
    func succeed() { _ = fuse_reply_err(raw, 0) }
    func replyData(_ pointer: UnsafeRawPointer?, count: Int) { _ = fuse_reply_buf(raw, pointer?.assumingMemoryBound(to: CChar.self), count) }
    func replyWritten(_ count: Int) { _ = fuse_reply_write(raw, count) }
    func replyOffset(_ offset: Int64) { _ = fuse_reply_lseek(raw, off_t(offset)) }
    func replyEntry(_ attr: imgfs_attr, timeout: Double) {
        var a = attr
        _ = imgfs_reply_entry(raw, &a, timeout)
    }
    func replyAttr(_ attr: imgfs_attr, timeout: Double) {
        var a = attr
        _ = imgfs_reply_attr(raw, &a, timeout)
    }
    /// Answers an open with the file handle later requests carry; if the kernel no longer wants it (the open
    /// was interrupted), libfuse calls release with it, so the handle is never leaked.
    func replyOpen(handle: UInt64, keepCache: Bool) { _ = imgfs_reply_open(raw, handle, keepCache ? 1 : 0, 0) }
}
