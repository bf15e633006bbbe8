/*
 * qcow2 requests and block status.
 *
 * Theory of operation.  qcow2_submit() first tries the fast path, with no
 * coroutine and no allocation once warm: under cache_lock it looks the
 * request up in the cached L2 slice; a READ of one contiguous run of data
 * clusters (or a WRITE of clusters allocated with COPIED set, and with
 * extended L2 entries, of allocated subclusters) is counted in flight and
 * forwarded to the data node at the host offset, as raw.c forwards; a READ
 * of a run that reads as zeros is answered at once, and a READ of an
 * unallocated run inside the backing node is passed to it.  Everything
 * else runs in a coroutine in the submitting thread: cache misses under
 * s->lock, cluster allocation with copy-on-write of the partial head and
 * tail (subclusters with extended L2), compressed clusters, zero writes
 * and discards, flushes.
 *
 * Writes that change mappings hold a range lock on the guest clusters they
 * touch, so concurrent requests to one cluster are serialised while other
 * clusters go on.  A data write completes before the L2 entry pointing at
 * it is updated in the cache; the cache writes L2 slices back only after
 * the refcount blocks (qcow2-meta.c).
 */
#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>
#include "config.h"
#ifdef CONFIG_ZSTD
#include <zstd.h>
#endif
#include "block/qcow2-int.h"
#include "util/aio.h"
#include "util/cleanup.h"
#include "util/coroutine.h"
#include "util/xalloc.h"
#include "util/loop.h"
#include "util/log.h"
#include "util/thread-exit.h"

/* ---- per-request context (per-thread free list) ---- */

struct qreq {
    struct breq child;          /* fast path, external data file: the request to it */
    struct breq *parent;
    void (*parent_done)(struct breq *, int);   /* fast path, forwarded: restored at */
    void *parent_opaque;                       /* completion */
    struct bnode *bs;
    struct qcow2_state *s;
    uint64_t offset;            /* guest offset of parent */
    int slot;                   /* in-flight slot of the fast path */
    struct qreq *next;
};

static __thread struct qreq *qreq_pool;

static struct qreq *qreq_get(void)
{
    struct qreq *q = qreq_pool;
    if (q) {
        qreq_pool = q->next;
        return q;
    }
    q = xcalloc(1, sizeof(*q));
    return q;
}

/* A thread that ends (the synchronous helpers', an iothread whose object
 * is deleted) frees its idle requests. */
static void qreq_pool_drain(void)
{
    while (qreq_pool) {
        struct qreq *q = qreq_pool;
        qreq_pool = q->next;
        free(q);
    }
}

/* The pool's head is thread-local: a thread that ends with requests in its
 * pool drains it at exit (armed at its first put). */
static __thread struct thread_exit_hook qreq_exit = THREAD_EXIT_HOOK(qreq_pool_drain);

static void qreq_put(struct qreq *q)
{
    thread_exit_arm(&qreq_exit);
    q->next = qreq_pool;
    qreq_pool = q;
}

/* ---- iovec helpers ---- */

#define SUB_IOV_MAX 64

struct sub_iov {
    struct iovec *iov;
    int cnt;
    struct iovec inline_iov[SUB_IOV_MAX];
    struct iovec *heap;
};

static void sub_iov_free(struct sub_iov *v) { free(v->heap); }

/* The part [off, off+len) of (iov, cnt) as its own vector. */
static void sub_iov_make(struct sub_iov *v, const struct iovec *iov, int cnt, uint64_t off,
                         uint64_t len)
{
    int n = 0;
    uint64_t pos = 0;
    v->heap = NULL;
    v->iov = v->inline_iov;
    for (int pass = 0; pass < 2; pass++) {
        n = 0;
        pos = 0;
        for (int i = 0; i < cnt && pos < off + len; i++) {
            uint64_t a = pos, b = pos + iov[i].iov_len;
            pos = b;
            if (b <= off)
                continue;
            uint64_t from = off > a ? off - a : 0;
            uint64_t to = MIN(b, off + len) - a;
            if (pass == 1)
                v->iov[n] = (struct iovec){ (char *)iov[i].iov_base + from, to - from };
            n++;
        }
        if (pass == 0 && n > SUB_IOV_MAX) {
            v->heap = xmalloc(n * sizeof(struct iovec));
            if (!v->heap)
                abort();
            v->iov = v->heap;
        }
    }
    v->cnt = n;
}

static void iov_memset(const struct iovec *iov, int cnt, uint64_t off, int c, uint64_t len)
{
    uint64_t pos = 0;
    for (int i = 0; i < cnt && len; i++) {
        uint64_t a = pos, b = pos + iov[i].iov_len;
        pos = b;
        if (b <= off)
            continue;
        uint64_t from = off > a ? off - a : 0;
        uint64_t n = MIN(iov[i].iov_len - from, len);
        memset((char *)iov[i].iov_base + from, c, n);
        off += n;
        len -= n;
    }
}

/* Copy len bytes between buf and the iov's bytes from off on: into the
 * iov (to_iov) or out of it. */
static void iov_xfer(const struct iovec *iov, int cnt, uint64_t off, void *buf, uint64_t len,
                     bool to_iov)
{
    uint64_t pos = 0;
    char *p = buf;
    for (int i = 0; i < cnt && len; i++) {
        uint64_t a = pos, b = pos + iov[i].iov_len;
        pos = b;
        if (b <= off)
            continue;
        uint64_t from = off > a ? off - a : 0;
        uint64_t n = MIN(iov[i].iov_len - from, len);
        char *at = (char *)iov[i].iov_base + from;
        memcpy(to_iov ? at : p, to_iov ? p : at, n);
        p += n;
        off += n;
        len -= n;
    }
}

static void iov_from_buf(const struct iovec *iov, int cnt, uint64_t off, const void *buf,
                         uint64_t len)
{
    iov_xfer(iov, cnt, off, (void *)buf, len, true);
}

/* ---- entry classification ---- */

enum qtype qcow2_subcluster_type(const struct qcow2_state *s, uint64_t l2e, uint64_t bitmap,
                                 unsigned sc)
{
    bool ext_data = s->data != s->bs->file;
    if (l2e & QCOW2_OFLAG_COMPRESSED)
        return (s->extl2 && bitmap) || ext_data ? QT_INVALID : QT_COMPRESSED;
    uint64_t off = l2e & QCOW2_L2E_OFFSET_MASK;
    bool has_host = off || (ext_data && (l2e & QCOW2_OFLAG_COPIED));
    if (s->extl2) {
        bool alloc = bitmap & QCOW2_SC_ALLOC(sc), zero = bitmap & QCOW2_SC_ZERO(sc);
        if (alloc && zero)
            return QT_INVALID;
        if (!has_host)
            return alloc ? QT_INVALID : zero ? QT_ZERO : QT_UNALLOC;
        return zero ? QT_ZERO_ALLOC : alloc ? QT_NORMAL : QT_UNALLOC_ALLOC;
    }
    if (l2e & QCOW2_OFLAG_ZERO)
        return has_host ? QT_ZERO_ALLOC : QT_ZERO;
    return has_host ? QT_NORMAL : QT_UNALLOC;
}

static uint64_t l2_entry(const struct qcow2_state *s, const uint8_t *slice, uint64_t i)
{
    uint64_t v;
    memcpy(&v, slice + i * s->l2_entry_bytes, 8);
    return be64toh(v);
}

static uint64_t l2_bitmap(const struct qcow2_state *s, const uint8_t *slice, uint64_t i)
{
    if (!s->extl2)
        return 0;
    uint64_t v;
    memcpy(&v, slice + i * s->l2_entry_bytes + 8, 8);
    return be64toh(v);
}

static void set_l2(struct qcow2_state *s, uint8_t *slice, uint64_t i, uint64_t e, uint64_t bm)
{
    uint64_t v = htobe64(e);
    memcpy(slice + i * s->l2_entry_bytes, &v, 8);
    if (s->extl2) {
        v = htobe64(bm);
        memcpy(slice + i * s->l2_entry_bytes + 8, &v, 8);
    }
}

/* One run of equal type: from guest offset, at most bytes, within the
 * slice (entries from index i). */
struct qrun {
    enum qtype type;
    uint64_t host;              /* host offset of the first byte (types with a host cluster) */
    uint64_t bytes;
    uint64_t l2e;               /* entry of the first cluster */
};

static uint64_t unit_size(const struct qcow2_state *s)
{
    return s->extl2 ? s->subcluster_size : s->cluster_size;
}

static bool type_has_host(enum qtype t)
{
    return t == QT_NORMAL || t == QT_ZERO_ALLOC || t == QT_UNALLOC_ALLOC;
}

/* One run from guest offset (entry i of slice, which holds nent entries),
 * at most bytes.  -EIO for an invalid entry.  With contig, a run with host
 * clusters is contiguous in the file (I/O); without, it has one type only
 * (block status). */
static int scan_run_any(const struct qcow2_state *s, const uint8_t *slice, uint64_t i,
                        uint64_t nent, uint64_t offset, uint64_t bytes, struct qrun *run,
                        bool contig)
{
    uint64_t us = unit_size(s);
    uint64_t in_cl = qoffset_into_cluster(s, offset);
    unsigned sc = in_cl / us, nsc = s->extl2 ? QCOW2_SUBCLUSTERS : 1;
    uint64_t done = 0, expect = 0;
    run->l2e = l2_entry(s, slice, i);
    while (i < nent) {
        uint64_t e = l2_entry(s, slice, i), bm = l2_bitmap(s, slice, i);
        enum qtype t = qcow2_subcluster_type(s, e, bm, sc);
        if (t == QT_INVALID)
            return -EIO;
        uint64_t host = (e & QCOW2_L2E_OFFSET_MASK) + (uint64_t)sc * us;
        if (done == 0) {
            run->type = t;
            run->host = host + in_cl % us;
        } else if (t != run->type || t == QT_COMPRESSED ||
                   (contig && type_has_host(t) && host != expect)) {
            break;
        }
        expect = host + us;
        done += done == 0 ? us - in_cl % us : us;
        if (done >= bytes || t == QT_COMPRESSED)
            break;
        if (++sc == nsc) {
            sc = 0;
            i++;
        }
    }
    run->bytes = MIN(done, bytes);
    if (run->type == QT_COMPRESSED)
        run->bytes = MIN(run->bytes, s->cluster_size - in_cl);
    return 0;
}

static int scan_run(const struct qcow2_state *s, const uint8_t *slice, uint64_t i,
                    uint64_t nent, uint64_t offset, uint64_t bytes, struct qrun *run)
{
    return scan_run_any(s, slice, i, nent, offset, bytes, run, true);
}

static int corrupt_entry(struct qcow2_state *s, uint64_t l2_off, uint64_t guest)
{
    qcow2_signal_corruption(s, true, -1, -1,
                            "Invalid L2 entry for guest offset %#" PRIx64
                            " (L2 table at %#" PRIx64 ")", guest, l2_off);
    return -EIO;
}

/* ---- mapping lookup (coroutine, s->lock held) ---- */

struct qslice {
    int idx;                    /* cache slot (pinned), -1 = none */
    uint64_t l2_off;            /* the L2 table */
    uint64_t first;             /* L2 index of the slice's first entry */
    uint32_t l1_i;
};

/* Locate guest offset: *sl gets the pinned slice, or idx -1 if the L2 table
 * is unallocated (then *cover = bytes the unallocated table covers). */
static int get_slice(struct qcow2_state *s, uint64_t offset, struct qslice *sl, uint64_t *cover)
{
    uint64_t l2_cover = s->l2_entries << s->cluster_bits;
    uint64_t l1_i = offset / l2_cover;
    sl->idx = -1;
    sl->l1_i = (uint32_t)l1_i;
    *cover = l2_cover - offset % l2_cover;
    if (l1_i >= s->l1_size)
        return 0;
    pthread_mutex_lock(&s->cache_lock);
    uint64_t l1e = s->l1[l1_i];
    pthread_mutex_unlock(&s->cache_lock);
    sl->l2_off = l1e & QCOW2_L1E_OFFSET_MASK;
    if (!sl->l2_off)
        return 0;
    if (qoffset_into_cluster(s, sl->l2_off)) {
        qcow2_signal_corruption(s, true, -1, -1, "L2 table offset %#" PRIx64
                                " unaligned (L1 index: %#" PRIx64 ")", sl->l2_off, l1_i);
        return -EIO;
    }
    uint64_t l2_i = (offset >> s->cluster_bits) & (s->l2_entries - 1);
    sl->first = l2_i - l2_i % s->l2_slice_entries;
    *cover = (s->l2_slice_entries - (l2_i - sl->first)) * s->cluster_size -
             qoffset_into_cluster(s, offset);
    return qcache_get(s, &s->l2c, sl->l2_off + sl->first * s->l2_entry_bytes, true, &sl->idx);
}

static int get_run(struct qcow2_state *s, uint64_t offset, uint64_t bytes, struct qrun *run)
{
    struct qslice sl;
    uint64_t cover;
    int ret = get_slice(s, offset, &sl, &cover);
    if (ret < 0)
        return ret;
    if (sl.idx < 0) {
        *run = (struct qrun){ .type = QT_UNALLOC, .bytes = MIN(bytes, cover) };
        return 0;
    }
    uint64_t i = ((offset >> s->cluster_bits) & (s->l2_entries - 1)) - sl.first;
    pthread_mutex_lock(&s->cache_lock);
    ret = scan_run(s, qcache_data(&s->l2c, sl.idx), i, s->l2_slice_entries, offset,
                   MIN(bytes, cover), run);
    pthread_mutex_unlock(&s->cache_lock);
    qcache_put(s, &s->l2c, sl.idx);
    if (ret < 0)
        return corrupt_entry(s, sl.l2_off, offset);
    if (type_has_host(run->type) && qoffset_into_cluster(s, run->l2e & QCOW2_L2E_OFFSET_MASK)) {
        qcow2_signal_corruption(s, true, -1, -1, "Cluster allocation offset %#" PRIx64
                                " unaligned (L2 offset: %#" PRIx64 ", L2 index: %#" PRIx64 ")",
                                (uint64_t)(run->l2e & QCOW2_L2E_OFFSET_MASK), sl.l2_off,
                                (uint64_t)(sl.first + i));
        return -EIO;
    }
    return 0;
}

/* ---- in-flight slots ---- */

static int inflight_enter_locked(struct qcow2_state *s)
{
    int slot = s->cur_slot;
    __atomic_add_fetch(&s->inflight[slot], 1, __ATOMIC_ACQ_REL);
    return slot;
}

static int inflight_enter(struct qcow2_state *s)
{
    pthread_mutex_lock(&s->cache_lock);
    int slot = inflight_enter_locked(s);
    pthread_mutex_unlock(&s->cache_lock);
    return slot;
}

static void inflight_leave(struct qcow2_state *s, int slot)
{
    __atomic_sub_fetch(&s->inflight[slot], 1, __ATOMIC_ACQ_REL);
}

/* ---- decompression ---- */

int qcow2_decompress(const struct qcow2_state *s, void *dst, size_t dst_len,
                     const void *src, size_t src_len)
{
    if (s->compression_type == QCOW2_COMPRESSION_ZLIB) {
        z_stream z = { .next_in = (Bytef *)src, .avail_in = src_len,
                       .next_out = dst, .avail_out = dst_len };
        if (inflateInit2(&z, -12) != Z_OK)
            return -EIO;
        int r = inflate(&z, Z_FINISH);
        bool ok = (r == Z_STREAM_END || r == Z_BUF_ERROR) && z.avail_out == 0;
        inflateEnd(&z);
        return ok ? 0 : -EIO;
    }
#ifdef CONFIG_ZSTD
    if (s->compression_type == QCOW2_COMPRESSION_ZSTD) {
        ZSTD_DCtx *dctx = ZSTD_createDCtx();
        ZSTD_inBuffer in = { src, src_len, 0 };
        ZSTD_outBuffer out = { dst, dst_len, 0 };
        int ret = 0;
        /* the data may hold several frames; stop once the cluster is full */
        while (out.pos < out.size) {
            size_t last_in = in.pos, last_out = out.pos;
            size_t r = ZSTD_decompressStream(dctx, &out, &in);
            if (ZSTD_isError(r)) {
                ret = -EIO;
                break;
            }
            if (in.pos == last_in && out.pos == last_out) {
                ret = -EIO;         /* no progress: truncated input */
                break;
            }
        }
        ZSTD_freeDCtx(dctx);
        return ret;
    }
#endif
    return -ENOTSUP;
}

/* Compress a cluster into dst (at most dst_len bytes) as QEMU does: raw
 * deflate with a 4 KiB window, or one zstd frame.  The length, -ENOMEM if
 * it does not fit (the caller writes the cluster uncompressed), or -EIO. */
static ssize_t qcow2_compress(const struct qcow2_state *s, void *dst, size_t dst_len,
                              const void *src, size_t src_len)
{
    if (s->compression_type == QCOW2_COMPRESSION_ZLIB) {
        z_stream z = { .next_in = (Bytef *)src, .avail_in = src_len,
                       .next_out = dst, .avail_out = dst_len };
        if (deflateInit2(&z, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9,
                         Z_DEFAULT_STRATEGY) != Z_OK)
            return -EIO;
        int r = deflate(&z, Z_FINISH);
        ssize_t ret = r == Z_STREAM_END ? (ssize_t)(dst_len - z.avail_out) :
                      r == Z_OK ? -ENOMEM : -EIO;
        deflateEnd(&z);
        return ret;
    }
#ifdef CONFIG_ZSTD
    if (s->compression_type == QCOW2_COMPRESSION_ZSTD) {
        ZSTD_CCtx *cctx = ZSTD_createCCtx();
        if (!cctx)
            return -EIO;
        ZSTD_inBuffer in = { src, src_len, 0 };
        ZSTD_outBuffer out = { dst, dst_len, 0 };
        /* one call with the whole input; anything left to flush means
         * the output did not fit */
        size_t r = ZSTD_compressStream2(cctx, &out, &in, ZSTD_e_end);
        ZSTD_freeCCtx(cctx);
        if (ZSTD_isError(r))
            return -EIO;
        return r ? -ENOMEM : (ssize_t)out.pos;
    }
#endif
    return -ENOTSUP;
}

/* Read and inflate the compressed cluster of entry l2e into buf (a cluster). */
static int read_compressed(struct qcow2_state *s, uint64_t l2e, uint8_t *buf)
{
    uint64_t coff = l2e & s->coffset_mask;
    uint64_t nsec = ((l2e >> s->csize_shift) & s->csize_mask) + 1;
    uint64_t csize = nsec * 512 - (coff & 511);
    CLEANUP_FREE uint8_t *cbuf = xmalloc(csize);
    bnode_debug_event(s->bs->file, BLKDBG_READ_COMPRESSED);
    int ret = bnode_co_pread(s->bs->file, coff, csize, cbuf, BREQ_BEYOND_EOF);
    if (ret < 0)
        return ret;
    ret = qcow2_decompress(s, buf, s->cluster_size, cbuf, csize);
    if (ret < 0)
        log_debug("qcow2: cannot decompress the cluster at %#" PRIx64, coff);
    return ret;
}

/* ---- reads ---- */

/* Reads of what the backing node holds (zeros past its end). */
static int read_backing(struct bnode *bs, uint64_t offset, uint64_t bytes,
                        const struct iovec *iov, int cnt, uint64_t iov_off)
{
    struct bnode *b = bs->backing;
    uint64_t bsize = b ? __atomic_load_n(&b->size, __ATOMIC_RELAXED) : 0;
    uint64_t n = offset < bsize ? MIN(bytes, bsize - offset) : 0;
    if (n) {
        struct sub_iov v;
        sub_iov_make(&v, iov, cnt, iov_off, n);
        int ret = bnode_co_preadv(b, offset, n, v.iov, v.cnt, 0);
        sub_iov_free(&v);
        if (ret < 0)
            return ret;
    }
    if (n < bytes)
        iov_memset(iov, cnt, iov_off + n, 0, bytes - n);
    return 0;
}

static int co_read(struct bnode *bs, struct qcow2_state *s, uint64_t offset, uint64_t bytes,
                   const struct iovec *iov, int cnt, uint64_t iov_off)
{
    uint64_t done = 0;
    while (done < bytes) {
        struct qrun run;
        co_mutex_lock(&s->lock);
        int ret = get_run(s, offset + done, bytes - done, &run);
        int slot = -1;
        if (ret == 0 && (run.type == QT_NORMAL || run.type == QT_COMPRESSED))
            slot = inflight_enter(s);
        co_mutex_unlock(&s->lock);
        if (ret < 0)
            return ret;
        switch (run.type) {
        case QT_UNALLOC:
        case QT_UNALLOC_ALLOC:
            if (bs->backing)
                bnode_debug_event(s->bs->file, BLKDBG_READ_BACKING_AIO);
            ret = read_backing(bs, offset + done, run.bytes, iov, cnt, iov_off + done);
            break;
        case QT_ZERO:
        case QT_ZERO_ALLOC:
            iov_memset(iov, cnt, iov_off + done, 0, run.bytes);
            break;
        case QT_NORMAL: {
            struct sub_iov v;
            sub_iov_make(&v, iov, cnt, iov_off + done, run.bytes);
            bnode_debug_event(s->bs->file, BLKDBG_READ_AIO);
            ret = bnode_co_preadv(s->data, run.host, run.bytes, v.iov, v.cnt, BREQ_BEYOND_EOF);
            sub_iov_free(&v);
            break;
        }
        case QT_COMPRESSED: {
            uint8_t *buf = xmalloc(s->cluster_size);
            if (!buf) {
                ret = -ENOMEM;
                break;
            }
            ret = read_compressed(s, run.l2e, buf);
            if (ret == 0)
                iov_from_buf(iov, cnt, iov_off + done,
                             buf + qoffset_into_cluster(s, offset + done), run.bytes);
            free(buf);
            break;
        }
        default:
            ret = -EIO;
        }
        if (slot >= 0)
            inflight_leave(s, slot);
        if (ret < 0)
            return ret;
        done += run.bytes;
    }
    return 0;
}

/* ---- range locks ---- */

static void range_lock(struct qcow2_state *s, struct qrange *r, uint64_t offset, uint64_t bytes)
{
    r->start = offset >> s->cluster_bits;
    r->end = (offset + bytes + s->cluster_size - 1) >> s->cluster_bits;
    co_queue_init(&r->waiters);
    pthread_mutex_lock(&s->cache_lock);
again:
    for (struct qrange *x = s->ranges; x; x = x->next) {
        if (x->start < r->end && r->start < x->end) {
            co_queue_wait(&x->waiters, &s->cache_lock);
            goto again;
        }
    }
    r->next = s->ranges;
    s->ranges = r;
    pthread_mutex_unlock(&s->cache_lock);
}

static void range_unlock(struct qcow2_state *s, struct qrange *r)
{
    pthread_mutex_lock(&s->cache_lock);
    for (struct qrange **p = &s->ranges; *p; p = &(*p)->next) {
        if (*p == r) {
            *p = r->next;
            break;
        }
    }
    pthread_mutex_unlock(&s->cache_lock);
    co_queue_wake_all(&r->waiters);
    co_queue_destroy(&r->waiters);
}

/* ---- L2 tables for writing ---- */

/* Make sure the L2 table for guest offset exists and is ours (COPIED);
 * returns the slice pinned in *sl.  s->lock held. */
static int get_l2_for_write(struct qcow2_state *s, uint64_t offset, struct qslice *sl)
{
    uint64_t l2_cover = s->l2_entries << s->cluster_bits;
    uint64_t l1_i = offset / l2_cover;
    if (l1_i >= s->l1_size)
        return -EIO;
    pthread_mutex_lock(&s->cache_lock);
    uint64_t l1e = s->l1[l1_i];
    pthread_mutex_unlock(&s->cache_lock);
    uint64_t old = l1e & QCOW2_L1E_OFFSET_MASK;
    if (!old || !(l1e & QCOW2_OFLAG_COPIED)) {
        /* a new table: zeros, or a copy of a shared one */
        uint64_t tbytes = s->l2_entries * s->l2_entry_bytes;
        CLEANUP_FREE uint8_t *t = xcalloc(1, tbytes);
        int ret;
        if (old) {
            if (qoffset_into_cluster(s, old))
                return -EIO;
            /* dirty slices of the old table must be on disk before copying it */
            ret = qcache_flush(s, &s->l2c);
            if (ret == 0)
                bnode_debug_event(s->bs->file, BLKDBG_L2_ALLOC_COW_READ);
            if (ret == 0)
                ret = bnode_co_pread(s->bs->file, old, tbytes, t,
                                     BREQ_BEYOND_EOF | QCOW2_META_IO);
            if (ret < 0)
                return ret;
        }
        int64_t n = qcow2_alloc_clusters(s, 1);
        if (n < 0)
            return (int)n;
        ret = qcache_flush(s, &s->rbc);
        if (ret == 0)
            ret = qcow2_overlap_check(s, 0, n, s->cluster_size);
        if (ret == 0) {
            /* QEMU writes the new table by flushing its cache entry */
            bnode_debug_event(s->bs->file, BLKDBG_L2_ALLOC_WRITE);
            bnode_debug_event(s->bs->file, BLKDBG_L2_UPDATE);
            ret = bnode_co_pwrite(s->bs->file, n, s->cluster_size, t,
                                  BREQ_BEYOND_EOF | QCOW2_META_IO);
        }
        if (ret == 0)
            ret = bnode_co_flush(s->bs->file);
        if (ret == 0) {
            /* The slice about to be used goes into the cache from memory,
             * as QEMU fills a new table (no read back: no l2_load).  Nobody
             * finds it before the L1 entry points to the table. */
            uint64_t l2_i = (offset >> s->cluster_bits) & (s->l2_entries - 1);
            uint64_t first = l2_i - l2_i % s->l2_slice_entries;
            int idx;
            if (qcache_get(s, &s->l2c, n + first * s->l2_entry_bytes, false, &idx) == 0) {
                memcpy(qcache_data(&s->l2c, idx), t + first * s->l2_entry_bytes,
                       s->l2_slice_entries * s->l2_entry_bytes);
                qcache_put(s, &s->l2c, idx);
            }
            qcow2_meta_add_kind(s, n, s->cluster_size, QOL_ACTIVE_L2);
            ret = qcow2_write_l1_entry(s, (uint32_t)l1_i, (uint64_t)n | QCOW2_OFLAG_COPIED);
            if (ret < 0) {
                qcow2_meta_del(s, n, s->cluster_size);
                qcache_drop(s, &s->l2c, n, s->cluster_size);
            }
        }
        if (ret < 0) {
            qcow2_update_refcount(s, n, s->cluster_size, -1);
            return ret;
        }
        if (old)
            qcow2_free_deferred(s, old, 1, QFREE_OTHER);   /* one reference less */
    }
    uint64_t cover;
    return get_slice(s, offset, sl, &cover);
}

/* ---- writes ---- */

/* ---- growing an O_DIRECT file ahead (QEMU's preallocate filter) ----
 * A fresh cluster lies past the end of the file, so its data write extends
 * the file: on ext4 an O_DIRECT write that extends the file takes the inode
 * lock exclusively and waits for the device under it, and io_uring punts
 * each one to a worker, where they queue on that lock.  Growing the file
 * (sparse, ftruncate) GROW_STEP ahead of the clusters handed out turns
 * them into writes inside the file.  bs->file->size keeps following what
 * was written (file.c grows it as writes complete), so the allocator,
 * shrink and the rest see the image as it is; the file is cut back to that
 * length at close (a crash leaves up to GROW_STEP of unreferenced zeros at
 * the end, which qemu-img check accepts).  s->lock held. */
#define GROW_STEP (128ull << 20)
#define GROW_ALIGN (1ull << 20)

static void grow_ahead(struct qcow2_state *s, uint64_t need)
{
    struct bnode *f = s->bs->file;
    if (s->data != f || !f->cache_direct || strcmp(f->drv->name, "file") ||
        need <= s->grown_to || need <= __atomic_load_n(&f->size, __ATOMIC_RELAXED))
        return;
    uint64_t to = (need + GROW_STEP + GROW_ALIGN - 1) / GROW_ALIGN * GROW_ALIGN;
    error *err = NULL;
    if (f->drv->truncate(f, to, &err) < 0) {
        error_free(err);         /* only slower: the writes extend the file */
        return;
    }
    s->grown_to = to;
}

void qcow2_trim_grown(struct qcow2_state *s)
{
    struct bnode *f = s->bs->file;
    uint64_t size = __atomic_load_n(&f->size, __ATOMIC_RELAXED);
    if (!s->grown_to)
        return;
    s->grown_to = 0;
    if (f->read_only)
        return;
    error *err = NULL;
    if (f->drv->truncate(f, size, &err) < 0) {
        log_warn("qcow2: node '%s': could not cut the file back to %" PRIu64 " bytes: %s",
                 s->bs->node_name, size, err->msg);
        error_free(err);
    }
}

/*
 * At a read-write open: a tail that grow_ahead() left behind a kill -9 is
 * cut off.  It is recognised as ours, and so safe to cut, when it is no
 * longer than one grow step, no cluster in it has a refcount, and the file
 * holds no data there (a hole: what the sparse ftruncate made).  Anything
 * else past the last referenced cluster is left as found.  The refcounts
 * are the repaired ones if the image was dirty.
 */
int qcow2_trim_stale_tail(struct qcow2_state *s)
{
    struct bnode *f = s->bs->file;
    if (s->data != f || f->read_only || strcmp(f->drv->name, "file"))
        return 0;
    uint64_t fsize = __atomic_load_n(&f->size, __ATOMIC_RELAXED);
    uint64_t n = fsize >> s->cluster_bits;          /* whole clusters in the file */
    uint64_t limit = (GROW_STEP + GROW_ALIGN) >> s->cluster_bits;
    uint64_t end = 0;
    bool found = false;
    for (uint64_t i = n; i-- > 0 && n - i <= limit + 1;) {
        uint64_t ref = 0;
        int ret = qcow2_get_refcount(s, i, &ref);
        if (ret < 0)
            return ret;
        if (ref) {
            end = (i + 1) << s->cluster_bits;
            found = true;
            break;
        }
    }
    if (!found || end >= fsize || fsize - end < GROW_ALIGN)
        return 0;                /* nothing worth cutting, or not ours */
    uint64_t pnum = 0;
    unsigned flags = 0;
    int depth = 0;
    if (bnode_block_status(f, end, fsize - end, &pnum, &flags, &depth) < 0 ||
        (flags & BS_DATA) || pnum < fsize - end)
        return 0;                /* data there: not a tail we grew */
    error *err = NULL;
    if (f->drv->truncate(f, end, &err) < 0) {
        log_warn("qcow2: node '%s': could not cut the unused tail of the file: %s",
                 s->bs->node_name, err->msg);
        error_free(err);
        return 0;
    }
    __atomic_store_n(&f->size, end, __ATOMIC_RELAXED);
    log_info("qcow2: node '%s': cut %" PRIu64 " unused bytes (grown ahead before a crash) "
             "off the end of the file", s->bs->node_name, fsize - end);
    return 0;
}

/* What a guest cluster holds now, for copy-on-write into a new cluster. */
static int read_old(struct bnode *bs, struct qcow2_state *s, uint64_t guest, uint64_t len,
                    uint8_t *buf)
{
    struct iovec iov = { buf, len };
    bnode_debug_event(s->bs->file, BLKDBG_COW_READ);    /* as do_perform_cow_read */
    return co_read(bs, s, guest, len, &iov, 1, 0);
}

struct wpiece {
    uint64_t offset, bytes;     /* guest range written by the caller */
};

/* Write [offset, offset+bytes) that lies within one L2 slice, into
 * clusters that need allocation or in place.  s->lock held on entry and
 * exit (released around data I/O). */
/* The guest's n bytes (iov from iov_off) written at host offset `at`
 * with the copy-on-write head before them and tail after them (either
 * may be empty): one write, for which QEMU raises cow_write and
 * write_aio. */
static int write_with_cow(struct qcow2_state *s, uint64_t at, uint8_t *head, uint64_t hlen,
                          const struct iovec *iov, int cnt, uint64_t iov_off, uint64_t n,
                          uint8_t *tail, uint64_t tlen, unsigned wflags)
{
    struct sub_iov v;
    sub_iov_make(&v, iov, cnt, iov_off, n);
    CLEANUP_FREE struct iovec *all = xmalloc((v.cnt + 2) * sizeof(*all));
    int ret = -ENOMEM;
    if (all) {
        int k = 0;
        if (hlen)
            all[k++] = (struct iovec){ head, hlen };
        memcpy(all + k, v.iov, v.cnt * sizeof(*all));
        k += v.cnt;
        if (tlen)
            all[k++] = (struct iovec){ tail, tlen };
        if (hlen || tlen)
            bnode_debug_event(s->bs->file, BLKDBG_COW_WRITE);
        bnode_debug_event(s->bs->file, BLKDBG_WRITE_AIO);
        ret = bnode_co_pwritev(s->data, at, hlen + n + tlen, all, k, BREQ_BEYOND_EOF | wflags);
    }
    sub_iov_free(&v);
    return ret;
}

static int write_piece(struct bnode *bs, struct qcow2_state *s, uint64_t offset, uint64_t bytes,
                       const struct iovec *iov, int cnt, uint64_t iov_off, unsigned flags,
                       uint64_t *written, bool *meta_changed)
{
    struct qslice sl;
    int ret = get_l2_for_write(s, offset, &sl);
    if (ret < 0)
        return ret;
    uint8_t *slice = qcache_data(&s->l2c, sl.idx);
    uint64_t i = ((offset >> s->cluster_bits) & (s->l2_entries - 1)) - sl.first;
    uint64_t in_cl = qoffset_into_cluster(s, offset);
    uint64_t us = unit_size(s);

    pthread_mutex_lock(&s->cache_lock);
    uint64_t e = l2_entry(s, slice, i), bm = l2_bitmap(s, slice, i);
    pthread_mutex_unlock(&s->cache_lock);
    uint64_t host = e & QCOW2_L2E_OFFSET_MASK;
    bool ext_data = s->data != s->bs->file;

    /* In place: COPIED normal cluster; the written subclusters become allocated. */
    if ((e & QCOW2_OFLAG_COPIED) && !(e & QCOW2_OFLAG_COMPRESSED) &&
        (host || ext_data) && (s->extl2 || !(e & QCOW2_OFLAG_ZERO))) {
        uint64_t n = MIN(bytes, s->cluster_size - in_cl);
        unsigned sc0 = in_cl / us, sc1 = (in_cl + n - 1) / us;
        uint64_t need_cow_head = 0, need_cow_tail = 0;
        if (s->extl2) {
            /* partially written subclusters that are not allocated need COW */
            for (unsigned sc = sc0; sc <= sc1; sc++) {
                if (!(bm & QCOW2_SC_ALLOC(sc))) {
                    if (sc == sc0 && in_cl % us)
                        need_cow_head = in_cl % us;
                    if (sc == sc1 && (in_cl + n) % us)
                        need_cow_tail = us - (in_cl + n) % us;
                }
            }
        }
        qcache_put(s, &s->l2c, sl.idx);
        if (qoffset_into_cluster(s, host))
            return corrupt_entry(s, sl.l2_off, offset);
        ret = ext_data ? 0 : qcow2_overlap_check(s, 0, host + in_cl - need_cow_head,
                                                 n + need_cow_head + need_cow_tail);
        if (ret < 0)
            return ret;
        int slot = inflight_enter(s);
        co_mutex_unlock(&s->lock);
        CLEANUP_FREE uint8_t *head = NULL, *tail = NULL;
        if (need_cow_head) {
            head = xmalloc(need_cow_head);
            ret = head ? 0 : -ENOMEM;
            if (ret == 0) {
                /* what the guest reads there now: backing, or zeros */
                bool zero = bm & QCOW2_SC_ZERO(sc0);
                if (zero)
                    memset(head, 0, need_cow_head);
                else {
                    struct iovec hv = { head, need_cow_head };
                    bnode_debug_event(s->bs->file, BLKDBG_COW_READ);
                    ret = read_backing(bs, offset - need_cow_head, need_cow_head, &hv, 1, 0);
                }
            }
        }
        if (ret == 0 && need_cow_tail) {
            tail = xmalloc(need_cow_tail);
            ret = tail ? 0 : -ENOMEM;
            if (ret == 0) {
                if (bm & QCOW2_SC_ZERO(sc1))
                    memset(tail, 0, need_cow_tail);
                else {
                    struct iovec tv = { tail, need_cow_tail };
                    bnode_debug_event(s->bs->file, BLKDBG_COW_READ);
                    ret = read_backing(bs, offset + n, need_cow_tail, &tv, 1, 0);
                }
            }
        }
        if (ret == 0)
            ret = write_with_cow(s, host + in_cl - need_cow_head, head, need_cow_head,
                                 iov, cnt, iov_off, n, tail, need_cow_tail,
                                 flags & (BREQ_FUA | BREQ_COPY_INLINE));
        inflight_leave(s, slot);
        co_mutex_lock(&s->lock);
        if (ret < 0)
            return ret;
        if (s->extl2) {
            uint64_t set = 0;
            for (unsigned sc = sc0; sc <= sc1; sc++)
                set |= QCOW2_SC_ALLOC(sc);
            if ((bm & set) != set || (bm & (set << 32))) {
                ret = get_slice(s, offset, &sl, &(uint64_t){ 0 });
                if (ret < 0)
                    return ret;
                slice = qcache_data(&s->l2c, sl.idx);
                pthread_mutex_lock(&s->cache_lock);
                uint64_t cur = l2_bitmap(s, slice, i);
                set_l2(s, slice, i, l2_entry(s, slice, i), (cur | set) & ~(set << 32));
                pthread_mutex_unlock(&s->cache_lock);
                qcache_mark_dirty(s, &s->l2c, sl.idx);
                qcache_put(s, &s->l2c, sl.idx);
                *meta_changed = true;
            }
        }
        *written = n;
        return 0;
    }

    /* Allocate: as many following clusters as also need a new cluster,
     * within this slice, contiguous on the host. */
    uint64_t ncl = 1;
    uint64_t want = (in_cl + bytes + s->cluster_size - 1) >> s->cluster_bits;
    pthread_mutex_lock(&s->cache_lock);
    while (ncl < want && i + ncl < s->l2_slice_entries &&
           l2_entry(s, slice, i + ncl) == 0 && l2_bitmap(s, slice, i + ncl) == 0)
        ncl++;                           /* plain unallocated clusters join the run */
    pthread_mutex_unlock(&s->cache_lock);
    qcache_put(s, &s->l2c, sl.idx);

    int64_t newh;
    bool fresh = false;
    if (ext_data) {
        newh = (int64_t)qstart_of_cluster(s, offset);   /* fixed host = guest mapping */
    } else {
        newh = qcow2_alloc_clusters(s, ncl);
        fresh = s->last_alloc_fresh;
    }
    if (newh < 0)
        return (int)newh;
    uint64_t n = MIN(bytes, ncl * s->cluster_size - in_cl);
    uint64_t cl_start = qstart_of_cluster(s, offset);
    uint64_t end_in = in_cl + n;                       /* end within the first cluster's run */
    uint64_t run_bytes = ncl * s->cluster_size;
    /* COW extents: with extended L2 only the partly written subclusters */
    uint64_t head_from = 0, tail_to = run_bytes;
    if (s->extl2 && !host && !(e & QCOW2_OFLAG_COMPRESSED)) {
        head_from = in_cl - in_cl % us;
        tail_to = MIN(run_bytes, (end_in + us - 1) / us * us);
    }
    /* Copy-on-write of what reads as zeros into clusters never written
     * (past everything the image ever used: the file reads zeros there)
     * is skipped: only the guest's data is written.  That is where QEMU's
     * handle_alloc_space() zeroes the new clusters instead of copying
     * (cluster_alloc_space). */
    if (fresh) {
        uint64_t bsize = bs->backing ? __atomic_load_n(&bs->backing->size, __ATOMIC_RELAXED) : 0;
        bool no_old = !host && !(e & QCOW2_OFLAG_COMPRESSED);
        uint64_t hf = head_from, tt = tail_to;
        if (no_old && cl_start + head_from >= bsize)
            head_from = in_cl;
        /* the tail is in the last cluster: a plain unallocated one if ncl > 1 */
        if ((ncl > 1 || no_old) && cl_start + end_in >= bsize)
            tail_to = end_in;
        if ((hf < in_cl || tt > end_in) && head_from == in_cl && tail_to == end_in)
            bnode_debug_event(s->bs->file, BLKDBG_CLUSTER_ALLOC_SPACE);
    }
    ret = ext_data ? 0 : qcow2_overlap_check(s, 0, newh, run_bytes);
    if (ret < 0) {
        qcow2_update_refcount(s, newh, run_bytes, -1);
        return ret;
    }
    if (fresh)
        grow_ahead(s, newh + run_bytes);
    co_mutex_unlock(&s->lock);

    CLEANUP_FREE uint8_t *head = NULL, *tail = NULL;
    uint64_t hlen = in_cl - head_from, tlen = tail_to - end_in;
    ret = 0;
    if (hlen) {
        head = xmalloc(hlen);
        ret = head ? read_old(bs, s, cl_start + head_from, hlen, head) : -ENOMEM;
    }
    if (ret == 0 && tlen) {
        tail = xmalloc(tlen);
        ret = tail ? read_old(bs, s, cl_start + end_in, tlen, tail) : -ENOMEM;
    }
    if (ret == 0)
        ret = write_with_cow(s, newh + head_from, head, hlen, iov, cnt, iov_off, n,
                             tail, tlen, flags & BREQ_COPY_INLINE);
    co_mutex_lock(&s->lock);
    if (ret < 0) {
        if (!ext_data)
            qcow2_update_refcount(s, newh, run_bytes, -1);
        return ret;
    }
    /* link the new clusters in (the data is written) */
    ret = qcow2_mark_dirty(s);
    if (ret < 0) {
        if (!ext_data)
            qcow2_update_refcount(s, newh, run_bytes, -1);
        return ret;
    }
    ret = get_slice(s, offset, &sl, &(uint64_t){ 0 });
    if (ret < 0)
        return ret;
    slice = qcache_data(&s->l2c, sl.idx);
    pthread_mutex_lock(&s->cache_lock);
    for (uint64_t k = 0; k < ncl; k++) {
        uint64_t old = l2_entry(s, slice, i + k);
        uint64_t obm = l2_bitmap(s, slice, i + k);
        uint64_t bmv = 0;
        if (s->extl2) {
            uint64_t a = k == 0 ? head_from : 0;
            uint64_t b = k == ncl - 1 ? tail_to - k * s->cluster_size : s->cluster_size;
            bmv = obm & ~QCOW2_SC_ALLOC_MASK;
            if (old & QCOW2_OFLAG_COMPRESSED || (old & QCOW2_L2E_OFFSET_MASK))
                bmv = QCOW2_SC_ALLOC_MASK;     /* the whole old cluster was copied */
            else
                for (uint64_t sc = a / us; sc < (b + us - 1) / us; sc++)
                    bmv = (bmv | QCOW2_SC_ALLOC(sc)) & ~QCOW2_SC_ZERO(sc);
        }
        set_l2(s, slice, i + k, ((uint64_t)newh + k * s->cluster_size) | QCOW2_OFLAG_COPIED, bmv);
        if (old & QCOW2_OFLAG_COMPRESSED) {
            uint64_t coff = old & s->coffset_mask;
            uint64_t nsec = ((old >> s->csize_shift) & s->csize_mask) + 1;
            uint64_t first = coff >> s->cluster_bits;
            uint64_t last = (coff + nsec * 512 - (coff & 511) - 1) >> s->cluster_bits;
            pthread_mutex_unlock(&s->cache_lock);
            qcow2_free_deferred(s, first << s->cluster_bits, last - first + 1, QFREE_NEVER);
            pthread_mutex_lock(&s->cache_lock);
        } else if ((old & QCOW2_L2E_OFFSET_MASK) && !ext_data) {
            pthread_mutex_unlock(&s->cache_lock);
            qcow2_free_deferred(s, old & QCOW2_L2E_OFFSET_MASK, 1, QFREE_NEVER);
            pthread_mutex_lock(&s->cache_lock);
        }
    }
    pthread_mutex_unlock(&s->cache_lock);
    qcache_mark_dirty(s, &s->l2c, sl.idx);
    qcache_put(s, &s->l2c, sl.idx);
    *meta_changed = true;
    *written = n;
    return 0;
}

static int co_write(struct bnode *bs, struct qcow2_state *s, uint64_t offset, uint64_t bytes,
                    const struct iovec *iov, int cnt, unsigned flags)
{
    struct qrange r;
    range_lock(s, &r, offset, bytes);
    co_mutex_lock(&s->lock);
    int ret = 0;
    bool meta = false;
    uint64_t done = 0;
    while (done < bytes) {
        uint64_t w = 0;
        ret = write_piece(bs, s, offset + done, bytes - done, iov, cnt, done, flags, &w, &meta);
        if (ret < 0)
            break;
        done += w;
    }
    if (ret == 0 && (flags & BREQ_FUA) && (meta || s->l2c.ndirty || s->rbc.ndirty))
        ret = qcow2_flush_metadata(s);   /* the data's mapping must be durable too */
    co_mutex_unlock(&s->lock);
    range_unlock(s, &r);
    return ret;
}

/* ---- compressed writes (QEMU's qcow2_co_pwritev_compressed_part) ---- */

/* Store cluster `guest` (cluster-aligned) as the len compressed bytes of
 * data: into a cluster not allocated yet (QEMU: "compression can't
 * overwrite anything"), the data first, then its L2 entry. */
static int write_compressed_cluster(struct bnode *bs, struct qcow2_state *s, uint64_t guest,
                                    const uint8_t *data, uint64_t len)
{
    struct qrange r;
    struct qslice sl;
    range_lock(s, &r, guest, s->cluster_size);
    co_mutex_lock(&s->lock);
    int ret = get_l2_for_write(s, guest, &sl);
    if (ret < 0)
        goto out;
    uint64_t i = ((guest >> s->cluster_bits) & (s->l2_entries - 1)) - sl.first;
    pthread_mutex_lock(&s->cache_lock);
    uint64_t e = l2_entry(s, qcache_data(&s->l2c, sl.idx), i);
    pthread_mutex_unlock(&s->cache_lock);
    qcache_put(s, &s->l2c, sl.idx);
    if (e & QCOW2_L2E_OFFSET_MASK) {
        ret = -EIO;
        goto out;
    }
    int64_t host = qcow2_alloc_bytes(s, len);
    if (host < 0) {
        ret = (int)host;
        goto out;
    }
    ret = qcow2_overlap_check(s, 0, (uint64_t)host, len);
    if (ret == 0) {
        co_mutex_unlock(&s->lock);
        bnode_debug_event(s->bs->file, BLKDBG_WRITE_COMPRESSED);
        ret = bnode_co_pwrite(s->bs->file, (uint64_t)host, len, data, BREQ_BEYOND_EOF);
        co_mutex_lock(&s->lock);
    }
    if (ret == 0)
        ret = qcow2_mark_dirty(s);
    if (ret == 0)
        ret = get_slice(s, guest, &sl, &(uint64_t){ 0 });
    if (ret < 0) {
        qcow2_update_refcount(s, (uint64_t)host, len, -1);
        goto out;
    }
    /* the count of 512-byte sectors after the first that the bytes touch */
    uint64_t nsec = ((uint64_t)host + len - 1) / 512 - (uint64_t)host / 512;
    pthread_mutex_lock(&s->cache_lock);
    set_l2(s, qcache_data(&s->l2c, sl.idx), i,
           (uint64_t)host | QCOW2_OFLAG_COMPRESSED | (nsec << s->csize_shift), 0);
    pthread_mutex_unlock(&s->cache_lock);
    bnode_debug_event(s->bs->file, BLKDBG_L2_UPDATE_COMPRESSED);
    qcache_mark_dirty(s, &s->l2c, sl.idx);
    qcache_put(s, &s->l2c, sl.idx);
out:
    co_mutex_unlock(&s->lock);
    range_unlock(s, &r);
    return ret;
}

/* Compression in a worker of the CPU pool (QEMU's qcow2_co_compress uses
 * its thread pool too): deflate or zstd of a 64 KiB cluster takes about a
 * millisecond, which the loop running the coroutine would otherwise spend
 * away from every other request it serves.  The coroutine yields until
 * the worker is done; outside a loop it compresses in place. */
struct compress_call {
    struct aio_req aio;
    const struct qcow2_state *s;
    void *dst;
    size_t dst_len;
    const void *src;
    size_t src_len;
    struct coroutine *co;
    int64_t res;
    bool done, waiting;
};

static int64_t compress_fn(struct aio_req *a)
{
    struct compress_call *c = container_of(a, struct compress_call, aio);
    return qcow2_compress(c->s, c->dst, c->dst_len, c->src, c->src_len);
}

static void compress_done(struct aio_req *a, int64_t res)
{
    struct compress_call *c = container_of(a, struct compress_call, aio);
    c->res = res;
    c->done = true;
    if (!c->waiting)
        return;
    if (co_in_coroutine())
        co_wake(c->co);
    else
        co_enter(c->co);
}

static ssize_t co_compress(const struct qcow2_state *s, void *dst, size_t dst_len,
                           const void *src, size_t src_len)
{
    struct loop *l = loop_current();
    if (!l || !co_in_coroutine())
        return qcow2_compress(s, dst, dst_len, src, src_len);
    struct compress_call c = {
        .aio = { .op = AIO_OP_CALL, .fd = -1, .flags = AIO_NO_INLINE | AIO_CPU_BOUND,
                 .fn = compress_fn, .done = compress_done },
        .s = s, .dst = dst, .dst_len = dst_len, .src = src, .src_len = src_len,
        .co = co_self(),
    };
    aio_submit(l, AIO_THREADS, &c.aio);
    if (!c.done) {
        c.waiting = true;
        co_yield();
    }
    return (ssize_t)c.res;
}

/* Whole clusters (the last one may end at the end of the image), each
 * compressed, or written as it is if it does not compress. */
static int co_write_compressed(struct bnode *bs, struct qcow2_state *s, uint64_t offset,
                               uint64_t bytes, const struct iovec *iov, int cnt)
{
    uint64_t cs = s->cluster_size;
    if (s->data != s->bs->file)
        return -ENOTSUP;
    if (qoffset_into_cluster(s, offset) ||
        (qoffset_into_cluster(s, bytes) && offset + bytes != s->size))
        return -EINVAL;
    CLEANUP_FREE uint8_t *buf = xmalloc(cs);
    CLEANUP_FREE uint8_t *out = xmalloc(cs);
    int ret = 0;
    for (uint64_t done = 0; ret == 0 && done < bytes; done += cs) {
        uint64_t n = MIN(cs, bytes - done);
        iov_xfer(iov, cnt, done, buf, n, false);
        memset(buf + n, 0, cs - n);      /* the image's short last cluster */
        ssize_t len = co_compress(s, out, cs - 1, buf, cs);
        if (len == -ENOMEM) {            /* does not compress: a normal cluster */
            struct iovec one = { buf, n };
            ret = co_write(bs, s, offset + done, n, &one, 1, 0);
        } else if (len < 0) {
            ret = -EINVAL;
        } else {
            ret = write_compressed_cluster(bs, s, offset + done, out, (uint64_t)len);
        }
    }
    return ret;
}

/* ---- zeroes and discard ---- */

/* Give up the host cluster(s) entry e referenced (its mapping is gone). */
static void free_entry(struct qcow2_state *s, uint64_t e, int type)
{
    if (e & QCOW2_OFLAG_COMPRESSED) {
        uint64_t coff = e & s->coffset_mask;
        uint64_t nsec = ((e >> s->csize_shift) & s->csize_mask) + 1;
        uint64_t first = coff >> s->cluster_bits;
        uint64_t last = (coff + nsec * 512 - (coff & 511) - 1) >> s->cluster_bits;
        qcow2_free_deferred(s, first << s->cluster_bits, last - first + 1, type);
    } else if (s->data != s->bs->file) {
        if ((e & QCOW2_L2E_OFFSET_MASK) || (e & QCOW2_OFLAG_COPIED))
            qcow2_free_deferred_external(s, e & QCOW2_L2E_OFFSET_MASK, type);
    } else if (e & QCOW2_L2E_OFFSET_MASK) {
        qcow2_free_deferred(s, e & QCOW2_L2E_OFFSET_MASK, 1, type);
    }
}

static bool entry_allocated(const struct qcow2_state *s, uint64_t e)
{
    return (e & QCOW2_OFLAG_COMPRESSED) || (e & QCOW2_L2E_OFFSET_MASK) ||
           (s->data != s->bs->file && (e & QCOW2_OFLAG_COPIED));
}

/*
 * Whole clusters [offset, offset+bytes), as QEMU's zero_in_l2_slice and
 * discard_in_l2_slice decide each entry:
 *   Z_ZERO     reads as zeros (ZERO flag / zero bits); the host cluster is
 *              kept unless unmap (may-unmap) or compressed;
 *   Z_DISCARD  a discard request: unallocated if nothing shows through
 *              (v2: always), else zeros; the host cluster is freed;
 *   Z_FULL     unallocated, freed, the file told (truncate).
 */
enum zmode { Z_ZERO, Z_DISCARD, Z_FULL };

static int zero_clusters(struct bnode *bs, struct qcow2_state *s, uint64_t offset,
                         uint64_t bytes, enum zmode mode, bool unmap)
{
    uint64_t done = 0;
    uint64_t l2_cover = s->l2_entries << s->cluster_bits;
    int type = mode == Z_FULL ? QFREE_ALWAYS : QFREE_REQUEST;
    while (done < bytes) {
        struct qslice sl;
        uint64_t o = offset + done;
        if (mode == Z_FULL) {
            /* nothing to drop where no L2 table is */
            uint64_t l1_i = o / l2_cover;
            pthread_mutex_lock(&s->cache_lock);
            bool none = l1_i >= s->l1_size || !(s->l1[l1_i] & QCOW2_L1E_OFFSET_MASK);
            pthread_mutex_unlock(&s->cache_lock);
            if (none) {
                done += l2_cover - o % l2_cover;
                continue;
            }
        }
        int ret = get_l2_for_write(s, o, &sl);
        if (ret < 0)
            return ret;
        uint8_t *slice = qcache_data(&s->l2c, sl.idx);
        uint64_t i = ((o >> s->cluster_bits) & (s->l2_entries - 1)) - sl.first;
        bool changed = false;
        pthread_mutex_lock(&s->cache_lock);
        for (; i < s->l2_slice_entries && done < bytes; i++, done += s->cluster_size) {
            uint64_t e = l2_entry(s, slice, i), bm = l2_bitmap(s, slice, i);
            bool allocated = entry_allocated(s, e);
            bool drop;
            uint64_t ne = e, nbm = bm;
            if (mode == Z_ZERO) {
                drop = (e & QCOW2_OFLAG_COMPRESSED) || (unmap && allocated);
                if (drop)
                    ne = 0;
                if (s->extl2)
                    nbm = QCOW2_SC_ZERO_MASK;
                else
                    ne |= QCOW2_OFLAG_ZERO;
            } else if (mode == Z_FULL) {
                drop = true;
                ne = nbm = 0;
            } else {
                drop = true;
                if (bs->backing || allocated) {
                    if (s->extl2) {
                        ne = 0;
                        nbm = QCOW2_SC_ZERO_MASK;
                    } else {
                        ne = s->version >= 3 ? QCOW2_OFLAG_ZERO : 0;
                    }
                }
            }
            if (ne == e && nbm == bm)
                continue;
            set_l2(s, slice, i, ne, nbm);
            changed = true;
            if (drop && allocated) {
                pthread_mutex_unlock(&s->cache_lock);
                free_entry(s, e, type);
                pthread_mutex_lock(&s->cache_lock);
            }
        }
        pthread_mutex_unlock(&s->cache_lock);
        if (changed)
            qcache_mark_dirty(s, &s->l2c, sl.idx);
        qcache_put(s, &s->l2c, sl.idx);
    }
    return 0;
}

/* Zero buffers written through the normal write path (partial clusters,
 * images without the zero flag). */
static int write_zero_buffers(struct bnode *bs, struct qcow2_state *s, uint64_t offset,
                              uint64_t bytes)
{
    uint64_t chunk = MIN(bytes, (uint64_t)1 << 20);
    CLEANUP_FREE uint8_t *z = xcalloc(1, chunk ? chunk : 1);
    while (bytes) {
        uint64_t n = MIN(bytes, chunk);
        struct iovec v = { z, n };
        int ret = co_write(bs, s, offset, n, &v, 1, 0);
        if (ret < 0)
            return ret;
        offset += n;
        bytes -= n;
    }
    return 0;
}

static int co_write_zeroes(struct bnode *bs, struct qcow2_state *s, uint64_t offset,
                           uint64_t bytes, unsigned flags)
{
    uint64_t cs = s->cluster_size, end = offset + bytes;
    uint64_t a = (offset + cs - 1) & ~(cs - 1), b = end & ~(cs - 1);
    /* v2 has no zero flag, but with nothing below an unallocated cluster
     * reads as zeros (as QEMU: a discard) */
    bool v2_discard = s->version < 3 && !bs->backing;
    if (s->data_file_raw || a >= b || (s->version < 3 && !v2_discard)) {
        if (flags & BREQ_NO_FALLBACK)
            return -ENOTSUP;
        return write_zero_buffers(bs, s, offset, bytes);
    }
    if ((a > offset || b < end) && (flags & BREQ_NO_FALLBACK))
        return -ENOTSUP;
    int ret = write_zero_buffers(bs, s, offset, a - offset);
    if (ret == 0)
        ret = write_zero_buffers(bs, s, b, end - b);
    if (ret < 0)
        return ret;
    struct qrange r;
    range_lock(s, &r, a, b - a);
    co_mutex_lock(&s->lock);
    if (v2_discard)
        ret = zero_clusters(bs, s, a, b - a, Z_DISCARD, true);
    else
        ret = zero_clusters(bs, s, a, b - a, Z_ZERO, (flags & BREQ_MAY_UNMAP) && bs->discard);
    if (ret == 0 && (flags & BREQ_FUA))
        ret = qcow2_flush_metadata(s);
    co_mutex_unlock(&s->lock);
    range_unlock(s, &r);
    return ret;
}

static int co_discard(struct bnode *bs, struct qcow2_state *s, uint64_t offset, uint64_t bytes)
{
    /* As QEMU: v2 has no zero flag, so an unallocated cluster would show
     * the backing file's stale data: discard does nothing there. */
    if (s->version < 3 && bs->backing)
        return 0;
    /* As QEMU: only whole clusters, and the partial last cluster of the image. */
    uint64_t cs = s->cluster_size, end = offset + bytes;
    uint64_t a = (offset + cs - 1) & ~(cs - 1);
    uint64_t b = end >= s->size ? (end + cs - 1) & ~(cs - 1) : end & ~(cs - 1);
    if (a >= b)
        return 0;
    struct qrange r;
    range_lock(s, &r, a, b - a);
    co_mutex_lock(&s->lock);
    int ret = zero_clusters(bs, s, a, b - a, Z_DISCARD, true);
    co_mutex_unlock(&s->lock);
    range_unlock(s, &r);
    return ret;
}

static int co_flush(struct qcow2_state *s)
{
    co_mutex_lock(&s->lock);
    /* bits first, so one file flush makes both durable; a failure there
     * is logged, not the guest's: the bitmaps are in use on disk anyway */
    if (s->bitmaps && !s->bs->read_only)
        qcow2_bitmaps_flush(s);
    int ret = qcow2_flush_metadata(s);
    co_mutex_unlock(&s->lock);
    return ret;
}

/* After a grow over a backing file longer than the old size: the new area
 * reads as zeros, not as the backing file (QEMU 7.2's bdrv_co_truncate
 * asks for BDRV_REQ_ZERO_WRITE then). */
int qcow2_co_zero_grown(struct bnode *bs, struct qcow2_state *s, uint64_t old, uint64_t size)
{
    return size > old ? co_write_zeroes(bs, s, old, size - old, 0) : 0;
}

/* ---- shrink (QEMU 7.2's qcow2_co_truncate, offset < old length) ---- */

/*
 * QEMU 7.2's order and messages: the clusters past the new end are dropped
 * as a full discard (freed, the file told); L1 entries past the new L1
 * size are zeroed on disk and their L2 tables freed (the header's L1 size
 * stays, as QEMU leaves it); refcount blocks left counting nothing leave
 * the table; the new size goes in the header last.  *what names the step
 * that failed (QEMU's message); *file_end is where the last cluster still
 * referenced ends, for the caller to cut the file there.
 */
int qcow2_co_shrink(struct bnode *bs, struct qcow2_state *s, uint64_t size, uint64_t *file_end,
                    const char **what)
{
    uint64_t cs = s->cluster_size, old = s->size;
    uint64_t a = (size + cs - 1) & ~(cs - 1);
    uint64_t end = (old + cs - 1) & ~(cs - 1);
    uint64_t l2_cover = s->l2_entries << s->cluster_bits;
    uint64_t new_l1 = (size + l2_cover - 1) / l2_cover;
    struct qrange r;
    int ret = 0;

    if (a < end)
        range_lock(s, &r, a, end - a);
    co_mutex_lock(&s->lock);
    *what = "Failed to discard cropped clusters";
    if (a < end)
        ret = zero_clusters(bs, s, a, end - a, Z_FULL, false);
    if (ret == 0 && new_l1 < s->l1_size) {
        /* the discarded slices reach their tables before the tables go */
        ret = qcow2_flush_metadata(s);
        uint64_t n = s->l1_size - new_l1;
        CLEANUP_FREE uint8_t *z = xzalloc(n * 8);
        if (ret == 0) {
            /* QEMU's qcow2_shrink_l1_table */
            *what = "Failed to reduce the number of L2 tables";
            bnode_debug_event(s->bs->file, BLKDBG_L1_SHRINK_WRITE_TABLE);
            ret = bnode_co_pwrite(s->bs->file, s->l1_offset + new_l1 * 8, n * 8, z, 0);
        }
        if (ret == 0)
            ret = bnode_co_flush(s->bs->file);
        if (ret == 0)
            bnode_debug_event(s->bs->file, BLKDBG_L1_SHRINK_FREE_L2_CLUSTERS);
        for (uint64_t i = s->l1_size; ret == 0 && i-- > new_l1;) {
            pthread_mutex_lock(&s->cache_lock);
            uint64_t l2 = s->l1[i] & QCOW2_L1E_OFFSET_MASK;
            s->l1[i] = 0;
            pthread_mutex_unlock(&s->cache_lock);
            if (!l2)
                continue;
            qcache_drop(s, &s->l2c, l2, cs);
            qcow2_meta_del(s, l2, cs);
            /* Discarded now, as QEMU's qcow2_free_clusters discards it (the
             * L1 entry is gone on disk, so nothing on disk uses the table;
             * the discard's failure is ignored: it is advice).  The cluster
             * itself is freed once the lockless block-status readers that
             * may still hold its old L1 entry have drained: such a reader
             * sees zeros (unallocated), never a reused cluster.  A table
             * a snapshot shares (refcount > 1) stays, as in QEMU. */
            uint64_t ref = 0;
            if (s->discard_passthrough[QFREE_ALWAYS] && s->bs->file->discard &&
                qcow2_get_refcount(s, l2 >> s->cluster_bits, &ref) == 0 && ref == 1)
                bnode_co_pdiscard(s->bs->file, l2, cs);
            qcow2_free_deferred(s, l2, 1, QFREE_ALWAYS);
        }
    }
    if (ret == 0) {
        /* two rounds: the frees queued above are released once drained */
        *what = "Failed to discard unused refblocks";
        ret = qcow2_flush_metadata(s);
        if (ret == 0)
            ret = qcow2_flush_metadata(s);
        if (ret == 0)
            ret = qcow2_shrink_reftable(s);
        if (ret == 0)
            ret = qcow2_flush_metadata(s);
    }
    if (ret == 0) {
        /* QEMU's qcow2_get_last_cluster over the file as it is now */
        *what = "Failed to find the last cluster";
        uint64_t n = qsize_to_clusters(s, s->bs->file->size);
        *file_end = 0;
        for (uint64_t i = n; i-- > 0;) {
            uint64_t ref = 0;
            ret = qcow2_get_refcount(s, i, &ref);
            if (ret < 0)
                break;
            if (ref) {
                *file_end = (i + 1) << s->cluster_bits;
                break;
            }
        }
    }
    if (ret == 0) {
        *what = "Failed to update the image size";
        uint64_t v = htobe64(size);
        ret = bnode_co_pwrite(s->bs->file, offsetof(struct qcow2_header, size), 8, &v, 0);
        if (ret == 0)
            ret = bnode_co_flush(s->bs->file);
        if (ret == 0)
            s->size = size;
    }
    co_mutex_unlock(&s->lock);
    if (a < end)
        range_unlock(s, &r);
    return ret;
}

/* ---- coroutine entry ---- */

static void co_entry(void *opaque)
{
    struct qreq *q = opaque;
    struct breq *r = q->parent;
    struct bnode *bs = q->bs;
    struct qcow2_state *s = q->s;
    uint64_t offset = q->offset;
    int ret;
    qreq_put(q);
    switch (r->op) {
    case BREQ_READ:
        ret = co_read(bs, s, offset, r->len, r->iov, r->iovcnt, 0);
        break;
    case BREQ_WRITE:
        if (s->corrupt)
            ret = -EIO;
        else if (r->flags & BREQ_WRITE_COMPRESSED)
            ret = co_write_compressed(bs, s, offset, r->len, r->iov, r->iovcnt);
        else
            ret = co_write(bs, s, offset, r->len, r->iov, r->iovcnt, r->flags);
        break;
    case BREQ_WRITE_ZEROES:
        ret = s->corrupt ? -EIO : co_write_zeroes(bs, s, offset, r->len, r->flags);
        break;
    case BREQ_DISCARD:
        ret = s->corrupt ? -EIO : co_discard(bs, s, offset, r->len);
        break;
    case BREQ_FLUSH:
        ret = co_flush(s);
        break;
    default:
        ret = 0;
    }
    breq_complete(r, ret);
}

/* ---- fast path ---- */

static void fast_done(struct breq *child, int ret)
{
    struct qreq *q = child->opaque;
    struct breq *parent = q->parent;
    inflight_leave(q->s, q->slot);
    qreq_put(q);
    breq_complete(parent, ret);
}

/* A request forwarded to the image file itself (as raw.c forwards): one
 * request, accounted once with the file node through acct_fwd, its fixed
 * buffer kept; only done and opaque are borrowed until it completes. */
static void fast_fwd_done(struct breq *r, int ret)
{
    struct qreq *q = r->opaque;
    r->done = q->parent_done;
    r->opaque = q->parent_opaque;
    inflight_leave(q->s, q->slot);
    qreq_put(q);
    r->done(r, ret);
}

enum fast_kind { FAST_NONE, FAST_DATA, FAST_ZERO, FAST_BACKING };

static enum fast_kind fast_map(struct qcow2_state *s, struct bnode *bs, struct breq *r,
                               uint64_t offset, uint64_t *host, int *slot)
{
    bool write = r->op == BREQ_WRITE;
    uint64_t l2_cover = s->l2_entries << s->cluster_bits;
    uint64_t l1_i = offset / l2_cover;
    enum fast_kind kind = FAST_NONE;

    if (l1_i >= s->l1_size)
        return FAST_NONE;
    pthread_mutex_lock(&s->cache_lock);
    uint64_t l1e = s->l1[l1_i];
    uint64_t l2_off = l1e & QCOW2_L1E_OFFSET_MASK;
    if (!l2_off) {
        if (!write && offset % l2_cover + r->len <= l2_cover)
            kind = bs->backing ? FAST_BACKING : FAST_ZERO;
        goto out;
    }
    if (write && !(l1e & QCOW2_OFLAG_COPIED))
        goto out;
    uint64_t l2_i = (offset >> s->cluster_bits) & (s->l2_entries - 1);
    uint64_t first = l2_i - l2_i % s->l2_slice_entries;
    int idx = qcache_find(&s->l2c, l2_off + first * s->l2_entry_bytes);
    if (idx < 0)
        goto out;
    qcache_touch(&s->l2c, idx);
    uint64_t i = l2_i - first;
    uint64_t in_cl = qoffset_into_cluster(s, offset);
    if (!write && !s->extl2 && in_cl + r->len <= s->cluster_size) {
        /* the common read: one cluster, a plain data entry */
        uint64_t e = l2_entry(s, qcache_data(&s->l2c, idx), i);
        uint64_t h = e & QCOW2_L2E_OFFSET_MASK;
        if (h && !(e & (QCOW2_OFLAG_COMPRESSED | QCOW2_OFLAG_ZERO)) &&
            !qoffset_into_cluster(s, h)) {
            *host = h + in_cl;
            *slot = inflight_enter_locked(s);
            kind = FAST_DATA;
            goto out;
        }
    }
    uint64_t avail = (s->l2_slice_entries - i) * s->cluster_size - in_cl;
    if (r->len > avail)
        goto out;
    struct qrun run;
    if (scan_run(s, qcache_data(&s->l2c, idx), i, s->l2_slice_entries, offset, r->len,
                 &run) < 0 ||
        run.bytes < r->len)
        goto out;
    switch (run.type) {
    case QT_NORMAL:
        if (write) {
            if (!(run.l2e & QCOW2_OFLAG_COPIED) ||
                qoffset_into_cluster(s, run.l2e & QCOW2_L2E_OFFSET_MASK))
                goto out;
            if ((r->flags & BREQ_FUA) && (s->l2c.ndirty || s->rbc.ndirty || s->data != bs->file))
                goto out;            /* FUA needs the metadata durable too */
            unsigned hit;
            if (qcow2_overlap_check_locked(s, 0, run.host, r->len, &hit) < 0)
                goto out;            /* the slow path reports it */
            /* every cluster of the run has COPIED? scan_run keeps contiguity
             * only; check the flag of each entry */
            const uint8_t *sd = qcache_data(&s->l2c, idx);
            uint64_t last = i + ((qoffset_into_cluster(s, offset) + r->len - 1) >> s->cluster_bits);
            for (uint64_t k = i; k <= last; k++)
                if (!(l2_entry(s, sd, k) & QCOW2_OFLAG_COPIED))
                    goto out;
        } else if (qoffset_into_cluster(s, run.l2e & QCOW2_L2E_OFFSET_MASK)) {
            goto out;
        }
        *host = run.host;
        *slot = inflight_enter_locked(s);
        kind = FAST_DATA;
        break;
    case QT_ZERO:
    case QT_ZERO_ALLOC:
        kind = write ? FAST_NONE : FAST_ZERO;
        break;
    case QT_UNALLOC:
    case QT_UNALLOC_ALLOC:
        kind = write ? FAST_NONE : bs->backing ? FAST_BACKING : FAST_ZERO;
        break;
    default:
        break;
    }
out:
    pthread_mutex_unlock(&s->cache_lock);
    return kind;
}

static bool try_fast(struct bnode *bs, struct qcow2_state *s, struct breq *r, uint64_t offset)
{
    if (r->op != BREQ_READ &&
        (r->op != BREQ_WRITE || s->corrupt || (r->flags & BREQ_WRITE_COMPRESSED)))
        return false;
    uint64_t host = 0;
    int slot = 0;
    switch (fast_map(s, bs, r, offset, &host, &slot)) {
    case FAST_NONE:
        return false;
    case FAST_ZERO:
        iov_memset(r->iov, r->iovcnt, 0, 0, r->len);
        breq_complete(r, 0);
        return true;
    case FAST_BACKING: {
        struct bnode *b = bs->backing;
        uint64_t a = b->request_alignment;
        if (offset + r->len > __atomic_load_n(&b->size, __ATOMIC_RELAXED) ||
            (a > 1 && ((offset | r->len) & (a - 1))))
            return false;
        bnode_debug_event(bs->file, BLKDBG_READ_BACKING_AIO);
        bnode_submit_child(b, r, offset);
        return true;
    }
    case FAST_DATA: {
        struct qreq *q = qreq_get();
        q->s = s;
        q->slot = slot;
        bnode_debug_event(bs->file, r->op == BREQ_READ ? BLKDBG_READ_AIO : BLKDBG_WRITE_AIO);
        if (s->data == bs->file) {
            q->parent_done = r->done;
            q->parent_opaque = r->opaque;
            r->done = fast_fwd_done;
            r->opaque = q;
            bnode_submit_child(s->data, r, host);
            return true;
        }
        q->parent = r;
        q->child = (struct breq){
            .op = r->op, .flags = (r->flags & (BREQ_FUA | BREQ_COPY_INLINE)) | BREQ_BEYOND_EOF,
            .offset = host, .len = r->len, .iov = r->iov, .iovcnt = r->iovcnt,
            .loop = r->loop, .done = fast_done, .opaque = q,
        };
        bnode_submit(s->data, &q->child);
        return true;
    }
    }
    return false;
}

void qcow2_submit(struct bnode *bs, struct breq *r, uint64_t offset)
{
    struct qcow2_state *s = bs->opaque;
    if (try_fast(bs, s, r, offset))
        return;
    if (r->op == BREQ_CACHE) {
        breq_complete(r, 0);
        return;
    }
    struct qreq *q = qreq_get();
    q->parent = r;
    q->bs = bs;
    q->s = s;
    q->offset = offset;
    co_enter(co_create(co_entry, q));
}

/* ---- synchronous helpers (control paths, block status misses) ---- */

struct sync_run {
    struct qcow2_state *s;
    int (*fn)(struct qcow2_state *, void *);
    void *opaque;
    int ret;
    struct loop *loop;
};

static void sync_body(void *opaque)
{
    struct sync_run *sr = opaque;
    sr->ret = sr->fn(sr->s, sr->opaque);
    loop_stop(sr->loop);
}

static void sync_start(void *opaque)
{
    co_enter(co_create(sync_body, opaque));
}

static void *sync_thread(void *opaque)
{
    struct sync_run *sr = opaque;
    loop_call(sr->loop, sync_start, sr);
    loop_run(sr->loop);
    co_pool_drain();
    qreq_pool_drain();
    return NULL;
}

static int run_sync(struct qcow2_state *s, int (*fn)(struct qcow2_state *, void *),
                    void *opaque)
{
    struct sync_run sr = { .s = s, .fn = fn, .opaque = opaque, .loop = loop_new("qcow2") };
    pthread_t t;
    if (pthread_create(&t, NULL, sync_thread, &sr) != 0) {
        loop_free(sr.loop);
        return -EAGAIN;
    }
    pthread_join(t, NULL);
    loop_free(sr.loop);
    return sr.ret;
}

int qcow2_run_sync(struct qcow2_state *s, int (*fn)(struct qcow2_state *, void *), void *opaque)
{
    if (co_waits_in_main())
        return fn(s, opaque);       /* a command's coroutine: wait here, the loop goes on */
    if (qcow2_run_sync_busy(s))
        return -EBUSY;
    return run_sync(s, fn, opaque);
}

/* The main thread stops the main loop while the helper works: if a
 * coroutine of the main loop holds the image's lock or waits for it (a
 * job's read, an export without iothread), the helper would wait for it
 * for ever.  qcow2_run_sync refuses then rather than hang. */
bool qcow2_run_sync_busy(struct qcow2_state *s)
{
    return !co_waits_in_main() && loop_in_thread(loop_main()) &&
           co_mutex_involves_loop(&s->lock, loop_main());
}

/* ---- block status ----
 *
 * Block status runs on the caller's loop, outside any coroutine, and never
 * takes s->lock: a coroutine of this very loop may hold it while it waits
 * for I/O that only this loop completes.  A cached slice answers under
 * cache_lock.  A slice not cached is read, not cached: at once from the
 * page cache where the file allows it (bnode_pread_sync), otherwise in one
 * helper-thread run for the whole batch.  A batch is up to BS_BATCH slices
 * from the asked offset and answers with one run across them while their
 * entries have one type, so mapping an image of 512-byte clusters (an L2
 * table per 32 KiB) costs a small read per table and, on O_DIRECT, a
 * thread per 64 tables, not a thread per table.
 */

#define BS_BATCH 64
#define BS_BATCH_BYTES (256u << 10)

struct bs_seg {
    uint64_t guest;             /* guest offset of the first byte asked */
    uint64_t cover;             /* guest bytes this segment answers for */
    uint64_t l2_off;            /* its L2 table; 0 = none (unallocated) */
    uint64_t src;               /* host offset of the entries in buf */
    uint64_t nent;              /* entries in buf */
    uint8_t *buf;
    bool need_read;             /* buf is to be read from the file */
    int ret;                    /* reading it failed */
};

struct bs_batch {
    struct bs_seg seg[BS_BATCH];
    int n;
};

static int read_batch_sync(struct qcow2_state *s, void *opaque)
{
    struct bs_batch *b = opaque;
    for (int k = 0; k < b->n; k++) {
        struct bs_seg *g = &b->seg[k];
        if (g->need_read)
            g->ret = bnode_co_pread(s->bs->file, g->src, g->nent * s->l2_entry_bytes, g->buf,
                                    BREQ_BEYOND_EOF);
        g->need_read = false;
    }
    return 0;
}

/* The segments from offset (cache_lock held); entries of cached slices
 * are copied, the others are to be read. */
static void plan_batch(struct qcow2_state *s, uint64_t offset, uint64_t bytes,
                       struct bs_batch *b)
{
    uint64_t l2_cover = s->l2_entries << s->cluster_bits;
    uint64_t end = offset + bytes, budget = BS_BATCH_BYTES;

    b->n = 0;
    while (offset < end && b->n < BS_BATCH) {
        struct bs_seg *g = &b->seg[b->n];
        uint64_t l1_i = offset / l2_cover;
        uint64_t l2_off = l1_i < s->l1_size ? s->l1[l1_i] & QCOW2_L1E_OFFSET_MASK : 0;
        *g = (struct bs_seg){ .guest = offset, .l2_off = l2_off };
        if (!l2_off) {
            g->cover = MIN(end - offset, l2_cover - offset % l2_cover);
        } else {
            if (qoffset_into_cluster(s, l2_off))
                break;          /* the caller reports it when it gets there */
            uint64_t l2_i = (offset >> s->cluster_bits) & (s->l2_entries - 1);
            uint64_t first = l2_i - l2_i % s->l2_slice_entries;
            uint64_t in_cl = qoffset_into_cluster(s, offset);
            g->cover = MIN(end - offset,
                           (s->l2_slice_entries - (l2_i - first)) * s->cluster_size - in_cl);
            g->nent = (in_cl + g->cover + s->cluster_size - 1) >> s->cluster_bits;
            uint64_t len = g->nent * s->l2_entry_bytes;
            if (b->n > 0 && len > budget)
                break;
            budget -= MIN(budget, len);
            g->src = l2_off + l2_i * s->l2_entry_bytes;
            g->buf = xmalloc(len);
            int idx = qcache_find(&s->l2c, l2_off + first * s->l2_entry_bytes);
            if (idx >= 0)
                memcpy(g->buf, qcache_data(&s->l2c, idx) + (l2_i - first) * s->l2_entry_bytes,
                       len);
            else
                g->need_read = true;
        }
        offset += g->cover;
        b->n++;
    }
}

/* One run of the segment g, or false if it cannot say. */
static bool seg_run(struct qcow2_state *s, const struct bs_seg *g, bool contig,
                    struct qrun *run)
{
    if (!g->l2_off) {
        *run = (struct qrun){ .type = QT_UNALLOC, .bytes = g->cover };
        return true;
    }
    if (g->ret < 0 || g->need_read ||
        scan_run_any(s, g->buf, 0, g->nent, g->guest, g->cover, run, contig) < 0)
        return false;
    return true;
}

static int batch_status(struct bnode *bs, struct qcow2_state *s, uint64_t offset,
                        uint64_t bytes, bool contig, struct qrun *run)
{
    struct bs_batch *b = xmalloc(sizeof(*b));
    int ret = 0;

    pthread_mutex_lock(&s->cache_lock);
    plan_batch(s, offset, bytes, b);
    pthread_mutex_unlock(&s->cache_lock);
    bool helper = false;
    for (int k = 0; k < b->n; k++) {
        struct bs_seg *g = &b->seg[k];
        if (!g->need_read || helper)
            continue;
        int r = bnode_pread_sync(bs->file, g->src, g->nent * s->l2_entry_bytes, g->buf);
        if (r == 0)
            g->need_read = false;
        else
            helper = true;      /* the rest in one run of a helper thread */
    }
    if (helper)
        ret = run_sync(s, read_batch_sync, b);     /* takes no s->lock */
    if (ret == 0 && b->seg[0].ret < 0)
        ret = b->seg[0].ret;
    if (ret == 0 && !seg_run(s, &b->seg[0], contig, run))
        run->type = QT_INVALID;
    if (ret == 0 && run->type != QT_INVALID) {
        /* one type on: the segments after it extend the run */
        uint64_t reach = b->seg[0].cover;
        for (int k = 1; k < b->n && run->bytes == reach && run->type != QT_COMPRESSED; k++) {
            struct qrun next;
            if (!seg_run(s, &b->seg[k], contig, &next) || next.type != run->type ||
                (contig && type_has_host(run->type) && next.host != run->host + run->bytes))
                break;
            run->bytes += next.bytes;
            reach += b->seg[k].cover;
        }
    }
    for (int k = 0; k < b->n; k++)
        free(b->seg[k].buf);
    free(b);
    return ret;
}

int qcow2_block_status(struct bnode *bs, uint64_t offset, uint64_t bytes,
                       uint64_t *pnum, unsigned *flags)
{
    struct qcow2_state *s = bs->opaque;
    uint64_t l2_cover = s->l2_entries << s->cluster_bits;
    uint64_t l1_i = offset / l2_cover;
    struct qrun run = { .type = QT_UNALLOC, .bytes = MIN(bytes, l2_cover - offset % l2_cover) };
    /* preallocated metadata: a data run is also looked up in the file */
    bool contig = s->metadata_preallocation;

    pthread_mutex_lock(&s->cache_lock);
    uint64_t l2_off = l1_i < s->l1_size ? s->l1[l1_i] & QCOW2_L1E_OFFSET_MASK : 0;
    bool found = !l2_off;
    if (l2_off) {
        uint64_t l2_i = (offset >> s->cluster_bits) & (s->l2_entries - 1);
        uint64_t first = l2_i - l2_i % s->l2_slice_entries;
        int idx = qcache_find(&s->l2c, l2_off + first * s->l2_entry_bytes);
        if (idx >= 0) {
            qcache_touch(&s->l2c, idx);
            uint64_t avail = (s->l2_slice_entries - (l2_i - first)) * s->cluster_size -
                             qoffset_into_cluster(s, offset);
            if (scan_run_any(s, qcache_data(&s->l2c, idx), l2_i - first, s->l2_slice_entries,
                             offset, MIN(bytes, avail), &run, contig) < 0)
                run.type = QT_INVALID;
            found = true;
        }
    }
    pthread_mutex_unlock(&s->cache_lock);
    if (!found) {
        if (qoffset_into_cluster(s, l2_off))
            return -EIO;
        int ret = batch_status(bs, s, offset, bytes, contig, &run);
        if (ret < 0)
            return ret;
    }
    switch (run.type) {
    case QT_NORMAL:
        *flags = BS_DATA | BS_ALLOCATED;
        if (s->metadata_preallocation) {
            /* preallocated clusters may be holes in the file: say so */
            uint64_t fsize = __atomic_load_n(&s->data->size, __ATOMIC_RELAXED);
            uint64_t fp;
            unsigned ff;
            int fd;
            if (run.host >= fsize) {
                *flags |= BS_ZERO;
            } else if (bnode_block_status(s->data, run.host, run.bytes, &fp, &ff, &fd) == 0 &&
                       fp) {
                run.bytes = MIN(run.bytes, fp);
                if (ff & BS_ZERO)
                    *flags |= BS_ZERO;
            }
        }
        break;
    case QT_COMPRESSED:
        *flags = BS_DATA | BS_ALLOCATED;
        break;
    case QT_ZERO:
    case QT_ZERO_ALLOC:
        *flags = BS_ZERO | BS_ALLOCATED;
        break;
    case QT_UNALLOC:
    case QT_UNALLOC_ALLOC:
        *flags = bs->backing ? 0 : BS_ZERO;
        break;
    default:
        return -EIO;
    }
    *pnum = run.bytes;
    return 0;
}
