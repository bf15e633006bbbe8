/*
 * Persistent dirty bitmaps of raw images, in a sidecar file next to the
 * image (IMAGE.bitmaps; the format is in docs/bitmaps.md).
 *
 * Theory of operation.  The sidecar belongs to the `file` (or
 * `host_device`) node of the image, which reads it when it opens.  Each
 * stored bitmap records the layer it was made on: a `file`-layer bitmap
 * goes back onto the file node, a `raw`-layer one waits ("pending") until
 * a raw node without offset or size opens on that file node and takes it.
 * Whenever the set of persistent bitmaps changes (add, remove, a holder
 * opens or closes) the whole sidecar is rewritten: a temporary file, then
 * rename, so a crash leaves the old or the new one, never a mix.
 *
 * The in-use rule (QEMU's for qcow2): a bitmap held by a node open for
 * writing is stored with IN_USE set and its bits are meaningless; only a
 * clean close stores the bits with IN_USE clear.  A bitmap found IN_USE
 * when the image opens was left by a crash (or is still open in another
 * process): it loads as inconsistent, usable only for removal.
 */
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include "block/bitmap-sidecar.h"
#include "block/block.h"
#include "block/dirty-bitmap.h"
#include "util/cleanup.h"
#include "util/log.h"
#include "util/pbitmap.h"
#include "util/sha256.h"
#include "util/xalloc.h"


/* ---- on disk (little-endian) ---- */

#define SC_MAGIC        "BEXDBMAP"
#define SC_VERSION      1
#define SC_ALIGN        4096
#define SC_MAX_BITMAPS  65535
#define SC_MAX_DIR      (64u << 20)

enum {
    SC_IN_USE   = 1u << 0,    /* held by a writer: bits not valid */
    SC_ENABLED  = 1u << 1,    /* records writes once loaded */
    SC_LAYER_RAW = 1u << 2,   /* made on the raw node above the file */
    SC_KNOWN    = SC_IN_USE | SC_ENABLED | SC_LAYER_RAW,
};

struct sc_header {
    char magic[8];
    uint32_t version;
    uint32_t nbitmaps;
    uint64_t dir_offset;
    uint64_t dir_size;
    uint8_t dir_sha256[32];       /* of the directory bytes */
} __attribute__((packed));

struct sc_entry {
    uint64_t data_offset;         /* 0: no data (all clear) */
    uint64_t data_size;           /* bytes of flat layout */
    uint64_t size;                /* bytes the bitmap covers */
    uint32_t granularity;
    uint32_t flags;
    uint16_t name_len;
    uint8_t reserved[6];
    /* name_len bytes of name, then zero padding to a multiple of 8 */
} __attribute__((packed));

/* ---- in memory ---- */

struct sc_record {               /* a stored bitmap no node holds (yet) */
    char *name;
    uint32_t granularity, flags;
    uint64_t size;
    struct pbitmap *bits;         /* NULL: in use or no data */
    struct sc_record *next;
};

struct sidecar {
    char *path;                   /* IMAGE.bitmaps */
    bool writable;
    struct bnode *raw;            /* the raw node holding the raw layer */
    struct sc_record *pending;    /* raw layer, not taken */
};

static struct sidecar *sidecar_of(struct bnode *bs)
{
    return bs->bitmap_store;
}

/* The file node of bs (itself, or a raw node's file child). */
static struct bnode *file_node_of(struct bnode *bs)
{
    if (!strcmp(bs->drv->name, "raw"))
        return bs->file;
    return bs;
}

static uint64_t round_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

static void record_free(struct sc_record *r)
{
    pbitmap_free(r->bits);
    free(r->name);
    free(r);
}

/* ---- writing ---- */

struct out_item {
    const char *name;
    uint32_t granularity, flags;
    uint64_t size;
    const struct pbitmap *bits;   /* NULL: no data */
};

static int write_all(int fd, const void *buf, size_t len, uint64_t off)
{
    const char *p = buf;
    while (len) {
        ssize_t n = pwrite(fd, p, len, (off_t)off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        p += n;
        len -= (size_t)n;
        off += (uint64_t)n;
    }
    return 0;
}

/* The flat bits of one bitmap at off, leaving all-zero blocks as holes. */
static int write_bits(int fd, const struct pbitmap *bits, uint64_t off)
{
    static const uint8_t zero[SC_ALIGN];
    uint8_t buf[SC_ALIGN];
    size_t total = pbitmap_flat_bytes(bits);

    for (size_t at = 0; at < total; at += SC_ALIGN) {
        size_t n = MIN((size_t)SC_ALIGN, total - at);
        pbitmap_serialize(bits, at, n, buf);
        if (!memcmp(buf, zero, n))
            continue;
        int r = write_all(fd, buf, n, off + at);
        if (r < 0)
            return r;
    }
    return 0;
}

static void add_bitmaps_of(struct bnode *bs, uint32_t layer, bool in_use,
                           struct out_item *items, size_t *n)
{
    for (struct dirty_bitmap *bm = bs->dirty_bitmaps; bm; bm = bm->next) {
        if (!bm->persistent || !bm->name)
            continue;
        struct out_item *it = &items[(*n)++];
        it->name = bm->name;
        it->granularity = bm->granularity;
        it->size = bm->size;
        it->flags = layer | (bm->disabled && !bm->successor ? 0 : SC_ENABLED);
        if (bm->inconsistent || in_use) {
            it->flags |= SC_IN_USE;
            it->bits = NULL;
        } else {
            it->bits = bm->bits;
        }
    }
}

static size_t count_persistent(struct bnode *bs)
{
    size_t n = 0;
    for (struct dirty_bitmap *bm = bs ? bs->dirty_bitmaps : NULL; bm; bm = bm->next)
        n += bm->persistent && bm->name;
    return n;
}

/* Rewrite the sidecar of file node fbs from what its holders have now;
 * `closing` holds no more bitmaps in use (it is storing them for good). */
static int sidecar_write(struct bnode *fbs, struct bnode *closing, error **errp)
{
    struct sidecar *sc = sidecar_of(fbs);
    size_t cap = count_persistent(fbs) + count_persistent(sc->raw), n = 0;
    for (struct sc_record *r = sc->pending; r; r = r->next)
        cap++;
    if (!sc->writable)
        return 0;
    if (cap == 0) {
        if (unlink(sc->path) < 0 && errno != ENOENT) {
            error_setg_errno(errp, errno, "Could not remove '%s'", sc->path);
            return -1;
        }
        return 0;
    }
    CLEANUP_FREE struct out_item *items = xcalloc(cap, sizeof(*items));
    add_bitmaps_of(fbs, 0, closing != fbs, items, &n);
    if (sc->raw)
        add_bitmaps_of(sc->raw, SC_LAYER_RAW, closing != sc->raw && closing != fbs, items, &n);
    for (struct sc_record *r = sc->pending; r; r = r->next) {
        struct out_item *it = &items[n++];
        it->name = r->name;
        it->granularity = r->granularity;
        it->size = r->size;
        it->flags = r->flags;
        it->bits = r->bits;
    }

    /* the directory, then each bitmap's data at the next aligned offset */
    size_t dir_size = 0;
    for (size_t i = 0; i < n; i++)
        dir_size += sizeof(struct sc_entry) + round_up(strlen(items[i].name), 8);
    CLEANUP_FREE uint8_t *dir = xzalloc(dir_size);
    uint64_t data_at = round_up(sizeof(struct sc_header) + dir_size, SC_ALIGN);
    uint8_t *p = dir;
    for (size_t i = 0; i < n; i++) {
        struct sc_entry e = { 0 };
        size_t len = strlen(items[i].name);
        e.size = htole64(items[i].size);
        e.granularity = htole32(items[i].granularity);
        e.flags = htole32(items[i].flags);
        e.name_len = htole16((uint16_t)len);
        if (items[i].bits && pbitmap_count(items[i].bits)) {
            uint64_t bytes = pbitmap_flat_bytes(items[i].bits);
            e.data_offset = htole64(data_at);
            e.data_size = htole64(bytes);
            data_at = round_up(data_at + bytes, SC_ALIGN);
        }
        memcpy(p, &e, sizeof(e));
        memcpy(p + sizeof(e), items[i].name, len);
        p += sizeof(e) + round_up(len, 8);
    }
    struct sc_header h = { .version = htole32(SC_VERSION), .nbitmaps = htole32((uint32_t)n),
                           .dir_offset = htole64(sizeof(h)), .dir_size = htole64(dir_size) };
    memcpy(h.magic, SC_MAGIC, 8);
    struct sha256 ctx;
    sha256_init(&ctx);
    sha256_update(&ctx, dir, dir_size);
    sha256_final(&ctx, h.dir_sha256);

    CLEANUP_FREE char *tmp = xasprintf("%s.tmp", sc->path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) {
        error_setg_errno(errp, errno, "Could not create '%s'", tmp);
        return -1;
    }
    int r = write_all(fd, &h, sizeof(h), 0);
    if (r == 0)
        r = write_all(fd, dir, dir_size, sizeof(h));
    /* data, where the directory put it */
    uint64_t at = round_up(sizeof(struct sc_header) + dir_size, SC_ALIGN);
    for (size_t i = 0; i < n && r == 0; i++) {
        if (!items[i].bits || !pbitmap_count(items[i].bits))
            continue;
        r = write_bits(fd, items[i].bits, at);
        at = round_up(at + pbitmap_flat_bytes(items[i].bits), SC_ALIGN);
    }
    if (r == 0 && ftruncate(fd, (off_t)data_at) < 0)
        r = -errno;
    if (r == 0 && fsync(fd) < 0)
        r = -errno;
    close(fd);
    if (r == 0 && rename(tmp, sc->path) < 0)
        r = -errno;
    if (r < 0) {
        unlink(tmp);
        error_setg_errno(errp, -r, "Could not write '%s'", sc->path);
        return -1;
    }
    /* make the rename durable */
    CLEANUP_FREE char *dcopy = xstrdup(sc->path);
    int dfd = open(dirname(dcopy), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
        fsync(dfd);
        close(dfd);
    }
    return 0;
}

/* ---- reading ---- */

static int read_all(int fd, void *buf, size_t len, uint64_t off)
{
    char *p = buf;
    while (len) {
        ssize_t n = pread(fd, p, len, (off_t)off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return -EIO;   /* past the end: truncated */
        p += n;
        len -= (size_t)n;
        off += (uint64_t)n;
    }
    return 0;
}

static uint64_t nbits_for(uint64_t size, uint32_t gran)
{
    return size / gran + (size % gran != 0);
}

/* Parse and check the sidecar at sc->path: a list of records, or -1 with
 * errp set (a sidecar we cannot trust is an error, not an empty list). */
static int sidecar_read(struct sidecar *sc, struct sc_record **out, error **errp)
{
    struct sc_record *list = NULL, **tail = &list;
    struct stat st;
    CLEANUP_FREE uint8_t *dir = NULL;
    CLEANUP_CLOSE int fd = open(sc->path, O_RDONLY | O_CLOEXEC);

    *out = NULL;
    if (fd < 0) {
        if (errno == ENOENT)
            return 0;
        error_setg_errno(errp, errno, "Could not open '%s'", sc->path);
        return -1;
    }
#define BAD(...) do { error_setg(errp, "Invalid bitmap sidecar '%s': %s", sc->path, __VA_ARGS__); \
                      goto fail; } while (0)
    struct sc_header h;
    if (fstat(fd, &st) < 0 || read_all(fd, &h, sizeof(h), 0) < 0)
        BAD("cannot read its header");
    if (memcmp(h.magic, SC_MAGIC, 8))
        BAD("bad magic");
    if (le32toh(h.version) != SC_VERSION)
        BAD("unknown version");
    uint32_t nb = le32toh(h.nbitmaps);
    uint64_t doff = le64toh(h.dir_offset), dsize = le64toh(h.dir_size);
    if (nb > SC_MAX_BITMAPS || dsize > SC_MAX_DIR || doff < sizeof(h) ||
        doff > (uint64_t)st.st_size || dsize > (uint64_t)st.st_size - doff)
        BAD("directory out of bounds");
    dir = xmalloc(dsize ? dsize : 1);
    if (read_all(fd, dir, dsize, doff) < 0)
        BAD("cannot read its directory");
    uint8_t digest[32];
    struct sha256 ctx;
    sha256_init(&ctx);
    sha256_update(&ctx, dir, dsize);
    sha256_final(&ctx, digest);
    if (memcmp(digest, h.dir_sha256, 32))
        BAD("directory checksum mismatch");

    uint64_t at = 0;
    for (uint32_t i = 0; i < nb; i++) {
        struct sc_entry e;
        if (dsize - at < sizeof(e))
            BAD("directory too short");
        memcpy(&e, dir + at, sizeof(e));
        size_t len = le16toh(e.name_len);
        uint32_t gran = le32toh(e.granularity), flags = le32toh(e.flags);
        uint64_t size = le64toh(e.size), doff2 = le64toh(e.data_offset);
        uint64_t dlen = le64toh(e.data_size);
        at += sizeof(e);
        if (len == 0 || len > DIRTY_BITMAP_NAME_MAX || dsize - at < round_up(len, 8))
            BAD("bad bitmap name length");
        if (memchr(dir + at, 0, len))
            BAD("bad bitmap name");
        if (gran < 512 || (gran & (gran - 1)) || (flags & ~SC_KNOWN))
            BAD("bad bitmap granularity or flags");
        uint64_t flat = (nbits_for(size, gran) + 63) / 64 * 8;
        if (flat == 0)
            flat = 8;
        if (doff2 && (dlen != flat || doff2 > (uint64_t)st.st_size ||
                      dlen > (uint64_t)st.st_size - doff2))
            BAD("bitmap data out of bounds");
        struct sc_record *r = xzalloc(sizeof(*r));
        r->name = xstrndup((const char *)dir + at, len);
        r->granularity = gran;
        r->flags = flags;
        r->size = size;
        at += round_up(len, 8);
        *tail = r;
        tail = &r->next;
        if (flags & SC_IN_USE)
            continue;                 /* bits not valid: loads inconsistent */
        r->bits = pbitmap_new(nbits_for(size, gran));
        if (!r->bits)
            BAD("bitmap too large");
        uint8_t buf[65536];
        for (uint64_t o = 0; doff2 && o < dlen; o += sizeof(buf)) {
            size_t n = (size_t)MIN((uint64_t)sizeof(buf), dlen - o);
            if (read_all(fd, buf, n, doff2 + o) < 0)
                BAD("cannot read bitmap data");
            pbitmap_deserialize_or(r->bits, o, n, buf);
        }
    }
#undef BAD
    *out = list;
    return 0;

fail:
    while (list) {
        struct sc_record *n = list->next;
        record_free(list);
        list = n;
    }
    return -1;
}

/* Make a live bitmap of node bs from a record (whose bits it takes). */
static int record_adopt(struct bnode *bs, struct sc_record *r, bool writable, error **errp)
{
    struct dirty_bitmap *bm = dirty_bitmap_create(bs, r->granularity, r->name, errp);
    if (!bm)
        return -1;
    bm->persistent = true;
    if ((r->flags & SC_IN_USE) || r->size != bs->size) {
        if (r->size != bs->size)
            log_warn("dirty bitmap '%s' of node '%s' was stored for %" PRIu64
                     " bytes, the node has %" PRIu64 ": inconsistent",
                     r->name, bs->node_name, r->size, bs->size);
        bm->inconsistent = true;
        dirty_bitmap_set_enabled(bm, false);
    } else {
        if (r->bits)
            dirty_bitmap_restore(bm, r->bits);
        r->bits = NULL;
        dirty_bitmap_set_enabled(bm, r->flags & SC_ENABLED);
    }
    bm->readonly = !writable;
    return 0;
}

/* ---- driver hooks ---- */

int sidecar_file_load(struct bnode *bs, error **errp)
{
    struct sidecar *sc = xzalloc(sizeof(*sc));
    struct sc_record *list, *next;

    sc->path = xasprintf("%s.bitmaps", bnode_leaf_path(bs));
    sc->writable = !bs->read_only;
    bs->bitmap_store = sc;
    if (sidecar_read(sc, &list, errp) < 0)
        goto fail;
    for (struct sc_record *r = list; r; r = next) {
        next = r->next;
        if (r->flags & SC_LAYER_RAW) {
            r->next = sc->pending;
            sc->pending = r;
            continue;
        }
        int ret = record_adopt(bs, r, sc->writable, errp);
        record_free(r);
        if (ret < 0) {
            for (r = next; r; r = next) {
                next = r->next;
                record_free(r);
            }
            goto fail;
        }
    }
    if (count_persistent(bs) && sidecar_write(bs, NULL, errp) < 0)
        goto fail;          /* cannot mark them in use: do not open for writing */
    return 0;

fail:
    sidecar_file_close(bs);
    return -1;
}

void sidecar_file_close(struct bnode *bs)
{
    struct sidecar *sc = sidecar_of(bs);
    if (!sc)
        return;
    while (sc->pending) {
        struct sc_record *n = sc->pending->next;
        record_free(sc->pending);
        sc->pending = n;
    }
    free(sc->path);
    free(sc);
    bs->bitmap_store = NULL;
}

void sidecar_file_store(struct bnode *bs)
{
    error *err = NULL;
    if (sidecar_of(bs) && sidecar_write(bs, bs, &err) < 0) {
        log_error("%s", err->msg);
        error_free(err);
    }
    sidecar_file_close(bs);
}

/* May raw node bs hold the raw layer of its file's sidecar? */
static bool raw_can_hold(struct bnode *bs)
{
    json_t *o = bs->options;
    struct bnode *f = bs->file;
    return f && sidecar_of(f) && !json_object_get(o, "offset") && !json_object_get(o, "size") &&
           (!sidecar_of(f)->raw || sidecar_of(f)->raw == bs);
}

int sidecar_raw_load(struct bnode *bs, error **errp)
{
    if (!raw_can_hold(bs))
        return 0;
    struct sidecar *sc = sidecar_of(bs->file);
    sc->raw = bs;
    if (!sc->pending)
        return 0;
    while (sc->pending) {
        struct sc_record *r = sc->pending;
        int ret = record_adopt(bs, r, sc->writable && !bs->read_only, errp);
        if (ret < 0) {
            sidecar_raw_store(bs);    /* what was taken waits again: bs does not open */
            return -1;
        }
        sc->pending = r->next;
        record_free(r);
    }
    return sidecar_write(bs->file, NULL, errp);
}

void sidecar_raw_store(struct bnode *bs)
{
    struct sidecar *sc = bs->file ? sidecar_of(bs->file) : NULL;
    error *err = NULL;

    if (!sc || sc->raw != bs)
        return;
    /* the raw layer's bitmaps wait in the file node again, stored clean */
    for (struct dirty_bitmap *bm = bs->dirty_bitmaps; bm; bm = bm->next) {
        if (!bm->persistent || !bm->name)
            continue;
        struct sc_record *r = xzalloc(sizeof(*r));
        r->name = xstrdup(bm->name);
        r->granularity = bm->granularity;
        r->size = bm->size;
        r->flags = SC_LAYER_RAW | (bm->disabled ? 0 : SC_ENABLED) |
                   (bm->inconsistent ? SC_IN_USE : 0);
        if (!bm->inconsistent && !(r->bits = pbitmap_dup(bm->bits)))
            r->flags |= SC_IN_USE;    /* no memory for a copy: not trusted later */
        r->next = sc->pending;
        sc->pending = r;
    }
    sc->raw = NULL;
    if (sidecar_write(bs->file, bs, &err) < 0) {
        log_error("%s", err->msg);
        error_free(err);
    }
}

int sidecar_can_store(struct bnode *bs, const char *name, uint32_t granularity, error **errp)
{
    struct bnode *f = file_node_of(bs);
    struct sidecar *sc = f ? sidecar_of(f) : NULL;

    if (!sc || (f != bs && !raw_can_hold(bs))) {
        error_setg(errp, "Can't store persistent bitmaps to %s: Operation not supported",
                   bs->node_name);
        return -1;
    }
    if (!sc->writable || bs->read_only) {
        error_setg(errp, "Can't store persistent bitmaps to %s: Read-only file system",
                   bs->node_name);
        return -1;
    }
    CLEANUP_FREE char *dcopy = xstrdup(sc->path);
    if (access(dirname(dcopy), W_OK) < 0) {
        error_setg_errno(errp, errno, "Can't store persistent bitmaps to %s", bs->node_name);
        return -1;
    }
    return 0;
}

int sidecar_update(struct bnode *bs, error **errp)
{
    struct bnode *f = file_node_of(bs);
    if (!f || !sidecar_of(f))
        return 0;
    if (f != bs)
        sidecar_of(f)->raw = bs;
    return sidecar_write(f, NULL, errp);
}
