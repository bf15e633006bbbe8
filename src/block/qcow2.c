/*
 * Driver "qcow2": open, options, header, backing chain, queries, resize.
 *
 * Theory of operation.  Opening reads and checks the header, its
 * extensions, the L1 and refcount tables (bounded as QEMU bounds them:
 * 32 MiB of L1, 8 MiB of refcount table, 64k snapshots) in a coroutine on a
 * helper thread (qcow2_run_sync), so the main loop needs no special case.
 * The metadata overlap set (what the overlap-check option protects) is
 * built from the same tables: L2 tables from the L1, refcount blocks from
 * the refcount table, snapshot tables and their L1s.  Then the backing
 * chain the header names is opened (or the node given by `backing`), and
 * the caches are sized from the options with QEMU's defaults.
 *
 * Requests and block status are in qcow2-io.c; metadata in qcow2-meta.c.
 */
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include "block/qcow2-int.h"
#include "qmp/qmp.h"
#include "util/opts.h"
#include "util/xalloc.h"
#include "util/cleanup.h"
#include "util/log.h"
#include "util/loop.h"

#define DEFAULT_L2_CACHE_MAX_SIZE (32u << 20)
#define MIN_L2_CACHE_SIZE 2            /* entries */
#define MIN_REFCOUNT_CACHE_SIZE 4      /* clusters */
#define MAX_BACKING_DEPTH 256

struct bnode *bnode_open_ref(json_t *ref, bool parent_ro, error **errp);

/* ---- header ---- */

struct open_ctx {
    struct qcow2_header h;
    error **errp;
    uint8_t *cluster0;
};

static int read_all(struct qcow2_state *s, uint64_t off, uint64_t len, void *buf)
{
    return bnode_co_pread(s->bs->file, off, len, buf, BREQ_BEYOND_EOF);
}

static int read_extensions(struct qcow2_state *s, struct open_ctx *c, uint64_t start,
                           uint64_t end)
{
    uint64_t off = start;
    while (off + 8 <= end) {
        struct qcow2_ext_header eh;
        memcpy(&eh, c->cluster0 + off, 8);
        uint32_t type = be32toh(eh.type), len = be32toh(eh.len);
        off += 8;
        if (len > end - off) {          /* QEMU checks the end marker's length too */
            error_setg(c->errp, "Header extension too large");
            return -EINVAL;
        }
        if (type == QCOW2_EXT_END)
            break;
        const uint8_t *d = c->cluster0 + off;
        switch (type) {
        case QCOW2_EXT_BACKING_FMT:
            if (len >= 16) {
                error_setg(c->errp, "ERROR: ext_backing_format: len=%" PRIu32
                           " too large (>=16)", len);
                return -EINVAL;
            }
            free(s->backing_fmt);
            s->backing_fmt = xstrndup((const char *)d, len);
            break;
        case QCOW2_EXT_BITMAPS: {
            struct qcow2_bitmaps_ext b;
            if (len != sizeof(b)) {
                error_setg(c->errp, "bitmaps_ext: Invalid extension length");
                return -EINVAL;
            }
            memcpy(&b, d, sizeof(b));
            if (s->autoclear & QCOW2_AUTOCLEAR_BITMAPS) {
                /* QEMU's checks and words */
                s->nb_bitmaps = be32toh(b.nb_bitmaps);
                s->bitmap_dir_size = be64toh(b.bitmap_directory_size);
                s->bitmap_dir_offset = be64toh(b.bitmap_directory_offset);
                if (b.reserved) {
                    error_setg(c->errp, "bitmaps_ext: Reserved field is not zero");
                    return -EINVAL;
                }
                if (s->nb_bitmaps > 65535) {
                    error_setg(c->errp, "bitmaps_ext: Image has %" PRIu32 " bitmaps, exceeding "
                               "the QEMU supported maximum of %d", s->nb_bitmaps, 65535);
                    return -EINVAL;
                }
                if (s->nb_bitmaps == 0) {
                    error_setg(c->errp, "bitmaps_ext: found bitmaps extension with zero bitmaps");
                    return -EINVAL;
                }
                if (s->bitmap_dir_size > 1024ull * 65535) {
                    error_setg(c->errp, "bitmaps_ext: bitmap directory size (%" PRIu64 ") exceeds "
                               "the maximum supported size (%d)", s->bitmap_dir_size,
                               1024 * 65535);
                    return -EINVAL;
                }
                if (qoffset_into_cluster(s, s->bitmap_dir_offset)) {
                    error_setg(c->errp, "bitmaps_ext: invalid dir offset");
                    return -EINVAL;
                }
            }
            break;
        }
        case QCOW2_EXT_DATA_FILE:
            free(s->data_file_name);
            s->data_file_name = xstrndup((const char *)d, len);
            break;
        default:
            break;              /* unknown extensions are kept as they are */
        }
        off += (len + 7) & ~7ull;
    }
    s->unknown_ext_end = off;
    return 0;
}

/* "Unsupported qcow2 feature(s): name, ..." from the feature name table. */
static void report_unsupported(struct qcow2_state *s, struct open_ctx *c, uint64_t mask,
                               uint64_t ext_start, uint64_t ext_end)
{
    char buf[512] = "";
    size_t n = 0;
    uint64_t off = ext_start;
    while (off + 8 <= ext_end) {
        struct qcow2_ext_header eh;
        memcpy(&eh, c->cluster0 + off, 8);
        uint32_t type = be32toh(eh.type), len = be32toh(eh.len);
        off += 8;
        if (type == QCOW2_EXT_END || len > ext_end - off)
            break;
        if (type == QCOW2_EXT_FEATURE_TABLE) {
            for (uint32_t k = 0; k + sizeof(struct qcow2_feature_name) <= len;
                 k += sizeof(struct qcow2_feature_name)) {
                const struct qcow2_feature_name *f = (const void *)(c->cluster0 + off + k);
                if (f->type == QCOW2_FEAT_TYPE_INCOMPAT && f->bit < 64 &&
                    (mask & (1ull << f->bit))) {
                    n += snprintf(buf + n, sizeof(buf) - MIN(n, sizeof(buf)), "%s%.46s",
                                  n ? ", " : "", f->name);
                    mask &= ~(1ull << f->bit);
                }
            }
        }
        off += (len + 7) & ~7ull;
    }
    if (mask && n < sizeof(buf))
        snprintf(buf + n, sizeof(buf) - n, "%sUnknown incompatible feature: %" PRIx64,
                 n ? ", " : "", mask);
    error_setg(c->errp, "Unsupported qcow2 feature(s): %s", buf);
}

/* QEMU's test for preallocation=metadata: many more clusters have a
 * reference than the file has blocks.  Block status then asks the file
 * whether a data cluster is a hole. */
static int detect_metadata_preallocation(struct qcow2_state *s)
{
    int64_t allocated = bnode_leaf_allocated(s->bs->file);
    if (allocated < 0)
        return 0;
    uint64_t real = (uint64_t)allocated / s->cluster_size;
    uint64_t threshold = MAX(real * 10 / 9, real + 2);
    uint64_t end = qsize_to_clusters(s, s->bs->file->size), count = 0;
    CLEANUP_FREE uint8_t *blk = xmalloc(s->cluster_size);
    for (uint64_t rt = 0; rt < s->reftable_size && (rt << s->rb_bits) < end &&
                          count < threshold; rt++) {
        uint64_t off = s->reftable[rt] & QCOW2_REFT_OFFSET_MASK;
        if (!off || qoffset_into_cluster(s, off))
            continue;
        int ret = read_all(s, off, s->cluster_size, blk);
        if (ret < 0)
            return ret;
        for (uint64_t i = 0; i < s->rb_entries && (rt << s->rb_bits) + i < end; i++)
            count += qcow2_refcount_get(blk, s->refcount_order, i) != 0;
    }
    s->metadata_preallocation = count >= threshold;
    return 0;
}

static int do_open(struct qcow2_state *s, void *opaque)
{
    struct open_ctx *c = opaque;
    struct qcow2_header *h = &c->h;
    struct bnode *bs = s->bs;
    int ret = read_all(s, 0, sizeof(*h), h);
    if (ret < 0) {
        error_setg_errno(c->errp, -ret, "Could not read qcow2 header");
        return ret;
    }
    if (be32toh(h->magic) != QCOW2_MAGIC) {
        error_setg(c->errp, "Image is not in qcow2 format");
        return -EINVAL;
    }
    s->version = be32toh(h->version);
    if (s->version < 2 || s->version > 3) {
        error_setg(c->errp, "Unsupported qcow2 version %" PRIu32, s->version);
        return -ENOTSUP;
    }
    s->cluster_bits = be32toh(h->cluster_bits);
    if (s->cluster_bits < QCOW2_MIN_CLUSTER_BITS || s->cluster_bits > QCOW2_MAX_CLUSTER_BITS) {
        error_setg(c->errp, "Unsupported cluster size: 2^%" PRIu32, s->cluster_bits);
        return -EINVAL;
    }
    s->cluster_size = 1ull << s->cluster_bits;
    if (s->version == 2) {
        s->header_length = QCOW2_V2_HEADER_LEN;
        s->refcount_order = 4;
    } else {
        s->incompat = be64toh(h->incompatible_features);
        s->compat = be64toh(h->compatible_features);
        s->autoclear = be64toh(h->autoclear_features);
        s->refcount_order = be32toh(h->refcount_order);
        s->header_length = be32toh(h->header_length);
        if (s->header_length < QCOW2_V3_HEADER_LEN) {
            error_setg(c->errp, "qcow2 header too short");
            return -EINVAL;
        }
        if (s->header_length > s->cluster_size) {
            error_setg(c->errp, "qcow2 header exceeds cluster size");
            return -EINVAL;
        }
        s->compression_type = s->header_length > 104 ? h->compression_type : 0;
    }
    c->cluster0 = xcalloc(1, s->cluster_size);
    ret = read_all(s, 0, s->cluster_size, c->cluster0);
    if (ret < 0) {
        error_setg_errno(c->errp, -ret, "Could not read qcow2 header");
        return ret;
    }
    uint64_t backing_off = be64toh(h->backing_file_offset);
    uint64_t ext_end = backing_off && backing_off < s->cluster_size ? backing_off
                                                                    : s->cluster_size;
    if (s->incompat & ~QCOW2_INCOMPAT_MASK) {
        report_unsupported(s, c, s->incompat & ~QCOW2_INCOMPAT_MASK, s->header_length, ext_end);
        return -ENOTSUP;
    }
    if ((s->incompat & QCOW2_INCOMPAT_CORRUPT) && !bs->read_only) {
        error_setg(c->errp, "qcow2: Image is corrupt; cannot be opened read/write");
        return -EACCES;
    }
    s->corrupt = s->incompat & QCOW2_INCOMPAT_CORRUPT;
    if (s->refcount_order > QCOW2_MAX_REFCOUNT_ORDER) {
        error_setg(c->errp, "Reference count entry width too large; may not exceed 64 bits");
        return -EINVAL;
    }
    s->extl2 = s->incompat & QCOW2_INCOMPAT_EXTL2;
    if (s->extl2 && s->cluster_bits < QCOW2_MIN_CLUSTER_BITS_EXTL2) {
        error_setg(c->errp, "The cluster size must be at least 16 KiB with extended L2 entries");
        return -EINVAL;
    }
    if (s->compression_type > QCOW2_COMPRESSION_ZSTD) {
        error_setg(c->errp, "qcow2: unknown compression type: %u", s->compression_type);
        return -ENOTSUP;
    }
    if (!s->compression_type != !(s->incompat & QCOW2_INCOMPAT_COMPRESSION)) {
        error_setg(c->errp, "qcow2: Compression type incompatible feature bit must %sbe set",
                   s->compression_type ? "" : "not ");
        return -EINVAL;
    }
    uint32_t crypt = be32toh(h->crypt_method);
    if (crypt != QCOW2_CRYPT_NONE) {
        error_setg(c->errp, "Encrypted qcow2 images (%s) are not supported",
                   crypt == QCOW2_CRYPT_LUKS ? "luks" : crypt == QCOW2_CRYPT_AES ? "aes" : "?");
        return -ENOTSUP;
    }
    ret = read_extensions(s, c, s->version == 2 ? QCOW2_V2_HEADER_LEN : s->header_length,
                          ext_end);
    if (ret < 0)
        return ret;

    s->size = be64toh(h->size);
    s->l2_entry_bytes = s->extl2 ? 16 : 8;
    s->l2_entries = s->cluster_size / s->l2_entry_bytes;
    s->l2_bits = __builtin_ctzll(s->l2_entries);
    s->subcluster_size = s->extl2 ? s->cluster_size / QCOW2_SUBCLUSTERS : s->cluster_size;
    s->csize_shift = qcow2_csize_shift(s->cluster_bits);
    s->csize_mask = qcow2_csize_mask(s->cluster_bits);
    s->coffset_mask = qcow2_coffset_mask(s->cluster_bits);
    s->rb_bits = s->cluster_bits + 3 - s->refcount_order;
    s->rb_entries = 1ull << s->rb_bits;
    s->refcount_max = s->refcount_order == 6 ? UINT64_MAX : (1ull << (1u << s->refcount_order)) - 1;
    s->lazy_refcounts = s->compat & QCOW2_COMPAT_LAZY_REFCOUNTS;

    /* backing file name */
    if (backing_off) {
        uint32_t len = be32toh(h->backing_file_size);
        if (len > QCOW2_MAX_BACKING_NAME || backing_off > s->cluster_size ||
            len > s->cluster_size - backing_off) {
            error_setg(c->errp, "Backing file name too long");
            return -EINVAL;
        }
        s->backing_file = xstrndup((const char *)c->cluster0 + backing_off, len);
    }

    /* L1 */
    s->l1_size = be32toh(h->l1_size);
    s->l1_offset = be64toh(h->l1_table_offset);
    if (s->l1_size > QCOW2_MAX_L1_SIZE / 8) {
        error_setg(c->errp, "Active L1 table too large");
        return -EFBIG;
    }
    uint64_t l2_cover = s->l2_entries << s->cluster_bits;
    uint64_t need = (s->size + l2_cover - 1) / l2_cover;
    if (s->size > (UINT64_MAX >> 1) || s->l1_size < need) {
        error_setg(c->errp, "L1 table is too small");
        return -EINVAL;
    }
    if (s->l1_size && (!s->l1_offset || qoffset_into_cluster(s, s->l1_offset))) {
        error_setg(c->errp, "Active L1 table offset invalid");
        return -EINVAL;
    }
    s->l1 = xcalloc(s->l1_size ? s->l1_size : 1, 8);
    if (s->l1_size) {
        ret = read_all(s, s->l1_offset, s->l1_size * 8ull, s->l1);
        if (ret < 0) {
            error_setg_errno(c->errp, -ret, "Could not read L1 table");
            return ret;
        }
        for (uint32_t i = 0; i < s->l1_size; i++)
            s->l1[i] = be64toh(s->l1[i]);
    }

    /* refcount table */
    s->reftable_offset = be64toh(h->refcount_table_offset);
    s->reftable_clusters = be32toh(h->refcount_table_clusters);
    if ((uint64_t)s->reftable_clusters << s->cluster_bits > QCOW2_MAX_REFTABLE_SIZE) {
        error_setg(c->errp, "Reference count table too large");
        return -EINVAL;
    }
    if (!s->reftable_clusters) {
        error_setg(c->errp, "Image does not contain a reference count table");
        return -EINVAL;
    }
    if (qoffset_into_cluster(s, s->reftable_offset) || !s->reftable_offset) {
        error_setg(c->errp, "Reference count table offset invalid");
        return -EINVAL;
    }
    s->reftable_size = ((uint64_t)s->reftable_clusters << s->cluster_bits) / 8;
    s->reftable = xcalloc(s->reftable_size, 8);
    bnode_debug_event(s->bs->file, BLKDBG_REFTABLE_LOAD);       /* qcow2_refcount_init */
    ret = read_all(s, s->reftable_offset, s->reftable_size * 8, s->reftable);
    if (ret < 0) {
        error_setg_errno(c->errp, -ret, "Could not read the refcount table");
        return ret;
    }
    for (uint64_t i = 0; i < s->reftable_size; i++)
        s->reftable[i] = be64toh(s->reftable[i]);

    /* snapshots */
    s->nb_snapshots = be32toh(h->nb_snapshots);
    s->snapshots_offset = be64toh(h->snapshots_offset);
    ret = qcow2_read_snapshots(s, c->errp);
    if (ret < 0)
        return ret;

    /* metadata the overlap check protects */
    uint64_t hdr_clusters = 1;
    qcow2_meta_add_kind(s, 0, hdr_clusters << s->cluster_bits, QOL_MAIN_HEADER);
    qcow2_meta_add_kind(s, s->l1_offset, s->l1_size * 8ull, QOL_ACTIVE_L1);
    qcow2_meta_add_kind(s, s->reftable_offset, s->reftable_size * 8, QOL_REFCOUNT_TABLE);
    for (uint32_t i = 0; i < s->l1_size; i++) {
        uint64_t o = s->l1[i] & QCOW2_L1E_OFFSET_MASK;
        if (o)
            qcow2_meta_add_kind(s, o, s->cluster_size, QOL_ACTIVE_L2);
    }
    for (uint64_t i = 0; i < s->reftable_size; i++) {
        uint64_t o = s->reftable[i] & QCOW2_REFT_OFFSET_MASK;
        if (o)
            qcow2_meta_add_kind(s, o, s->cluster_size, QOL_REFCOUNT_BLOCK);
    }
    if (s->nb_snapshots)
        qcow2_meta_add_kind(s, s->snapshots_offset, s->snapshots_size, QOL_SNAPSHOT_TABLE);
    for (uint32_t i = 0; i < s->nb_snapshots; i++)
        qcow2_meta_add_kind(s, s->snapshots[i].l1_table_offset,
                            s->snapshots[i].l1_size * 8ull, QOL_INACTIVE_L1);
    if (s->bitmap_dir_size)
        qcow2_meta_add_kind(s, s->bitmap_dir_offset, s->bitmap_dir_size, QOL_BITMAP_DIRECTORY);

    ret = detect_metadata_preallocation(s);
    if (ret < 0) {
        error_setg_errno(c->errp, -ret, "Could not read refcount block");
        return ret;
    }
    /* the allocator starts looking after what the file holds */
    s->alloc_end = qsize_to_clusters(s, bs->file->size);
    return 0;
}

/* overlap-check with inactive-l2 (the "all" template): the L2 tables of
 * the snapshots join the overlap set.  QEMU reads every snapshot's L1 on
 * each check; here they join once: a new snapshot's L2 tables are the
 * active ones, already in the set (a table copied on write stays in it),
 * and those a deleted snapshot frees leave it (qcow2-snapshot.c). */
static int load_inactive_l2(struct qcow2_state *s, void *opaque)
{
    for (uint32_t i = 0; i < s->nb_snapshots; i++) {
        struct qsnapshot *sn = &s->snapshots[i];
        if (!sn->l1_size)
            continue;
        CLEANUP_FREE uint64_t *l1 = xcalloc(sn->l1_size, 8);
        int ret = read_all(s, sn->l1_table_offset, sn->l1_size * 8ull, l1);
        if (ret < 0)
            return ret;
        for (uint32_t k = 0; k < sn->l1_size; k++) {
            uint64_t o = be64toh(l1[k]) & QCOW2_L1E_OFFSET_MASK;
            if (o && !qoffset_into_cluster(s, o))
                qcow2_meta_add_kind(s, o, s->cluster_size, QOL_INACTIVE_L2);
        }
    }
    return 0;
}

/* On a read-write open: autoclear bits we do not maintain are cleared, as
 * the format asks of writers.  The bitmaps bit stays: qcow2-bitmap.c keeps
 * the bitmaps (marked in use now, stored at close). */
static int prepare_write(struct qcow2_state *s, void *opaque)
{
    int ret = qcow2_trim_stale_tail(s);
    if (ret < 0)
        return ret;
    s->alloc_end = qsize_to_clusters(s, s->bs->file->size);
    if (s->version < 3)
        return 0;
    uint64_t keep = s->autoclear & (QCOW2_AUTOCLEAR_DATA_FILE_RAW | QCOW2_AUTOCLEAR_BITMAPS);
    if (keep == s->autoclear)
        return 0;
    uint64_t v = htobe64(keep);
    ret = bnode_co_pwrite(s->bs->file, offsetof(struct qcow2_header, autoclear_features),
                          8, &v, 0);
    if (ret == 0)
        ret = bnode_co_flush(s->bs->file);
    if (ret == 0)
        s->autoclear = keep;
    return ret;
}

/* The dirty bit: refcounts may be stale (lazy refcounts and a crash).
 * As QEMU, repair before writing: every refcount is recounted. */
static int repair(struct qcow2_state *s, void *opaque)
{
    log_info("qcow2: node '%s': the image was not closed cleanly; repairing refcounts",
             s->bs->node_name);
    return qcow2_rebuild_refcounts(s);
}

/* ---- rewriting the header ---- */

int qcow2_co_rewrite_header(struct qcow2_state *s, const struct qcow2_header_edit *e)
{
    uint64_t cs = s->cluster_size;
    CLEANUP_FREE uint8_t *old = xmalloc(cs);
    CLEANUP_FREE uint8_t *buf = xzalloc(cs);
    int ret = bnode_co_pread(s->bs->file, 0, cs, old, BREQ_BEYOND_EOF);
    if (ret < 0)
        return ret;
    struct qcow2_header h;
    memcpy(&h, old, sizeof(h));
    uint64_t hlen = s->header_length;
    uint64_t boff = be64toh(h.backing_file_offset);
    uint32_t blen = be32toh(h.backing_file_size);
    uint64_t ext_end = boff && boff < cs ? boff : cs;
    const char *bname = NULL;
    size_t bname_len = 0;
    memcpy(buf, old, hlen);
    uint64_t out = hlen;

    if (e->bitmaps && e->nb_bitmaps) {
        struct qcow2_ext_header eh = { htobe32(QCOW2_EXT_BITMAPS), htobe32(24) };
        struct qcow2_bitmaps_ext b = { htobe32(e->nb_bitmaps), 0, htobe64(e->dir_size),
                                       htobe64(e->dir_offset) };
        memcpy(buf + out, &eh, 8);
        memcpy(buf + out + 8, &b, sizeof(b));
        out += 8 + sizeof(b);
    }
    if (e->backing && e->backing_file && e->backing_fmt) {
        uint32_t n = (uint32_t)strlen(e->backing_fmt);
        struct qcow2_ext_header eh = { htobe32(QCOW2_EXT_BACKING_FMT), htobe32(n) };
        if (out + 8 + ((n + 7) & ~7u) > cs)
            return -ENOSPC;
        memcpy(buf + out, &eh, 8);
        memcpy(buf + out + 8, e->backing_fmt, n);
        out += 8 + ((n + 7) & ~7u);
    }
    for (uint64_t off = hlen; off + 8 <= ext_end;) {
        struct qcow2_ext_header eh;
        memcpy(&eh, old + off, 8);
        uint32_t type = be32toh(eh.type), len = be32toh(eh.len);
        if (type == QCOW2_EXT_END)
            break;
        uint64_t whole = 8 + (((uint64_t)len + 7) & ~7ull);
        if (whole > ext_end - off)
            return -EINVAL;
        bool edited = (e->bitmaps && type == QCOW2_EXT_BITMAPS) ||
                      (e->backing && type == QCOW2_EXT_BACKING_FMT);
        if (!edited) {
            if (out + whole > cs)
                return -ENOSPC;
            memcpy(buf + out, old + off, whole);
            out += whole;
        }
        off += whole;
    }
    out += 8;                                   /* the end marker: zeros */
    if (e->backing) {
        bname = e->backing_file;
        bname_len = bname ? strlen(bname) : 0;
    } else if (boff) {
        if (boff + blen > cs)
            return -EINVAL;
        bname = (const char *)old + boff;
        bname_len = blen;
    }
    if (bname) {
        if (out + bname_len > cs)
            return -ENOSPC;
        memmove(buf + out, bname, bname_len);
        h.backing_file_offset = htobe64(out);
        h.backing_file_size = htobe32((uint32_t)bname_len);
    } else {
        h.backing_file_offset = 0;
        h.backing_file_size = 0;
    }
    if (e->bitmaps)
        h.autoclear_features = htobe64(e->autoclear);
    memcpy(buf, &h, MIN(sizeof(h), hlen));
    ret = bnode_co_pwrite(s->bs->file, 0, cs, buf, 0);
    if (ret == 0)
        ret = bnode_co_flush(s->bs->file);
    return ret;
}

struct change_backing {
    const char *file, *fmt;
};

static int do_change_backing(struct qcow2_state *s, void *opaque)
{
    struct change_backing *c = opaque;
    co_mutex_lock(&s->lock);
    struct qcow2_header_edit e = { .backing = true, .backing_file = c->file,
                                   .backing_fmt = c->fmt };
    int ret = qcow2_co_rewrite_header(s, &e);
    co_mutex_unlock(&s->lock);
    return ret;
}

int qcow2_change_backing_file(struct bnode *bs, const char *file, const char *fmt)
{
    if (strcmp(bs->drv->name, "qcow2"))
        return -ENOTSUP;
    struct qcow2_state *s = bs->opaque;
    if (file && strlen(file) > 1023)
        return -EINVAL;
    if (file && s->data_file_raw)
        return -EINVAL;     /* QEMU clears the flag; bexd does not write it back */
    struct change_backing c = { file, fmt };
    int ret = qcow2_run_sync(s, do_change_backing, &c);
    if (ret < 0)
        return ret;
    free(s->backing_file);
    free(s->backing_fmt);
    s->backing_file = file ? xstrdup(file) : NULL;
    s->backing_fmt = file && fmt ? xstrdup(fmt) : NULL;
    free(bs->auto_backing_file);
    bs->auto_backing_file = file ? xstrdup(file) : NULL;
    return 0;
}

/* ---- options ---- */

static int opt_size(json_t *opts, const char *key, uint64_t dflt, bool *set)
{
    json_t *v = json_object_get(opts, key);
    *set = v != NULL;
    return v ? (uint64_t)json_integer_value(v) : dflt;
}

static int read_cache_sizes(struct qcow2_state *s, json_t *opts, error **errp)
{
    bool combined_set, l2_set, rc_set, entry_set;
    uint64_t combined = json_integer_value(json_object_get(opts, "cache-size"));
    combined_set = json_object_get(opts, "cache-size") != NULL;
    uint64_t l2_max = json_object_get(opts, "l2-cache-size")
                          ? (uint64_t)json_integer_value(json_object_get(opts, "l2-cache-size"))
                          : DEFAULT_L2_CACHE_MAX_SIZE;
    l2_set = json_object_get(opts, "l2-cache-size") != NULL;
    uint64_t rc = json_object_get(opts, "refcount-cache-size")
                      ? (uint64_t)json_integer_value(json_object_get(opts, "refcount-cache-size"))
                      : 0;
    rc_set = json_object_get(opts, "refcount-cache-size") != NULL;
    uint64_t entry = json_object_get(opts, "l2-cache-entry-size")
                         ? (uint64_t)json_integer_value(json_object_get(opts, "l2-cache-entry-size"))
                         : s->cluster_size;
    entry_set = json_object_get(opts, "l2-cache-entry-size") != NULL;
    uint64_t min_rc = MIN_REFCOUNT_CACHE_SIZE * s->cluster_size;
    uint64_t max_l2_entries = (s->size + s->cluster_size - 1) / s->cluster_size;
    uint64_t max_l2_cache = (max_l2_entries * s->l2_entry_bytes + s->cluster_size - 1) &
                            ~(s->cluster_size - 1);
    uint64_t l2 = MIN(max_l2_cache, l2_max);

    if (combined_set) {
        if (l2_set && rc_set) {
            error_setg(errp, "cache-size, l2-cache-size and refcount-cache-size may not be "
                       "set at the same time");
            return -EINVAL;
        } else if (l2_set && l2_max > combined) {
            error_setg(errp, "l2-cache-size may not exceed cache-size");
            return -EINVAL;
        } else if (rc > combined) {
            error_setg(errp, "refcount-cache-size may not exceed cache-size");
            return -EINVAL;
        }
        if (l2_set) {
            rc = combined - l2;
        } else if (rc_set) {
            l2 = combined - rc;
        } else if (combined >= max_l2_cache + min_rc) {
            l2 = max_l2_cache;
            rc = combined - l2;
        } else {
            rc = MIN(combined, min_rc);
            l2 = combined - rc;
        }
    }
    if (l2 < max_l2_cache && !entry_set)
        entry = MIN(s->cluster_size, 4096);
    if (entry < 512 || entry > s->cluster_size || (entry & (entry - 1))) {
        error_setg(errp, "L2 cache entry size must be a power of two between 512 and the "
                   "cluster size (%" PRIu64 ")", s->cluster_size);
        return -EINVAL;
    }
    /* entries of 16 bytes make a slice too small to hold whole subcluster
     * bitmaps only below 512 bytes, which is refused above */
    l2 /= entry;
    if (l2 < MIN_L2_CACHE_SIZE)
        l2 = MIN_L2_CACHE_SIZE;
    if (l2 > INT_MAX) {
        error_setg(errp, "L2 cache size too big");
        return -EINVAL;
    }
    rc /= s->cluster_size;
    if (rc < MIN_REFCOUNT_CACHE_SIZE)
        rc = MIN_REFCOUNT_CACHE_SIZE;
    if (rc > INT_MAX) {
        error_setg(errp, "Refcount cache size too big");
        return -EINVAL;
    }
    s->l2_cache_size = l2;
    s->refcount_cache_size = rc;
    s->l2_slice_size = entry;
    s->l2_slice_entries = entry / s->l2_entry_bytes;
    (void)opt_size;
    return 0;
}

static const char *const overlap_keys[] = {
    "main-header", "active-l1", "active-l2", "refcount-table", "refcount-block",
    "snapshot-table", "inactive-l1", "inactive-l2", "bitmap-directory",
};

static unsigned overlap_template(const char *mode)
{
    if (!strcmp(mode, "none"))
        return 0;
    if (!strcmp(mode, "constant"))
        return QOL_MAIN_HEADER | QOL_ACTIVE_L1 | QOL_REFCOUNT_TABLE | QOL_SNAPSHOT_TABLE |
               QOL_INACTIVE_L1 | QOL_BITMAP_DIRECTORY;
    if (!strcmp(mode, "all"))
        return 0x1ff;
    return 0x1ff & ~QOL_INACTIVE_L2;   /* cached */
}

static int read_options(struct qcow2_state *s, json_t *opts, bool discard, error **errp)
{
    int ret = read_cache_sizes(s, opts, errp);
    if (ret < 0)
        return ret;
    json_t *cci = json_object_get(opts, "cache-clean-interval");
    int64_t interval = cci ? json_integer_value(cci) : 600;
    if (interval < 0 || interval > UINT_MAX) {
        error_setg(errp, "Cache clean interval too big");
        return -EINVAL;
    }
    s->cache_clean_interval = interval;
    s->lazy_refcounts = opt_bool(opts, "lazy-refcounts", s->compat & QCOW2_COMPAT_LAZY_REFCOUNTS);
    if (s->lazy_refcounts && s->version < 3) {
        error_setg(errp, "Lazy refcounts require a qcow2 image with at least qemu 1.1 "
                   "compatibility level");
        return -EINVAL;
    }
    json_t *ol = json_object_get(opts, "overlap-check");
    if (json_is_string(ol)) {
        s->overlap = overlap_template(json_string_value(ol));
    } else {
        s->overlap = overlap_template(opt_str(ol, "template", "cached"));
        for (unsigned i = 0; i < ARRAY_SIZE(overlap_keys); i++) {
            json_t *v = json_object_get(ol, overlap_keys[i]);
            if (json_is_boolean(v))
                s->overlap = json_is_true(v) ? s->overlap | (1u << i) : s->overlap & ~(1u << i);
        }
    }
    s->discard_passthrough[QFREE_NEVER] = false;
    s->discard_passthrough[QFREE_ALWAYS] = true;
    s->discard_passthrough[QFREE_REQUEST] = opt_bool(opts, "pass-discard-request", discard);
    s->discard_passthrough[QFREE_SNAPSHOT] = opt_bool(opts, "pass-discard-snapshot", true);
    s->discard_passthrough[QFREE_OTHER] = opt_bool(opts, "pass-discard-other", false);
    json_t *enc = json_object_get(opts, "encrypt");
    if (enc) {
        error_setg(errp, "No encryption in image header, but options specified format '%s'",
                   opt_str(enc, "format", ""));
        return -EINVAL;
    }
    return 0;
}

/* ---- backing chain ---- */

static int chain_depth(struct bnode *bs)
{
    int d = 0;
    for (struct bnode *b = bs->backing; b; b = b->backing)
        d++;
    return d;
}

/* The backing file name as QEMU resolves it: relative to the directory of
 * the image's file name. */
static char *resolve_backing(struct bnode *bs, const char *name)
{
    if (name[0] == '/' || strstr(name, "://"))
        return xstrdup(name);
    const char *base = bnode_leaf_path(bs);
    if (!base)
        base = "";
    const char *slash = strrchr(base, '/');
    return xasprintf("%.*s%s", slash ? (int)(slash - base + 1) : 0, base, name);
}

const char *bnode_probe_format(const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    unsigned char m[4] = { 0 };
    if (fd >= 0) {
        if (pread(fd, m, 4, 0) != 4)
            memset(m, 0, 4);
        close(fd);
    }
    return memcmp(m, "QFI\xfb", 4) ? "raw" : "qcow2";
}

/* Images whose backing chain is being opened right now (opening runs in
 * the main thread, one chain at a time): a backing file already on it
 * would make the chain loop. */
#define OPEN_STACK_MAX (MAX_BACKING_DEPTH + 2)
static char *open_stack[OPEN_STACK_MAX];
static int open_depth;

static bool on_open_stack(const char *path)
{
    CLEANUP_FREE char *real = realpath(path, NULL);
    for (int i = 0; real && i < open_depth; i++)
        if (open_stack[i] && !strcmp(open_stack[i], real))
            return true;
    return false;
}

static int open_backing(struct qcow2_state *s, json_t *opts, int depth, error **errp)
{
    struct bnode *bs = s->bs;
    json_t *ref = json_object_get(opts, "backing");
    free(bs->auto_backing_file);
    bs->auto_backing_file = s->backing_file ? xstrdup(s->backing_file) : NULL;
    if (json_is_null(ref))
        return 0;
    if (!ref && !s->backing_file)
        return 0;
    if (s->data_file_raw && (ref || s->backing_file)) {
        error_setg(errp, "data-file-raw cannot be used with a backing file");
        return -EINVAL;
    }
    CLEANUP_JSON json_t *made = NULL;
    if (!ref) {
        if (depth >= MAX_BACKING_DEPTH) {
            error_setg(errp, "Backing chain of '%s' is deeper than %d images",
                       bs->node_name, MAX_BACKING_DEPTH);
            return -ELOOP;
        }
        CLEANUP_FREE char *path = resolve_backing(bs, s->backing_file);
        if (on_open_stack(path)) {
            error_setg(errp, "Backing file '%s' of node '%s' is already part of its backing "
                       "chain (the chain loops)", s->backing_file, bs->node_name);
            return -ELOOP;
        }
        const char *fmt = s->backing_fmt ? s->backing_fmt : bnode_probe_format(path);
        if (strcmp(fmt, "qcow2") && strcmp(fmt, "raw")) {
            error_setg(errp, "Unknown driver '%s'", fmt);
            return -EINVAL;
        }
        made = json_pack("{s:s, s:{s:s, s:s}, s:b}", "driver", fmt, "file", "driver", "file",
                         "filename", path, "read-only", true);
        if (!strcmp(fmt, "qcow2"))
            json_object_set_new(made, "x-bexd-depth", json_integer(depth + 1));
        ref = made;
    }
    error *err = NULL;
    bool pushed = false;
    if (open_depth < OPEN_STACK_MAX) {
        const char *path = bnode_leaf_path(bs);
        if (path)
            open_stack[open_depth] = realpath(path, NULL);
        open_depth++;
        pushed = true;
    }
    struct bnode *b = bnode_open_child(ref, bs, true, &err);
    if (b && json_is_object(ref)) {
        b->inherits_from = bs;          /* reopened with bs (blockdev-reopen) */
        if (made)
            b->ro_inherited = true;     /* QEMU's default for backing files */
    }
    if (pushed) {
        open_depth--;
        free(open_stack[open_depth]);
        open_stack[open_depth] = NULL;
    }
    if (!b) {
        /* one prefix for the whole chain, not one per level */
        static const char prefix[] = "Could not open backing file: ";
        if (made && strncmp(err->msg, prefix, sizeof(prefix) - 1))
            error_setg(errp, "%s%s", prefix, err->msg);
        else
            error_propagate(errp, err), err = NULL;
        error_free(err);
        return -EINVAL;
    }
    /* the link holds the reference (x-debug-query-block-graph shows it) */
    s->backing_link = bnode_attach_child(bs, b, "backing", errp);
    bnode_unref(b);
    if (!s->backing_link)
        return -EINVAL;
    bs->backing = b;
    if (made) {
        /* opened from the header: that is the backing file (QEMU) */
        free(bs->auto_backing_file);
        bs->auto_backing_file = bnode_filename(b);
    }
    if (chain_depth(bs) > MAX_BACKING_DEPTH) {
        error_setg(errp, "Backing chain of '%s' is deeper than %d images", bs->node_name,
                   MAX_BACKING_DEPTH);
        return -ELOOP;
    }
    return 0;
}

/* ---- open / close ---- */

static void free_state(struct qcow2_state *s)
{
    qcache_free(&s->l2c);
    qcache_free(&s->rbc);
    free(s->l1);
    free(s->reftable);
    qcow2_snapshots_free(s);
    free(s->backing_file);
    free(s->backing_fmt);
    free(s->data_file_name);
    free(s->meta_set);
    qcow2_bitmaps_free(s);
    while (s->pending) {
        struct qfree *f = s->pending;
        s->pending = f->next;
        free(f);
    }
    while (s->draining) {
        struct qfree *f = s->draining;
        s->draining = f->next;
        free(f);
    }
    co_mutex_destroy(&s->lock);
    pthread_mutex_destroy(&s->cache_lock);
    free(s);
}

static int open_data_file(struct qcow2_state *s, json_t *opts, error **errp)
{
    struct bnode *bs = s->bs;
    json_t *ref = json_object_get(opts, "data-file");
    bool has = s->incompat & QCOW2_INCOMPAT_DATA_FILE;
    s->data = bs->file;
    if (!has) {
        if (ref) {
            error_setg(errp, "'data-file' can only be set for images with an external data file");
            return -EINVAL;
        }
        if (s->autoclear & QCOW2_AUTOCLEAR_DATA_FILE_RAW) {
            error_setg(errp, "data-file-raw requires a data file");
            return -EINVAL;
        }
        return 0;
    }
    CLEANUP_JSON json_t *made = NULL;
    if (!ref) {
        if (!s->data_file_name) {
            error_setg(errp, "Missing data file name in image header");
            return -EINVAL;
        }
        CLEANUP_FREE char *path = resolve_backing(bs, s->data_file_name);
        made = json_pack("{s:s, s:s, s:b}", "driver", "file", "filename", path,
                         "read-only", bs->read_only);
        ref = made;
    }
    error *err = NULL;
    struct bnode *d = bnode_open_child(ref, bs, false, &err);
    if (!d) {
        error_setg(errp, "Could not open data file: %s", err->msg);
        error_free(err);
        return -EINVAL;
    }
    s->data_link = bnode_attach_child(bs, d, "data-file", errp);
    bnode_unref(d);
    if (!s->data_link)
        return -EINVAL;
    s->data = d;
    s->data_file_raw = s->autoclear & QCOW2_AUTOCLEAR_DATA_FILE_RAW;
    return 0;
}

static void qcow2_close(struct bnode *bs);

/* cache-clean-interval: every interval, entries nobody used since the last
 * tick leave the caches and their memory goes back to the system (QEMU's
 * cache_clean_timer).  Runs in the main loop, under cache_lock. */
static void cache_clean_tick(void *opaque)
{
    struct qcow2_state *s = opaque;
    int n = qcache_clean_unused(s, &s->l2c) + qcache_clean_unused(s, &s->rbc);
    if (n)
        log_debug("qcow2: node '%s': dropped %d unused cache entries", s->bs->node_name, n);
    loop_timer_arm(s->clean_timer, s->cache_clean_interval * 1000);
}

static void start_cache_clean(struct qcow2_state *s)
{
    if (!s->cache_clean_interval || !loop_main())
        return;
    s->clean_timer = loop_timer_new(loop_main(), cache_clean_tick, s);
    loop_timer_arm(s->clean_timer, s->cache_clean_interval * 1000);
}

static int qcow2_open(struct bnode *bs, json_t *opts, error **errp)
{
    struct qcow2_state *s = xcalloc(1, sizeof(*s));
    s->bs = bs;
    co_mutex_init(&s->lock);
    pthread_mutex_init(&s->cache_lock, NULL);
    bs->opaque = s;
    if (bs->file->read_only && !bs->read_only) {
        /* qcow2 writes metadata: it needs to write its file (QEMU's words) */
        error_setg(errp, "Block node is read-only");
        goto fail;
    }

    struct open_ctx c = { .errp = errp };
    int ret = qcow2_run_sync(s, do_open, &c);
    free(c.cluster0);
    if (ret < 0) {
        if (!*errp)
            error_setg_errno(errp, -ret, "Could not open qcow2 image");
        goto fail;
    }
    if (read_options(s, opts, bs->discard, errp) < 0)
        goto fail;
    if ((s->overlap & QOL_INACTIVE_L2) && s->nb_snapshots &&
        (ret = qcow2_run_sync(s, load_inactive_l2, NULL)) < 0) {
        error_setg_errno(errp, -ret, "Could not read the snapshot L1 tables");
        goto fail;
    }
    if (qcache_init(&s->l2c, "L2", (uint32_t)s->l2_slice_size, (int)s->l2_cache_size) < 0 ||
        qcache_init(&s->rbc, "refcount", (uint32_t)s->cluster_size,
                    (int)s->refcount_cache_size) < 0) {
        error_setg(errp, "Could not allocate metadata caches");
        goto fail;
    }
    if (open_data_file(s, opts, errp) < 0)
        goto fail;
    int depth = (int)opt_int(opts, "x-bexd-depth", 0);
    if (open_backing(s, opts, depth, errp) < 0)
        goto fail;
    bs->size = s->size;
    bs->request_alignment = bs->file->request_alignment;
    if ((s->incompat & QCOW2_INCOMPAT_DIRTY) && !bs->read_only &&
        (ret = qcow2_run_sync(s, repair, NULL)) < 0) {
        error_setg_errno(errp, -ret, "Could not repair the refcounts of the dirty image");
        goto fail;
    }
    if (!bs->read_only && (ret = qcow2_run_sync(s, prepare_write, NULL)) < 0) {
        error_setg_errno(errp, -ret, "Could not update qcow2 header");
        goto fail;
    }
    start_cache_clean(s);
    return 0;

fail:
    qcow2_close(bs);
    bs->opaque = NULL;
    return -1;
}

static int close_flush(struct qcow2_state *s, void *opaque)
{
    co_mutex_lock(&s->lock);
    int ret = qcow2_flush_metadata(s);
    /* nothing is in flight now: the frees of the last flush can go */
    if (ret == 0 && (s->pending || s->draining)) {
        qcow2_process_frees(s, true);
        qcow2_process_frees(s, true);
        ret = qcow2_flush_metadata(s);
    }
    co_mutex_unlock(&s->lock);
    return ret;
}

static int close_clean(struct qcow2_state *s, void *opaque)
{
    int ret = close_flush(s, opaque);
    co_mutex_lock(&s->lock);
    if (ret == 0)
        ret = qcow2_mark_clean(s);
    co_mutex_unlock(&s->lock);
    return ret;
}

static void qcow2_close(struct bnode *bs)
{
    struct qcow2_state *s = bs->opaque;
    if (!s)
        return;
    if (s->clean_timer)
        loop_timer_free(s->clean_timer);
    s->clean_timer = NULL;
    if (!bs->read_only && !s->corrupt && s->l2c.e && s->rbc.e) {
        int ret = qcow2_run_sync(s, close_clean, NULL);
        if (ret < 0)
            log_error("qcow2: node '%s': flushing metadata at close failed: %s",
                      bs->node_name, strerror(-ret));
    }
    qcow2_trim_grown(s);
    bs->backing = NULL;
    if (s->backing_link)
        bnode_detach(s->backing_link);
    if (s->data_link)
        bnode_detach(s->data_link);
    free_state(s);
    bs->opaque = NULL;
}

static int qcow2_flush_sync(struct bnode *bs)
{
    struct qcow2_state *s = bs->opaque;
    return qcow2_run_sync(s, close_flush, NULL);
}

/* ---- resize ---- */

struct resize {
    uint64_t size;
    error **errp;
};

static int do_grow(struct qcow2_state *s, void *opaque)
{
    struct resize *r = opaque;
    uint64_t l2_cover = s->l2_entries << s->cluster_bits;
    uint64_t need = (r->size + l2_cover - 1) / l2_cover;
    co_mutex_lock(&s->lock);
    int ret = 0;
    if (need > s->l1_size) {
        if (need > QCOW2_MAX_L1_SIZE / 8) {
            error_setg(r->errp, "File too large");
            co_mutex_unlock(&s->lock);
            return -EFBIG;
        }
        uint64_t bytes = need * 8;
        uint64_t ncl = qsize_to_clusters(s, bytes);
        /* QEMU's qcow2_grow_l1_table: its events, and on failure the new
         * table's clusters are freed again */
        bnode_debug_event(s->bs->file, BLKDBG_L1_GROW_ALLOC_TABLE);
        int64_t off = qcow2_alloc_clusters(s, ncl);
        if (off < 0) {
            co_mutex_unlock(&s->lock);
            error_setg_errno(r->errp, (int)-off, "Failed to grow the L1 table");
            return (int)off;
        }
        CLEANUP_FREE uint64_t *t = xcalloc(ncl << s->cluster_bits, 1);
        if (!t) {
            qcow2_update_refcount(s, (uint64_t)off, ncl << s->cluster_bits, -1);
            co_mutex_unlock(&s->lock);
            return -ENOMEM;
        }
        for (uint32_t i = 0; i < s->l1_size; i++)
            t[i] = htobe64(s->l1[i]);
        ret = qcache_flush(s, &s->rbc);
        if (ret == 0) {
            bnode_debug_event(s->bs->file, BLKDBG_L1_GROW_WRITE_TABLE);
            ret = bnode_co_pwrite(s->bs->file, off, ncl << s->cluster_bits, t, BREQ_BEYOND_EOF);
        }
        if (ret == 0)
            ret = bnode_co_flush(s->bs->file);
        struct __attribute__((packed)) { uint32_t l1_size; uint64_t l1_off; } h = {
            htobe32((uint32_t)need), htobe64((uint64_t)off) };
        if (ret == 0) {
            bnode_debug_event(s->bs->file, BLKDBG_L1_GROW_ACTIVATE_TABLE);
            ret = bnode_co_pwrite(s->bs->file, offsetof(struct qcow2_header, l1_size),
                                  sizeof(h), &h, 0);
        }
        if (ret == 0)
            ret = bnode_co_flush(s->bs->file);
        if (ret < 0) {
            qcow2_update_refcount(s, (uint64_t)off, ncl << s->cluster_bits, -1);
            co_mutex_unlock(&s->lock);
            error_setg_errno(r->errp, -ret, "Failed to grow the L1 table");
            return ret;
        }
        uint64_t *l1 = xcalloc(need, 8);
        pthread_mutex_lock(&s->cache_lock);
        memcpy(l1, s->l1, s->l1_size * 8ull);
        uint64_t old_off = s->l1_offset, old_bytes = s->l1_size * 8ull;
        free(s->l1);
        s->l1 = l1;
        s->l1_size = (uint32_t)need;
        s->l1_offset = (uint64_t)off;
        pthread_mutex_unlock(&s->cache_lock);
        qcow2_meta_del(s, old_off, old_bytes);
        qcow2_meta_add_kind(s, s->l1_offset, s->l1_size * 8ull, QOL_ACTIVE_L1);
        if (old_bytes)
            qcow2_update_refcount(s, old_off, old_bytes, -1);
    }
    uint64_t v = htobe64(r->size);
    ret = bnode_co_pwrite(s->bs->file, offsetof(struct qcow2_header, size), 8, &v, 0);
    if (ret == 0)
        ret = bnode_co_flush(s->bs->file);
    if (ret == 0)
        s->size = r->size;
    else
        error_setg_errno(r->errp, -ret, "Failed to update the image size");
    co_mutex_unlock(&s->lock);
    return ret;
}

struct shrink {
    uint64_t size, file_end;
    const char *what;
};

static int do_shrink(struct qcow2_state *s, void *opaque)
{
    struct shrink *sh = opaque;
    return qcow2_co_shrink(s->bs, s, sh->size, &sh->file_end, &sh->what);
}

static int do_zero_grown(struct qcow2_state *s, void *opaque)
{
    struct shrink *z = opaque;          /* size: the old size, file_end: the new */
    return qcow2_co_zero_grown(s->bs, s, z->size, z->file_end);
}

static int qcow2_truncate(struct bnode *bs, uint64_t size, error **errp)
{
    struct qcow2_state *s = bs->opaque;
    if (size % 512) {
        error_setg(errp, "The new size must be a multiple of 512");
        return -EINVAL;
    }
    /* version 2 does not record a snapshot's disk size */
    if (s->nb_snapshots && s->version < 3) {
        error_setg(errp, "Can't resize a v2 image which has snapshots");
        return -ENOTSUP;
    }
    if (size < s->size) {
        struct shrink sh = { .size = size };
        int ret = qcow2_run_sync(s, do_shrink, &sh);
        if (ret < 0) {
            error_setg_errno(errp, -ret, "%s", sh.what);
            return ret;
        }
        /* As QEMU: the file loses its unused tail; failing that only warns. */
        if (sh.file_end && sh.file_end < bs->file->size) {
            error *err = NULL;
            if (bnode_truncate(bs->file, sh.file_end, &err) < 0) {
                log_warn("Failed to truncate the tail of the image: %s", err->msg);
                error_free(err);
            } else {
                s->grown_to = 0;         /* cut below anything grown ahead */
            }
        }
        return 0;
    }
    if (qcow2_bitmaps_truncate_check(bs, errp) < 0)
        return -ENOTSUP;
    struct resize r = { .size = size, .errp = errp };
    uint64_t old = s->size;
    bool zero = bs->backing && __atomic_load_n(&bs->backing->size, __ATOMIC_RELAXED) > old;
    if (zero && s->version < 3) {
        /* no zero flag: QEMU refuses before it changes the size */
        error_setg_errno(errp, ENOTSUP, "Failed to zero out new clusters");
        return -ENOTSUP;
    }
    int ret = qcow2_run_sync(s, do_grow, &r);
    if (ret == 0 && zero) {
        struct shrink z = { .size = old, .file_end = size };
        ret = qcow2_run_sync(s, do_zero_grown, &z);
        if (ret < 0)
            error_setg_errno(errp, -ret, "Failed to zero out new clusters");
    }
    return ret;
}

/* ---- queries ---- */

static void qcow2_query_info(struct bnode *bs, json_t *info)
{
    struct qcow2_state *s = bs->opaque;
    json_t *image = json_object_get(info, "image");
    json_object_set_new(image, "cluster-size", json_integer((json_int_t)s->cluster_size));
    json_object_set_new(image, "format", json_string("qcow2"));
    json_object_set_new(image, "dirty-flag", json_boolean(s->incompat & QCOW2_INCOMPAT_DIRTY));
    /* the internal snapshots, as bdrv_query_snapshot_info_list lists them */
    json_t *snaps = json_array();
    for (uint32_t i = 0; s->snapshots && i < s->nb_snapshots; i++) {
        json_t *si = bsnapshot_info(&s->snapshots[i].info);
        if (si)                     /* NULL: a name that is not UTF-8 */
            json_array_append_new(snaps, si);
    }
    if (json_array_size(snaps))
        json_object_set_new(image, "snapshots", snaps);
    else
        json_decref(snaps);
    json_t *data;
    if (s->version == 2) {
        data = json_pack("{s:s, s:s, s:i}", "compat", "0.10",
                         "compression-type", "zlib", "refcount-bits",
                         1 << s->refcount_order);
    } else {
        data = json_pack("{s:s, s:s, s:b, s:i, s:b, s:b}", "compat", "1.1",
                         "compression-type", s->compression_type ? "zstd" : "zlib",
                         "lazy-refcounts", (s->compat & QCOW2_COMPAT_LAZY_REFCOUNTS) != 0,
                         "refcount-bits", 1 << s->refcount_order,
                         "corrupt", s->corrupt, "extended-l2", s->extl2);
        json_t *bitmaps = qcow2_bitmaps_info(s);
        if (bitmaps)
            json_object_set_new(data, "bitmaps", bitmaps);
        if (s->data != bs->file) {
            if (s->data_file_name)
                json_object_set_new(data, "data-file", json_string(s->data_file_name));
            json_object_set_new(data, "data-file-raw", json_boolean(s->data_file_raw));
        }
    }
    json_object_set_new(image, "format-specific",
                        json_pack("{s:s, s:o}", "type", "qcow2", "data", data));
    if (s->backing_file) {
        json_object_set_new(image, "backing-filename", json_string(s->backing_file));
        CLEANUP_FREE char *full = resolve_backing(bs, s->backing_file);
        json_object_set_new(image, "full-backing-filename", json_string(full));
        if (s->backing_fmt)
            json_object_set_new(image, "backing-filename-format", json_string(s->backing_fmt));
    }
    if (bs->backing) {
        /* QEMU: the backing node's file name, whatever the header says */
        CLEANUP_FREE char *bf = bnode_filename(bs->backing);
        json_object_set_new(info, "backing_file", json_string(bf));
    }
}

static bool qcow2_can_zero_fast(struct bnode *bs)
{
    struct qcow2_state *s = bs->opaque;
    return s->version >= 3 && !s->data_file_raw;
}

/* ---- blockdev-reopen ----
 * QEMU's qcow2_reopen_prepare/commit: the runtime options (cache sizes,
 * cache-clean-interval, lazy-refcounts, pass-discard-*, overlap-check) may
 * change and may be left out; read-write to read-only writes the metadata
 * back and marks the image clean first; read-only to read-write, once the
 * file is writable, repairs a dirty image and updates the header as a
 * read-write open does. */
static const char *const qcow2_reopen_resettable[] = {
    "lazy-refcounts", "pass-discard-request", "pass-discard-snapshot", "pass-discard-other",
    "overlap-check", "cache-size", "l2-cache-size", "l2-cache-entry-size",
    "refcount-cache-size", "cache-clean-interval", NULL
};
static const char *const qcow2_reopen_keys[] = {
    "lazy-refcounts", "pass-discard-request", "pass-discard-snapshot", "pass-discard-other",
    "overlap-check", "cache-size", "l2-cache-size", "l2-cache-entry-size",
    "refcount-cache-size", "cache-clean-interval", "encrypt", NULL
};

static int qcow2_reopen_prepare(struct reopen_state *rs, error **errp)
{
    struct bnode *bs = rs->bs;
    struct qcow2_state *s = bs->opaque;
    struct qcow2_state *n = xmalloc(sizeof(*n));
    memcpy(n, s, sizeof(*n));           /* scalars only: read_options sets no pointer */
    if (read_options(n, rs->opts, rs->discard, errp) < 0) {
        free(n);
        return -1;
    }
    if (rs->backing_missing && (bs->backing || s->backing_file)) {
        error_setg(errp, "backing is missing for '%s'", bs->node_name);
        free(n);
        return -1;
    }
    rs->drv = n;
    return 0;
}

static void qcow2_reopen_abort(struct reopen_state *rs)
{
    free(rs->drv);
    rs->drv = NULL;
}

/* New cache sizes: the caches are written back and rebuilt while no
 * coroutine holds or waits for an entry (metadata lock and cache lock
 * held; entries in use are released within a request, so this waits a
 * moment at most). */
static int resize_caches(struct qcow2_state *s, void *opaque)
{
    struct qcow2_state *n = opaque;
    for (int tries = 0;; tries++) {
        co_mutex_lock(&s->lock);
        int ret = qcache_flush(s, &s->l2c);
        if (ret == 0)
            ret = qcache_flush(s, &s->rbc);
        if (ret < 0) {
            co_mutex_unlock(&s->lock);
            return ret;
        }
        pthread_mutex_lock(&s->cache_lock);
        bool busy = !co_queue_empty(&s->l2c.waitq) || !co_queue_empty(&s->rbc.waitq) ||
                    s->l2c.ndirty || s->rbc.ndirty;
        for (int i = 0; !busy && i < s->l2c.n; i++)
            busy = s->l2c.e[i].pins || s->l2c.e[i].loading;
        for (int i = 0; !busy && i < s->rbc.n; i++)
            busy = s->rbc.e[i].pins || s->rbc.e[i].loading;
        if (!busy) {
            struct qcache l2c, rbc;
            ret = qcache_init(&l2c, "L2", (uint32_t)n->l2_slice_size, (int)n->l2_cache_size);
            if (ret == 0)
                ret = qcache_init(&rbc, "refcount", (uint32_t)s->cluster_size,
                                  (int)n->refcount_cache_size);
            if (ret == 0) {
                qcache_free(&s->l2c);
                qcache_free(&s->rbc);
                s->l2c = l2c;
                s->rbc = rbc;
                s->l2_cache_size = n->l2_cache_size;
                s->refcount_cache_size = n->refcount_cache_size;
                s->l2_slice_size = n->l2_slice_size;
                s->l2_slice_entries = n->l2_slice_entries;
            }
        }
        pthread_mutex_unlock(&s->cache_lock);
        co_mutex_unlock(&s->lock);
        if (!busy || ret < 0 || tries >= 5000)
            return busy ? -EBUSY : ret;
        usleep(1000);                   /* this helper thread runs only us */
    }
}

static int reopen_clean(struct qcow2_state *s, void *opaque)
{
    return close_clean(s, opaque);
}

static int reopen_mark_clean(struct qcow2_state *s, void *opaque)
{
    co_mutex_lock(&s->lock);
    int ret = qcow2_mark_clean(s);
    co_mutex_unlock(&s->lock);
    return ret;
}

static void qcow2_reopen_commit(struct reopen_state *rs)
{
    struct bnode *bs = rs->bs;
    struct qcow2_state *s = bs->opaque, *n = rs->drv;
    rs->drv = NULL;
    int ret;
    if (!bs->read_only && rs->read_only && !s->corrupt) {
        /* the file is still writable: write everything back, mark clean */
        qcow2_bitmaps_reopen_ro(bs);
        if ((ret = qcow2_run_sync(s, reopen_clean, NULL)) < 0)
            log_error("qcow2: node '%s': flushing metadata for read-only failed: %s",
                      bs->node_name, strerror(-ret));
    } else if (!bs->read_only && s->lazy_refcounts && !n->lazy_refcounts &&
               (ret = qcow2_run_sync(s, reopen_mark_clean, NULL)) < 0) {
        log_error("qcow2: node '%s': marking the image clean failed: %s", bs->node_name,
                  strerror(-ret));
    }
    if ((n->l2_cache_size != s->l2_cache_size || n->refcount_cache_size != s->refcount_cache_size ||
         n->l2_slice_size != s->l2_slice_size) &&
        (ret = qcow2_run_sync(s, resize_caches, n)) < 0)
        log_error("qcow2: node '%s': the caches keep their size: %s", bs->node_name,
                  strerror(-ret));
    s->lazy_refcounts = n->lazy_refcounts;
    __atomic_store_n(&s->overlap, n->overlap, __ATOMIC_RELAXED);
    for (int i = 0; i < QFREE__MAX; i++)
        s->discard_passthrough[i] = n->discard_passthrough[i];
    if (n->cache_clean_interval != s->cache_clean_interval) {
        s->cache_clean_interval = n->cache_clean_interval;
        if (s->clean_timer)
            loop_timer_free(s->clean_timer);
        s->clean_timer = NULL;
        start_cache_clean(s);
    }
    free(n);
}

static void qcow2_reopen_commit_post(struct reopen_state *rs)
{
    struct bnode *bs = rs->bs;
    struct qcow2_state *s = bs->opaque;
    int ret;
    if (bs->read_only || !rs->was_read_only)
        return;
    if ((s->incompat & QCOW2_INCOMPAT_DIRTY) && (ret = qcow2_run_sync(s, repair, NULL)) < 0)
        log_error("qcow2: node '%s': could not repair the refcounts of the dirty image: %s",
                  bs->node_name, strerror(-ret));
    if ((ret = qcow2_run_sync(s, prepare_write, NULL)) < 0)
        log_error("qcow2: node '%s': could not update the qcow2 header: %s", bs->node_name,
                  strerror(-ret));
    else
        qcow2_bitmaps_reopen_rw(bs);
}

static struct bnode_user **qcow2_backing_link(struct bnode *bs)
{
    return &((struct qcow2_state *)bs->opaque)->backing_link;
}

static uint32_t qcow2_cluster_size(struct bnode *bs)
{
    struct qcow2_state *s = bs->opaque;
    return (uint32_t)s->cluster_size;
}

int qcow2_open_backing_file(struct bnode *bs, error **errp)
{
    struct qcow2_state *s = bs->opaque;
    if (bs->backing || !s->backing_file)
        return 0;
    CLEANUP_JSON json_t *none = json_object();
    int ret = open_backing(s, none, 0, errp);
    if (ret == 0)
        json_object_del(bs->options, "backing");   /* opened from the header now */
    return ret;
}

static const char *const qcow2_strong_opts[] = { "encrypt.", NULL };

/* x-blockdev-amend (QEMU 7.2's qcow2_co_amend): the keys of an encrypted
 * image are all it changes, and bexd opens no encrypted image. */
static int qcow2_amend(struct bnode *bs, json_t *opts, bool force, error **errp)
{
    if (json_object_get(opts, "encrypt")) {
        error_setg(errp, "image is not encrypted, can't amend");
        return -EOPNOTSUPP;
    }
    return 0;
}

static const struct bdrv bdrv_qcow2 = {
    .strong_opts = qcow2_strong_opts,
    .name = "qcow2",
    .is_format = true,
    .compressed_writes = true,
    .open = qcow2_open,
    .close = qcow2_close,
    .submit = qcow2_submit,
    .block_status = qcow2_block_status,
    .truncate = qcow2_truncate,
    .query_info = qcow2_query_info,
    .flush_sync = qcow2_flush_sync,
    .can_write_zeroes_fast = qcow2_can_zero_fast,
    .reopen_keys = qcow2_reopen_keys,
    .reopen_resettable = qcow2_reopen_resettable,
    .reopen_prepare = qcow2_reopen_prepare,
    .reopen_commit = qcow2_reopen_commit,
    .reopen_abort = qcow2_reopen_abort,
    .reopen_commit_post = qcow2_reopen_commit_post,
    .reopen_needs_rw_file = true,
    .reopen_backing_link = qcow2_backing_link,
    .cluster_size = qcow2_cluster_size,
    .snapshot_list = qcow2_snapshot_list,
    .snapshot_create = qcow2_snapshot_create,
    .snapshot_delete = qcow2_snapshot_delete,
    .bitmaps_load = qcow2_bitmaps_load,
    .bitmaps_store = qcow2_bitmaps_store,
    .bitmap_can_store = qcow2_bitmap_can_store,
    .bitmaps_update = qcow2_bitmaps_update,
    .amend = qcow2_amend,
};
BDRV_REGISTER(bdrv_qcow2)
