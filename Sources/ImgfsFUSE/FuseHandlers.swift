import CFuseBridge
import ImgfsBlock
#if canImport(Glibc)
import Glibc
#endif

/// The Swift ends of the C bridge's callbacks: each finds its server and forwards to it.
enum FuseHandlers {
    static func table(context: UnsafeMutableRawPointer) -> imgfs_fuse_handlers {
        var h = imgfs_fuse_handlers()
        h.context = context
        h.lookup = { ctx, req, parent, name in
            server(ctx).lookup(FuseRequest(raw: req!), parent: parent, name: String(cString: name!))
        }
        h.getattr = { ctx, req, ino in server(ctx).getattr(FuseRequest(raw: req!), ino: ino) }
        h.setattr = { ctx, req, ino, toSet, size in
            server(ctx).setattr(FuseRequest(raw: req!), ino: ino, toSet: toSet, size: size)
        }
        h.open = { ctx, req, ino, flags in server(ctx).open(FuseRequest(raw: req!), ino: ino, flags: flags) }
        h.release = { ctx, req, _, fh in server(ctx).release(FuseRequest(raw: req!), handle: fh) }
        h.read = { ctx, req, _, fh, size, offset in
            server(ctx).read(FuseRequest(raw: req!), OpenFile.from(handle: fh), size: size, offset: offset)
        }
        h.write = { ctx, req, _, fh, data, size, offset in
            server(ctx).write(FuseRequest(raw: req!), OpenFile.from(handle: fh), data: data!, size: size,
                              offset: offset)
        }
        h.fsync = { ctx, req, _, fh, _ in server(ctx).fsync(FuseRequest(raw: req!), OpenFile.from(handle: fh)) }
        h.readdir = { ctx, req, ino, size, offset in
            server(ctx).readdir(FuseRequest(raw: req!), ino: ino, size: size, offset: offset)
        }
        h.statfs = { ctx, req, _ in server(ctx).statfs(FuseRequest(raw: req!)) }
        h.fallocate = { ctx, req, _, fh, mode, offset, length in
            server(ctx).fallocate(FuseRequest(raw: req!), OpenFile.from(handle: fh), mode: mode, offset: offset,
                                  length: length)
        }
        h.lseek = { ctx, req, _, fh, offset, whence in
            server(ctx).lseek(FuseRequest(raw: req!), OpenFile.from(handle: fh), offset: offset, whence: whence)
        }
        return h
    }
}

// File-level so the C callbacks capture nothing (a static member would capture the metatype).
private func server(_ context: UnsafeMutableRawPointer?) -> FuseServer {
    Unmanaged<FuseServer>.fromOpaque(context!).takeUnretainedValue()
}
