/*
 * blockdev-create for qcow2: the image qemu-storage-daemon 7.2 makes for
 * the same options, byte for byte.
 *
 * Theory of operation: QEMU writes a header and a refcount table with one
 * refcount block, opens the image, allocates its first three clusters,
 * grows the L1 table to the requested size (and, with an external data
 * file and metadata preallocation, allocates the L2 tables that map it
 * 1:1), then sets the backing file.  Its allocator places every cluster,
 * and every refcount block it needs on the way, by a fixed algorithm
 * (first free cluster; a new refcount block where it can describe
 * itself, or counted in another block; retry when a block lands where the
 * data was going).  qc_alloc() replays that algorithm on an in-memory
 * model, so the final tables are known before anything is written; then
 * each structure is written once, in its final state, through the file
 * node (and the data file node is resized).  The file ends where QEMU's
 * does (an L1 table is written to its last entry, not to the end of its
 * cluster).
 *
 * Not made (clear errors): preallocation other than "metadata" with an
 * external data file (the qcow2 driver will do it once it writes),
 * encryption, and images whose metadata needs more than one cluster of
 * refcount table (very large images with tiny clusters).
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

const char *file_node_filename(struct bnode *bs);

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

/* ---- the allocator model ---- */

struct qc_refblock {
    uint64_t offset;
    uint8_t *data;
};

struct qc_image {
    unsigned cluster_bits, order, rb_bits;  /* rb_bits: log2(entries per refcount block) */
    uint64_t cs;
    uint64_t *reftable;                     /* one cluster of entries */
    uint64_t rt_entries;
    struct qc_refblock *rbs;
    unsigned n_rbs;
    uint64_t free_idx;                      /* QEMU's free_cluster_index */
};

static uint8_t *qc_refblock(struct qc_image *m, uint64_t offset)
{
    for (unsigned i = 0; i < m->n_rbs; i++)
        if (m->rbs[i].offset == offset)
            return m->rbs[i].data;
    return NULL;
}

static void qc_new_refblock(struct qc_image *m, uint64_t offset)
{
    m->rbs = xrealloc(m->rbs, (m->n_rbs + 1) * sizeof(*m->rbs));
    m->rbs[m->n_rbs].offset = offset;
    m->rbs[m->n_rbs].data = xzalloc(m->cs);
    m->n_rbs++;
}

static uint64_t qc_get_refcount(struct qc_image *m, uint64_t idx)
{
    uint64_t ti = idx >> m->rb_bits;
    if (ti >= m->rt_entries || !m->reftable[ti])
        return 0;
    return qcow2_refcount_get(qc_refblock(m, m->reftable[ti]), m->order,
                              idx & ((1ull << m->rb_bits) - 1));
}

static void qc_add_refcount(struct qc_image *m, uint64_t idx, int64_t addend)
{
    uint8_t *rb = qc_refblock(m, m->reftable[idx >> m->rb_bits]);
    uint64_t i = idx & ((1ull << m->rb_bits) - 1);
    qcow2_refcount_set(rb, m->order, i, qcow2_refcount_get(rb, m->order, i) + addend);
}

/* First n free clusters from the free index (QEMU's alloc_clusters_noref). */
static uint64_t qc_alloc_noref(struct qc_image *m, uint64_t n)
{
    uint64_t found = 0;
    while (found < n) {
        if (qc_get_refcount(m, m->free_idx++) != 0)
            found = 0;
        else
            found++;
    }
    return m->free_idx - n;
}

static int qc_update_refcount(struct qc_image *m, uint64_t start, uint64_t n);

/* The refcount block for cluster idx (QEMU's alloc_refcount_block): 0 if
 * it exists, -EAGAIN once a new one is hooked up (the caller's clusters
 * may now be taken), -EFBIG when the table itself would have to grow. */
static int qc_alloc_refblock(struct qc_image *m, uint64_t idx)
{
    uint64_t ti = idx >> m->rb_bits;
    if (ti < m->rt_entries && m->reftable[ti])
        return 0;
    uint64_t nb = qc_alloc_noref(m, 1);
    if (ti >= m->rt_entries)
        return -EFBIG;
    if ((nb >> m->rb_bits) == ti) {
        qc_new_refblock(m, nb << m->cluster_bits);
        m->reftable[ti] = nb << m->cluster_bits;         /* it describes itself */
        qc_add_refcount(m, nb, 1);
        return -EAGAIN;
    }
    int ret = qc_update_refcount(m, nb, 1);
    if (ret < 0)
        return ret;
    qc_new_refblock(m, nb << m->cluster_bits);
    m->reftable[ti] = nb << m->cluster_bits;
    return -EAGAIN;
}

static int qc_update_refcount(struct qc_image *m, uint64_t start, uint64_t n)
{
    uint64_t old_ti = UINT64_MAX;
    for (uint64_t idx = start; idx < start + n; idx++) {
        uint64_t ti = idx >> m->rb_bits;
        if (ti != old_ti) {
            int ret = qc_alloc_refblock(m, idx);
            if (ret < 0) {
                if (ret == -EAGAIN && m->free_idx > start)
                    m->free_idx = start;
                for (uint64_t j = start; j < idx; j++)     /* undo what was counted */
                    qc_add_refcount(m, j, -1);
                return ret;
            }
        }
        old_ti = ti;
        qc_add_refcount(m, idx, 1);
    }
    return 0;
}

/* n clusters, counted (QEMU's qcow2_alloc_clusters); first index or -errno. */
static int64_t qc_alloc(struct qc_image *m, uint64_t n)
{
    for (;;) {
        uint64_t idx = qc_alloc_noref(m, n);
        int ret = qc_update_refcount(m, idx, n);
        if (ret == 0)
            return idx;
        if (ret != -EAGAIN)
            return ret;
    }
}

static void qc_image_free(struct qc_image *m)
{
    for (unsigned i = 0; i < m->n_rbs; i++)
        free(m->rbs[i].data);
    free(m->rbs);
    free(m->reftable);
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
    bool prealloc_off = !strcmp(q->prealloc, "off");
    if (!prealloc_off && !(q->data_ref && !strcmp(q->prealloc, "metadata"))) {
        error_setg(errp, "bexd cannot preallocate qcow2 images yet (preallocation=%s); "
                   "only 'off', or 'metadata' with an external data file", q->prealloc);
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
        .refcount_table_offset = htobe64(m->cs),
        .refcount_table_clusters = htobe32(1),
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

static const char *leaf_filename(struct bnode *bs, char *buf, size_t len)
{
    while (bs->file)
        bs = bs->file;
    if (!strcmp(bs->drv->name, "file") || !strcmp(bs->drv->name, "host_device"))
        return file_node_filename(bs);
    snprintf(buf, len, "%s://", bs->drv->name);
    return buf;
}

static int qc_write(struct bnode *bs, uint64_t off, const void *buf, uint64_t len, error **errp,
                    const char *what)
{
    int ret = bnode_co_pwrite(bs, off, len, buf, BREQ_BEYOND_EOF);
    if (ret < 0)
        error_setg_errno(errp, -ret, "Could not write %s", what);
    return ret;
}

/* Build the image in memory and write it (in the job's coroutine). */
static int qc_make(struct qc_job_state *s, error **errp)
{
    struct qc_opts *q = &s->q;
    struct qc_image m = { 0 };
    struct qc_layout lay = { 0 };
    CLEANUP_FREE uint8_t *hdr = NULL;
    CLEANUP_FREE uint64_t *l1 = NULL;
    CLEANUP_FREE uint8_t *l2 = NULL;
    CLEANUP_FREE uint64_t *l2_offsets = NULL;
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
    m.rt_entries = m.cs / 8;
    m.reftable = xcalloc(m.rt_entries, sizeof(uint64_t));
    m.reftable[0] = 2 * m.cs;
    qc_new_refblock(&m, 2 * m.cs);

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
    bool map_data = q->data_ref && !strcmp(q->prealloc, "metadata");
    ret = qc_alloc(&m, 3) < 0 ? -EFBIG : 0;             /* header, reftable, refblock */
    int64_t l1_idx = 0;
    if (!ret && lay.l1_size) {
        l1_idx = qc_alloc(&m, (lay.l1_size * 8 + m.cs - 1) / m.cs);
        ret = l1_idx < 0 ? (int)l1_idx : 0;
        lay.l1_offset = (uint64_t)l1_idx << m.cluster_bits;
    }
    l1 = xcalloc(lay.l1_size + 1, sizeof(uint64_t));
    l2_offsets = xcalloc(lay.l1_size + 1, sizeof(uint64_t));
    for (uint64_t i = 0; !ret && map_data && i < lay.l1_size; i++) {
        int64_t idx = qc_alloc(&m, 1);
        if (idx < 0) {
            ret = (int)idx;
            break;
        }
        l2_offsets[i] = (uint64_t)idx << m.cluster_bits;
        l1[i] = htobe64(l2_offsets[i] | QCOW2_OFLAG_COPIED);
    }
    if (ret == -EFBIG) {
        error_setg(errp, "bexd cannot create this image yet: its metadata needs more than one "
                   "cluster of refcount table (use a larger cluster size)");
        goto out;
    }
    if (ret < 0) {
        error_setg_errno(errp, -ret, "Could not allocate the image's metadata");
        goto out;
    }

    hdr = xmalloc(m.cs);
    if (s->data)
        lay.data_file_name = leaf_filename(s->data, namebuf, sizeof(namebuf));
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

    /* Write every structure in its final state. */
    ret = qc_write(s->file, 0, hdr, m.cs, errp, "qcow2 header");
    rt = xcalloc(m.rt_entries, sizeof(uint64_t));
    for (uint64_t i = 0; i < m.rt_entries; i++)
        rt[i] = htobe64(m.reftable[i]);
    if (!ret)
        ret = qc_write(s->file, m.cs, rt, m.cs, errp, "refcount table");
    for (unsigned i = 0; !ret && i < m.n_rbs; i++)
        ret = qc_write(s->file, m.rbs[i].offset, m.rbs[i].data, m.cs, errp, "refcount block");
    if (!ret && lay.l1_size)
        ret = qc_write(s->file, lay.l1_offset, l1, lay.l1_size * 8, errp, "L1 table");
    if (map_data) {
        l2 = xmalloc(m.cs);
    }
    for (uint64_t i = 0; !ret && map_data && i < lay.l1_size; i++) {
        memset(l2, 0, m.cs);
        for (uint64_t j = 0; j < l2_entries; j++) {
            uint64_t guest = i * l2_span + j * m.cs;
            if (guest >= (uint64_t)q->size)
                break;
            uint64_t e = htobe64(guest | QCOW2_OFLAG_COPIED);
            memcpy(l2 + j * entry_size, &e, 8);
        }
        ret = qc_write(s->file, l2_offsets[i], l2, m.cs, errp, "L2 table");
    }
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
    qc_image_free(&m);
    return ret;
}

static int qc_create_co(struct job *job, error **errp)
{
    struct qc_job_state *s = job->opaque;
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
    job->opaque = NULL;
    job_progress_update(job, 1);
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
