#include "imgfs_fuse.h"

#include <errno.h>
#include <linux/fuse.h>
#include <pthread.h>
#include <stdatomic.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

struct imgfs_session {
    struct fuse_session *se;
    imgfs_fuse_handlers handlers;
    unsigned max_request_bytes;
    unsigned negotiated_max_write;
    int mounted;
    int want_passthrough;
    _Atomic uint64_t init_unique;   // the INIT request, while its reply may still ask for passthrough
    _Atomic int passthrough;        // the kernel accepted: opens may name a backing file
};

// FUSE passthrough (Linux 6.9+) postdates libfuse 3.14 and its headers: the protocol's values, from the kernel's
// include/uapi/linux/fuse.h.
#define IMGFS_PASSTHROUGH_FLAGS2 (1u << (37 - 32))  // FUSE_PASSTHROUGH, in INIT's flags2
#define IMGFS_FOPEN_PASSTHROUGH (1u << 7)
#define IMGFS_FOPEN_DIRECT_IO (1u << 0)
#define IMGFS_FOPEN_PARALLEL_DIRECT_WRITES (1u << 6)
struct imgfs_backing_map {
    int32_t fd;
    uint32_t flags;
    uint64_t padding;
};
#define IMGFS_DEV_IOC_BACKING_OPEN _IOW(229, 1, struct imgfs_backing_map)

#define HANDLERS(req) (&((imgfs_session *)fuse_req_userdata(req))->handlers)

static void op_init(void *userdata, struct fuse_conn_info *conn) {
    imgfs_session *s = userdata;
    // 1 MiB is libfuse 3.14's buffer limit; a larger max_write makes the loop fail with EINVAL.
    if (conn->max_write < s->max_request_bytes) conn->max_write = s->max_request_bytes;
    conn->max_readahead = s->max_request_bytes;
    // Kernel readahead and async direct I/O run as background requests: let many be in flight.
    conn->max_background = 64;
    conn->congestion_threshold = 48;
    conn->want &= ~(FUSE_CAP_SPLICE_READ | FUSE_CAP_SPLICE_WRITE | FUSE_CAP_SPLICE_MOVE);
    if (conn->capable & FUSE_CAP_PARALLEL_DIROPS) conn->want |= FUSE_CAP_PARALLEL_DIROPS;
    if (conn->capable & FUSE_CAP_ASYNC_DIO) conn->want |= FUSE_CAP_ASYNC_DIO;
    if (conn->capable & FUSE_CAP_ASYNC_READ) conn->want |= FUSE_CAP_ASYNC_READ;
    // The kernel must not cache writes: a write is acknowledged only once the driver has it.
    conn->want &= ~FUSE_CAP_WRITEBACK_CACHE;
    s->negotiated_max_write = conn->max_write;
}

static void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name) {
    imgfs_fuse_handlers *h = HANDLERS(req);
    h->lookup(h->context, req, parent, name);
}

static void op_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup) {
    (void)ino; (void)nlookup;
    fuse_reply_none(req);  // inodes are fixed for the life of the mount
}

static void op_forget_multi(fuse_req_t req, size_t count, struct fuse_forget_data *forgets) {
    (void)count; (void)forgets;
    fuse_reply_none(req);
}

static void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    (void)fi;
    imgfs_fuse_handlers *h = HANDLERS(req);
    h->getattr(h->context, req, ino);
}

static void op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set, struct fuse_file_info *fi) {
    (void)fi;
    imgfs_fuse_handlers *h = HANDLERS(req);
    h->setattr(h->context, req, ino, to_set, (int64_t)attr->st_size);
}

static void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    imgfs_fuse_handlers *h = HANDLERS(req);
    h->open(h->context, req, ino, fi->flags);
}

static void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi) {
    imgfs_fuse_handlers *h = HANDLERS(req);
    h->read(h->context, req, ino, fi->fh, size, (int64_t)off);
}

static void op_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
                     struct fuse_file_info *fi) {
    imgfs_fuse_handlers *h = HANDLERS(req);
    h->write(h->context, req, ino, fi->fh, buf, size, (int64_t)off);
}

static void op_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    (void)ino; (void)fi;
    fuse_reply_err(req, 0);  // close(2) promises no durability; fsync does
}

static void op_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    imgfs_fuse_handlers *h = HANDLERS(req);
    h->release(h->context, req, ino, fi->fh);
}

static void op_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi) {
    imgfs_fuse_handlers *h = HANDLERS(req);
    h->fsync(h->context, req, ino, fi->fh, datasync);
}

static void op_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    (void)ino;
    fuse_reply_open(req, fi);
}

static void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi) {
    (void)fi;
    imgfs_fuse_handlers *h = HANDLERS(req);
    h->readdir(h->context, req, ino, size, (int64_t)off);
}

static void op_releasedir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    (void)ino; (void)fi;
    fuse_reply_err(req, 0);
}

static void op_fsyncdir(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi) {
    (void)ino; (void)datasync; (void)fi;
    fuse_reply_err(req, 0);
}

static void op_statfs(fuse_req_t req, fuse_ino_t ino) {
    imgfs_fuse_handlers *h = HANDLERS(req);
    h->statfs(h->context, req, ino);
}

static void op_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset, off_t length,
                         struct fuse_file_info *fi) {
    imgfs_fuse_handlers *h = HANDLERS(req);
    h->fallocate(h->context, req, ino, fi->fh, mode, (int64_t)offset, (int64_t)length);
}

static void op_lseek(fuse_req_t req, fuse_ino_t ino, off_t off, int whence, struct fuse_file_info *fi) {
    imgfs_fuse_handlers *h = HANDLERS(req);
    h->lseek(h->context, req, ino, fi->fh, (int64_t)off, whence);
}

static const struct fuse_lowlevel_ops imgfs_ops = {
    .init = op_init,
    .lookup = op_lookup,
    .forget = op_forget,
    .forget_multi = op_forget_multi,
    .getattr = op_getattr,
    .setattr = op_setattr,
    .open = op_open,
    .read = op_read,
    .write = op_write,
    .flush = op_flush,
    .release = op_release,
    .fsync = op_fsync,
    .opendir = op_opendir,
    .readdir = op_readdir,
    .releasedir = op_releasedir,
    .fsyncdir = op_fsyncdir,
    .statfs = op_statfs,
    .fallocate = op_fallocate,
    .lseek = op_lseek,
};

imgfs_session *imgfs_session_new(const imgfs_fuse_handlers *handlers, int argc, const char **argv,
                                 unsigned max_request_bytes) {
    imgfs_session *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->handlers = *handlers;
    s->max_request_bytes = max_request_bytes;
    struct fuse_args args = {argc, (char **)argv, 0};
    s->se = fuse_session_new(&args, &imgfs_ops, sizeof imgfs_ops, s);
    if (!s->se) {
        free(s);
        return NULL;
    }
    return s;
}

// The session's own read and writev, installed only to ask for passthrough: libfuse 3.14 cannot set the flag, so
// INIT's reply gets it here when the kernel offered it.
static ssize_t session_read(int fd, void *buf, size_t len, void *userdata) {
    imgfs_session *s = userdata;
    ssize_t n = read(fd, buf, len);
    if (n >= (ssize_t)(sizeof(struct fuse_in_header) + sizeof(struct fuse_init_in))) {
        const struct fuse_in_header *in = buf;
        const struct fuse_init_in *init = (const void *)(in + 1);
        if (in->opcode == FUSE_INIT && (init->flags & FUSE_INIT_EXT) && (init->flags2 & IMGFS_PASSTHROUGH_FLAGS2)) {
            atomic_store(&s->init_unique, in->unique);
        }
    }
    return n;
}

static ssize_t session_writev(int fd, struct iovec *iov, int count, void *userdata) {
    imgfs_session *s = userdata;
    uint64_t init_unique = atomic_load(&s->init_unique);
    int asked = 0;
    if (init_unique != 0 && count >= 2 && iov[0].iov_len >= sizeof(struct fuse_out_header) &&
        iov[1].iov_len >= sizeof(struct fuse_init_out)) {
        const struct fuse_out_header *out = iov[0].iov_base;
        struct fuse_init_out *init = iov[1].iov_base;
        // Passthrough and the writeback cache exclude each other; imgfs never asks for the latter.
        if (out->unique == init_unique && out->error == 0 && (init->flags & FUSE_INIT_EXT) &&
            !(init->flags & FUSE_WRITEBACK_CACHE)) {
            init->flags2 |= IMGFS_PASSTHROUGH_FLAGS2;
            // max_stack_depth, the word after flags2 (unused[0] in libfuse's copy of the struct): the backing files
            // are on ordinary file systems, one level below this one.
            ((uint32_t *)(&init->flags2 + 1))[0] = 1;
            asked = 1;
        }
    }
    ssize_t n = writev(fd, iov, count);
    if (asked) {
        atomic_store(&s->init_unique, 0);
        if (n >= 0) atomic_store(&s->passthrough, 1);
    }
    return n;
}

int imgfs_session_mount(imgfs_session *s, const char *mountpoint) {
    int rc = fuse_session_mount(s->se, mountpoint);
    if (rc != 0) return rc;
    s->mounted = 1;
    if (s->want_passthrough) {
        const struct fuse_custom_io io = {.read = session_read, .writev = session_writev};
        // Without it the mount works as before, only without passthrough.
        (void)fuse_session_custom_io(s->se, &io, fuse_session_fd(s->se));
    }
    return 0;
}

void imgfs_session_request_passthrough(imgfs_session *s) { s->want_passthrough = 1; }

int imgfs_session_backing_open(imgfs_session *s, int fd) {
    if (!atomic_load(&s->passthrough)) return -EOPNOTSUPP;
    struct imgfs_backing_map map;
    memset(&map, 0, sizeof map);
    map.fd = fd;
    int id = ioctl(fuse_session_fd(s->se), IMGFS_DEV_IOC_BACKING_OPEN, &map);
    if (id < 0) return -errno;
    return id == 0 ? -EIO : id;
}

int imgfs_reply_open_passthrough(fuse_req_t req, uint64_t fh, int backing_id, int daemon_serves) {
    // fuse_open_out as Linux 6.9 defines it: libfuse 3.14's has padding where backing_id is.
    struct {
        uint64_t fh;
        uint32_t open_flags;
        int32_t backing_id;
    } out = {fh, IMGFS_FOPEN_PASSTHROUGH, backing_id};
    // FOPEN_DIRECT_IO comes before passthrough for reads and writes: they come to us, mmap maps the backing file.
    // Parallel writes: the daemon orders overlapping ones itself, as it does for O_DIRECT writes.
    if (daemon_serves) out.open_flags |= IMGFS_FOPEN_DIRECT_IO | IMGFS_FOPEN_PARALLEL_DIRECT_WRITES;
    return fuse_reply_buf(req, (const char *)&out, sizeof out);
}

int imgfs_session_loop(imgfs_session *s, unsigned max_threads, int handle_signals) {
    if (handle_signals) {
        // A job started with '&' from a script has SIGINT ignored; libfuse only replaces default handlers.
        signal(SIGINT, SIG_DFL);
        signal(SIGTERM, SIG_DFL);
        signal(SIGHUP, SIG_DFL);
        if (fuse_set_signal_handlers(s->se) != 0) return -1;
        // The signal mask is inherited across exec: a daemon started by a program that blocks SIGTERM (libdispatch
        // and many test runners do) would never see it and never stop. Unblock on this thread, which runs the loop
        // and whose sem_wait the signal must interrupt; threads started earlier keep them blocked.
        sigset_t stop_signals;
        sigemptyset(&stop_signals);
        sigaddset(&stop_signals, SIGINT);
        sigaddset(&stop_signals, SIGTERM);
        sigaddset(&stop_signals, SIGHUP);
        pthread_sigmask(SIG_UNBLOCK, &stop_signals, NULL);
    }
    struct fuse_loop_config *config = fuse_loop_cfg_create();
    fuse_loop_cfg_set_max_threads(config, max_threads);
    fuse_loop_cfg_set_clone_fd(config, 0);
    int rc = fuse_session_loop_mt(s->se, config);
    fuse_loop_cfg_destroy(config);
    if (handle_signals) fuse_remove_signal_handlers(s->se);
    return rc;
}

void imgfs_session_exit(imgfs_session *s) { fuse_session_exit(s->se); }

void imgfs_session_unmount(imgfs_session *s) {
    if (s->mounted) {
        fuse_session_unmount(s->se);
        s->mounted = 0;
    }
}

void imgfs_session_destroy(imgfs_session *s) {
    fuse_session_destroy(s->se);
    free(s);
}

unsigned imgfs_session_max_write(imgfs_session *s) { return s->negotiated_max_write; }

static void fill_stat(struct stat *st, const imgfs_attr *a) {
    memset(st, 0, sizeof *st);
    st->st_ino = a->ino;
    st->st_mode = a->mode;
    st->st_nlink = a->nlink;
    st->st_size = a->size;
    st->st_uid = a->uid;
    st->st_gid = a->gid;
    st->st_blksize = 4096;
    st->st_blocks = (a->size + 511) / 512;
    st->st_mtim.tv_sec = a->mtime_sec;
    st->st_ctim.tv_sec = a->mtime_sec;
    st->st_atim.tv_sec = a->mtime_sec;
}

int imgfs_reply_entry(fuse_req_t req, const imgfs_attr *attr, double timeout) {
    struct fuse_entry_param e;
    memset(&e, 0, sizeof e);
    e.ino = attr->ino;
    e.generation = 1;
    fill_stat(&e.attr, attr);
    e.attr_timeout = timeout;
    e.entry_timeout = timeout;
    return fuse_reply_entry(req, &e);
}

int imgfs_reply_attr(fuse_req_t req, const imgfs_attr *attr, double timeout) {
    struct stat st;
    fill_stat(&st, attr);
    return fuse_reply_attr(req, &st, timeout);
}

int imgfs_reply_open(fuse_req_t req, uint64_t fh, int keep_cache, int direct_io) {
    struct fuse_file_info fi;
    memset(&fi, 0, sizeof fi);
    fi.fh = fh;
    fi.keep_cache = keep_cache ? 1 : 0;
    fi.direct_io = direct_io ? 1 : 0;
    return fuse_reply_open(req, &fi);
}

int imgfs_reply_statfs(fuse_req_t req, uint64_t blocks, uint64_t files, uint32_t block_size) {
    struct statvfs sv;
    memset(&sv, 0, sizeof sv);
    sv.f_bsize = block_size;
    sv.f_frsize = block_size;
    sv.f_blocks = blocks;
    sv.f_files = files;
    sv.f_namemax = 255;
    return fuse_reply_statfs(req, &sv);
}

size_t imgfs_dirbuf_add(fuse_req_t req, char *buf, size_t capacity, size_t used, const char *name,
                        uint64_t ino, uint32_t mode, int64_t next_offset) {
    struct stat st;
    memset(&st, 0, sizeof st);
    st.st_ino = ino;
    st.st_mode = mode;
    size_t need = fuse_add_direntry(req, buf + used, capacity - used, name, &st, next_offset);
    if (need > capacity - used) return 0;
    return used + need;
}
