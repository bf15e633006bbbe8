/*
 * FUSE export: the low-level operations on the one file of the mount.
 *
 * The mount is a single regular file (inode FUSE_ROOT_ID) whose content is
 * the block node.  Metadata operations answer at once; data operations take
 * a request slot and complete through the block layer (see fuse-session.c).
 *
 * Semantics follow QEMU 7.2's FUSE export so that applications see the same
 * answers: mode 0400/0600 owned by the daemon's user; writes to a read-only
 * export fail with EACCES; a write straddling the end of a fixed-size export
 * is cut short, one starting at or past it fails with EIO; a growable export
 * grows to hold it.  Truncation works on writable exports (growable or not,
 * shrinking included), as in QEMU.  fallocate: mode 0 only at/after EOF (it
 * grows the node), PUNCH_HOLE|KEEP_SIZE as write-zeroes that may unmap and
 * must not fall back to writing zeroes, ZERO_RANGE as write-zeroes;
 * everything else is EOPNOTSUPP.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>
#include "export/fuse/fuse-export.h"
#include "util/cleanup.h"

static struct fuse_export *req_exp(fuse_req_t req)
{
    return fuse_req_userdata(req);
}

static uint64_t node_size(struct fuse_export *exp)
{
    return __atomic_load_n(&exp->common.node->size, __ATOMIC_RELAXED);
}

/* Reply with an error and release the slot (nothing touches r after). */
static void ioreq_fail(struct fuse_ioreq *r, int err)
{
    fuse_reply_err(r->req, err);
    fuse_ioreq_put(r);
}

/* ---- init, lookup, attributes ---- */

static void op_init(void *userdata, struct fuse_conn_info *conn)
{
    /* max_read must equal the mount option given in fuse-export.c. */
    conn->max_read = FUSE_RW_MAX;
    conn->max_write = MIN(conn->max_write, FUSE_RW_MAX);
    /* Payloads must arrive in memory so writes can keep them (no splice). */
    conn->want &= ~(FUSE_CAP_SPLICE_READ | FUSE_CAP_SPLICE_MOVE);
    /* Let the kernel keep more asynchronous reads/direct I/O in flight. */
    conn->max_background = FUSE_MAX_INFLIGHT;
    conn->congestion_threshold = 48;
}

static void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    fuse_reply_err(req, ENOENT);   /* the mount has no names below it */
}

static uint64_t alloc_blocks(struct fuse_export *exp, uint64_t size)
{
    /* fstat of the image, not stat of its path: the mount may cover that
     * path, and a stat there would wait for this very request. */
    int64_t allocated = bnode_leaf_allocated(exp->common.node);
    return allocated > 0 ? (uint64_t)allocated / 512 : (size + 511) / 512;
}

void fuse_reply_attr_of(struct fuse_export *exp, fuse_req_t req)
{
    struct stat st;
    uint64_t size = node_size(exp);
    time_t now = time(NULL);

    memset(&st, 0, sizeof(st));
    st.st_ino = FUSE_ROOT_ID;
    st.st_mode = exp->st_mode;
    st.st_nlink = 1;
    st.st_uid = exp->st_uid;
    st.st_gid = exp->st_gid;
    st.st_size = size;
    st.st_blksize = exp->common.node->request_alignment;
    st.st_blocks = alloc_blocks(exp, size);
    st.st_atime = st.st_mtime = st.st_ctime = now;
    fuse_reply_attr(req, &st, 1.0);
}

static void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    fuse_reply_attr_of(req_exp(req), req);
}

static void setattr_apply(struct fuse_export *exp, const struct stat *attr, int to_set)
{
    if (to_set & FUSE_SET_ATTR_MODE)
        exp->st_mode = (attr->st_mode & 07777) | S_IFREG;
    if (to_set & FUSE_SET_ATTR_UID)
        exp->st_uid = attr->st_uid;
    if (to_set & FUSE_SET_ATTR_GID)
        exp->st_gid = attr->st_gid;
}

static void setattr_resized(struct fuse_ioreq *r, int ret)
{
    if (ret < 0) {
        ioreq_fail(r, -ret);
        return;
    }
    setattr_apply(r->exp, &r->attr, r->to_set);
    fuse_reply_attr_of(r->exp, r->req);
    fuse_ioreq_put(r);
}

/* Only the size and, as far as they still let the owner in, the mode and
 * (with allow_other) the owner can change. */
static int setattr_check(struct fuse_export *exp, const struct stat *attr, int to_set)
{
    int supported = FUSE_SET_ATTR_SIZE | FUSE_SET_ATTR_MODE;

    if (exp->allow_other)
        supported |= FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID;
    if (to_set & ~supported)
        return ENOTSUP;
    if (to_set & FUSE_SET_ATTR_MODE) {
        if (!exp->allow_other && (attr->st_mode & (S_IRWXG | S_IRWXO)))
            return EPERM;
        if (!exp->common.writable && (attr->st_mode & (S_IWUSR | S_IWGRP | S_IWOTH)))
            return EROFS;
    }
    if ((to_set & FUSE_SET_ATTR_SIZE) && !exp->common.writable)
        return EACCES;
    if ((to_set & FUSE_SET_ATTR_SIZE) && attr->st_size < 0)
        return EINVAL;
    return 0;
}

static void op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr,
                       int to_set, struct fuse_file_info *fi)
{
    struct fuse_export *exp = req_exp(req);
    struct fuse_ioreq *r;
    int err = setattr_check(exp, attr, to_set);

    if (err) {
        fuse_reply_err(req, err);
        return;
    }
    if (!(to_set & FUSE_SET_ATTR_SIZE)) {
        setattr_apply(exp, attr, to_set);
        fuse_reply_attr_of(exp, req);
        return;
    }
    r = fuse_ioreq_get(exp, req);
    if (!r) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    r->attr = *attr;
    r->to_set = to_set;
    r->new_size = attr->st_size;
    fuse_resize(r, false, setattr_resized);
}

/* ---- open / release ---- */

static void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct fuse_export *exp = req_exp(req);

    __atomic_add_fetch(&exp->open_handles, 1, __ATOMIC_SEQ_CST);
    if (fuse_reply_open(req, fi) < 0)   /* interrupted: no release will come */
        __atomic_sub_fetch(&exp->open_handles, 1, __ATOMIC_SEQ_CST);
}

static void op_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct fuse_export *exp = req_exp(req);

    __atomic_sub_fetch(&exp->open_handles, 1, __ATOMIC_SEQ_CST);
    fuse_reply_err(req, 0);
}

/* ---- read ---- */

static void read_done(struct breq *b, int ret)
{
    struct fuse_ioreq *r = b->opaque;

    if (ret < 0) {
        ioreq_fail(r, -ret);
        return;
    }
    fuse_reply_buf(r->req, r->iov.iov_base, r->iov.iov_len);
    fuse_ioreq_put(r);
}

static void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                    struct fuse_file_info *fi)
{
    struct fuse_export *exp = req_exp(req);
    uint64_t len = node_size(exp);
    struct fuse_ioreq *r;

    if (off < 0 || size > FUSE_RW_MAX) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    if ((uint64_t)off >= len || size == 0) {
        fuse_reply_buf(req, NULL, 0);   /* EOF: a short (empty) read */
        return;
    }
    size = MIN(size, len - off);
    r = fuse_ioreq_get(exp, req);
    if (!r) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    if (fuse_ioreq_alloc(r, size) < 0) {
        ioreq_fail(r, ENOMEM);
        return;
    }
    fuse_ioreq_submit(r, BREQ_READ, 0, off, size, read_done);
}

/* ---- write ---- */

static void write_done(struct breq *b, int ret)
{
    struct fuse_ioreq *r = b->opaque;

    if (ret < 0) {
        ioreq_fail(r, -ret);
        return;
    }
    fuse_reply_write(r->req, r->iov.iov_len);
    fuse_ioreq_put(r);
}

static void write_submit(struct fuse_ioreq *r)
{
    unsigned flags = r->exp->common.writethrough ? BREQ_FUA : 0;

    fuse_ioreq_submit(r, BREQ_WRITE, flags, r->offset, r->iov.iov_len, write_done);
}

static void write_resized(struct fuse_ioreq *r, int ret)
{
    if (ret < 0) {
        ioreq_fail(r, -ret);
        return;
    }
    write_submit(r);
}

static void op_write(fuse_req_t req, fuse_ino_t ino, const char *buf,
                     size_t size, off_t off, struct fuse_file_info *fi)
{
    struct fuse_export *exp = req_exp(req);
    struct fuse_ioreq *r;
    uint64_t len, end;

    if (!exp->common.writable) {
        fuse_reply_err(req, EACCES);
        return;
    }
    if (off < 0 || size > FUSE_RW_MAX || (uint64_t)off > INT64_MAX - size) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    if (size == 0) {
        fuse_reply_write(req, 0);
        return;
    }
    r = fuse_ioreq_get(exp, req);
    if (!r) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    if (fuse_ioreq_take_data(r, buf, size) < 0) {
        ioreq_fail(r, ENOMEM);
        return;
    }
    r->offset = off;
    len = node_size(exp);
    end = off + size;
    if (end > len) {
        if (exp->growable) {
            r->new_size = end;
            fuse_resize(r, true, write_resized);
            return;
        }
        if ((uint64_t)off >= len) {   /* nothing of it fits: EIO, as QEMU */
            ioreq_fail(r, EIO);
            return;
        }
        r->iov.iov_len = len - off;   /* the part that fits: a short write */
    }
    write_submit(r);
}

/* ---- flush / fsync ---- */

static void flush_done(struct breq *b, int ret)
{
    struct fuse_ioreq *r = b->opaque;

    fuse_reply_err(r->req, ret < 0 ? -ret : 0);
    fuse_ioreq_put(r);
}

static void op_fsync(fuse_req_t req, fuse_ino_t ino, int datasync,
                     struct fuse_file_info *fi)
{
    struct fuse_export *exp = req_exp(req);
    struct fuse_ioreq *r;

    if (!exp->common.writable) {   /* nothing of ours can be dirty */
        fuse_reply_err(req, 0);
        return;
    }
    r = fuse_ioreq_get(exp, req);
    if (!r) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    fuse_ioreq_submit(r, BREQ_FLUSH, 0, 0, 0, flush_done);
}

/* Every close() flushes, as in QEMU: late errors reach the application. */
static void op_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    op_fsync(req, ino, 1, fi);
}

/* ---- fallocate ---- */

static void zero_next(struct fuse_ioreq *r);

static void zero_done(struct breq *b, int ret)
{
    struct fuse_ioreq *r = b->opaque;

    if (ret == 0) {
        r->offset += b->len;
        r->remaining -= b->len;
        if (r->remaining) {
            zero_next(r);
            return;
        }
    }
    if (ret == -ENOTSUP)
        ret = -EOPNOTSUPP;   /* fallocate(2)'s word for "not supported" */
    fuse_reply_err(r->req, ret < 0 ? -ret : 0);
    fuse_ioreq_put(r);
}

static void zero_next(struct fuse_ioreq *r)
{
    uint64_t n = MIN(r->remaining, FUSE_ZERO_CHUNK);
    fuse_ioreq_submit(r, BREQ_WRITE_ZEROES, r->zero_flags, r->offset, n, zero_done);
}

static void zero_start(struct fuse_ioreq *r, int ret)
{
    if (ret < 0) {
        ioreq_fail(r, -ret);
        return;
    }
    if (!r->remaining) {
        fuse_reply_err(r->req, 0);
        fuse_ioreq_put(r);
        return;
    }
    zero_next(r);
}

static void falloc_grown(struct fuse_ioreq *r, int ret)
{
    fuse_reply_err(r->req, ret < 0 ? -ret : 0);
    fuse_ioreq_put(r);
}

/* Returns 0 to proceed, or the errno to answer at once. */
static int falloc_check(struct fuse_export *exp, int mode, off_t off, off_t length)
{
    if (!exp->common.writable)
        return EACCES;
    if (off < 0 || length <= 0)
        return EINVAL;
    if ((uint64_t)off > INT64_MAX - (uint64_t)length)
        return EFBIG;
    if ((mode & FALLOC_FL_PUNCH_HOLE) && !(mode & FALLOC_FL_KEEP_SIZE))
        return EINVAL;
    if (mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE))
        return EOPNOTSUPP;
    if (mode && !(mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE)))
        return EOPNOTSUPP;   /* KEEP_SIZE alone: preallocation inside */
    return 0;
}

static void op_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t off,
                         off_t length, struct fuse_file_info *fi)
{
    struct fuse_export *exp = req_exp(req);
    uint64_t len = node_size(exp);
    struct fuse_ioreq *r;
    int err = falloc_check(exp, mode, off, length);

    if (!err && mode == 0 && (uint64_t)off < len)
        err = EOPNOTSUPP;   /* preallocating inside the node: QEMU cannot either */
    if (err) {
        fuse_reply_err(req, err);
        return;
    }
    r = fuse_ioreq_get(exp, req);
    if (!r) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    r->offset = off;
    r->remaining = length;
    if (mode == 0) {
        r->new_size = off + length;
        fuse_resize(r, true, falloc_grown);
        return;
    }
    if (mode & FALLOC_FL_KEEP_SIZE)
        r->remaining = (uint64_t)off >= len ? 0 : MIN((uint64_t)length, len - off);
    if (mode & FALLOC_FL_PUNCH_HOLE) {
        r->zero_flags = BREQ_MAY_UNMAP | BREQ_NO_FALLBACK;
        zero_start(r, 0);
        return;
    }
    r->zero_flags = 0;   /* ZERO_RANGE */
    if (!(mode & FALLOC_FL_KEEP_SIZE) && off + length > (off_t)len) {
        r->new_size = off + length;
        fuse_resize(r, true, zero_start);
        return;
    }
    zero_start(r, 0);
}

/* ---- lseek (SEEK_DATA / SEEK_HOLE) ---- */

static void op_lseek(fuse_req_t req, fuse_ino_t ino, off_t off, int whence,
                     struct fuse_file_info *fi)
{
    struct fuse_export *exp = req_exp(req);
    uint64_t len = node_size(exp);
    uint64_t pos = off;

    if (whence != SEEK_DATA && whence != SEEK_HOLE) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    if (off < 0) {
        fuse_reply_err(req, ENXIO);
        return;
    }
    for (;;) {
        uint64_t pnum = 0;
        unsigned flags = 0;
        int depth = 0, ret;
        bool data;

        if (pos >= len) {
            /* EOF is a hole; past it there is nothing at all. */
            if (pos > len || whence == SEEK_DATA)
                fuse_reply_err(req, ENXIO);
            else
                fuse_reply_lseek(req, pos);
            return;
        }
        ret = bnode_block_status(exp->common.node, pos, len - pos, &pnum, &flags, &depth);
        if (ret < 0) {
            fuse_reply_err(req, -ret);
            return;
        }
        data = flags & BS_DATA;
        if ((whence == SEEK_DATA) == data) {
            fuse_reply_lseek(req, pos);
            return;
        }
        if (!pnum) {   /* never loop forever on a driver that makes no progress */
            fuse_reply_err(req, ENXIO);
            return;
        }
        pos += pnum;
    }
}

/* ---- statfs ---- */

static void op_statfs(fuse_req_t req, fuse_ino_t ino)
{
    struct fuse_export *exp = req_exp(req);
    struct statvfs st;

    memset(&st, 0, sizeof(st));
    st.f_bsize = 512;
    st.f_frsize = 512;
    st.f_blocks = (node_size(exp) + 511) / 512;
    st.f_files = 1;
    st.f_namemax = 255;
    fuse_reply_statfs(req, &st);
}

const struct fuse_lowlevel_ops fuse_export_ops = {
    .init       = op_init,
    .lookup     = op_lookup,
    .getattr    = op_getattr,
    .setattr    = op_setattr,
    .open       = op_open,
    .release    = op_release,
    .read       = op_read,
    .write      = op_write,
    .flush      = op_flush,
    .fsync      = op_fsync,
    .fallocate  = op_fallocate,
    .lseek      = op_lseek,
    .statfs     = op_statfs,
};
