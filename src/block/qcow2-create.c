/*
 * blockdev-create for qcow2: the image qemu-storage-daemon 7.2 makes for
 * the same options, byte for byte.
 *
 * Theory of operation: QEMU writes a header and a refcount table with one
 * refcount block, opens the image, allocates its first three clusters,
 * grows the L1 table to the requested size, preallocates (metadata: L2
 * tables and data clusters by its cluster allocator, one run per L2 table,
 * the tail of the last cluster written by copy-on-write; falloc/full: new
 * refcount structures at the end of the file covering everything, the
 * data area after them, then the L2 tables; with an external data file
 * only the L2 tables that map it 1:1), then sets the backing file.  Its
 * allocator places every cluster, and every refcount block it needs on the
 * way, by a fixed algorithm (first free cluster; a new refcount block where
 * it can describe itself, or counted in another block; retry from the same
 * clusters when a block lands where the data was going; a new, larger
 * refcount table past the end of the file when the table is full, the old
 * one freed).  The model below replays that algorithm in memory, so the
 * final tables are known before anything is written; then each structure
 * is written once, in its final state, through the file node (over the
 * bytes of the refcount tables QEMU gave up, which stay in its file), and
 * the file is made as long as QEMU's.
 *
 * Not made (clear error): encryption.
 */
#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include "block/block.h"
#include "block/qcow2.h"
#include "job/job.h"
#include "qmp/qmp.h"
#include "util/cleanup.h"
#include "util/coroutine.h"
#include "util/xalloc.h"
#include "util/opts.h"


#define QC_DEFAULT_CLUSTER_SIZE 65536
#define QC_SECTOR 512

struct qc_opts {
    json_t *file_ref, *data_ref;
    bool data_file_raw, extended_l2, lazy_refcounts;
    int64_t size;
    unsigned version;
    const char *backing_file, *backing_fmt;
    json_t *encrypt;
    int64_t cluster_size;
    const char *prealloc;
    int64_t refcount_bits;
    unsigned compression_type;
};

/* ---- the allocator model ----
 *
 * QEMU's refcount code (alloc_clusters_noref, update_refcount with its
 * undo, alloc_refcount_block, qcow2_refcount_area, qcow2_free_clusters)
 * replayed on tables in memory.  Refcount blocks are kept by refcount
 * table index; a block made before the table that will point at it (the
 * table grows) waits at its index until the new table takes it. */

struct qc_image {
    unsigned cluster_bits, order, rb_bits;  /* rb_bits: log2(entries per refcount block) */
    uint64_t cs;
    uint64_t *reftable;                     /* rt_size entries */
    uint64_t rt_size, rt_offset;
    uint8_t **rbs;                          /* by reftable index; rbs_cap entries */
    uint64_t rbs_cap;
    uint64_t free_idx;                      /* QEMU's free_cluster_index */
    /* Tables given up when the reftable grew: their bytes stay in the file
     * wherever nothing else is written later. */
    struct qc_stale { uint64_t offset, bytes; uint8_t *data; } *stale;
    unsigned n_stale;
};

static uint8_t **qc_rb_slot(struct qc_image *m, uint64_t ti)
{
    if (ti >= m->rbs_cap) {
        uint64_t cap = MAX(ti + 1, m->rbs_cap * 2);
        m->rbs = xrealloc(m->rbs, cap * sizeof(*m->rbs));
        memset(m->rbs + m->rbs_cap, 0, (cap - m->rbs_cap) * sizeof(*m->rbs));
        m->rbs_cap = cap;
    }
    return &m->rbs[ti];
}

static uint64_t qc_get_refcount(struct qc_image *m, uint64_t idx)
{
    uint64_t ti = idx >> m->rb_bits;
    if (ti >= m->rt_size || !m->reftable[ti])
        return 0;
    return qcow2_refcount_get(m->rbs[ti], m->order, idx & ((1ull << m->rb_bits) - 1));
}

/* First n free clusters from the free index (QEMU's alloc_clusters_noref). */
static int64_t qc_alloc_noref(struct qc_image *m, uint64_t n)
{
    uint64_t found = 0;
    while (found < n) {
        if (qc_get_refcount(m, m->free_idx++) != 0)
            found = 0;
        else
            found++;
    }
    if (m->free_idx > 0 && m->free_idx - 1 > (uint64_t)(INT64_MAX >> m->cluster_bits))
        return -EFBIG;
    return (int64_t)(m->free_idx - n);
}

static int qc_update_refcount(struct qc_image *m, uint64_t start, uint64_t n, bool decrease);
static int64_t qc_refcount_area(struct qc_image *m, uint64_t start_offset, uint64_t additional,
                                bool exact, uint64_t new_index, uint64_t new_offset);

/* The refcount block for cluster idx (QEMU's alloc_refcount_block): 0 if
 * it exists, -EAGAIN once a new one is hooked up (the caller's clusters
 * may now be taken, so it searches again). */
static int qc_alloc_refblock(struct qc_image *m, uint64_t idx)
{
    uint64_t ti = idx >> m->rb_bits;
    if (ti < m->rt_size && m->reftable[ti])
        return 0;
    int64_t nb = qc_alloc_noref(m, 1);
    if (nb < 0)
        return (int)nb;
    uint8_t *block;
    if (((uint64_t)nb >> m->rb_bits) == ti) {
        block = xzalloc(m->cs);                          /* it describes itself */
        qcow2_refcount_set(block, m->order, (uint64_t)nb & ((1ull << m->rb_bits) - 1), 1);
    } else {
        int ret = qc_update_refcount(m, (uint64_t)nb, 1, false);
        if (ret < 0)
            return ret;
        block = xzalloc(m->cs);
    }
    uint8_t **slot = qc_rb_slot(m, ti);
    free(*slot);
    *slot = block;
    uint64_t nb_off = (uint64_t)nb << m->cluster_bits;
    if (ti < m->rt_size) {
        m->reftable[ti] = nb_off;
        return -EAGAIN;
    }
    /* The table is full: new self-describing structures past everything
     * counted so far. */
    uint64_t rbsize = 1ull << m->rb_bits;
    uint64_t blocks_used = (MAX(idx + 1, (uint64_t)nb + 1) + rbsize - 1) / rbsize;
    int64_t ret = qc_refcount_area(m, (blocks_used * rbsize) << m->cluster_bits, 0, false,
                                   ti, nb_off);
    return ret < 0 ? (int)ret : -EAGAIN;
}

static int qc_update_refcount(struct qc_image *m, uint64_t start, uint64_t n, bool decrease)
{
    uint64_t old_ti = UINT64_MAX, idx;
    uint64_t max = m->order == 6 ? UINT64_MAX : (1ull << (1u << m->order)) - 1;
    int ret = 0;
    for (idx = start; idx < start + n; idx++) {
        uint64_t ti = idx >> m->rb_bits;
        if (ti != old_ti) {
            ret = qc_alloc_refblock(m, idx);
            /* the caller searches again, from the same clusters first */
            if (ret == -EAGAIN && m->free_idx > start)
                m->free_idx = start;
            if (ret < 0)
                break;
        }
        old_ti = ti;
        uint8_t *rb = m->rbs[ti];
        uint64_t i = idx & ((1ull << m->rb_bits) - 1);
        uint64_t r = qcow2_refcount_get(rb, m->order, i);
        if (decrease ? r == 0 : r == max) {
            ret = -EINVAL;
            break;
        }
        r = decrease ? r - 1 : r + 1;
        if (r == 0 && idx < m->free_idx)
            m->free_idx = idx;
        qcow2_refcount_set(rb, m->order, i, r);
    }
    if (ret < 0 && idx > start)                          /* undo what was counted */
        (void)qc_update_refcount(m, start, idx - start, !decrease);
    return ret;
}

/* n clusters, counted (QEMU's qcow2_alloc_clusters); first index or -errno. */
static int64_t qc_alloc(struct qc_image *m, uint64_t n)
{
    for (;;) {
        int64_t idx = qc_alloc_noref(m, n);
        if (idx < 0)
            return idx;
        int ret = qc_update_refcount(m, (uint64_t)idx, n, false);
        if (ret == 0)
            return idx;
        if (ret != -EAGAIN)
            return ret;
    }
}

/* As many of n clusters at idx as are free (QEMU's qcow2_alloc_clusters_at). */
static int64_t qc_alloc_at(struct qc_image *m, uint64_t idx, uint64_t n)
{
    for (;;) {
        uint64_t i = 0;
        while (i < n && qc_get_refcount(m, idx + i) == 0)
            i++;
        int ret = qc_update_refcount(m, idx, i, false);
        if (ret == 0)
            return (int64_t)i;
        if (ret != -EAGAIN)
            return ret;
    }
}

/* QEMU's qcow2_refcount_metadata_size: refcount blocks needed to count
 * clusters and the refcount structures themselves. */
static uint64_t qc_refblock_count(uint64_t clusters, const struct qc_image *m, bool generous)
{
    uint64_t per_table_cluster = m->cs / 8, per_block = 1ull << m->rb_bits;
    uint64_t table = 0, blocks = 0, n = 0, last;
    do {
        last = n;
        blocks = (clusters + table + blocks + per_block - 1) / per_block;
        table = (blocks + per_table_cluster - 1) / per_table_cluster;
        n = clusters + blocks + table;
        if (n == last && generous) {
            clusters += (table + 1) / 2;
            n = 0;
            generous = false;
        }
    } while (n != last);
    return blocks;
}

/* QEMU's qcow2_refcount_area: from start_offset (the end of everything
 * counted) new refcount blocks and a new table that count themselves and
 * `additional` clusters after them; the old table is freed.  Returns where
 * the additional clusters go. */
static int64_t qc_refcount_area(struct qc_image *m, uint64_t start_offset, uint64_t additional,
                                bool exact, uint64_t new_index, uint64_t new_offset)
{
    uint64_t rbsize = 1ull << m->rb_bits;
    uint64_t total = qc_refblock_count((start_offset >> m->cluster_bits) + additional, m, !exact);
    if (total > QCOW2_MAX_REFTABLE_SIZE)                 /* QEMU compares entries to bytes */
        return -EFBIG;
    uint64_t area_index = (start_offset >> m->cluster_bits) / rbsize;
    uint64_t table_size = exact ? total : total + (total + 1) / 2;
    uint64_t per_cluster = m->cs / 8;
    table_size = (table_size + per_cluster - 1) / per_cluster * per_cluster;
    uint64_t table_clusters = table_size / per_cluster;
    if (table_size > QCOW2_MAX_REFTABLE_SIZE)
        return -EFBIG;
    uint64_t *nt = xcalloc(table_size, 8);
    uint64_t max_used = 0;
    for (uint64_t i = 0; i < m->rt_size; i++)
        if (m->reftable[i])
            max_used = i;
    memcpy(nt, m->reftable, MIN(table_size, max_used + 1) * 8);
    if (new_offset)
        nt[new_index] = new_offset;
    uint64_t added = 0;
    for (uint64_t i = area_index; i < total; i++)
        if (!nt[i])
            added++;
    uint64_t table_offset = start_offset + (added << m->cluster_bits);
    uint64_t end_offset = table_offset + (table_clusters << m->cluster_bits);
    uint64_t block_offset = start_offset;
    for (uint64_t i = area_index; i < total; i++) {
        uint8_t **slot = qc_rb_slot(m, i);
        if (!nt[i]) {
            free(*slot);
            *slot = xzalloc(m->cs);
            nt[i] = block_offset;
            block_offset += m->cs;
        }
        uint64_t first = (i * rbsize) << m->cluster_bits;
        if (first >= end_offset)
            continue;
        uint64_t j = first < start_offset ? (start_offset - first) >> m->cluster_bits : 0;
        uint64_t end_j = MIN((end_offset - first) >> m->cluster_bits, rbsize);
        for (; j < end_j; j++)
            qcow2_refcount_set(*slot, m->order, j, 1);
    }
    /* the old table's bytes stay where they were */
    m->stale = xrealloc(m->stale, (m->n_stale + 1) * sizeof(*m->stale));
    struct qc_stale *st = &m->stale[m->n_stale++];
    st->offset = m->rt_offset;
    st->bytes = m->rt_size * 8;
    st->data = xmalloc(st->bytes);
    for (uint64_t i = 0; i < m->rt_size; i++) {
        uint64_t v = htobe64(m->reftable[i]);
        memcpy(st->data + i * 8, &v, 8);
    }
    uint64_t old_offset = m->rt_offset, old_size = m->rt_size;
    free(m->reftable);
    m->reftable = nt;
    m->rt_size = table_size;
    m->rt_offset = table_offset;
    (void)qc_update_refcount(m, old_offset >> m->cluster_bits,
                             (old_size * 8 + m->cs - 1) >> m->cluster_bits, true);
    return (int64_t)end_offset;
}

/* The last cluster with a reference below file_len (qcow2_get_last_cluster). */
static int64_t qc_last_cluster(struct qc_image *m, uint64_t file_len)
{
    for (int64_t i = (int64_t)((file_len + m->cs - 1) >> m->cluster_bits) - 1; i >= 0; i--)
        if (qc_get_refcount(m, (uint64_t)i))
            return i;
    return -EIO;
}

static void qc_image_free(struct qc_image *m)
{
    for (uint64_t i = 0; i < m->rbs_cap; i++)
        free(m->rbs[i]);
    free(m->rbs);
    free(m->reftable);
    for (unsigned i = 0; i < m->n_stale; i++)
        free(m->stale[i].data);
    free(m->stale);
}

/* ---- options ---- */

static int qc_parse(json_t *o, struct qc_opts *q)
{
    *q = (struct qc_opts){
        .file_ref = json_object_get(o, "file"),
        .data_ref = json_object_get(o, "data-file"),
        .data_file_raw = opt_bool(o, "data-file-raw", false),
        .extended_l2 = opt_bool(o, "extended-l2", false),
        .lazy_refcounts = opt_bool(o, "lazy-refcounts", false),
        .size = opt_int(o, "size", 0),
        .version = strcmp(opt_str(o, "version", "v3"), "v2") ? 3 : 2,
        .backing_file = opt_str(o, "backing-file", NULL),
        .backing_fmt = opt_str(o, "backing-fmt", NULL),
        .encrypt = json_object_get(o, "encrypt"),
        .cluster_size = opt_int(o, "cluster-size", QC_DEFAULT_CLUSTER_SIZE),
        .prealloc = opt_str(o, "preallocation", "off"),
        .refcount_bits = opt_int(o, "refcount-bits", 16),
        .compression_type = strcmp(opt_str(o, "compression-type", "zlib"), "zstd") ?
                            QCOW2_COMPRESSION_ZLIB : QCOW2_COMPRESSION_ZSTD,
    };
    return 0;
}

static bool pow2(uint64_t v) { return v && !(v & (v - 1)); }

/* QEMU's checks, in QEMU's order, up to opening the data file. */
static int qc_validate(struct qc_opts *q, error **errp)
{
    const char *v3 = "compatibility level 1.1 and above (use version=v3 or greater)";
    if (q->size % QC_SECTOR) {
        error_setg(errp, "Image size must be a multiple of %u bytes", QC_SECTOR);
        return -EINVAL;
    }
    if (q->extended_l2 && q->version < 3) {
        error_setg(errp, "Extended L2 entries are only supported with %s", v3);
        return -EINVAL;
    }
    if (!pow2(q->cluster_size) || q->cluster_size < (1 << QCOW2_MIN_CLUSTER_BITS) ||
        q->cluster_size > (1 << QCOW2_MAX_CLUSTER_BITS)) {
        error_setg(errp, "Cluster size must be a power of two between %d and %dk",
                   1 << QCOW2_MIN_CLUSTER_BITS, 1 << (QCOW2_MAX_CLUSTER_BITS - 10));
        return -EINVAL;
    }
    if (q->extended_l2 && q->cluster_size < (1 << QCOW2_MIN_CLUSTER_BITS_EXTL2)) {
        error_setg(errp, "Extended L2 entries are only supported with cluster sizes of at "
                   "least %d bytes", 1 << QCOW2_MIN_CLUSTER_BITS_EXTL2);
        return -EINVAL;
    }
    if (q->backing_file && strcmp(q->prealloc, "off") && !q->extended_l2) {
        error_setg(errp, "Backing file and preallocation can only be used at the same time "
                   "if extended_l2 is on");
        return -EINVAL;
    }
    if (q->backing_fmt && !q->backing_file) {
        error_setg(errp, "Backing format cannot be used without backing file");
        return -EINVAL;
    }
    if (q->lazy_refcounts && q->version < 3) {
        error_setg(errp, "Lazy refcounts only supported with %s", v3);
        return -EINVAL;
    }
    if (q->refcount_bits > 64 || !pow2(q->refcount_bits)) {
        error_setg(errp, "Refcount width must be a power of two and may not exceed 64 bits");
        return -EINVAL;
    }
    if (q->version < 3 && q->refcount_bits != 16) {
        error_setg(errp, "Different refcount widths than 16 bits require compatibility level "
                   "1.1 or above (use version=v3 or greater)");
        return -EINVAL;
    }
    if (q->data_file_raw && !q->data_ref) {
        error_setg(errp, "data-file-raw requires data-file");
        return -EINVAL;
    }
    if (q->data_file_raw && q->backing_file) {
        error_setg(errp, "Backing file and data-file-raw cannot be used at the same time");
        return -EINVAL;
    }
    if (q->data_file_raw && !strcmp(q->prealloc, "off"))
        q->prealloc = "metadata";       /* the L2 tables must map the data file 1:1 */
    if (q->data_ref && q->version < 3) {
        error_setg(errp, "External data files are only supported with %s", v3);
        return -EINVAL;
    }
    return 0;
}

/* Checks after the data file is open. */
static int qc_validate_late(struct qc_opts *q, error **errp)
{
    if (q->compression_type != QCOW2_COMPRESSION_ZLIB && q->version < 3) {
        error_setg(errp, "Non-zlib compression type is only supported with %s",
                   "compatibility level 1.1 and above (use version=v3 or greater)");
        return -EINVAL;
    }
    if (q->encrypt) {
        error_setg(errp, "Encrypted qcow2 images (encrypt.format=%s) are not supported by bexd",
                   opt_str(q->encrypt, "format", "?"));
        return -ENOTSUP;
    }
    return 0;
}

/* ---- the header cluster (QEMU's qcow2_update_header) ---- */

static int header_ext(uint8_t *buf, size_t *pos, size_t len, uint32_t type,
                      const void *data, size_t n)
{
    size_t total = 8 + ((n + 7) & ~(size_t)7);
    if (*pos + total > len)
        return -ENOSPC;
    struct qcow2_ext_header h = { htobe32(type), htobe32(n) };
    memcpy(buf + *pos, &h, sizeof(h));
    if (n)
        memcpy(buf + *pos + 8, data, n);
    *pos += total;
    return 0;
}

static const struct { uint8_t type, bit; const char *name; } feature_names[] = {
    { QCOW2_FEAT_TYPE_INCOMPAT, 0, "dirty bit" },
    { QCOW2_FEAT_TYPE_INCOMPAT, 1, "corrupt bit" },
    { QCOW2_FEAT_TYPE_INCOMPAT, 2, "external data file" },
    { QCOW2_FEAT_TYPE_INCOMPAT, 3, "compression type" },
    { QCOW2_FEAT_TYPE_INCOMPAT, 4, "extended L2 entries" },
    { QCOW2_FEAT_TYPE_COMPAT, 0, "lazy refcounts" },
    { QCOW2_FEAT_TYPE_AUTOCLEAR, 0, "bitmaps" },
    { QCOW2_FEAT_TYPE_AUTOCLEAR, 1, "raw external data" },
};

struct qc_layout {
    uint64_t l1_offset, l1_size;
    const char *data_file_name;
};

static int qc_header(const struct qc_opts *q, const struct qc_image *m,
                     const struct qc_layout *lay, uint8_t *buf)
{
    struct qcow2_header h = {
        .magic = htobe32(QCOW2_MAGIC),
        .version = htobe32(q->version),
        .cluster_bits = htobe32(m->cluster_bits),
        .size = htobe64(q->size),
        .crypt_method = htobe32(QCOW2_CRYPT_NONE),
        .l1_size = htobe32(lay->l1_size),
        .l1_table_offset = htobe64(lay->l1_offset),
        .refcount_table_offset = htobe64(m->rt_offset),
        .refcount_table_clusters = htobe32((uint32_t)(m->rt_size * 8 / m->cs)),
        .refcount_order = htobe32(m->order),
        .header_length = htobe32(sizeof(struct qcow2_header)),
        .compression_type = q->compression_type,
    };
    uint64_t incompat = 0, compat = 0, autoclear = 0;
    if (q->lazy_refcounts)
        compat |= QCOW2_COMPAT_LAZY_REFCOUNTS;
    if (q->data_ref)
        incompat |= QCOW2_INCOMPAT_DATA_FILE;
    if (q->data_file_raw)
        autoclear |= QCOW2_AUTOCLEAR_DATA_FILE_RAW;
    if (q->compression_type != QCOW2_COMPRESSION_ZLIB)
        incompat |= QCOW2_INCOMPAT_COMPRESSION;
    if (q->extended_l2)
        incompat |= QCOW2_INCOMPAT_EXTL2;
    h.incompatible_features = htobe64(incompat);
    h.compatible_features = htobe64(compat);
    h.autoclear_features = htobe64(autoclear);

    size_t len = m->cs;
    size_t pos = q->version == 2 ? QCOW2_V2_HEADER_LEN : sizeof(h);
    memset(buf, 0, len);
    memcpy(buf, &h, pos);
    int ret = 0;
    if (q->backing_fmt)
        ret = header_ext(buf, &pos, len, QCOW2_EXT_BACKING_FMT, q->backing_fmt,
                         strlen(q->backing_fmt));
    if (!ret && lay->data_file_name)
        ret = header_ext(buf, &pos, len, QCOW2_EXT_DATA_FILE, lay->data_file_name,
                         strlen(lay->data_file_name));
    /* QEMU leaves the feature table out of clusters of 4 KiB and less. */
    if (!ret && q->version >= 3 && m->cs > 4096) {
        struct qcow2_feature_name t[ARRAY_SIZE(feature_names)];
        memset(t, 0, sizeof(t));
        for (unsigned i = 0; i < ARRAY_SIZE(feature_names); i++) {
            t[i].type = feature_names[i].type;
            t[i].bit = feature_names[i].bit;
            strncpy(t[i].name, feature_names[i].name, sizeof(t[i].name));
        }
        ret = header_ext(buf, &pos, len, QCOW2_EXT_FEATURE_TABLE, t, sizeof(t));
    }
    if (!ret)
        ret = header_ext(buf, &pos, len, QCOW2_EXT_END, NULL, 0);
    if (!ret && q->backing_file) {
        size_t n = strlen(q->backing_file);
        if (n > QCOW2_MAX_BACKING_NAME)
            return -EINVAL;
        if (pos + n > len)
            return -ENOSPC;
        memcpy(buf + pos, q->backing_file, n);
        struct qcow2_header *hp = (struct qcow2_header *)buf;
        hp->backing_file_offset = htobe64(pos);
        hp->backing_file_size = htobe32(n);
    }
    return ret;
}

/* ---- the work ---- */

struct qc_job_state {
    struct qc_opts q;
    struct bnode *file, *data;
    struct bnode_user *file_user, *data_user;
};

static int qc_write(struct bnode *bs, uint64_t off, const void *buf, uint64_t len, error **errp,
                    const char *what)
{
    int ret = bnode_co_pwrite(bs, off, len, buf, BREQ_BEYOND_EOF);
    if (ret < 0)
        error_setg_errno(errp, -ret, "Could not write %s", what);
    return ret;
}

/* What preallocation adds to the model: L2 tables (and data clusters,
 * when they live in the image) mapping the whole disk. */
struct qc_prealloc {
    uint64_t *l2_offsets;           /* by L1 index */
    uint8_t **l2;                   /* the tables' contents, by L1 index */
    uint64_t file_len;              /* where QEMU's file ends */
    uint64_t data_start, data_len;  /* falloc/full: the data area */
};

static uint8_t *qc_l2(struct qc_prealloc *p, const struct qc_image *m, uint64_t i)
{
    if (!p->l2[i])
        p->l2[i] = xzalloc(m->cs);
    return p->l2[i];
}

/* The L2 table for L1 index i, allocated if new (QEMU's l2_allocate). */
static int qc_l2_table(struct qc_image *m, struct qc_prealloc *p, uint64_t i)
{
    if (p->l2_offsets[i])
        return 0;
    int64_t idx = qc_alloc(m, 1);
    if (idx < 0)
        return (int)idx;
    p->l2_offsets[i] = (uint64_t)idx << m->cluster_bits;
    qc_l2(p, m, i);
    p->file_len = MAX(p->file_len, p->l2_offsets[i] + m->cs);
    return 0;
}

static void qc_map(struct qc_prealloc *p, const struct qc_image *m, unsigned entry_size,
                   uint64_t guest_cluster, uint64_t host)
{
    uint64_t per_l2 = m->cs / entry_size;
    uint64_t e = htobe64(host | QCOW2_OFLAG_COPIED);
    memcpy(qc_l2(p, m, guest_cluster / per_l2) + (guest_cluster % per_l2) * entry_size, &e, 8);
}

/* preallocation=metadata with data clusters in the image (QEMU's
 * preallocate_co: calls of qcow2_alloc_host_offset of at most INT_MAX
 * bytes; each maps one contiguous run of new clusters and allocates the
 * L2 table of the run that follows before finding it cannot continue). */
static int qc_prealloc_metadata(struct qc_image *m, struct qc_prealloc *p, uint64_t size,
                                unsigned entry_size)
{
    uint64_t per_l2 = m->cs / entry_size, chunk = (INT32_MAX / m->cs) * m->cs;
    uint64_t guest = 0, remaining = size, last_host = 0, last_bytes = 0;
    while (remaining) {
        uint64_t start = guest, rem = MIN(remaining, chunk), call = rem;
        int64_t host = -1, next = -1;
        while (rem) {
            uint64_t gcl = start >> m->cluster_bits;
            int ret = qc_l2_table(m, p, gcl / per_l2);
            if (ret < 0)
                return ret;
            uint64_t in_cl = start & (m->cs - 1);
            uint64_t n = MIN((in_cl + rem + m->cs - 1) >> m->cluster_bits,
                             per_l2 - gcl % per_l2);
            int64_t d;
            if (next < 0) {
                d = qc_alloc(m, n);
                if (d < 0)
                    return (int)d;
            } else {
                int64_t got = qc_alloc_at(m, (uint64_t)next, n);
                if (got < 0)
                    return (int)got;
                if (got == 0)
                    break;
                n = (uint64_t)got;
                d = next;
            }
            for (uint64_t k = 0; k < n; k++)
                qc_map(p, m, entry_size, gcl + k, ((uint64_t)d + k) << m->cluster_bits);
            if (host < 0)
                host = d;
            next = d + (int64_t)n;
            uint64_t done = MIN(rem, (n << m->cluster_bits) - in_cl);
            start += done;
            rem -= done;
        }
        uint64_t processed = call - rem;
        guest += processed;
        remaining -= processed;
        last_host = (uint64_t)host << m->cluster_bits;
        last_bytes = processed;
    }
    /* the copy-on-write of the last cluster's tail (a subcluster's with
     * extended L2) writes zeros up to its end */
    uint64_t granule = entry_size == 16 ? m->cs / 32 : m->cs;
    uint64_t end = last_host + last_bytes;
    p->file_len = MAX(p->file_len, (end + granule - 1) / granule * granule);
    return 0;
}

/* preallocation=falloc/full (QEMU's qcow2_co_truncate): refcount
 * structures for everything at the end of the file, the data area after
 * them, then the L2 tables wherever the allocator puts them. */
static int qc_prealloc_data(struct qc_image *m, struct qc_prealloc *p, uint64_t size,
                            unsigned entry_size)
{
    uint64_t per_l2 = m->cs / entry_size;
    int64_t last = qc_last_cluster(m, p->file_len);
    uint64_t old_end = last >= 0 ? ((uint64_t)last + 1) << m->cluster_bits
                                 : (p->file_len + m->cs - 1) & ~(m->cs - 1);
    uint64_t nb_data = (size + m->cs - 1) >> m->cluster_bits;
    uint64_t nb_l2 = (nb_data + per_l2 - 1) / per_l2 + 1;
    int64_t start = qc_refcount_area(m, old_end, nb_data + nb_l2, true, 0, 0);
    if (start < 0)
        return (int)start;
    p->file_len = MAX(p->file_len, (uint64_t)start);
    int64_t got = qc_alloc_at(m, (uint64_t)start >> m->cluster_bits, nb_data);
    if (got < 0)
        return (int)got;
    if ((uint64_t)got != nb_data)
        return -ENOSPC;
    p->data_start = (uint64_t)start;
    p->data_len = nb_data << m->cluster_bits;
    p->file_len = MAX(p->file_len, p->data_start + p->data_len);
    for (uint64_t c = 0; c < nb_data; c++) {
        int ret = qc_l2_table(m, p, c / per_l2);
        if (ret < 0)
            return ret;
        qc_map(p, m, entry_size, c, p->data_start + (c << m->cluster_bits));
    }
    return 0;
}

static int qc_zero_area(struct bnode *bs, uint64_t off, uint64_t len, bool full, error **errp)
{
    int ret = 0;
    if (!full) {
        ret = bnode_co_pwrite_zeroes(bs, off, len, BREQ_BEYOND_EOF);
    } else {
        size_t chunk = 1 << 20;
        CLEANUP_FREE uint8_t *z = xzalloc(chunk);
        for (uint64_t o = 0; ret == 0 && o < len; o += chunk)
            ret = bnode_co_pwrite(bs, off + o, MIN(chunk, len - o), z, BREQ_BEYOND_EOF);
    }
    if (ret < 0)
        error_setg_errno(errp, -ret, "Could not preallocate data for the new area");
    return ret;
}

/* Build the image in memory and write it (in the job's coroutine). */
static int qc_make(struct qc_job_state *s, error **errp)
{
    struct qc_opts *q = &s->q;
    struct qc_image m = { 0 };
    struct qc_layout lay = { 0 };
    struct qc_prealloc p = { 0 };
    CLEANUP_FREE uint8_t *hdr = NULL;
    CLEANUP_FREE uint64_t *l1 = NULL;
    CLEANUP_FREE uint64_t *rt = NULL;
    char namebuf[64];
    int ret;

    if (q->size < 0) {
        error_setg(errp, "Could not resize image: Image size cannot be negative");
        return -EINVAL;
    }
    if ((uint64_t)q->size > BNODE_MAX_LENGTH) {
        error_setg(errp, "Could not resize image: offset(%" PRId64 ") exceeds maximum(%" PRIu64 ")",
                   q->size, (uint64_t)BNODE_MAX_LENGTH);
        return -EINVAL;
    }
    m.cluster_bits = __builtin_ctzll(q->cluster_size);
    m.cs = q->cluster_size;
    m.order = __builtin_ctzll(q->refcount_bits);
    m.rb_bits = m.cluster_bits + 3 - m.order;
    m.rt_size = m.cs / 8;
    m.rt_offset = m.cs;
    m.reftable = xcalloc(m.rt_size, sizeof(uint64_t));
    m.reftable[0] = 2 * m.cs;
    *qc_rb_slot(&m, 0) = xzalloc(m.cs);
    p.file_len = 3 * m.cs;                                  /* header, reftable, refblock */

    unsigned entry_size = q->extended_l2 ? 16 : 8;
    uint64_t l2_entries = m.cs / entry_size;
    uint64_t l2_span = l2_entries * m.cs;                /* guest bytes per L2 table */
    lay.l1_size = (q->size + l2_span - 1) / l2_span;
    if (lay.l1_size * 8 > QCOW2_MAX_L1_SIZE) {
        error_setg(errp, "Could not resize image: Failed to grow the L1 table: %s",
                   strerror(EFBIG));
        ret = -EFBIG;
        goto out;
    }
    bool prealloc = strcmp(q->prealloc, "off") != 0;
    bool map_data = q->data_ref && prealloc;
    bool in_image = !q->data_ref && prealloc;
    ret = qc_alloc(&m, 3) < 0 ? -EFBIG : 0;
    int64_t l1_idx = 0;
    if (!ret && lay.l1_size) {
        l1_idx = qc_alloc(&m, (lay.l1_size * 8 + m.cs - 1) / m.cs);
        ret = l1_idx < 0 ? (int)l1_idx : 0;
        lay.l1_offset = (uint64_t)l1_idx << m.cluster_bits;
        p.file_len = MAX(p.file_len, lay.l1_offset + lay.l1_size * 8);
    }
    l1 = xcalloc(lay.l1_size + 1, sizeof(uint64_t));
    p.l2_offsets = xcalloc(lay.l1_size + 1, sizeof(uint64_t));
    p.l2 = xcalloc(lay.l1_size + 1, sizeof(uint8_t *));
    for (uint64_t i = 0; !ret && map_data && i < lay.l1_size; i++)
        ret = qc_l2_table(&m, &p, i);
    if (!ret && in_image && !strcmp(q->prealloc, "metadata"))
        ret = qc_prealloc_metadata(&m, &p, (uint64_t)q->size, entry_size);
    else if (!ret && in_image)
        ret = qc_prealloc_data(&m, &p, (uint64_t)q->size, entry_size);
    if (ret < 0) {
        error_setg_errno(errp, -ret, "Could not allocate the image's metadata");
        goto out;
    }
    for (uint64_t i = 0; i < lay.l1_size; i++)
        if (p.l2_offsets[i])
            l1[i] = htobe64(p.l2_offsets[i] | QCOW2_OFLAG_COPIED);
    for (uint64_t i = 0; map_data && i < lay.l1_size; i++)        /* data file: 1:1 */
        for (uint64_t j = 0; j < l2_entries && i * l2_span + j * m.cs < (uint64_t)q->size; j++)
            qc_map(&p, &m, entry_size, i * l2_entries + j, i * l2_span + j * m.cs);

    hdr = xmalloc(m.cs);
    if (s->data)
        lay.data_file_name = bnode_leaf_filename(s->data, namebuf, sizeof(namebuf));
    /* QEMU writes the header before it sets the backing file: which step
     * finds no room says which error it is. */
    struct qc_opts plain = *q;
    plain.backing_file = plain.backing_fmt = NULL;
    ret = qc_header(&plain, &m, &lay, hdr);
    if (ret < 0) {
        error_setg_errno(errp, -ret, "Could not update qcow2 header");
        goto out;
    }
    ret = qc_header(q, &m, &lay, hdr);
    if (ret < 0) {
        error_setg_errno(errp, -ret, "Could not assign backing file '%s' with format '%s'",
                         q->backing_file ? q->backing_file : "(null)",
                         q->backing_fmt ? q->backing_fmt : "(null)");
        goto out;
    }

    /* Write every structure in its final state, over what QEMU leaves
     * behind of the tables it replaced. */
    for (unsigned i = 0; !ret && i < m.n_stale; i++)
        ret = qc_write(s->file, m.stale[i].offset, m.stale[i].data, m.stale[i].bytes, errp,
                       "refcount table");
    if (!ret && p.data_len) {
        ret = bnode_truncate(s->file, p.data_start + p.data_len, errp);
        if (!ret)
            ret = qc_zero_area(s->file, p.data_start, p.data_len,
                               !strcmp(q->prealloc, "full"), errp);
    }
    if (!ret)
        ret = qc_write(s->file, 0, hdr, m.cs, errp, "qcow2 header");
    rt = xcalloc(m.rt_size, sizeof(uint64_t));
    for (uint64_t i = 0; i < m.rt_size; i++)
        rt[i] = htobe64(m.reftable[i]);
    if (!ret)
        ret = qc_write(s->file, m.rt_offset, rt, m.rt_size * 8, errp, "refcount table");
    for (uint64_t i = 0; !ret && i < m.rt_size; i++)
        if (m.reftable[i])
            ret = qc_write(s->file, m.reftable[i], m.rbs[i], m.cs, errp, "refcount block");
    if (!ret && lay.l1_size)
        ret = qc_write(s->file, lay.l1_offset, l1, lay.l1_size * 8, errp, "L1 table");
    for (uint64_t i = 0; !ret && i < lay.l1_size; i++)
        if (p.l2_offsets[i])
            ret = qc_write(s->file, p.l2_offsets[i], p.l2[i], m.cs, errp, "L2 table");
    /* QEMU's last step may have been a truncate past everything written */
    uint64_t written = MAX(m.rt_offset + m.rt_size * 8, lay.l1_offset + lay.l1_size * 8);
    for (uint64_t i = 0; i < m.rt_size; i++)
        written = MAX(written, m.reftable[i] + m.cs);
    for (uint64_t i = 0; i < lay.l1_size; i++)
        written = MAX(written, p.l2_offsets[i] + m.cs);
    for (unsigned i = 0; i < m.n_stale; i++)
        written = MAX(written, m.stale[i].offset + m.stale[i].bytes);
    if (!ret && in_image && p.file_len > MAX(written, p.data_start + p.data_len))
        ret = bnode_truncate(s->file, p.file_len, errp);
    if (!ret && s->data) {
        uint64_t old = s->data->size;
        ret = bnode_truncate(s->data, q->size, errp);
        if (ret < 0) {
            error_prepend(errp, "Could not resize image: ");
        } else if (old == 0 && q->size > 0) {
            /* As QEMU's file driver: the first block allocated. */
            static const uint8_t zeros[4096];
            ret = qc_write(s->data, 0, zeros, q->size < 4096 ? 512 : 4096, errp, "data file");
        }
        if (!ret && (!strcmp(q->prealloc, "falloc") || !strcmp(q->prealloc, "full")))
            ret = qc_zero_area(s->data, 0, (uint64_t)q->size, !strcmp(q->prealloc, "full"),
                               errp);
    }
    if (!ret) {
        ret = bnode_co_flush(s->file);
        if (ret < 0)
            error_setg_errno(errp, -ret, "Could not flush the image");
    }
    if (!ret) {
        /* A node that forgets what it is given (null-co) cannot hold an image. */
        uint32_t magic = 0;
        ret = bnode_co_pread(s->file, 0, sizeof(magic), &magic, BREQ_BEYOND_EOF);
        if (ret < 0) {
            error_setg_errno(errp, -ret, "Could not read the qcow2 header back");
        } else if (be32toh(magic) != QCOW2_MAGIC) {
            error_setg(errp, "Image is not in qcow2 format");
            ret = -EINVAL;
        }
    }
out:
    for (uint64_t i = 0; p.l2 && i < lay.l1_size; i++)
        free(p.l2[i]);
    free(p.l2);
    free(p.l2_offsets);
    qc_image_free(&m);
    return ret;
}

/* Open the children, check, make the image; frees s. */
static int qc_create(struct qc_job_state *s, error **errp)
{
    struct qc_opts *q = &s->q;
    int ret;

    s->file = bnode_open_ref(q->file_ref, false, errp);
    if (!s->file) {
        ret = -EIO;
        goto done;
    }
    ret = qc_validate(q, errp);
    if (ret < 0)
        goto done;
    if (q->data_ref) {
        s->data = bnode_open_ref(q->data_ref, false, errp);
        if (!s->data) {
            ret = -EIO;
            goto done;
        }
    }
    ret = qc_validate_late(q, errp);
    if (ret < 0)
        goto done;
    s->file_user = bnode_attach(s->file, PERM_WRITE | PERM_RESIZE, PERM_ALL,
                                "an unnamed block device", "root", errp);
    if (!s->file_user) {
        ret = -EPERM;
        goto done;
    }
    if (s->data) {
        s->data_user = bnode_attach(s->data, PERM_WRITE | PERM_RESIZE, PERM_ALL,
                                    "an unnamed block device", "root", errp);
        if (!s->data_user) {
            ret = -EPERM;
            goto done;
        }
    }
    ret = qc_make(s, errp);
done:
    if (s->data_user)
        bnode_detach(s->data_user);
    if (s->file_user)
        bnode_detach(s->file_user);
    if (s->data)
        bnode_unref(s->data);
    if (s->file)
        bnode_unref(s->file);
    free(s);
    return ret;
}

static int qc_create_co(struct job *job, error **errp)
{
    int ret = qc_create(job->opaque, errp);
    job->opaque = NULL;
    job_progress_update(job, 1);
    return ret;
}

struct qc_sync {
    struct qc_job_state *s;
    error **errp;
};

static int qc_create_sync_co(void *opaque)
{
    struct qc_sync *cs = opaque;
    return qc_create(cs->s, cs->errp);
}

int qcow2_create_sync(json_t *opts, error **errp)
{
    struct qc_sync cs = { .s = xzalloc(sizeof(*cs.s)), .errp = errp };
    qc_parse(opts, &cs.s->q);
    int ret = bnode_co_run_sync(qc_create_sync_co, &cs);
    if (ret < 0 && errp && !*errp)
        error_setg_errno(errp, -ret, "Could not create the image");
    return ret;
}

static void qcow2_create(struct job *job, json_t *opts)
{
    struct qc_job_state *s = xzalloc(sizeof(*s));
    qc_parse(opts, &s->q);          /* points into opts, which the job holds */
    job->opaque = s;
    job_run_co(job, qc_create_co);
}
BLOCKDEV_CREATE_REGISTER("qcow2", qcow2_create)
