/*
 * Drivers "file" and "host_device": a POSIX file or block device.
 *
 * Theory of operation: reads and writes go to the loop's I/O engine
 * (aio.h).  A FUA write is one write with RWF_DSYNC (QEMU 7.2 writes, then
 * flushes: two trips to the device and one to its worker pool).  Multi-step
 * requests (FUA write-zeroes = zeroing then fdatasync; write-zeroes =
 * ZERO_RANGE, else punch+allocate, else writing zero buffers) advance a
 * small per-request stage counter from the completion callback.  Image
 * locking uses OFD locks on the byte offsets QEMU uses (100 + permission
 * bit held, 200 + permission bit not shared), so bexd and QEMU see each
 * other's locks.  Unlike QEMU exports, a writer here does not share WRITE:
 * two daemons cannot both write one image.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/vfs.h>
#include <linux/magic.h>
#include <pthread.h>
#include <unistd.h>
#include "util/atomic.h"
#include "block/block.h"
#include "block/align.h"
#include "block/bitmap-sidecar.h"
#include "job/job.h"
#include "util/cleanup.h"
#include "util/log.h"
#include "util/xalloc.h"
#include "util/opts.h"

#define ZERO_CHUNK (64 * 1024)
#define ZERO_IOVS 512              /* 32 MiB of zeros per write */
#define KNOWN_WRITTEN 8            /* hole-free stretches block status keeps */


struct file_state {
    int fd;
    char *filename;
    enum aio_kind aio;
    bool locking;
    bool is_blockdev;
    bool has_zero_range;        /* cleared after EOPNOTSUPP */
    bool has_punch;
    bool ram_backed;            /* tmpfs/ramfs: I/O is a memcpy, done inline */
    bool nowait_read, nowait_write;  /* RWF_NOWAIT worth trying */
    /* Stretches known to hold no hole, kept because finding one may cost:
     * tmpfs answers SEEK_HOLE by walking its pages up to the next hole (6 us
     * per MiB of data; issue 13, 6).  Only writes change the file otherwise,
     * and they never make a hole; a fallocate forgets the range it covers, a
     * truncate all (data_gen counts those, so a walk that raced with one is
     * not kept).
     * present: every page is in the page cache or in swap (zero-copy reads);
     * written: nor is any page fallocated and never written, which reads as
     * zeros and which SEEK_HOLE counts as a hole (block status; QEMU leaves
     * such pages on tmpfs where it zeroes the rest of a new qcow2 cluster). */
    pthread_mutex_t data_lock;
    unsigned data_gen;
    struct stretch { uint64_t lo, hi; } present, written[KNOWN_WRITTEN];
    unsigned written_next;
    /* The file's length in bytes (atomic).  The node's size is this rounded
     * up to 512, as QEMU's; the rest of the last sector reads as zeros. */
    uint64_t length;
    unsigned lock_held, lock_unshared;  /* the locks taken (apply_locks) */
};

static const unsigned char zero_buf[ZERO_CHUNK] __attribute__((aligned(4096)));  /* O_DIRECT-safe */
static struct iovec zero_iov[ZERO_IOVS];

/* ---- locking ---- */

static int lock_byte(int fd, off_t byte, bool lock)
{
    struct flock fl = { .l_type = lock ? F_RDLCK : F_UNLCK, .l_whence = SEEK_SET,
                        .l_start = byte, .l_len = 1 };
    return fcntl(fd, F_OFD_SETLK, &fl) < 0 ? -errno : 0;
}

/* True if another open file description holds a lock on byte. */
static bool byte_locked_by_others(int fd, off_t byte)
{
    struct flock fl = { .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = byte, .l_len = 1 };
    return fcntl(fd, F_OFD_GETLK, &fl) == 0 && fl.l_type != F_UNLCK;
}

/* Apply QEMU's scheme for (held perms, unshared perms) bit masks. */
static int apply_locks(struct file_state *s, unsigned held, unsigned unshared, error **errp)
{
    if (!s->locking)
        return 0;
    for (int b = 0; b < 4; b++) {
        if ((held & (1u << b)) && byte_locked_by_others(s->fd, 200 + b)) {
            error_setg(errp, "Failed to get \"%s\" lock", bnode_perm_name(b));
            return -1;
        }
        if ((unshared & (1u << b)) && byte_locked_by_others(s->fd, 100 + b)) {
            error_setg(errp, "Failed to get shared \"%s\" lock", bnode_perm_name(b));
            return -1;
        }
    }
    for (int b = 0; b < 4; b++) {
        lock_byte(s->fd, 100 + b, held & (1u << b));
        lock_byte(s->fd, 200 + b, unshared & (1u << b));
    }
    s->lock_held = held;
    s->lock_unshared = unshared;
    return 0;
}

/* Lock what the users hold and do not share.  Unlike QEMU exports, a
 * writer here never shares WRITE with other processes. */
static int file_set_perm(struct bnode *bs, uint64_t perm, uint64_t shared, error **errp)
{
    struct file_state *s = bs->opaque;
    uint64_t unshared = perm ? (~shared & PERM_ALL) | (perm & PERM_WRITE) : 0;
    return apply_locks(s, perm, unshared, errp);
}

/* ---- open/close ---- */

static int64_t fd_size(int fd, bool blockdev)
{
    if (blockdev) {
        uint64_t sz;
        if (ioctl(fd, BLKGETSIZE64, &sz) == 0)
            return sz;
    }
    off_t end = lseek(fd, 0, SEEK_END);
    return end < 0 ? -errno : end;
}

static int open_common(struct bnode *bs, json_t *opts, bool host_device, error **errp)
{
    const char *filename = opt_str(opts, "filename", "");
    const char *aio = opt_str(opts, "aio", "threads");
    const char *locking = opt_str(opts, "locking", "auto");
    struct file_state *s = xzalloc(sizeof(*s));
    bs->opaque = s;
    s->fd = -1;
    s->filename = xstrdup(filename);
    s->aio = aio_kind_parse(aio);
    s->locking = strcmp(locking, "off") != 0;
    s->has_zero_range = s->has_punch = true;
    pthread_mutex_init(&s->data_lock, NULL);
    /* bexd has no pr-manager-helper objects, so no id names one */
    if (opt_str(opts, "pr-manager", NULL)) {
        error_setg(errp, "No persistent reservation manager with id '%s'",
                   opt_str(opts, "pr-manager", NULL));
        return -1;
    }
    int flags = (bs->read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC;
    if (bs->cache_direct)
        flags |= O_DIRECT;
    s->fd = open(filename, flags);
    if (s->fd < 0 && errno == EROFS && !bs->read_only &&
        opt_bool(opts, "auto-read-only", false)) {
        bs->read_only = true;
        s->fd = open(filename, (flags & ~O_RDWR) | O_RDONLY);
    }
    if (s->fd < 0) {
        error_setg_errno(errp, errno, "Could not open '%s'", filename);
        return -1;
    }
    /* checked once the file is open, as QEMU does */
    if (!strcmp(aio, "native") && !bs->cache_direct) {
        error_setg(errp, "aio=native was specified, but it requires cache.direct=on, "
                         "which was not specified.");
        return -1;
    }
    /* As QEMU, which sets up its loop's context here: a kernel that will
     * not make one (fs.aio-max-nr reached, no Linux AIO) fails the open. */
    int laio_err = s->aio == AIO_NATIVE ? aio_native_probe() : 0;
    if (laio_err) {
        error_setg(errp, "Unable to use native AIO: failed to create linux AIO context: %s",
                   strerror(-laio_err));
        return -1;
    }
    struct stat st;
    if (fstat(s->fd, &st) < 0) {
        error_setg_errno(errp, errno, "Could not stat '%s'", filename);
        return -1;
    }
    s->is_blockdev = S_ISBLK(st.st_mode);
    struct statfs sfs;
    s->ram_backed = !bs->cache_direct && fstatfs(s->fd, &sfs) == 0 &&
                    (sfs.f_type == TMPFS_MAGIC || sfs.f_type == RAMFS_MAGIC);
    s->nowait_read = s->nowait_write = !bs->cache_direct;
    if (host_device && !S_ISBLK(st.st_mode) && !S_ISCHR(st.st_mode)) {
        error_setg(errp, "'host_device' driver requires '%s' to be either a "
                         "character or block device", filename);
        return -1;
    }
    if (!host_device && S_ISBLK(st.st_mode)) {
        error_setg(errp, "The 'file' block driver requires a regular file, but '%s' "
                         "is a block device; use the 'host_device' driver", filename);
        return -1;
    }
    if (S_ISDIR(st.st_mode)) {
        error_setg(errp, "'%s' is a directory", filename);
        return -1;
    }
    int64_t size = fd_size(s->fd, s->is_blockdev);
    if (size < 0) {
        error_setg_errno(errp, (int)-size, "Could not refresh total sector count");
        return -1;
    }
    s->length = size;
    bs->size = bnode_round_size(size);
    if (bs->cache_direct) {
        bs->request_alignment = 512;
        if (s->is_blockdev) {
            int lbs;
            if (ioctl(s->fd, BLKSSZGET, &lbs) == 0 && lbs > 0)
                bs->request_alignment = lbs;
        }
    }
    return 0;
}

static int file_open(struct bnode *bs, json_t *opts, error **errp)
{
    return open_common(bs, opts, false, errp);
}

static int host_device_open(struct bnode *bs, json_t *opts, error **errp)
{
    return open_common(bs, opts, true, errp);
}

static void file_close(struct bnode *bs)
{
    struct file_state *s = bs->opaque;
    if (!s)
        return;
    if (s->fd >= 0)
        close(s->fd);       /* drops the OFD locks too */
    pthread_mutex_destroy(&s->data_lock);
    free(s->filename);
    free(s);
}

/* ---- requests ---- */

static void file_aio_done(struct aio_req *a, int64_t res);

/* Where a request runs.  Copies from or to RAM-backed files never wait for
 * a device, so they run inline in the loop, except copies of LARGE_COPY
 * bytes or more that the submitter did not mark BREQ_COPY_INLINE: those go
 * to the worker pool, so that the loop goes on with its own work (a FUSE
 * loop reading the next payload) and big reads use every core.  Other files
 * try RWF_NOWAIT inline (a page-cache hit) when the file system supports
 * it, and otherwise go to the node's engine; their large copies go to the
 * pool.  Nothing is inline on O_DIRECT nodes. */
#define LARGE_COPY (64 * 1024)

static unsigned aio_flags(struct bnode *bs, struct breq *r, enum aio_op op, uint64_t len,
                          bool *pool)
{
    struct file_state *s = bs->opaque;
    bool large = !bs->cache_direct && len >= LARGE_COPY;

    *pool = false;
    if (op == AIO_OP_FSYNC && s->ram_backed)
        return AIO_INLINE_SYNC;     /* nothing to wait for: tmpfs has no device */
    if (op != AIO_OP_READ && op != AIO_OP_WRITE)
        return AIO_NO_INLINE;
    if (s->ram_backed && (!large || (r->flags & BREQ_COPY_INLINE)))
        return AIO_INLINE_SYNC;
    if (large) {
        *pool = true;
        return AIO_NO_INLINE | (s->ram_backed ? AIO_CPU_BOUND : 0);
    }
    if (op == AIO_OP_READ)
        return s->nowait_read ? 0 : AIO_NO_INLINE;
    return s->nowait_write ? 0 : AIO_NO_INLINE;
}

static void forget_data_range(struct file_state *s)
{
    pthread_mutex_lock(&s->data_lock);
    s->present = (struct stretch){ 0, 0 };
    memset(s->written, 0, sizeof(s->written));
    s->data_gen++;
    pthread_mutex_unlock(&s->data_lock);
}

/* Take [a, b) out of a set of stretches: what lies either side still holds
 * no hole.  The two sides of one stretch take two places (the second in
 * place of the oldest); with one place, the larger side stays. */
static void stretch_cut(struct stretch *set, unsigned n, unsigned *next, uint64_t a, uint64_t b)
{
    for (unsigned i = 0; i < n; i++) {
        struct stretch e = set[i];
        struct stretch below = { e.lo, MIN(e.hi, a) }, above = { MAX(e.lo, b), e.hi };
        if (e.hi <= a || e.lo >= b)
            continue;
        bool keep_below = below.hi > below.lo, keep_above = above.hi > above.lo;
        if (keep_below && keep_above && n > 1) {
            unsigned j = *next % n == i ? (i + 1) % n : *next % n;
            ++*next;
            set[i] = below;
            set[j] = above;
        } else if (keep_below &&
                   (!keep_above || below.hi - below.lo >= above.hi - above.lo)) {
            set[i] = below;
        } else {
            set[i] = keep_above ? above : (struct stretch){ 0, 0 };
        }
    }
}

/* [offset, offset + len) is being fallocated (a hole punched, zeroed,
 * allocated): forget it, and any walk that raced with it. */
static void forget_range(struct file_state *s, uint64_t offset, uint64_t len)
{
    unsigned one = 0;
    pthread_mutex_lock(&s->data_lock);
    stretch_cut(&s->present, 1, &one, offset, offset + len);
    stretch_cut(s->written, KNOWN_WRITTEN, &s->written_next, offset, offset + len);
    s->data_gen++;
    pthread_mutex_unlock(&s->data_lock);
}

/* The end of the stretch of set that holds offset, or 0 (data_lock held). */
static uint64_t stretch_end(const struct stretch *set, unsigned n, uint64_t offset)
{
    for (unsigned i = 0; i < n; i++)
        if (offset >= set[i].lo && offset < set[i].hi)
            return set[i].hi;
    return 0;
}

/* Keep [lo, hi) in set, learnt while the file was at generation gen: grown
 * into a stretch it overlaps or touches, else in place of the oldest. */
static void stretch_add(struct file_state *s, struct stretch *set, unsigned n, unsigned *next,
                        unsigned gen, uint64_t lo, uint64_t hi)
{
    pthread_mutex_lock(&s->data_lock);
    if (gen == s->data_gen && hi > lo) {
        unsigned i;
        for (i = 0; i < n; i++)
            if (set[i].hi > set[i].lo && lo <= set[i].hi && hi >= set[i].lo)
                break;
        if (i < n) {
            set[i].lo = MIN(set[i].lo, lo);
            set[i].hi = MAX(set[i].hi, hi);
        } else {
            set[*next % n] = (struct stretch){ lo, hi };
            ++*next;
        }
    }
    pthread_mutex_unlock(&s->data_lock);
}

static void submit_aio(struct bnode *bs, struct breq *r, enum aio_op op,
                       uint64_t offset, uint64_t len, int mode)
{
    struct file_state *s = bs->opaque;
    bool pool;
    if (op == AIO_OP_FALLOCATE)
        forget_range(s, offset, len);
    r->aio = (struct aio_req){
        .op = op, .fd = s->fd, .iov = r->iov, .iovcnt = r->iovcnt,
        .offset = offset, .len = len, .mode = mode,
        .flags = aio_flags(bs, r, op, len, &pool),
        .done = file_aio_done, .fixed = r->fixed,
    };
    if (op == AIO_OP_WRITE && r->op == BREQ_WRITE && (r->flags & BREQ_FUA) &&
        !bs->cache_no_flush)
        r->aio.flags |= AIO_DSYNC;      /* durable on completion: no fdatasync after */
    aio_submit(r->loop, pool ? AIO_THREADS : s->aio, &r->aio);
}

enum {
    ST_RW,              /* read or write in flight */
    ST_FUA_SYNC,        /* fdatasync after FUA write-zeroes */
    ST_ZERO_RANGE,
    ST_PUNCH,           /* punch hole (then allocate unless MAY_UNMAP) */
    ST_ALLOC,
    ST_ZERO_WRITE,      /* writing zero buffers */
    ST_FLUSH,
    ST_DISCARD,
};

static void zero_write_next(struct bnode *bs, struct breq *r);

static void finish(struct bnode *bs, struct breq *r, int ret)
{
    if (ret == 0 && (r->flags & BREQ_FUA) && r->stage != ST_FUA_SYNC &&
        r->op == BREQ_WRITE_ZEROES && !bs->cache_no_flush) {
        r->stage = ST_FUA_SYNC;
        submit_aio(bs, r, AIO_OP_FSYNC, 0, 0, 0);
        return;
    }
    breq_complete(r, ret);
}

static void zero_fill_iov(struct breq *r, uint64_t from)
{
    uint64_t pos = 0;
    for (int i = 0; i < r->iovcnt; i++) {
        uint64_t a = pos, b = pos + r->iov[i].iov_len;
        if (b > from) {
            uint64_t start = from > a ? from - a : 0;
            memset((char *)r->iov[i].iov_base + start, 0, r->iov[i].iov_len - start);
        }
        pos = b;
    }
}

/* The fast ways to zero failed: write zero buffers, unless told not to. */
static void zero_next_extent(struct bnode *bs, struct breq *r, uint64_t from);

static void zero_fallback(struct bnode *bs, struct breq *r)
{
    if (r->flags & BREQ_NO_FALLBACK) {
        breq_complete(r, -ENOTSUP);
        return;
    }
    r->stage = ST_ZERO_WRITE;
    r->done_bytes = 0;
    zero_write_next(bs, r);
}

/*
 * Write zeroes, extent by extent.  A request may unmap (punch a hole) only
 * when the client allows it and discard=unmap; otherwise it must leave
 * zeros that stay allocated where there was data.  Either way, ranges that
 * are holes already read as zeros and are skipped: a request never
 * allocates what the image did not have (with discard=ignore QEMU punches
 * and then fallocates the whole range, so a 32-byte request could fill
 * the disk; issue 13, 8).  Data extents are found with SEEK_DATA /
 * SEEK_HOLE at a cost bounded by the request (data_end()); each is zeroed
 * with ZERO_RANGE, else punch + fallocate, else zero buffers.
 */
static bool zero_may_dealloc(struct bnode *bs, struct breq *r)
{
    struct file_state *s = bs->opaque;
    return (r->flags & BREQ_MAY_UNMAP) && bs->discard && !s->is_blockdev;
}

static uint64_t data_end(struct file_state *s, uint64_t d, uint64_t end);

/* Zero [step_off, step_off + step_len) the best way the file allows. */
static void zero_step(struct bnode *bs, struct breq *r)
{
    struct file_state *s = bs->opaque;

    if (zero_may_dealloc(bs, r) && s->has_punch) {
        r->stage = ST_PUNCH;
        submit_aio(bs, r, AIO_OP_FALLOCATE, r->step_off, r->step_len,
                   FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE);
    } else if (s->has_zero_range) {
        r->stage = ST_ZERO_RANGE;
        submit_aio(bs, r, AIO_OP_FALLOCATE, r->step_off, r->step_len,
                   FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE);
    } else if (s->has_punch && !s->is_blockdev) {
        r->stage = ST_PUNCH;
        submit_aio(bs, r, AIO_OP_FALLOCATE, r->step_off, r->step_len,
                   FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE);
    } else {
        zero_fallback(bs, r);
    }
}

/* The next data extent at or after from, or finish. */
static void zero_next_extent(struct bnode *bs, struct breq *r, uint64_t from)
{
    struct file_state *s = bs->opaque;
    uint64_t end = r->drv_offset + r->len;
    uint64_t d = from, h = end;

    if (from >= end) {
        finish(bs, r, 0);
        return;
    }
    if (!s->is_blockdev && !zero_may_dealloc(bs, r)) {
        off_t o = lseek(s->fd, from, SEEK_DATA);
        if (o < 0 && errno == ENXIO) {
            finish(bs, r, 0);             /* a hole to the end of the file */
            return;
        }
        if (o >= 0) {
            d = o;
            if (d >= end) {
                finish(bs, r, 0);
                return;
            }
            h = data_end(s, d, end);
        }
    }
    r->step_off = d;
    r->step_len = h - d;
    zero_step(bs, r);
}

/* A write past the end made the file bigger (QEMU: total_sectors grows to
 * the sector the write ended in). */
static void grow_size(struct bnode *bs, uint64_t end)
{
    struct file_state *s = bs->opaque;
    atomic_max_u64(&s->length, end);
    atomic_max_u64(&bs->size, bnode_round_size(end));
}

static void file_aio_done(struct aio_req *a, int64_t res)
{
    struct breq *r = container_of(a, struct breq, aio);
    struct bnode *bs = r->bs;
    struct file_state *s = bs->opaque;

    if (a->op == AIO_OP_FALLOCATE)
        forget_range(s, a->offset, a->len);     /* again: a walk may have raced */
    if (a->flags & AIO_NOWAIT_UNSUPPORTED) {
        /* Learnt once per file: stop paying for the inline attempt. */
        if (a->op == AIO_OP_READ)
            s->nowait_read = false;
        else if (a->op == AIO_OP_WRITE)
            s->nowait_write = false;
    }
    switch (r->stage) {
    case ST_RW:
        if (r->op == BREQ_WRITE && res > 0)
            grow_size(bs, a->offset + res);
        if (res >= 0 && (uint64_t)res < a->len) {
            if (r->op == BREQ_READ) {
                zero_fill_iov(r, res);         /* the file ended early */
                res = a->len;
            } else {
                res = -ENOSPC;
            }
        }
        finish(bs, r, res < 0 ? (int)res : 0);
        return;
    case ST_ZERO_RANGE:
        if (res == -EOPNOTSUPP || res == -EINVAL || res == -ENOTSUP) {
            s->has_zero_range = false;
            zero_step(bs, r);
            return;
        }
        if (res < 0)
            finish(bs, r, (int)res);
        else
            zero_next_extent(bs, r, r->step_off + r->step_len);
        return;
    case ST_PUNCH:
        if (res == 0) {
            if (!zero_may_dealloc(bs, r)) {
                r->stage = ST_ALLOC;   /* re-allocate: the extent was data */
                submit_aio(bs, r, AIO_OP_FALLOCATE, r->step_off, r->step_len, 0);
                return;
            }
            zero_next_extent(bs, r, r->step_off + r->step_len);
            return;
        }
        if (res == -EOPNOTSUPP || res == -ENOTSUP)
            s->has_punch = false;
        zero_fallback(bs, r);
        return;
    case ST_ALLOC:
        if (res == 0)
            zero_next_extent(bs, r, r->step_off + r->step_len);
        else
            zero_fallback(bs, r);
        return;
    case ST_ZERO_WRITE:
        if (res < 0) {
            breq_complete(r, (int)res);
            return;
        }
        r->done_bytes += res;
        if (r->done_bytes < r->step_len) {
            zero_write_next(bs, r);
            return;
        }
        zero_next_extent(bs, r, r->step_off + r->step_len);
        return;
    case ST_FUA_SYNC:
    case ST_FLUSH:
    case ST_DISCARD:
        breq_complete(r, res == -EOPNOTSUPP && r->stage == ST_DISCARD ? 0 : (int)res);
        return;
    }
}

static void zero_write_next(struct bnode *bs, struct breq *r)
{
    struct file_state *s = bs->opaque;
    uint64_t left = r->step_len - r->done_bytes;
    uint64_t n = MIN(left, (uint64_t)ZERO_CHUNK * ZERO_IOVS);
    r->aio = (struct aio_req){
        .op = AIO_OP_WRITE, .fd = s->fd, .offset = r->step_off + r->done_bytes,
        .len = n, .done = file_aio_done,
    };
    if (n >= ZERO_CHUNK) {
        r->aio.iov = zero_iov;
        r->aio.iovcnt = n / ZERO_CHUNK;
        r->aio.len = (uint64_t)r->aio.iovcnt * ZERO_CHUNK;
    } else {
        r->tmp_iov = (struct iovec){ .iov_base = (void *)zero_buf, .iov_len = n };
        r->aio.iov = &r->tmp_iov;
        r->aio.iovcnt = 1;
    }
    bool pool;
    r->aio.flags = aio_flags(bs, r, AIO_OP_WRITE, r->aio.len, &pool);
    aio_submit(r->loop, pool ? AIO_THREADS : s->aio, &r->aio);
}

static void file_submit(struct bnode *bs, struct breq *r, uint64_t offset)
{
    r->drv_offset = offset;
    r->bs = bs;
    switch (r->op) {
    case BREQ_READ:
        r->stage = ST_RW;
        submit_aio(bs, r, AIO_OP_READ, offset, r->len, 0);
        return;
    case BREQ_WRITE:
        r->stage = ST_RW;
        submit_aio(bs, r, AIO_OP_WRITE, offset, r->len, 0);
        return;
    case BREQ_FLUSH:
        r->stage = ST_FLUSH;
        submit_aio(bs, r, AIO_OP_FSYNC, 0, 0, 0);
        return;
    case BREQ_DISCARD:
        r->stage = ST_DISCARD;
        submit_aio(bs, r, AIO_OP_FALLOCATE, offset, r->len,
                   FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE);
        return;
    case BREQ_WRITE_ZEROES:
        zero_next_extent(bs, r, offset);
        return;
    case BREQ_CACHE:
        breq_complete(r, 0);
        return;
    }
}

/* ---- block status, truncate ---- */

static int file_block_status(struct bnode *bs, uint64_t offset, uint64_t bytes,
                             uint64_t *pnum, unsigned *flags)
{
    struct file_state *s = bs->opaque;
    if (s->is_blockdev) {
        *pnum = bytes;
        *flags = BS_DATA | BS_ALLOCATED;
        return 0;
    }
    off_t data = lseek(s->fd, offset, SEEK_DATA);
    if (data < 0) {
        if (errno == ENXIO) {          /* a hole up to the end of the file */
            *pnum = bytes;
            *flags = BS_ZERO | BS_ALLOCATED;
            return 0;
        }
        *pnum = bytes;                 /* no SEEK_DATA: all data */
        *flags = BS_DATA | BS_ALLOCATED;
        return 0;
    }
    if ((uint64_t)data > offset) {
        *pnum = MIN(bytes, (uint64_t)data - offset);
        *flags = BS_ZERO | BS_ALLOCATED;
        return 0;
    }
    *pnum = data_end(s, offset, offset + bytes) - offset;
    *flags = BS_DATA | BS_ALLOCATED;
    return 0;
}

/* Zero-copy reads of RAM-backed files need to know that a range holds no
 * missing page.  cachestat(2) (Linux 6.5) says it in time proportional to
 * the range (7 us per MiB): the pages of a tmpfs file in RAM or in swap.
 * Without it, SEEK_DATA/SEEK_HOLE say it, walking the pages up to the next
 * hole.  Either answer is kept (s->present), grown as reads ask about more,
 * so sequential readers mostly ask nothing. */
#ifndef SYS_cachestat
#define SYS_cachestat 451           /* the same on every architecture */
#endif
struct cachestat_range { uint64_t off, len; };
struct cachestat { uint64_t nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted; };

/* Whether [offset, offset + bytes) holds no missing page. */
static bool pages_present(struct file_state *s, uint64_t offset, uint64_t bytes)
{
    static bool no_cachestat;
    uint64_t until;
    unsigned gen;

    pthread_mutex_lock(&s->data_lock);
    until = stretch_end(&s->present, 1, offset);
    gen = s->data_gen;
    pthread_mutex_unlock(&s->data_lock);
    if (until >= offset + bytes)
        return true;
    if (!__atomic_load_n(&no_cachestat, __ATOMIC_RELAXED)) {
        uint64_t first = offset & ~4095ull, end = (offset + bytes + 4095) & ~4095ull;
        struct cachestat_range cr = { first, end - first };
        struct cachestat cs;
        if (syscall(SYS_cachestat, s->fd, &cr, &cs, 0) == 0) {
            until = cs.nr_cache + cs.nr_evicted >= (end - first) / 4096 ? offset + bytes : 0;
            goto found;
        }
        if (errno == ENOSYS)
            __atomic_store_n(&no_cachestat, true, __ATOMIC_RELAXED);
    }
    off_t data = lseek(s->fd, offset, SEEK_DATA);
    off_t hole = data == (off_t)offset ? lseek(s->fd, offset, SEEK_HOLE) : -1;
    until = hole >= 0 && (uint64_t)hole >= offset + bytes ? (uint64_t)hole : 0;
found:
    if (!until)
        return false;
    unsigned one = 0;
    stretch_add(s, &s->present, 1, &one, gen, offset, until);
    return true;
}

/* End of the data that starts at d (as SEEK_HOLE sees it, as QEMU's block
 * status does), at most end.  tmpfs answers SEEK_HOLE by walking its pages
 * up to the next hole, which may lie far beyond end (a BLOCK_STATUS of 1
 * byte on a dense 2 GiB image took 16 ms; issue 13, 6); the answer is kept
 * in s->written, so the walk over a stretch is paid once until the file is
 * fallocated or truncated.  (cachestat cannot stand in: a page fallocated
 * and never written is in the page cache, and is a hole.) */
static uint64_t data_end(struct file_state *s, uint64_t d, uint64_t end)
{
    uint64_t known;
    unsigned gen;

    pthread_mutex_lock(&s->data_lock);
    known = stretch_end(s->written, KNOWN_WRITTEN, d);
    gen = s->data_gen;
    pthread_mutex_unlock(&s->data_lock);
    if (known >= end)
        return end;
    off_t hole = lseek(s->fd, known ? known : d, SEEK_HOLE);
    if (hole < 0 || (uint64_t)hole <= d)
        return end;
    stretch_add(s, s->written, KNOWN_WRITTEN, &s->written_next, gen, d, hole);
    return MIN((uint64_t)hole, end);
}

static int file_splice_source(struct bnode *bs, uint64_t offset, uint64_t bytes,
                              bool need_holes, int *fd, uint64_t *fd_offset)
{
    struct file_state *s = bs->opaque;

    if (!s->ram_backed || bs->cache_direct ||
        offset + bytes > __atomic_load_n(&s->length, __ATOMIC_RELAXED))
        return -ENOTSUP;        /* the tail of the last sector is not in the file */
    if (need_holes && !pages_present(s, offset, bytes))
        return -ENOTSUP;
    *fd = s->fd;
    *fd_offset = offset;
    return 0;
}

static int file_truncate(struct bnode *bs, uint64_t size, error **errp)
{
    struct file_state *s = bs->opaque;
    forget_data_range(s);
    if (s->is_blockdev) {
        int64_t cur = fd_size(s->fd, true);
        if (cur >= 0 && (uint64_t)cur >= size)
            return 0;
        error_setg(errp, "Cannot grow device files");
        return -ENOTSUP;
    }
    if (ftruncate(s->fd, size) < 0) {
        int err = errno;
        error_setg_errno(errp, err, "Could not resize file");
        return -err;
    }
    __atomic_store_n(&s->length, size, __ATOMIC_RELAXED);
    return 0;
}

/* ---- blockdev-create (QEMU 7.2's raw_co_create, step by step) ---- */

enum prealloc { PREALLOC_OFF, PREALLOC_METADATA, PREALLOC_FALLOC, PREALLOC_FULL };
static const char *const prealloc_names[] = { "off", "metadata", "falloc", "full" };

struct file_create {
    char *filename;
    uint64_t size;
    enum prealloc prealloc;
    bool nocow;
    uint64_t extent_size_hint;
};

/* QEMU writes the first block so that later alignment probing finds it
 * allocated; the result is visible in `qemu-img map`, so do the same. */
static void allocate_first_block(int fd, uint64_t size)
{
    size_t n = size < 4096 ? 512 : 4096;
    static const char zeros[4096];
    ssize_t r;
    do {
        r = pwrite(fd, zeros, n, 0);
    } while (r < 0 && errno == EINTR);
}

/* Resize fd to size, preallocating the new part (QEMU's handle_aiocb_truncate). */
static int file_truncate_prealloc(int fd, uint64_t size, enum prealloc prealloc, error **errp)
{
    struct stat st;
    if (fstat(fd, &st) < 0) {
        int err = errno;
        error_setg_errno(errp, err, "Could not stat file");
        return -err;
    }
    int64_t cur = st.st_size;
    if ((uint64_t)cur > size && prealloc != PREALLOC_OFF) {
        error_setg(errp, "Cannot use preallocation for shrinking files");
        return -ENOTSUP;
    }
    int ret = 0;
    switch (prealloc) {
    case PREALLOC_OFF:
        if (ftruncate(fd, size) != 0) {
            ret = -errno;
            error_setg_errno(errp, -ret, "Could not resize file");
        } else if (cur == 0 && size > 0) {
            allocate_first_block(fd, size);
        }
        return ret;
    case PREALLOC_FALLOC:
        if (size != (uint64_t)cur) {
            ret = -posix_fallocate(fd, cur, size - cur);
            if (ret)
                error_setg_errno(errp, -ret, "Could not preallocate new data");
            else if (cur == 0)
                allocate_first_block(fd, size);
        }
        break;
    case PREALLOC_FULL: {
        if (ftruncate(fd, size) != 0) {
            ret = -errno;
            error_setg_errno(errp, -ret, "Could not resize file");
            break;
        }
        uint64_t off = cur;
        while (off < size) {
            ssize_t n = pwrite(fd, zero_buf, MIN(size - off, (uint64_t)ZERO_CHUNK), off);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0) {
                ret = n < 0 ? -errno : -EIO;
                error_setg_errno(errp, -ret, "Could not write zeros for preallocation");
                break;
            }
            off += n;
        }
        if (!ret && fsync(fd) < 0) {
            ret = -errno;
            error_setg_errno(errp, -ret, "Could not flush file to disk");
        }
        break;
    }
    default:
        error_setg(errp, "Unsupported preallocation mode: %s", prealloc_names[prealloc]);
        return -ENOTSUP;
    }
    if (ret < 0 && ftruncate(fd, cur) < 0)
        log_error("Failed to restore old file length: %s", strerror(errno));
    return ret;
}

/* Lock (perm held, unshared) the way QEMU's raw_apply_lock_bytes does,
 * then check that nobody else conflicts (raw_check_lock_bytes). */
static int create_take_locks(int fd, unsigned perm, unsigned unshared, error **errp)
{
    for (int b = 0; b < 4; b++) {
        int ret = lock_byte(fd, 100 + b, perm & (1u << b));
        if (!ret)
            ret = lock_byte(fd, 200 + b, unshared & (1u << b));
        if (ret < 0) {
            error_setg_errno(errp, -ret, "Failed to lock byte %d", (perm & (1u << b)) ? 100 + b : 200 + b);
            return ret;
        }
    }
    for (int b = 0; b < 4; b++)
        if ((perm & (1u << b)) && byte_locked_by_others(fd, 200 + b)) {
            error_setg(errp, "Failed to get \"%s\" lock", bnode_perm_name(b));
            return -EAGAIN;
        }
    for (int b = 0; b < 4; b++)
        if ((unshared & (1u << b)) && byte_locked_by_others(fd, 100 + b)) {
            error_setg(errp, "Failed to get shared \"%s\" lock", bnode_perm_name(b));
            return -EAGAIN;
        }
    return 0;
}

static void create_set_attrs(int fd, const struct file_create *c)
{
    if (c->nocow) {
        /* An optimisation for btrfs and the like: failure does not matter. */
        int attr;
        if (ioctl(fd, FS_IOC_GETFLAGS, &attr) == 0) {
            attr |= FS_NOCOW_FL;
            ioctl(fd, FS_IOC_SETFLAGS, &attr);
        }
    }
    if (c->extent_size_hint) {
        /* Only XFS has extent size hints; elsewhere this fails quietly. */
        struct fsxattr attr;
        if (ioctl(fd, FS_IOC_FSGETXATTR, &attr) == 0) {
            attr.fsx_xflags |= FS_XFLAG_EXTSIZE;
            attr.fsx_extsize = c->extent_size_hint;
            if (ioctl(fd, FS_IOC_FSSETXATTR, &attr) < 0)
                log_debug("%s: extent size hint not set: %s", c->filename, strerror(errno));
        }
    }
}

/* Runs in the job's thread; frees c. */
static int file_create_sync(void *opaque, error **errp)
{
    CLEANUP_FREE struct file_create *c = opaque;
    CLEANUP_FREE char *filename = c->filename;
    if (c->extent_size_hint > UINT32_MAX) {
        error_setg(errp, "Extent size hint is too large");
        return -EINVAL;
    }
    int fd = open(filename, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) {
        int err = errno;
        error_setg_errno(errp, err, "Could not create '%s'", filename);
        return -err;
    }
    /* Write and resize, sharing everything but resize: the file must have
     * the requested size when we are done. */
    int ret = create_take_locks(fd, PERM_WRITE | PERM_RESIZE, PERM_RESIZE, errp);
    if (!ret)
        ret = file_truncate_prealloc(fd, 0, PREALLOC_OFF, errp);
    if (!ret) {
        create_set_attrs(fd, c);
        ret = file_truncate_prealloc(fd, c->size, c->prealloc, errp);
    }
    if (close(fd) != 0 && ret == 0) {     /* closing drops the locks too */
        ret = -errno;
        error_setg_errno(errp, -ret, "Could not close the new file");
    }
    return ret;
}

int file_create_now(const char *filename, uint64_t size, error **errp)
{
    struct file_create *c = xzalloc(sizeof(*c));
    c->filename = xstrdup(filename);
    c->size = size;
    c->extent_size_hint = 1 << 20;
    return file_create_sync(c, errp);
}

static void file_create_done(struct job *job, int ret, error *err)
{
    blockdev_create_done(job, ret, err);
}

static void file_create(struct job *job, json_t *opts)
{
    struct file_create *c = xzalloc(sizeof(*c));
    c->filename = xstrdup(opt_str(opts, "filename", ""));
    c->size = (uint64_t)opt_int(opts, "size", 0);
    const char *p = opt_str(opts, "preallocation", "off");
    for (unsigned i = 0; i < ARRAY_SIZE(prealloc_names); i++)
        if (!strcmp(p, prealloc_names[i]))
            c->prealloc = i;
    c->nocow = opt_bool(opts, "nocow", false);
    c->extent_size_hint = (uint64_t)opt_int(opts, "extent-size-hint", 1 << 20);
    job_run_in_thread(job, file_create_sync, c, file_create_done);
}
BLOCKDEV_CREATE_REGISTER("file", file_create)

/* A format's metadata for block status, read on the caller's loop: from
 * the page cache only (an O_DIRECT node says no; one reopened to O_DIRECT
 * under us fails the unaligned read, and the caller reads as usual). */
static int file_pread_sync(struct bnode *bs, uint64_t offset, uint64_t bytes, void *buf)
{
    struct file_state *s = bs->opaque;
    uint64_t done = 0;
    if (__atomic_load_n(&bs->cache_direct, __ATOMIC_RELAXED))
        return -ENOTSUP;
    while (done < bytes) {
        ssize_t n = pread(s->fd, (char *)buf + done, bytes - done, offset + done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -errno;
        if (n == 0) {
            memset((char *)buf + done, 0, bytes - done);
            break;
        }
        done += (uint64_t)n;
    }
    return 0;
}

static int file_flush_sync(struct bnode *bs)
{
    struct file_state *s = bs->opaque;
    return fdatasync(s->fd) < 0 ? -errno : 0;
}

/* ---- blockdev-reopen ----
 * read-only and cache.direct change the open flags: prepare opens the file
 * again with the new ones; commit takes the same locks on it and puts it
 * in place of the old descriptor with dup3(), so the fd number every loop
 * uses stays valid and a request in flight finishes on the old file.
 * drop-cache and x-check-cache-dropped are accepted as QEMU does. */
static const char *const file_reopen_keys[] = { "drop-cache", "x-check-cache-dropped", NULL };
static const char *const file_reopen_resettable[] = { "x-check-cache-dropped", NULL };

static int file_reopen_prepare(struct reopen_state *rs, error **errp)
{
    struct bnode *bs = rs->bs;
    struct file_state *s = bs->opaque;
    if (rs->read_only == bs->read_only && rs->cache_direct == bs->cache_direct)
        return 0;
    int flags = (rs->read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC;
    if (rs->cache_direct)
        flags |= O_DIRECT;
    int fd = open(s->filename, flags);
    if (fd < 0) {
        error_setg_errno(errp, errno, "Could not open '%s'", s->filename);
        return -1;
    }
    rs->drv = (void *)(intptr_t)(fd + 1);
    return 0;
}

static void file_reopen_abort(struct reopen_state *rs)
{
    int fd = (int)(intptr_t)rs->drv - 1;
    if (fd >= 0)
        close(fd);
    rs->drv = NULL;
}

static void file_reopen_commit(struct reopen_state *rs)
{
    struct bnode *bs = rs->bs;
    struct file_state *s = bs->opaque;
    int fd = (int)(intptr_t)rs->drv - 1;
    rs->drv = NULL;
    if (fd < 0)
        return;
    if (s->locking)
        for (int b = 0; b < 4; b++) {
            lock_byte(fd, 100 + b, s->lock_held & (1u << b));
            lock_byte(fd, 200 + b, s->lock_unshared & (1u << b));
        }
    if (rs->cache_direct != bs->cache_direct) {
        uint32_t align = 1;
        if (rs->cache_direct) {
            align = 512;
            int lbs;
            if (s->is_blockdev && ioctl(fd, BLKSSZGET, &lbs) == 0 && lbs > 0)
                align = lbs;
            s->ram_backed = false;
        }
        s->nowait_read = s->nowait_write = !rs->cache_direct;
        /* this node and the format nodes over it bounce what does not fit */
        for (struct bnode *n = bs; n; ) {
            if (align > 1 && !n->align)
                n->align = bnode_align_new();
            n->request_alignment = align;
            struct bnode *up = NULL;
            for (struct bnode_user *u = n->users; u; u = u->next)
                if (u->parent && u->parent->file == n)
                    up = u->parent;
            n = up;
        }
    }
    if (dup3(fd, s->fd, O_CLOEXEC) < 0)
        log_error("file: node '%s': could not switch to the reopened file: %s",
                  bs->node_name, strerror(errno));
    close(fd);
}

static bool file_can_zero_fast(struct bnode *bs) { return true; }
static bool file_can_discard(struct bnode *bs) { return true; }

static const struct bdrv bdrv_file, bdrv_host_device;

const char *bnode_leaf_path(struct bnode *bs)
{
    while (bs->file)
        bs = bs->file;
    if (bs->drv != &bdrv_file && bs->drv != &bdrv_host_device)
        return NULL;
    return ((struct file_state *)bs->opaque)->filename;
}

int64_t bnode_leaf_allocated(struct bnode *bs)
{
    struct bnode *f;
    while ((f = __atomic_load_n(&bs->file, __ATOMIC_ACQUIRE)))
        bs = f;
    if (bs->drv != &bdrv_file && bs->drv != &bdrv_host_device)
        return -ENOTSUP;
    struct stat st;
    if (fstat(((struct file_state *)bs->opaque)->fd, &st) < 0)
        return -errno;
    return (int64_t)st.st_blocks * 512;
}

const char *bnode_leaf_filename(struct bnode *bs, char *buf, size_t len)
{
    const char *path = bnode_leaf_path(bs);
    if (path)
        return path;
    while (bs->file)
        bs = bs->file;
    snprintf(buf, len, "%s://", bs->drv->name);
    return buf;
}

/* "file" and "host_device" differ only in what they accept to open. */
#define FILE_DRIVER(drv_name, open_fn) {              \
    .name = drv_name,                                 \
    .is_protocol = true,                              \
    .needs_filename = true,                           \
    .open = open_fn,                                  \
    .close = file_close,                              \
    .submit = file_submit,                            \
    .block_status = file_block_status,                \
    .truncate = file_truncate,                        \
    .splice_source = file_splice_source,              \
    .set_perm = file_set_perm,                        \
    .flush_sync = file_flush_sync,                    \
    .pread_sync = file_pread_sync,                    \
    .can_write_zeroes_fast = file_can_zero_fast,      \
    .can_discard = file_can_discard,                  \
    .bitmaps_load = sidecar_file_load,                \
    .bitmaps_store = sidecar_file_store,              \
    .bitmap_can_store = sidecar_can_store,            \
    .bitmaps_update = sidecar_update,                 \
    .reopen_keys = file_reopen_keys,                  \
    .reopen_resettable = file_reopen_resettable,      \
    .reopen_prepare = file_reopen_prepare,            \
    .reopen_commit = file_reopen_commit,              \
    .reopen_abort = file_reopen_abort,                \
}

static const struct bdrv bdrv_file = FILE_DRIVER("file", file_open);
BDRV_REGISTER(bdrv_file)
static const struct bdrv bdrv_host_device = FILE_DRIVER("host_device", host_device_open);
BDRV_REGISTER(bdrv_host_device)

__attribute__((constructor)) static void zero_iov_init(void)
{
    for (int i = 0; i < ZERO_IOVS; i++)
        zero_iov[i] = (struct iovec){ .iov_base = (void *)zero_buf, .iov_len = ZERO_CHUNK };
}
