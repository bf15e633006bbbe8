/*
 * Persistent dirty bitmaps inside qcow2 images: the bitmaps extension of
 * QEMU's docs/interop/qcow2.txt, read and written as qemu-img 7.2 does.
 *
 * On disk: a header extension (count, directory offset and size) and the
 * autoclear bit 0, which says the extension is valid; a directory of
 * entries (bitmap table offset and size, flags IN_USE and AUTO, granularity
 * bits, name); per bitmap a table with one entry per cluster of bits (0:
 * all clean, 1: all dirty, else the host offset of a cluster of bits in
 * QEMU's flat layout).
 *
 * Theory of operation.  The driver keeps one `struct qbm` per directory
 * entry, in directory order, with its table in memory and a copy of the
 * bits as last written.  Every change runs in a coroutine under s->lock.
 *
 * The in-use rule: while the node is open for writing, every bitmap it
 * holds is IN_USE on disk, so a crash leaves it inconsistent, never
 * trusted.  Its clusters may then be rewritten in place: a FLUSH writes the
 * clusters of bits that changed since the last write (nothing when no bit
 * changed), a clean close writes what is left and only then a new
 * directory with IN_USE clear.  The directory is never rewritten in place:
 * a new one is written, the refcounts of everything it points at made
 * durable, then the header switched to it in one write of its first sector
 * (the bitmaps extension is placed first), then the old clusters freed.
 *
 * A new persistent bitmap (block-dirty-bitmap-add persistent=true) gets its
 * entry at once, IN_USE, so a crash before close leaves it inconsistent
 * rather than gone; block-dirty-bitmap-remove removes the entry and frees
 * its clusters at once, as QEMU.  A transaction that cannot wait for the
 * image's lock leaves that write to a coroutine of the main loop
 * (qcow2_bitmaps_update); each write carries the set of bitmaps as taken
 * (bm_gen) and never replaces a newer one.
 *
 * Threads: the hooks run in the main thread, the work in a coroutine
 * (qcow2_run_sync); a FLUSH runs it in the export's thread.  The node's
 * dirty_lock is taken only for short copies of bits; the update hook
 * (called inside a transaction, which holds every dirty_lock) takes what
 * it needs in the calling thread first, and a FLUSH only tries the lock.
 */
#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include "block/dirty-bitmap.h"
#include "block/qcow2-int.h"
#include "util/cleanup.h"
#include "util/coroutine.h"
#include "util/log.h"
#include "util/loop.h"
#include "util/pbitmap.h"
#include "util/xalloc.h"

#define BME_MAX_TABLE_SIZE      0x8000000u
#define BME_MAX_PHYS_SIZE       0x20000000ull
#define BME_MAX_GRAN_BITS       31
#define BME_MIN_GRAN_BITS       9
#define BME_MAX_NAME            1023
#define QCOW2_MAX_BITMAPS       65535
#define QCOW2_MAX_BITMAP_DIR    (1024u * QCOW2_MAX_BITMAPS)

#define BME_FLAG_IN_USE         (1u << 0)
#define BME_FLAG_AUTO           (1u << 1)
#define BME_RESERVED_FLAGS      0xfffffffcu
#define BME_TYPE_DIRTY          1
#define BME_ENTRY_RESERVED      0xff000000000001feull
#define BME_ENTRY_OFFSET        0x00fffffffffffe00ull
#define BME_ENTRY_ALL_ONES      1ull

struct qbm_dirent {
    uint64_t table_offset;
    uint32_t table_size;
    uint32_t flags;
    uint8_t type;
    uint8_t gran_bits;
    uint16_t name_size;
    uint32_t extra_size;
} __attribute__((packed));

struct qbm {
    char *name;
    uint32_t flags;               /* as on disk */
    uint8_t gran_bits;
    uint64_t table_offset;        /* 0: none yet */
    uint32_t table_size;          /* entries */
    uint64_t *table;              /* host order; NULL: not loaded */
    struct pbitmap *stored;       /* the bits as last written; NULL: unknown */
    uint64_t stored_changes;      /* the bitmap's change count then */
    bool mine;                    /* a consistent bitmap of a writable node */
    bool fresh;                   /* made since the node opened */
    struct qbm *next;
};

static void qbm_free(struct qbm *e)
{
    if (!e)
        return;
    free(e->name);
    free(e->table);
    pbitmap_free(e->stored);
    free(e);
}

void qcow2_bitmaps_free(struct qcow2_state *s)
{
    while (s->bitmaps) {
        struct qbm *n = s->bitmaps->next;
        qbm_free(s->bitmaps);
        s->bitmaps = n;
    }
}

static uint64_t div_up(uint64_t a, uint64_t b) { return (a + b - 1) / b; }

/* Table entries a bitmap of `size` bytes at 2^gran_bits needs. */
static uint64_t table_size_for(struct qcow2_state *s, uint64_t size, unsigned gran_bits)
{
    uint64_t nbits = div_up(size, 1ull << gran_bits);
    return div_up(div_up(nbits, 64) * 8, s->cluster_size);
}

static size_t dirent_size(size_t name_len)
{
    return (sizeof(struct qbm_dirent) + name_len + 7) & ~(size_t)7;
}

/* ---- checks (QEMU's words) ---- */

static int check_constraints(struct qcow2_state *s, const char *name, uint32_t granularity,
                             error **errp)
{
    unsigned bits = (unsigned)__builtin_ctz(granularity);
    if (bits > BME_MAX_GRAN_BITS) {
        error_setg(errp, "Granularity exceeds maximum (%llu bytes)", 1ull << BME_MAX_GRAN_BITS);
        return -EINVAL;
    }
    if (bits < BME_MIN_GRAN_BITS) {
        error_setg(errp, "Granularity is under minimum (%llu bytes)", 1ull << BME_MIN_GRAN_BITS);
        return -EINVAL;
    }
    uint64_t bytes = div_up(div_up(s->bs->size, granularity), 8);
    if (bytes > BME_MAX_PHYS_SIZE || bytes > (uint64_t)BME_MAX_TABLE_SIZE * s->cluster_size) {
        error_setg(errp, "Too much space will be occupied by the bitmap. "
                   "Use larger granularity");
        return -EINVAL;
    }
    if (strlen(name) > BME_MAX_NAME) {
        error_setg(errp, "Name length exceeds maximum (%u characters)", BME_MAX_NAME);
        return -EINVAL;
    }
    return 0;
}

int qcow2_bitmap_can_store(struct bnode *bs, const char *name, uint32_t granularity,
                           error **errp)
{
    struct qcow2_state *s = bs->opaque;
    error *err = NULL;

    if (dirty_bitmap_find(bs, name)) {
        error_setg(errp, "Bitmap already exists: %s", name);
        return -1;
    }
    if (s->version < 3) {
        error_setg(&err, "Cannot store dirty bitmaps in qcow2 v2 files");
    } else if (bs->read_only) {
        /* qsd 7.2 accepts it and loses the bitmap at close ("No write access") */
        error_setg(&err, "Cannot store dirty bitmaps in a read-only image");
    } else if (check_constraints(s, name, granularity, &err) == 0) {
        uint32_t nb = 1;
        uint64_t dir = dirent_size(strlen(name));
        for (struct dirty_bitmap *bm = bs->dirty_bitmaps; bm; bm = bm->next) {
            if (bm->persistent && bm->name) {
                nb++;
                dir += dirent_size(strlen(bm->name));
            }
        }
        if (nb > QCOW2_MAX_BITMAPS)
            error_setg(&err, "Maximum number of persistent bitmaps is already reached");
        else if (dir > QCOW2_MAX_BITMAP_DIR)
            error_setg(&err, "Not enough space in the bitmap directory");
    }
    if (!err)
        return 0;
    error_setg(errp, "Can't make bitmap '%s' persistent in '%s': %s", name, bs->node_name,
               err->msg);
    error_free(err);
    return -1;
}

/* ---- reading ---- */

static int read_table(struct qcow2_state *s, struct qbm *e)
{
    if (e->table || !e->table_size)
        return 0;
    uint64_t *t = calloc(e->table_size, 8);
    if (!t)
        return -ENOMEM;
    int ret = bnode_co_pread(s->bs->file, e->table_offset, (uint64_t)e->table_size * 8, t,
                             BREQ_BEYOND_EOF);
    for (uint32_t i = 0; ret == 0 && i < e->table_size; i++) {
        t[i] = be64toh(t[i]);
        uint64_t off = t[i] & BME_ENTRY_OFFSET;
        if ((t[i] & BME_ENTRY_RESERVED) ||
            (off && ((t[i] & BME_ENTRY_ALL_ONES) || qoffset_into_cluster(s, off))))
            ret = -EINVAL;
    }
    if (ret < 0) {
        free(t);
        return ret;
    }
    e->table = t;
    return 0;
}

/* Parse the directory named by the header into s->bitmaps. */
static int read_directory(struct qcow2_state *s, error **errp)
{
    if (s->bitmap_dir_size == 0) {
        error_setg(errp, "Requested bitmap directory size is zero");
        return -EINVAL;
    }
    if (s->bitmap_dir_size > QCOW2_MAX_BITMAP_DIR) {
        error_setg(errp, "Requested bitmap directory size is too big");
        return -EINVAL;
    }
    uint64_t size = s->bitmap_dir_size;
    CLEANUP_FREE uint8_t *dir = malloc(size);
    if (!dir) {
        error_setg(errp, "Failed to allocate space for bitmap directory");
        return -ENOMEM;
    }
    int ret = bnode_co_pread(s->bs->file, s->bitmap_dir_offset, size, dir, BREQ_BEYOND_EOF);
    if (ret < 0) {
        error_setg_errno(errp, -ret, "Failed to read bitmap directory");
        return ret;
    }
    struct qbm **tail = &s->bitmaps;
    uint32_t n = 0;
    uint64_t at = 0;
    while (at < size) {
        struct qbm_dirent d;
        if (size - at < sizeof(d))
            goto broken;
        if (++n > s->nb_bitmaps) {
            error_setg(errp, "More bitmaps found than specified in header extension");
            return -EINVAL;
        }
        memcpy(&d, dir + at, sizeof(d));
        uint64_t toff = be64toh(d.table_offset);
        uint32_t tsize = be32toh(d.table_size), flags = be32toh(d.flags);
        uint16_t nlen = be16toh(d.name_size);
        uint32_t extra = be32toh(d.extra_size);
        uint64_t esize = (sizeof(d) + (uint64_t)nlen + extra + 7) & ~7ull;
        if (esize > size - at)
            goto broken;
        const char *name = (const char *)dir + at + sizeof(d) + extra;
        if (extra) {
            error_setg(errp, "Bitmap extra data is not supported");
            return -EINVAL;
        }
        uint64_t phys = (uint64_t)tsize * s->cluster_size;
        if (!tsize || !toff || qoffset_into_cluster(s, toff) || tsize > BME_MAX_TABLE_SIZE ||
            d.gran_bits > BME_MAX_GRAN_BITS || d.gran_bits < BME_MIN_GRAN_BITS ||
            (flags & BME_RESERVED_FLAGS) || nlen > BME_MAX_NAME || d.type != BME_TYPE_DIRTY ||
            phys > BME_MAX_PHYS_SIZE ||
            (!(flags & BME_FLAG_IN_USE) && s->size > ((phys * 8) << d.gran_bits))) {
            error_setg(errp, "Bitmap '%.*s' doesn't satisfy the constraints", (int)nlen, name);
            return -EINVAL;
        }
        struct qbm *e = xzalloc(sizeof(*e));
        e->name = xstrndup(name, nlen);
        e->flags = flags;
        e->gran_bits = d.gran_bits;
        e->table_offset = toff;
        e->table_size = tsize;
        *tail = e;
        tail = &e->next;
        at += esize;
    }
    if (n != s->nb_bitmaps) {
        error_setg(errp, "Less bitmaps found than specified in header extension");
        return -EINVAL;
    }
    return 0;
broken:
    error_setg(errp, "Broken bitmap directory");
    return -EINVAL;
}

/* The bits of entry e into a new pbitmap of nbits bits. */
static int read_bits(struct qcow2_state *s, struct qbm *e, uint64_t nbits, struct pbitmap **out)
{
    uint64_t cs = s->cluster_size, chunk_bits = cs * 8;
    struct pbitmap *bits = pbitmap_new(nbits);
    if (!bits)
        return -ENOMEM;
    uint64_t flat = div_up(nbits, 64) * 8;
    CLEANUP_FREE uint8_t *buf = xmalloc(cs);
    for (uint32_t i = 0; i < e->table_size; i++) {
        uint64_t ent = e->table[i], off = ent & BME_ENTRY_OFFSET;
        if (!off) {
            if (ent & BME_ENTRY_ALL_ONES)
                pbitmap_set_range(bits, i * chunk_bits, chunk_bits);
            continue;
        }
        int ret = bnode_co_pread(s->bs->file, off, cs, buf, BREQ_BEYOND_EOF);
        if (ret < 0) {
            pbitmap_free(bits);
            return ret;
        }
        uint64_t at = (uint64_t)i * cs;
        if (at < flat)
            pbitmap_deserialize_or(bits, at, (size_t)MIN(cs, flat - at), buf);
    }
    *out = bits;
    return 0;
}

/* ---- writing ---- */

/* Clusters to free once the header no longer points at them. */
struct to_free {
    uint64_t *off, *len;
    size_t n, cap;
};

static void free_later(struct to_free *f, uint64_t off, uint64_t len)
{
    if (!off || !len)
        return;
    if (f->n == f->cap) {
        f->cap = f->cap ? f->cap * 2 : 16;
        f->off = xrealloc(f->off, f->cap * sizeof(*f->off));
        f->len = xrealloc(f->len, f->cap * sizeof(*f->len));
    }
    f->off[f->n] = off;
    f->len[f->n++] = len;
}

static void free_now(struct qcow2_state *s, struct to_free *f)
{
    /* what no longer points at them reaches the disk first */
    if (f->n && bnode_co_flush(s->bs->file) < 0)
        f->n = 0;                       /* leak them rather than risk a reference */
    for (size_t i = 0; i < f->n; i++) {
        int ret = qcow2_update_refcount(s, f->off[i], f->len[i], -1);
        if (ret < 0)
            log_warn("qcow2: node '%s': could not free bitmap clusters at %#" PRIx64 ": %s",
                     s->bs->node_name, f->off[i], strerror(-ret));
    }
    free(f->off);
    free(f->len);
    *f = (struct to_free){ 0 };
}

/* Every cluster of e's table and bits. */
static int free_entry_later(struct qcow2_state *s, struct qbm *e, struct to_free *f)
{
    if (!e->table_offset)
        return 0;
    int ret = read_table(s, e);
    if (ret < 0)
        return ret;
    for (uint32_t i = 0; i < e->table_size; i++)
        free_later(f, e->table[i] & BME_ENTRY_OFFSET, s->cluster_size);
    free_later(f, e->table_offset, (uint64_t)e->table_size * 8);
    return 0;
}

/* Make refcounts of clusters just allocated durable before anything on
 * disk points at them. */
static int sync_refcounts(struct qcow2_state *s)
{
    int ret = qcache_flush(s, &s->rbc);
    if (ret == 0)
        ret = bnode_co_flush(s->bs->file);
    return ret;
}

static int write_table(struct qcow2_state *s, struct qbm *e)
{
    uint64_t bytes = (uint64_t)e->table_size * 8;
    CLEANUP_FREE uint64_t *t = xmalloc(bytes);
    for (uint32_t i = 0; i < e->table_size; i++)
        t[i] = htobe64(e->table[i]);
    return bnode_co_pwrite(s->bs->file, e->table_offset, bytes, t, BREQ_BEYOND_EOF);
}

/* A new table of table_size_for(size) clean entries (the old one and its
 * clusters are freed later). */
static int new_table(struct qcow2_state *s, struct qbm *e, uint64_t size, struct to_free *f)
{
    uint64_t n = table_size_for(s, size, e->gran_bits);
    if (n == 0 || n > BME_MAX_TABLE_SIZE)
        return -EINVAL;
    int ret = free_entry_later(s, e, f);
    if (ret < 0)
        return ret;
    int64_t off = qcow2_alloc_clusters(s, qsize_to_clusters(s, n * 8));
    if (off < 0)
        return (int)off;
    free(e->table);
    e->table = xcalloc(n, 8);
    e->table_size = (uint32_t)n;
    e->table_offset = (uint64_t)off;
    pbitmap_free(e->stored);
    e->stored = NULL;
    return write_table(s, e);
}

/* The persistent bitmap of bs named name, with bs's dirty_lock held. */
static struct dirty_bitmap *find_locked(struct bnode *bs, const char *name)
{
    for (struct dirty_bitmap *bm = bs->dirty_bitmaps; bm; bm = bm->next)
        if (bm->name && bm->persistent && !strcmp(bm->name, name))
            return bm;
    return NULL;
}

static bool all_bytes(const uint8_t *p, size_t n, uint8_t v)
{
    for (size_t i = 0; i < n; i++)
        if (p[i] != v)
            return false;
    return true;
}

/*
 * Write the clusters of e's bits that differ from what was last written
 * (the entry is IN_USE on disk: they may change in place).  try_lock: give
 * up (return 1) rather than wait for the node's dirty_lock.  *table_moved:
 * the table was replaced (the directory must follow).
 */
static int write_bits(struct qcow2_state *s, struct qbm *e, bool try_lock, struct to_free *f,
                      bool *table_moved)
{
    struct bnode *bs = s->bs;
    uint64_t cs = s->cluster_size, chunk_bits = cs * 8;
    CLEANUP_FREE uint8_t *buf = xmalloc(cs);
    CLEANUP_FREE uint8_t *was = xmalloc(cs);
    bool table_dirty = false, allocated = false;
    int ret = 0;

    if (try_lock ? pthread_mutex_trylock(&bs->dirty_lock) != 0
                 : (dirty_bitmaps_lock(bs), false))
        return 1;
    struct dirty_bitmap *bm = find_locked(bs, e->name);
    uint64_t size = bm ? bm->size : 0, changes = bm ? bm->changes : 0;
    dirty_bitmaps_unlock(bs);
    if (!bm)
        return 0;
    if (e->stored && changes == e->stored_changes)
        return 0;                                  /* nothing changed since */
    if (!e->table || table_size_for(s, size, e->gran_bits) != e->table_size) {
        if (e->table_offset && !e->table && (ret = read_table(s, e)) < 0)
            return ret;
        if (!e->table || table_size_for(s, size, e->gran_bits) != e->table_size) {
            ret = new_table(s, e, size, f);
            if (ret < 0)
                return ret;
            *table_moved = true;
        }
    }
    uint64_t nbits = div_up(size, 1ull << e->gran_bits);
    uint64_t flat = div_up(nbits, 64) * 8;
    struct pbitmap *now = pbitmap_new(nbits);
    if (!now)
        return -ENOMEM;
    for (uint32_t i = 0; i < e->table_size && ret == 0; i++) {
        uint64_t at = (uint64_t)i * cs, first = i * chunk_bits;
        size_t n = (size_t)MIN(cs, flat - at);
        bool same = false, clean;
        if (try_lock ? pthread_mutex_trylock(&bs->dirty_lock) != 0
                     : (dirty_bitmaps_lock(bs), false)) {
            ret = 1;
            break;
        }
        bm = find_locked(bs, e->name);
        if (!bm || bm->size != size) {
            dirty_bitmaps_unlock(bs);
            ret = 1;                               /* changed under us: next time */
            break;
        }
        uint64_t last = MIN(first + chunk_bits, nbits);
        clean = pbitmap_next_set(bm->bits, first, last) >= last;
        if (clean) {
            same = e->stored && pbitmap_next_set(e->stored, first, last) >= last;
        } else {
            pbitmap_serialize(bm->bits, at, n, buf);
            if (e->stored) {
                pbitmap_serialize(e->stored, at, n, was);
                same = !memcmp(buf, was, n);
            }
        }
        dirty_bitmaps_unlock(bs);
        if (!clean)
            pbitmap_deserialize_or(now, at, n, buf);
        if (same)
            continue;
        uint64_t ent = e->table[i], off = ent & BME_ENTRY_OFFSET;
        if (clean || (n == cs && all_bytes(buf, n, 0xff))) {
            free_later(f, off, cs);
            e->table[i] = clean ? 0 : BME_ENTRY_ALL_ONES;
            table_dirty |= ent != e->table[i];
            continue;
        }
        if (!off) {
            int64_t o = qcow2_alloc_clusters(s, 1);
            if (o < 0) {
                ret = (int)o;
                break;
            }
            off = (uint64_t)o;
            e->table[i] = off;
            table_dirty = allocated = true;
        }
        if (n < cs)
            memset(buf + n, 0, cs - n);
        ret = bnode_co_pwrite(bs->file, off, cs, buf, BREQ_BEYOND_EOF);
    }
    if (table_dirty) {
        /* also after giving up half way: the clusters allocated so far
         * must be reachable from the table */
        int r = allocated ? sync_refcounts(s) : 0;
        if (r == 0)
            r = write_table(s, e);
        if (r < 0 && ret >= 0)
            ret = r;
    }
    if (ret != 0) {
        pbitmap_free(now);
        pbitmap_free(e->stored);          /* what is on disk is not known now */
        e->stored = NULL;
        return ret;
    }
    pbitmap_free(e->stored);
    e->stored = now;
    e->stored_changes = changes;
    return 0;
}

/* A new directory from s->bitmaps; the header switches to it; the old one
 * is freed later. */
static int write_directory(struct qcow2_state *s, struct to_free *f)
{
    uint32_t nb = 0;
    uint64_t size = 0;
    for (struct qbm *e = s->bitmaps; e; e = e->next) {
        nb++;
        size += dirent_size(strlen(e->name));
    }
    int64_t off = 0;
    int ret = 0;
    if (nb) {
        if (nb > QCOW2_MAX_BITMAPS || size > QCOW2_MAX_BITMAP_DIR)
            return -EINVAL;
        CLEANUP_FREE uint8_t *dir = xzalloc(size);
        uint64_t at = 0;
        for (struct qbm *e = s->bitmaps; e; e = e->next) {
            struct qbm_dirent d = {
                .table_offset = htobe64(e->table_offset), .table_size = htobe32(e->table_size),
                .flags = htobe32(e->flags), .type = BME_TYPE_DIRTY, .gran_bits = e->gran_bits,
                .name_size = htobe16((uint16_t)strlen(e->name)),
            };
            memcpy(dir + at, &d, sizeof(d));
            memcpy(dir + at + sizeof(d), e->name, strlen(e->name));
            at += dirent_size(strlen(e->name));
        }
        off = qcow2_alloc_clusters(s, qsize_to_clusters(s, size));
        if (off < 0)
            return (int)off;
        ret = bnode_co_pwrite(s->bs->file, (uint64_t)off, size, dir, BREQ_BEYOND_EOF);
        if (ret == 0)
            ret = sync_refcounts(s);
        if (ret < 0) {
            qcow2_update_refcount(s, (uint64_t)off, size, -1);
            return ret;
        }
    }
    uint64_t autoclear = nb ? s->autoclear | QCOW2_AUTOCLEAR_BITMAPS
                            : s->autoclear & ~QCOW2_AUTOCLEAR_BITMAPS;
    struct qcow2_header_edit edit = { .bitmaps = true, .autoclear = autoclear, .nb_bitmaps = nb,
                                      .dir_offset = (uint64_t)off, .dir_size = size };
    ret = qcow2_co_rewrite_header(s, &edit);
    if (ret < 0) {
        if (off)
            qcow2_update_refcount(s, (uint64_t)off, size, -1);
        return ret;
    }
    if (s->bitmap_dir_size) {
        qcow2_meta_del(s, s->bitmap_dir_offset, s->bitmap_dir_size);
        free_later(f, s->bitmap_dir_offset, s->bitmap_dir_size);
    }
    s->autoclear = autoclear;
    s->nb_bitmaps = nb;
    s->bitmap_dir_offset = (uint64_t)off;
    s->bitmap_dir_size = size;
    if (size)
        qcow2_meta_add_kind(s, (uint64_t)off, size, QOL_BITMAP_DIRECTORY);
    return 0;
}

/* ---- load (open) ---- */

struct load_ctx {
    error **errp;
};

static int do_load(struct qcow2_state *s, void *opaque)
{
    struct load_ctx *c = opaque;
    struct bnode *bs = s->bs;
    bool writable = !bs->read_only;
    bool mark = false;
    int ret;

    co_mutex_lock(&s->lock);
    ret = read_directory(s, c->errp);
    for (struct qbm *e = s->bitmaps; ret == 0 && e; e = e->next) {
        struct dirty_bitmap *bm = dirty_bitmap_create(bs, 1u << e->gran_bits, e->name, c->errp);
        if (!bm) {
            ret = -EINVAL;
            break;
        }
        bm->persistent = true;
        if (e->flags & BME_FLAG_IN_USE) {
            bm->inconsistent = true;                /* left by a crash: never trusted */
            dirty_bitmap_set_enabled(bm, false);
        } else {
            uint64_t nbits = div_up(bs->size, 1ull << e->gran_bits);
            struct pbitmap *bits = NULL;
            if (table_size_for(s, bs->size, e->gran_bits) != e->table_size)
                ret = -EINVAL;
            else if ((ret = read_table(s, e)) < 0)
                error_setg_errno(c->errp, -ret, "Could not read bitmap_table table from "
                                 "image for bitmap '%s'", e->name);
            if (ret == 0)
                ret = read_bits(s, e, nbits, &bits);
            if (ret < 0) {
                if (!*c->errp)
                    error_setg_errno(c->errp, -ret, "Could not read bitmap '%s' from image",
                                     e->name);
                break;
            }
            dirty_bitmap_restore(bm, bits);
            dirty_bitmap_set_enabled(bm, e->flags & BME_FLAG_AUTO);
            if (writable) {
                e->mine = true;
                e->stored = pbitmap_dup(bits);
                e->stored_changes = bm->changes;
                e->flags |= BME_FLAG_IN_USE;
                mark = true;
            }
        }
        bm->readonly = !writable;
    }
    if (ret == 0 && mark) {
        struct to_free f = { 0 };
        ret = write_directory(s, &f);
        free_now(s, &f);
        if (ret < 0)
            error_setg_errno(c->errp, -ret, "Can't update bitmap directory");
    }
    co_mutex_unlock(&s->lock);
    return ret;
}

int qcow2_bitmaps_load(struct bnode *bs, error **errp)
{
    struct qcow2_state *s = bs->opaque;
    if (!s->nb_bitmaps)
        return 0;
    struct load_ctx c = { errp };
    int ret = qcow2_run_sync(s, do_load, &c);
    if (ret < 0) {
        if (!*errp)
            error_setg_errno(errp, -ret, "Could not load the bitmaps of '%s'", bs->node_name);
        return -1;         /* the node does not open: its bitmaps go with it */
    }
    return 0;
}

/* ---- the set of persistent bitmaps changed (add, remove) ---- */

struct want {
    char *name;
    uint8_t gran_bits;
    bool enabled;
};

struct update_ctx {
    struct want *w;
    size_t n;
    uint64_t size;
    uint64_t gen;               /* s->bm_gen when the set was taken */
};

static int do_update(struct qcow2_state *s, void *opaque)
{
    struct update_ctx *c = opaque;
    struct to_free f = { 0 };
    int ret = 0;
    bool changed = false;

    co_mutex_lock(&s->lock);
    if (c->gen < s->bm_gen_done) {      /* a newer set is in the image already */
        co_mutex_unlock(&s->lock);
        return 0;
    }
    /* entries whose bitmap is gone: removed from the image */
    for (struct qbm **pp = &s->bitmaps; *pp && ret == 0;) {
        struct qbm *e = *pp;
        bool keep = false;
        for (size_t i = 0; i < c->n && !keep; i++)
            keep = !strcmp(c->w[i].name, e->name);
        if (keep) {
            pp = &e->next;
            continue;
        }
        ret = free_entry_later(s, e, &f);
        *pp = e->next;
        qbm_free(e);
        changed = true;
    }
    /* new persistent bitmaps: an entry now, in use, with a clean table;
     * after those loaded at open, newest first (QEMU's order at close) */
    struct qbm **tail = &s->bitmaps;
    while (*tail && !(*tail)->fresh)
        tail = &(*tail)->next;
    for (size_t i = 0; i < c->n && ret == 0; i++) {
        bool have = false;
        for (struct qbm *e = s->bitmaps; e && !have; e = e->next)
            have = !strcmp(e->name, c->w[i].name);
        if (have)
            continue;
        struct qbm *e = xzalloc(sizeof(*e));
        e->name = xstrdup(c->w[i].name);
        e->gran_bits = c->w[i].gran_bits;
        e->flags = BME_FLAG_IN_USE | (c->w[i].enabled ? BME_FLAG_AUTO : 0);
        e->mine = e->fresh = true;
        ret = new_table(s, e, c->size, &f);
        if (ret < 0) {
            if (e->table_offset)
                qcow2_update_refcount(s, e->table_offset, (uint64_t)e->table_size * 8, -1);
            qbm_free(e);
            break;
        }
        e->next = *tail;
        *tail = e;
        tail = &e->next;
        changed = true;
    }
    if (ret == 0 && changed)
        ret = write_directory(s, &f);
    if (ret == 0) {
        free_now(s, &f);
        s->bm_gen_done = c->gen;
    } else {
        free(f.off), free(f.len);        /* still referenced: leak rather than free */
    }
    co_mutex_unlock(&s->lock);
    return ret;
}

/* The directory written later, by a coroutine of the main loop that waits
 * for the image's lock there (see qcow2_bitmaps_update). */
static void catch_up_body(void *opaque)
{
    struct bnode *bs = opaque;
    struct qcow2_state *s = bs->opaque;
    error *err = NULL;

    s->bm_catch_up = false;             /* the set is taken from here on */
    co_set_waits_in_main(true);
    if (qcow2_bitmaps_update(bs, &err) < 0) {
        log_error("qcow2: node '%s': %s", bs->node_name, err->msg);
        error_free(err);
    }
    co_set_waits_in_main(false);
    bnode_unref(bs);
}

static void catch_up_start(void *opaque)
{
    co_enter(co_create(catch_up_body, opaque));
}

int qcow2_bitmaps_update(struct bnode *bs, error **errp)
{
    struct qcow2_state *s = bs->opaque;
    struct update_ctx c = { .size = bs->size };

    /* A transaction's bitmap actions run in the main thread with every
     * bitmap lock held, and cannot wait there for a job's read or an
     * export's request that holds the image's lock in the main loop.  The
     * bitmaps are in memory and in use already; the directory follows as
     * soon as the loop gets the lock (QEMU 7.2 writes it only at close). */
    if (qcow2_run_sync_busy(s)) {
        if (!s->bm_catch_up) {
            s->bm_catch_up = true;
            bnode_ref(bs);
            loop_call(loop_main(), catch_up_start, bs);
        }
        return 0;
    }
    /* newest first, as QEMU appends them to the directory */
    dirty_bitmaps_lock(bs);
    c.gen = ++s->bm_gen;
    for (struct dirty_bitmap *bm = bs->dirty_bitmaps; bm; bm = bm->next)
        c.n += bm->persistent && bm->name;
    c.w = xcalloc(c.n ? c.n : 1, sizeof(*c.w));
    size_t i = 0;
    for (struct dirty_bitmap *bm = bs->dirty_bitmaps; bm; bm = bm->next) {
        if (!bm->persistent || !bm->name)
            continue;
        c.w[i].name = xstrdup(bm->name);
        c.w[i].gran_bits = (uint8_t)bm->shift;
        c.w[i++].enabled = dirty_bitmap_recording(bm);
    }
    dirty_bitmaps_unlock(bs);
    int ret = qcow2_run_sync(s, do_update, &c);
    for (i = 0; i < c.n; i++)
        free(c.w[i].name);
    free(c.w);
    if (ret < 0) {
        error_setg_errno(errp, -ret, "Failed to update bitmap extension");
        return -1;
    }
    return 0;
}

/* ---- flush and close ---- */

/* A FLUSH: write the bits that changed (IN_USE stays).  Coroutine, s->lock
 * held.  Never waits for the bitmap lock: a transaction may hold it. */
int qcow2_bitmaps_flush(struct qcow2_state *s)
{
    if (s->corrupt)
        return 0;
    struct to_free f = { 0 };
    bool moved = false;
    int ret = 0;
    for (struct qbm *e = s->bitmaps; e && ret == 0; e = e->next) {
        if (!e->mine)
            continue;
        ret = write_bits(s, e, true, &f, &moved);
        if (ret > 0)
            ret = 0;            /* busy: the next flush or the close writes it */
    }
    if (ret == 0 && moved)
        ret = write_directory(s, &f);
    if (ret == 0)
        free_now(s, &f);
    else
        free(f.off), free(f.len);
    if (ret < 0)
        log_warn("qcow2: node '%s': writing dirty bitmaps at a flush failed: %s",
                 s->bs->node_name, strerror(-ret));
    return ret;
}

static int do_store(struct qcow2_state *s, void *opaque)
{
    struct bnode *bs = s->bs;
    struct to_free f = { 0 };
    bool moved = false, any = false;
    int ret = 0;

    co_mutex_lock(&s->lock);
    for (struct qbm *e = s->bitmaps; e && ret == 0; e = e->next) {
        if (!e->mine)
            continue;
        any = true;
        ret = write_bits(s, e, false, &f, &moved);
        if (ret > 0)
            ret = -EBUSY;
        dirty_bitmaps_lock(bs);
        struct dirty_bitmap *bm = find_locked(bs, e->name);
        bool recording = bm && dirty_bitmap_recording(bm);
        dirty_bitmaps_unlock(bs);
        if (bm)
            e->flags = recording ? BME_FLAG_AUTO : 0;
    }
    if (ret == 0 && any) {
        ret = qcow2_flush_metadata(s);      /* bits and refcounts durable, then the directory */
        if (ret == 0)
            ret = write_directory(s, &f);
    }
    if (ret == 0)
        free_now(s, &f);
    else
        free(f.off), free(f.len);
    co_mutex_unlock(&s->lock);
    return ret;
}

void qcow2_bitmaps_store(struct bnode *bs)
{
    struct qcow2_state *s = bs->opaque;
    if (!s || bs->read_only || s->corrupt)
        return;
    if (s->bm_gen != s->bm_gen_done) {  /* the last set taken did not reach the image */
        error *err = NULL;
        if (qcow2_bitmaps_update(bs, &err) < 0) {
            log_error("qcow2: node '%s': %s", bs->node_name, err->msg);
            error_free(err);
        }
    }
    if (!s->bitmaps)
        return;
    int ret = qcow2_run_sync(s, do_store, NULL);
    if (ret < 0)
        log_error("qcow2: node '%s': storing the persistent dirty bitmaps failed (they stay "
                  "in use, inconsistent at the next open): %s", bs->node_name, strerror(-ret));
}

/* ---- queries ---- */

json_t *qcow2_bitmaps_info(struct qcow2_state *s)
{
    if (!s->bitmaps)
        return NULL;
    json_t *list = json_array();
    for (struct qbm *e = s->bitmaps; e; e = e->next) {
        json_t *flags = json_array();
        if (e->flags & BME_FLAG_IN_USE)
            json_array_append_new(flags, json_string("in-use"));
        if (e->flags & BME_FLAG_AUTO)
            json_array_append_new(flags, json_string("auto"));
        json_array_append_new(list, json_pack("{s:o, s:s, s:I}", "flags", flags, "name", e->name,
                                              "granularity", (json_int_t)1 << e->gran_bits));
    }
    return list;
}

/* QEMU's check before a resize: every stored bitmap is in memory and usable. */
int qcow2_bitmaps_truncate_check(struct bnode *bs, error **errp)
{
    struct qcow2_state *s = bs->opaque;
    for (struct qbm *e = s->bitmaps; e; e = e->next) {
        struct dirty_bitmap *bm = dirty_bitmap_find(bs, e->name);
        if (!bm) {
            error_setg(errp, "Cannot resize qcow2 with persistent bitmaps that were not "
                       "loaded into memory");
            return -1;
        }
        if (dirty_bitmap_check(bm, DBM_CHECK_DEFAULT, errp) < 0)
            return -1;
    }
    return 0;
}

/* ---- blockdev-reopen (QEMU's qcow2_reopen_bitmaps_ro/_rw) ---- */

/* Read-write to read-only: store everything (in-use clear), then the
 * bitmaps are readonly, as after a read-only open. */
void qcow2_bitmaps_reopen_ro(struct bnode *bs)
{
    struct qcow2_state *s = bs->opaque;
    if (!s->bitmaps)
        return;
    qcow2_bitmaps_store(bs);
    for (struct qbm *e = s->bitmaps; e; e = e->next)
        e->mine = false;
    for (struct dirty_bitmap *bm = bs->dirty_bitmaps; bm; bm = bm->next)
        if (bm->persistent)
            bm->readonly = true;
}

static int do_reopen_rw(struct qcow2_state *s, void *opaque)
{
    struct bnode *bs = s->bs;
    bool mark = false;
    co_mutex_lock(&s->lock);
    for (struct qbm *e = s->bitmaps; e; e = e->next) {
        if (e->flags & BME_FLAG_IN_USE)
            continue;                           /* inconsistent: stays so */
        dirty_bitmaps_lock(bs);
        struct dirty_bitmap *bm = find_locked(bs, e->name);
        if (bm && !bm->inconsistent) {
            pbitmap_free(e->stored);
            e->stored = pbitmap_dup(bm->bits);
            e->stored_changes = bm->changes;
            e->flags |= BME_FLAG_IN_USE;
            e->mine = mark = true;
        }
        dirty_bitmaps_unlock(bs);
    }
    struct to_free f = { 0 };
    int ret = mark ? write_directory(s, &f) : 0;
    free_now(s, &f);
    co_mutex_unlock(&s->lock);
    return ret;
}

/* Read-only to read-write (the header is writable again): the bitmaps go
 * in use on disk, then may change. */
void qcow2_bitmaps_reopen_rw(struct bnode *bs)
{
    struct qcow2_state *s = bs->opaque;
    if (!s->bitmaps)
        return;
    int ret = qcow2_run_sync(s, do_reopen_rw, NULL);
    if (ret < 0) {
        log_error("qcow2: node '%s': cannot mark the bitmaps in use, they stay readonly: %s",
                  bs->node_name, strerror(-ret));
        for (struct qbm *e = s->bitmaps; e; e = e->next)
            e->mine = false;
        return;
    }
    for (struct dirty_bitmap *bm = bs->dirty_bitmaps; bm; bm = bm->next)
        if (bm->persistent)
            bm->readonly = false;
}
