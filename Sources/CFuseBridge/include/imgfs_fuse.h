// The C side of imgfs's FUSE adapter: libfuse3's low-level callbacks forwarded to Swift function pointers,
// plus reply helpers that build libfuse's structs so Swift never has to.
#pragma once

#define FUSE_USE_VERSION 314
#include <fuse3/fuse_lowlevel.h>
#include <stdint.h>
#include <stddef.h>

/// Attributes of one inode, as Swift describes them.
typedef struct imgfs_attr {
    uint64_t ino;
    uint32_t mode;
    uint32_t nlink;
    int64_t size;
    uint32_t uid;
    uint32_t gid;
    int64_t mtime_sec;
} imgfs_attr;

/// The Swift side's request handlers. Each must answer its request exactly once, now or later, from any thread.
typedef struct imgfs_fuse_handlers {
    void *context;
    void (*lookup)(void *context, fuse_req_t req, uint64_t parent, const char *name);
    void (*getattr)(void *context, fuse_req_t req, uint64_t ino);
    void (*setattr)(void *context, fuse_req_t req, uint64_t ino, int to_set, int64_t size);
    void (*open)(void *context, fuse_req_t req, uint64_t ino, int flags);
    // `fh` is what open replied with.
    void (*release)(void *context, fuse_req_t req, uint64_t ino, uint64_t fh);
    void (*read)(void *context, fuse_req_t req, uint64_t ino, uint64_t fh, size_t size, int64_t offset);
    void (*write)(void *context, fuse_req_t req, uint64_t ino, uint64_t fh, const void *data, size_t size,
                  int64_t offset);
    void (*fsync)(void *context, fuse_req_t req, uint64_t ino, uint64_t fh, int datasync);
    void (*readdir)(void *context, fuse_req_t req, uint64_t ino, size_t size, int64_t offset);
    void (*statfs)(void *context, fuse_req_t req, uint64_t ino);
    void (*fallocate)(void *context, fuse_req_t req, uint64_t ino, uint64_t fh, int mode, int64_t offset,
                      int64_t length);
    void (*lseek)(void *context, fuse_req_t req, uint64_t ino, uint64_t fh, int64_t offset, int whence);
} imgfs_fuse_handlers;

typedef struct imgfs_session imgfs_session;

/// Creates a session; `argv` carries the mount options ("-o", "fsname=...,..."). NULL on failure.
imgfs_session *imgfs_session_new(const imgfs_fuse_handlers *handlers, int argc, const char **argv,
                                 unsigned max_request_bytes);
int imgfs_session_mount(imgfs_session *session, const char *mountpoint);
/// Runs the multi-threaded loop until unmount or fuse_session_exit; returns libfuse's result.
int imgfs_session_loop(imgfs_session *session, unsigned max_threads, int handle_signals);
void imgfs_session_exit(imgfs_session *session);

// FUSE passthrough (Linux 6.9+): the kernel reads an open file's backing host file itself, with no request to us.
/// Asks for it at INIT; call before imgfs_session_mount.
void imgfs_session_request_passthrough(imgfs_session *session);
/// Registers `fd` as a backing file (needs CAP_SYS_ADMIN); its id (> 0), or -errno.
int imgfs_session_backing_open(imgfs_session *session, int fd);
/// Answers an open with a backing file id: the kernel then serves the file's reads itself, or with `daemon_serves`
/// sends reads and writes here as before and only maps the backing file for mmap.
int imgfs_reply_open_passthrough(fuse_req_t req, uint64_t fh, int backing_id, int daemon_serves);
void imgfs_session_unmount(imgfs_session *session);
void imgfs_session_destroy(imgfs_session *session);
/// The negotiated largest write the kernel will send (0 before INIT).
unsigned imgfs_session_max_write(imgfs_session *session);

int imgfs_reply_entry(fuse_req_t req, const imgfs_attr *attr, double timeout);
int imgfs_reply_attr(fuse_req_t req, const imgfs_attr *attr, double timeout);
int imgfs_reply_open(fuse_req_t req, uint64_t fh, int keep_cache, int direct_io);
int imgfs_reply_statfs(fuse_req_t req, uint64_t blocks, uint64_t files, uint32_t block_size);
/// Appends one directory entry to `buf`; returns the new used size, or 0 when it does not fit.
size_t imgfs_dirbuf_add(fuse_req_t req, char *buf, size_t capacity, size_t used, const char *name,
                        uint64_t ino, uint32_t mode, int64_t next_offset);
