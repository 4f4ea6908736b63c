import CFuseBridge
import ImgfsBlock
#if canImport(Glibc)
import Glibc
#endif

/// What each FUSE operation does to the exported block nodes.
extension FuseServer {
    func lookup(_ request: FuseRequest, parent: UInt64, name: String) {
        guard let ino = tree.lookup(parent: parent, name: name), let attr = tree.attributes(ino) else {
            return request.fail(ENOENT)
        }
        request.replyEntry(attr, timeout: configuration.attributeTimeout)
    }

    func getattr(_ request: FuseRequest, ino: UInt64) {
        guard let attr = tree.attributes(ino) else { return request.fail(ENOENT) }
        request.replyAttr(attr, timeout: configuration.attributeTimeout)
    }

    func setattr(_ request: FuseRequest, ino: UInt64, toSet: Int32, size: Int64) {
        guard tree.attributes(ino) != nil else { return request.fail(ENOENT) }
        // Only the size means something for a disk; mode, owner and times are fixed and silently kept.
        guard toSet & Int32(FUSE_SET_ATTR_SIZE) != 0, let file = tree.file(ino) else {
            return getattr(request, ino: ino)
        }
        guard !file.isReadOnly, let node = file.fixedNode else { return request.fail(EROFS) }
        beginAsync(request) {
            if size != node.length { try await node.truncate(to: size) }
            self.getattr(request, ino: ino)
        }
    }

    func open(_ request: FuseRequest, ino: UInt64, flags: Int32) {
        guard let file = tree.file(ino) else {
            return request.fail(tree.attributes(ino) == nil ? ENOENT : EISDIR)
        }
        // Root passes default_permissions on a 0444 file: refuse writable opens of read-only files here.
        let writable = (flags & O_ACCMODE) != O_RDONLY
        if writable && file.isReadOnly { return request.fail(EROFS) }
        let keepCache = configuration.keepCache
        if let node = file.fixedNode {
            let handle = OpenFile(file: file, node: node).handle
            guard let answer = passthroughOpen(ino: ino, node: node, writable: writable, flags: flags) else {
                return request.replyOpen(handle: handle, keepCache: keepCache)
            }
            // An open the kernel no longer wants (interrupted) gets no release: drop the handle here.
            if imgfs_reply_open_passthrough(request.raw, handle, answer.backing, answer.isServedByDaemon ? 1 : 0) == -ENOENT {
                OpenFile.release(handle: handle)
            }
            return
        }
        beginAsync(request) {
            let node = try await file.open()
            request.replyOpen(handle: OpenFile(file: file, node: node).handle, keepCache: keepCache)
        }
    }

    /// How an open of `ino` names its backing file (`PassthroughOpen`), or nil where it has none (this session
    /// did not ask for passthrough, the node's disk is not its host file, or registering failed) and the daemon
    /// serves it through the page cache. The backing file is registered at the first open.
    private func passthroughOpen(ino: UInt64, node: BlockNode, writable: Bool, flags: Int32) -> PassthroughOpen? {
        guard configuration.kernelPassthrough, let session, let host = node.passthroughFile else { return nil }
        let backing = passthroughBackings.withLock { backings -> Int32 in
            if let known = backings[ino] { return known }
            let made = imgfs_session_backing_open(session, host.descriptor)
            if made > 0 {
                logger.info("kernel passthrough: the kernel reads \(host.path) itself")
            } else if made != -EOPNOTSUPP {
                logger.info("kernel passthrough unavailable for \(node.path): \(String(cString: strerror(-made)))")
            }
            let id = max(0, made)
            backings[ino] = id
            return id
        }
        guard backing > 0 else { return nil }
        return PassthroughOpen.answer(backing: backing, writable: writable) {
            // cachestat walks the cached pages (milliseconds for gigabytes): once per read-only O_DIRECT open.
            guard flags & LinuxOpenFlags.direct != 0, let share = host.pageCacheShare(), share > 0.5 else {
                return false
            }
            logger.debug("\(node.path): an O_DIRECT open served by the daemon (the host page cache holds \(Int(share * 100))% of the image)")
            return true
        }
    }

    func release(_ request: FuseRequest, handle: UInt64) {
        let open = OpenFile.from(handle: handle)
        OpenFile.release(handle: handle)
        guard case .lazy = open.file.source else { return request.succeed() }
        beginAsync(request) {
            await open.file.close()
            request.succeed()
        }
    }

    func read(_ request: FuseRequest, _ file: OpenFile, size: Int, offset: Int64) {
        let length = file.bytesInside(offset: offset, size: size)
        guard offset >= 0, length > 0 else { return request.replyData(nil, count: 0) }
        let buffers = self.buffers
        // Data in the host page cache behind cached metadata is a memory copy: the thread hop and task of the async
        // path would cost more than the read itself, so this loop thread serves it and replies. Only with a buffer
        // to be had at once: a loop thread never waits for the memory budget.
        let ready = buffers.takeIfFree(length)
        if let buffer = ready,
           file.node.readIfCached(at: offset, into: UnsafeMutableRawBufferPointer(start: buffer, count: length)) {
            request.replyData(buffer, count: length)
            return buffers.recycle(buffer, count: length)
        }
        let handed = ready.map(UncheckedSendable.init)
        let work: @Sendable () async throws -> Void = {
            var buffer = handed?.value
            if buffer == nil { buffer = await buffers.take(length) }
            let owned = UncheckedSendable(buffer!)
            defer { buffers.recycle(owned.value, count: length) }
            // The disk may shrink between the clamp above and the read: what is gone is a short read.
            let count = try await file.node.readUpTo(at: offset,
                                                     into: UnsafeMutableRawBufferPointer(start: owned.value, count: length))
            request.replyData(owned.value, count: count)
        }
        if serveInlineIfIdle(request, work) { return }
        // Under load, a miss whose host location is known at once is read with no task: the engine's completion
        // thread replies. On a cold disk at QD32 that took 40-50k reads a second to 61-64k.
        if let buffer = ready,
           startDirectRead(request, file, buffer: buffer, length: length, offset: offset, otherwise: work) { return }
        beginAsync(request, work)
    }

    /// Starts the read through `BlockNode.startRead`; one that comes back short or failed is served again by
    /// `otherwise` (which owns the buffer then), on the async path that reports errors. False when nothing was
    /// started.
    private func startDirectRead(_ request: FuseRequest, _ file: OpenFile, buffer: UnsafeMutableRawPointer,
                                 length: Int, offset: Int64,
                                 otherwise: @escaping @Sendable () async throws -> Void) -> Bool {
        let buffers = self.buffers
        let owned = UncheckedSendable(buffer)
        inFlight.add(1, ordering: .relaxed)
        let started = file.node.startRead(at: offset, into: UnsafeMutableRawBufferPointer(start: buffer, count: length)) { complete in
            if complete {
                request.replyData(owned.value, count: length)
                buffers.recycle(owned.value, count: length)
            } else {
                self.beginAsync(request, otherwise)
            }
            self.inFlight.subtract(1, ordering: .releasing)
        }
        if !started { inFlight.subtract(1, ordering: .relaxed) }
        return started
    }

    func write(_ request: FuseRequest, _ file: OpenFile, data: UnsafeRawPointer, size: Int, offset: Int64) {
        guard !file.isReadOnly else { return request.fail(EROFS) }
        // A disk does not grow by writing past its end: what fits is written, the rest is ENOSPC.
        let length = file.bytesInside(offset: offset, size: size)
        guard offset >= 0 else { return request.fail(EINVAL) }
        guard length > 0 else { return size == 0 ? request.replyWritten(0) : request.fail(ENOSPC) }
        if length > Self.largeWriteBytes && file.node.driver.writesInPlace {
            // Large writes are bandwidth-bound: copying the data would cost a fifth of the daemon's CPU. This loop
            // thread writes it itself from libfuse's buffer (valid until we return) and replies; two such writes
            // in flight already saturate memory bandwidth here, and no thread switch is paid. Only for drivers
            // whose write is one host write: one that may wait on metadata would stall the whole mount.
            let source = UncheckedSendable(UnsafeRawBufferPointer(start: data, count: length))
            runOnLoopThread(request) {
                try await file.node.write(at: offset, from: source.value)
                request.replyWritten(length)
            }
            return
        }
        // Small writes go fully async, so many are in flight; libfuse reuses its buffer once this callback returns,
        // so the data is copied first.
        let buffer = buffers.takeNow(length)
        buffer.copyMemory(from: data, byteCount: length)
        let copy = UncheckedSendable(buffer)
        let buffers = self.buffers
        beginAsync(request) {
            defer { buffers.recycle(copy.value, count: length) }
            try await file.node.write(at: offset, from: UnsafeRawBufferPointer(start: copy.value, count: length))
            request.replyWritten(length)
        }
    }

    /// Writes above this size are written from libfuse's buffer without a copy (see `write`).
    static let largeWriteBytes = 128 << 10

    func fsync(_ request: FuseRequest, _ file: OpenFile) {
        beginAsync(request) {
            try await file.node.flush()
            request.succeed()
        }
    }

    func readdir(_ request: FuseRequest, ino: UInt64, size: Int, offset: Int64) {
        guard let directory = tree.directory(ino) else { return request.fail(ENOTDIR) }
        let buffer = UnsafeMutablePointer<CChar>.allocate(capacity: max(size, 1))
        defer { buffer.deallocate() }
        var used = 0
        var index = Int(max(0, min(offset, Int64(Int32.max))))
        // Entry 0 is ".", 1 is "..", then the children: no listing is built per call.
        while index < directory.children.count + 2 {
            let (name, child) = index == 0 ? (".", ino) : index == 1 ? ("..", directory.parent)
                : directory.children[index - 2]
            let mode = tree.attributes(child)?.mode ?? UInt32(Glibc.S_IFDIR)
            let next = imgfs_dirbuf_add(request.raw, buffer, size, used, name, child, mode, Int64(index + 1))
            if next == 0 { break }
            used = next
            index += 1
        }
        request.replyData(buffer, count: used)
    }

    func statfs(_ request: FuseRequest) {
        let files = tree.files
        let bytes = files.reduce(Int64(0)) { $0 + $1.length }
        _ = imgfs_reply_statfs(request.raw, UInt64(bytes / 4096), UInt64(tree.inodes.count), 4096)
    }

    func fallocate(_ request: FuseRequest, _ file: OpenFile, mode: Int32, offset: Int64, length: Int64) {
        guard !file.isReadOnly else { return request.fail(EROFS) }
        guard offset >= 0, length > 0 else { return request.fail(EINVAL) }
        let size = file.node.length
        let end = min(size, offset + length)
        let keepSize = mode & FallocateMode.keepSize != 0
        switch mode & ~FallocateMode.keepSize {
        case 0:
            // Preallocation: a virtual disk has all its bytes already; growing it is truncate's job.
            return offset + length <= size || keepSize ? request.succeed() : request.fail(EOPNOTSUPP)
        case FallocateMode.punchHole where keepSize, FallocateMode.zeroRange:
            // A disk grows only by truncate: a zero range that would extend it is refused as preallocation is.
            if !keepSize && offset + length > size { return request.fail(EOPNOTSUPP) }
            guard offset < size else { return request.succeed() }
            // Punching must leave zeros behind (QEMU 7.2's export loses unaligned punches): write-zeroes does.
            let unmap = mode & FallocateMode.punchHole != 0
            beginAsync(request) {
                try await file.node.writeZeroes(at: offset, length: end - offset, flags: unmap ? [.mayUnmap] : [])
                request.succeed()
            }
        default:
            request.fail(EOPNOTSUPP)
        }
    }

    func lseek(_ request: FuseRequest, _ file: OpenFile, offset: Int64, whence: Int32) {
        let wantData: Bool
        switch whence {
        case 3: wantData = true   // SEEK_DATA
        case 4: wantData = false  // SEEK_HOLE
        default: return request.fail(EINVAL)
        }
        let size = file.node.length
        guard offset >= 0, offset < size else { return request.fail(ENXIO) }
        beginAsync(request) {
            var position = offset
            // Zero ranges count as holes, as they read as zeros and need not be copied.
            while position < size {
                let status = try await file.node.chainBlockStatus(at: position, length: size - position)
                if (status.kind == .data) == wantData { return request.replyOffset(position) }
                position += status.length
            }
            if wantData { request.fail(ENXIO) } else { request.replyOffset(size) }
        }
    }
}
