#include "imgfs_fuse.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

struct imgfs_session {
    struct fuse_session *se;
    imgfs_fuse_handlers handlers;
    unsigned max_request_bytes;
    unsigned negotiated_max_write;
    int mounted;
};

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

int imgfs_session_mount(imgfs_session *s, const char *mountpoint) {
    int rc = fuse_session_mount(s->se, mountpoint);
    if (rc == 0) s->mounted = 1;
    return rc;
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
