/*
 * qcow2 internal snapshots: the snapshot table, and taking and deleting a
 * snapshot (QEMU 7.2's qcow2-snapshot.c; blockdev-snapshot-internal-sync
 * and blockdev-snapshot-delete-internal-sync, internal-snapshot.c).
 *
 * Theory of operation.  A snapshot is a copy of the active L1 table; the
 * L2 tables and data clusters it reaches gain a reference each.  A
 * cluster referenced once carries COPIED in the table that points at it,
 * and only such clusters are written in place (qcow2-io.c copies the
 * others first): so taking a snapshot adds a reference to everything the
 * active L1 reaches and clears COPIED where a count went above one, and
 * deleting one drops the references its L1 holds, frees what nobody
 * references any more (discarded in the file if pass-discard-snapshot
 * says so), and sets COPIED again where a count came back to one.  The
 * snapshot table is rewritten whole into new clusters, then the header
 * points at it, then the old table is freed, as QEMU does.
 *
 * The caller has stopped the peers' writes (QEMU drains the node): no
 * write is in flight, so none can land in a cluster after it became
 * shared.  The work runs in a coroutine, with s->lock held.
 */
#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "block/qcow2-int.h"
#include "util/cleanup.h"
#include "util/coroutine.h"
#include "util/xalloc.h"

#define MAX_EXTRA_DATA 1024             /* QEMU's QCOW_MAX_SNAPSHOT_EXTRA_DATA */

static int read_at(struct qcow2_state *s, uint64_t off, uint64_t len, void *buf)
{
    return len ? bnode_co_pread(s->bs->file, off, len, buf, BREQ_BEYOND_EOF) : 0;
}

static void snapshot_free(struct qsnapshot *sn)
{
    bsnapshot_clear(&sn->info);
    free(sn->extra_unknown);
    sn->extra_unknown = NULL;
}

void qcow2_snapshots_free(struct qcow2_state *s)
{
    for (uint32_t i = 0; s->snapshots && i < s->nb_snapshots; i++)
        snapshot_free(&s->snapshots[i]);
    free(s->snapshots);
    s->snapshots = NULL;
}

/* ---- the table ---- */

int qcow2_read_snapshots(struct qcow2_state *s, error **errp)
{
    if (s->nb_snapshots > QCOW2_MAX_SNAPSHOTS) {
        error_setg(errp, "Snapshot table too large");
        return -EFBIG;
    }
    /* QEMU's qcow2_validate_table: the offset is checked with no snapshots too */
    if (qoffset_into_cluster(s, s->snapshots_offset)) {
        error_setg(errp, "Snapshot table offset invalid");
        return -EINVAL;
    }
    if (!s->nb_snapshots)
        return 0;
    s->snapshots = xcalloc(s->nb_snapshots, sizeof(*s->snapshots));
    uint64_t off = s->snapshots_offset;
    for (uint32_t i = 0; i < s->nb_snapshots; i++) {
        struct qcow2_snapshot_header h;
        if (off - s->snapshots_offset > QCOW2_MAX_SNAPSHOTS_SIZE) {
            error_setg(errp, "Snapshot table too large");
            return -EFBIG;
        }
        int ret = read_at(s, off, sizeof(h), &h);
        if (ret < 0) {
            error_setg_errno(errp, -ret, "Failed to read snapshot table");
            return ret;
        }
        struct qsnapshot *sn = &s->snapshots[i];
        sn->l1_table_offset = be64toh(h.l1_table_offset);
        sn->l1_size = be32toh(h.l1_size);
        sn->info.date_sec = be32toh(h.date_sec);
        sn->info.date_nsec = be32toh(h.date_nsec);
        sn->info.vm_clock_nsec = be64toh(h.vm_clock_nsec);
        sn->info.vm_state_size = be32toh(h.vm_state_size);
        sn->info.icount = UINT64_MAX;
        sn->disk_size = s->size;
        /* the extra data may hold the large state size, the disk size and
         * the icount; what follows them is kept as it is; then the id and
         * the name */
        uint32_t extra_size = be32toh(h.extra_data_size);
        uint16_t id_size = be16toh(h.id_str_size), name_size = be16toh(h.name_size);
        struct qcow2_snapshot_extra extra;
        memset(&extra, 0, sizeof(extra));
        uint32_t known = extra_size < sizeof(extra) ? extra_size : sizeof(extra);
        if (extra_size - known > MAX_EXTRA_DATA) {
            error_setg(errp, "Too much extra metadata in snapshot table entry %u", i);
            return -EFBIG;
        }
        sn->extra_unknown_size = extra_size - known;
        sn->extra_unknown = sn->extra_unknown_size ? xmalloc(sn->extra_unknown_size) : NULL;
        sn->info.id = xzalloc((size_t)id_size + 1);
        sn->info.name = xzalloc((size_t)name_size + 1);
        uint64_t p = off + sizeof(h);
        if ((ret = read_at(s, p, known, &extra)) < 0 ||
            (ret = read_at(s, p + known, sn->extra_unknown_size, sn->extra_unknown)) < 0 ||
            (ret = read_at(s, p + extra_size, id_size, sn->info.id)) < 0 ||
            (ret = read_at(s, p + extra_size + id_size, name_size, sn->info.name)) < 0) {
            error_setg_errno(errp, -ret, "Failed to read snapshot table");
            return ret;
        }
        if (known >= offsetof(struct qcow2_snapshot_extra, vm_state_size_large) + 8)
            sn->info.vm_state_size = be64toh(extra.vm_state_size_large);
        if (known >= offsetof(struct qcow2_snapshot_extra, disk_size) + 8)
            sn->disk_size = be64toh(extra.disk_size);
        if (known >= offsetof(struct qcow2_snapshot_extra, icount) + 8)
            sn->info.icount = be64toh(extra.icount);
        off = (p + extra_size + id_size + name_size + 7) & ~7ull;
        if (sn->l1_size > QCOW2_MAX_L1_SIZE / 8 || qoffset_into_cluster(s, sn->l1_table_offset)) {
            error_setg(errp, "Snapshot L1 table offset invalid");
            return -EINVAL;
        }
    }
    s->snapshots_size = off - s->snapshots_offset;
    if (s->snapshots_size > QCOW2_MAX_SNAPSHOTS_SIZE) {
        error_setg(errp, "Snapshot table too large");
        return -EFBIG;
    }
    return 0;
}

/* Drop references to [off, off+len); clusters nobody references any more
 * are discarded in the file when the discard type asks for it. */
static int unref(struct qcow2_state *s, uint64_t off, uint64_t len, int type)
{
    int ret = qcow2_update_refcount(s, off, len, -1);
    if (ret < 0 || !len || !s->discard_passthrough[type] || !s->bs->file->discard)
        return ret;
    uint64_t first = off >> s->cluster_bits, last = (off + len - 1) >> s->cluster_bits;
    uint64_t run = 0;                   /* clusters before c that reached 0 */
    for (uint64_t c = first; c <= last + 1; c++) {
        uint64_t ref = 1;
        if (c <= last && qcow2_get_refcount(s, c, &ref) == 0 && ref == 0) {
            run++;
            continue;
        }
        if (run)
            bnode_co_pdiscard(s->bs->file, (c - run) << s->cluster_bits, run << s->cluster_bits);
        run = 0;
    }
    return 0;
}

/* len bytes of buf into new clusters: their offset (0 if len is 0), or
 * -errno with nothing allocated. */
static int64_t write_new(struct qcow2_state *s, const void *buf, uint64_t len)
{
    if (!len)
        return 0;
    int64_t off = qcow2_alloc_clusters(s, qsize_to_clusters(s, len));
    if (off < 0)
        return off;
    int ret = qcow2_overlap_check(s, 0, (uint64_t)off, len);
    if (ret == 0)
        ret = bnode_co_pwrite(s->bs->file, (uint64_t)off, len, buf, BREQ_BEYOND_EOF);
    if (ret < 0) {
        unref(s, (uint64_t)off, len, QFREE_ALWAYS);
        return ret;
    }
    return off;
}

/* QEMU's qcow2_write_snapshots: the table as it is in memory, into new
 * clusters; then the header; then the old table is freed. */
static int write_snapshots(struct qcow2_state *s)
{
    uint64_t size = 0;
    for (uint32_t i = 0; i < s->nb_snapshots; i++) {
        struct qsnapshot *sn = &s->snapshots[i];
        size = (size + 7) & ~7ull;
        size += sizeof(struct qcow2_snapshot_header) + sizeof(struct qcow2_snapshot_extra) +
                sn->extra_unknown_size + strlen(sn->info.id) + strlen(sn->info.name);
        if (size > QCOW2_MAX_SNAPSHOTS_SIZE)
            return -EFBIG;
    }
    CLEANUP_FREE uint8_t *buf = xzalloc(size ? size : 1);
    uint64_t p = 0;
    for (uint32_t i = 0; i < s->nb_snapshots; i++) {
        struct qsnapshot *sn = &s->snapshots[i];
        size_t id_len = strlen(sn->info.id), name_len = strlen(sn->info.name);
        p = (p + 7) & ~7ull;
        struct qcow2_snapshot_header h = {
            .l1_table_offset = htobe64(sn->l1_table_offset),
            .l1_size = htobe32(sn->l1_size),
            .id_str_size = htobe16((uint16_t)id_len),
            .name_size = htobe16((uint16_t)name_len),
            .date_sec = htobe32(sn->info.date_sec),
            .date_nsec = htobe32(sn->info.date_nsec),
            .vm_clock_nsec = htobe64(sn->info.vm_clock_nsec),
            /* a state too large for 32 bits: older readers see none */
            .vm_state_size = htobe32(sn->info.vm_state_size <= UINT32_MAX ?
                                     (uint32_t)sn->info.vm_state_size : 0),
            .extra_data_size = htobe32((uint32_t)sizeof(struct qcow2_snapshot_extra) +
                                       sn->extra_unknown_size),
        };
        struct qcow2_snapshot_extra extra = {
            .vm_state_size_large = htobe64(sn->info.vm_state_size),
            .disk_size = htobe64(sn->disk_size),
            .icount = htobe64(sn->info.icount),
        };
        memcpy(buf + p, &h, sizeof(h));
        p += sizeof(h);
        memcpy(buf + p, &extra, sizeof(extra));
        p += sizeof(extra);
        if (sn->extra_unknown_size)
            memcpy(buf + p, sn->extra_unknown, sn->extra_unknown_size);
        p += sn->extra_unknown_size;
        memcpy(buf + p, sn->info.id, id_len);
        p += id_len;
        memcpy(buf + p, sn->info.name, name_len);
        p += name_len;
    }
    int64_t table = write_new(s, buf, size);
    if (table < 0)
        return (int)table;
    /* the table and its clusters' references reach the disk before the
     * header points at them */
    int ret = qcow2_flush_metadata(s);
    if (ret == 0) {
        struct {
            uint32_t nb;
            uint64_t offset;
        } __attribute__((packed)) hd = { htobe32(s->nb_snapshots), htobe64((uint64_t)table) };
        ret = bnode_co_pwrite(s->bs->file, offsetof(struct qcow2_header, nb_snapshots),
                              sizeof(hd), &hd, 0);
        if (ret == 0)
            ret = bnode_co_flush(s->bs->file);
    }
    if (ret < 0) {
        unref(s, (uint64_t)table, size, QFREE_ALWAYS);
        return ret;
    }
    if (s->snapshots_size) {
        qcow2_meta_del(s, s->snapshots_offset, s->snapshots_size);
        unref(s, s->snapshots_offset, s->snapshots_size, QFREE_SNAPSHOT);
    }
    s->snapshots_offset = (uint64_t)table;
    s->snapshots_size = size;
    if (size)
        qcow2_meta_add_kind(s, (uint64_t)table, size, QOL_SNAPSHOT_TABLE);
    return 0;
}

/* ---- references ---- */

static uint64_t entry_at(const struct qcow2_state *s, const uint8_t *slice, uint64_t i)
{
    uint64_t v;
    memcpy(&v, slice + i * s->l2_entry_bytes, 8);
    return be64toh(v);
}

/* The entry for a cluster that has host offset `host`, with COPIED as its
 * count says; -errno if the count cannot be read. */
static int with_copied(struct qcow2_state *s, uint64_t entry, uint64_t host, uint64_t *out)
{
    uint64_t ref;
    int ret = qcow2_get_refcount(s, host >> s->cluster_bits, &ref);
    if (ret < 0)
        return ret;
    *out = ref == 1 ? entry | QCOW2_OFLAG_COPIED : entry & ~QCOW2_OFLAG_COPIED;
    return 0;
}

/* One L2 table: addend to its data clusters' references, and (an active
 * table) their COPIED flags after. */
static int update_l2(struct qcow2_state *s, uint64_t l2_off, int addend, bool active)
{
    for (uint64_t first = 0; first < s->l2_entries; first += s->l2_slice_entries) {
        int idx, ret = qcache_get(s, &s->l2c, l2_off + first * s->l2_entry_bytes, true, &idx);
        if (ret < 0)
            return ret;
        uint8_t *slice = qcache_data(&s->l2c, idx);
        bool changed = false;
        for (uint64_t j = 0; j < s->l2_slice_entries && ret == 0; j++) {
            uint64_t e = entry_at(s, slice, j), ne = e;
            if (e & QCOW2_OFLAG_COMPRESSED) {
                /* shared or not, never written in place: no COPIED */
                uint64_t coff = e & s->coffset_mask;
                uint64_t nsec = ((e >> s->csize_shift) & s->csize_mask) + 1;
                uint64_t start = coff & ~511ull, len = nsec * 512;
                if (addend > 0)
                    ret = qcow2_update_refcount(s, start, len, addend);
                else if (addend < 0)
                    ret = unref(s, start, len, QFREE_SNAPSHOT);
                continue;
            }
            uint64_t host = e & QCOW2_L2E_OFFSET_MASK;
            if (!host)
                continue;
            if (qoffset_into_cluster(s, host)) {
                qcow2_signal_corruption(s, true, -1, -1, "Cluster allocation offset %#"
                                        PRIx64 " unaligned (L2 offset: %#" PRIx64
                                        ", L2 index: %#" PRIx64 ")", host, l2_off, first + j);
                ret = -EIO;
                break;
            }
            if (addend > 0)
                ret = qcow2_update_refcount(s, host, s->cluster_size, addend);
            else if (addend < 0)
                ret = unref(s, host, s->cluster_size, QFREE_SNAPSHOT);
            if (ret == 0 && active)
                ret = with_copied(s, e, host, &ne);
            if (ret == 0 && ne != e) {
                uint64_t v = htobe64(ne);
                pthread_mutex_lock(&s->cache_lock);
                memcpy(slice + j * s->l2_entry_bytes, &v, 8);
                pthread_mutex_unlock(&s->cache_lock);
                changed = true;
            }
        }
        if (changed)
            qcache_mark_dirty(s, &s->l2c, idx);
        qcache_put(s, &s->l2c, idx);
        if (ret < 0)
            return ret;
    }
    return 0;
}

/* QEMU's qcow2_update_snapshot_refcount: add addend (1, -1 or 0) to the
 * references of every cluster the L1 table at l1_off reaches, then set
 * COPIED in that L1 and its L2 tables where a cluster is referenced once
 * and clear it elsewhere.  The active L1 changes in memory as on disk.  A
 * snapshot's tables (only ever passed to drop it) are not changed: those
 * it shares with the active L1 get their flags from the pass over that
 * one, and nothing reads the flags of a table no active L1 reaches. */
static int update_refs(struct qcow2_state *s, uint64_t l1_off, uint32_t l1_size, int addend)
{
    bool active = l1_off == s->l1_offset;
    CLEANUP_FREE uint64_t *l1 = xcalloc(l1_size ? l1_size : 1, 8);
    int ret = 0;
    if (active) {
        pthread_mutex_lock(&s->cache_lock);
        memcpy(l1, s->l1, l1_size * 8ull);
        pthread_mutex_unlock(&s->cache_lock);
    } else {
        ret = read_at(s, l1_off, l1_size * 8ull, l1);
        if (ret < 0)
            return ret;
        for (uint32_t i = 0; i < l1_size; i++)
            l1[i] = be64toh(l1[i]);
    }
    bool changed = false;
    for (uint32_t i = 0; i < l1_size; i++) {
        uint64_t l2_off = l1[i] & QCOW2_L1E_OFFSET_MASK, ne = l1[i];
        if (!l2_off)
            continue;
        if (qoffset_into_cluster(s, l2_off)) {
            qcow2_signal_corruption(s, true, -1, -1, "L2 table offset %#" PRIx64
                                    " unaligned (L1 index: %#" PRIx32 ")", l2_off, i);
            return -EIO;
        }
        ret = update_l2(s, l2_off, addend, active);
        if (ret == 0 && addend > 0)
            ret = qcow2_update_refcount(s, l2_off, s->cluster_size, addend);
        else if (ret == 0 && addend < 0)
            ret = unref(s, l2_off, s->cluster_size, QFREE_SNAPSHOT);
        if (ret == 0)
            ret = with_copied(s, l1[i], l2_off, &ne);
        if (ret < 0)
            return ret;
        if (addend < 0 && !(ne & QCOW2_OFLAG_COPIED)) {
            uint64_t ref = 1;
            if (qcow2_get_refcount(s, l2_off >> s->cluster_bits, &ref) == 0 && ref == 0) {
                /* free now: its cluster may come back as data or a table */
                qcache_drop(s, &s->l2c, l2_off, s->cluster_size);
                qcow2_meta_del(s, l2_off, s->cluster_size);
            }
        }
        if (ne != l1[i]) {
            l1[i] = ne;
            changed = true;
        }
    }
    if (!active || !changed)
        return 0;
    CLEANUP_FREE uint64_t *be = xmalloc(l1_size * 8ull);
    for (uint32_t i = 0; i < l1_size; i++)
        be[i] = htobe64(l1[i]);
    ret = qcow2_overlap_check(s, QOL_ACTIVE_L1, l1_off, l1_size * 8ull);
    if (ret == 0)
        ret = bnode_co_pwrite(s->bs->file, l1_off, l1_size * 8ull, be, 0);
    if (ret < 0)
        return ret;
    pthread_mutex_lock(&s->cache_lock);
    memcpy(s->l1, l1, l1_size * 8ull);
    pthread_mutex_unlock(&s->cache_lock);
    return 0;
}

/* ---- create, delete, list ---- */

static int find_snapshot(struct qcow2_state *s, const char *id, const char *name)
{
    for (uint32_t i = 0; i < s->nb_snapshots; i++) {
        const struct bsnapshot *sn = &s->snapshots[i].info;
        if ((!id || !strcmp(sn->id, id)) && (!name || !strcmp(sn->name, name)))
            return (int)i;
    }
    return -1;
}

int qcow2_snapshot_list(struct bnode *bs, struct bsnapshot **list)
{
    struct qcow2_state *s = bs->opaque;
    if (s->data != s->bs->file)
        return -ENOTSUP;                /* QEMU: none with an external data file */
    *list = xcalloc(s->nb_snapshots ? s->nb_snapshots : 1, sizeof(**list));
    for (uint32_t i = 0; i < s->nb_snapshots; i++) {
        (*list)[i] = s->snapshots[i].info;
        (*list)[i].id = xstrdup(s->snapshots[i].info.id);
        (*list)[i].name = xstrdup(s->snapshots[i].info.name);
    }
    return (int)s->nb_snapshots;
}

static int create_locked(struct qcow2_state *s, struct bsnapshot *info)
{
    if (s->data != s->bs->file)
        return -ENOTSUP;                /* QEMU: not with an external data file */
    if (s->corrupt)
        return -EIO;                    /* nothing is written any more */
    if (s->nb_snapshots >= QCOW2_MAX_SNAPSHOTS)
        return -EFBIG;
    /* the id: one more than the largest number among the ids */
    unsigned long max = 0;
    for (uint32_t i = 0; i < s->nb_snapshots; i++) {
        unsigned long v = strtoul(s->snapshots[i].info.id, NULL, 10);
        if (v > max)
            max = v;
    }
    char id[24];
    snprintf(id, sizeof(id), "%lu", max + 1);

    /* the copy of the active L1 */
    uint64_t l1_bytes = s->l1_size * 8ull;
    CLEANUP_FREE uint64_t *be = xmalloc(l1_bytes ? l1_bytes : 8);
    pthread_mutex_lock(&s->cache_lock);
    for (uint32_t i = 0; i < s->l1_size; i++)
        be[i] = htobe64(s->l1[i]);
    pthread_mutex_unlock(&s->cache_lock);
    int64_t l1_off = write_new(s, be, l1_bytes);
    if (l1_off < 0)
        return (int)l1_off;
    /* every cluster it reaches gains a reference; all of that is on disk
     * before the table names the snapshot */
    int ret = update_refs(s, s->l1_offset, s->l1_size, 1);
    bool counted = ret == 0;
    if (ret == 0)
        ret = qcow2_flush_metadata(s);
    if (ret == 0) {
        struct qsnapshot *list = xrealloc(s->snapshots, (s->nb_snapshots + 1) * sizeof(*list));
        s->snapshots = list;
        struct qsnapshot *sn = &list[s->nb_snapshots];
        *sn = (struct qsnapshot){ .info = *info, .l1_table_offset = (uint64_t)l1_off,
                                  .l1_size = s->l1_size, .disk_size = s->size };
        sn->info.id = xstrdup(id);
        sn->info.name = xstrdup(info->name);
        s->nb_snapshots++;
        ret = write_snapshots(s);
        if (ret < 0) {
            s->nb_snapshots--;
            snapshot_free(sn);
        }
    }
    if (ret < 0) {
        /* give the references back if they were all taken (QEMU leaves
         * them: leaked clusters); a partial count stays a leak */
        if (counted)
            update_refs(s, s->l1_offset, s->l1_size, -1);
        unref(s, (uint64_t)l1_off, l1_bytes, QFREE_ALWAYS);
        qcow2_flush_metadata(s);
        return ret;
    }
    if (l1_bytes)
        qcow2_meta_add_kind(s, (uint64_t)l1_off, l1_bytes, QOL_INACTIVE_L1);
    free(info->id);
    info->id = xstrdup(id);
    return 0;
}

int qcow2_snapshot_create(struct bnode *bs, struct bsnapshot *info)
{
    struct qcow2_state *s = bs->opaque;
    co_mutex_lock(&s->lock);
    int ret = create_locked(s, info);
    co_mutex_unlock(&s->lock);
    /* a count past refcount_bits: QEMU's update_refcount says EINVAL */
    return ret == -ERANGE ? -EINVAL : ret;
}

static int delete_locked(struct qcow2_state *s, const char *id, const char *name,
                         struct bsnapshot *gone, error **errp)
{
    if (s->data != s->bs->file) {
        error_setg_errno(errp, ENOTSUP, "Can't delete snapshots of images with an "
                         "external data file");
        return -ENOTSUP;
    }
    if (s->corrupt) {
        error_setg_errno(errp, EIO, "Image is corrupt");
        return -EIO;
    }
    int i = find_snapshot(s, id, name);
    if (i < 0) {
        error_setg(errp, "Can't find the snapshot");
        return -ENOENT;
    }
    struct qsnapshot sn = s->snapshots[i];
    memmove(&s->snapshots[i], &s->snapshots[i + 1],
            (s->nb_snapshots - (uint32_t)i - 1) * sizeof(sn));
    s->nb_snapshots--;
    int ret = write_snapshots(s);
    if (ret < 0) {
        memmove(&s->snapshots[i + 1], &s->snapshots[i],
                (s->nb_snapshots - (uint32_t)i) * sizeof(sn));
        s->snapshots[i] = sn;
        s->nb_snapshots++;
        error_setg_errno(errp, -ret, "Failed to remove snapshot from snapshot list");
        return ret;
    }
    *gone = sn.info;
    free(sn.extra_unknown);
    /* gone from the table: a failure from here on only leaks clusters */
    qcow2_meta_del(s, sn.l1_table_offset, sn.l1_size * 8ull);
    ret = update_refs(s, sn.l1_table_offset, sn.l1_size, -1);
    if (ret == 0)
        ret = unref(s, sn.l1_table_offset, sn.l1_size * 8ull, QFREE_SNAPSHOT);
    if (ret < 0) {
        error_setg_errno(errp, -ret, "Failed to free the cluster and L1 table");
        return ret;
    }
    ret = update_refs(s, s->l1_offset, s->l1_size, 0);
    if (ret == 0)
        ret = qcow2_flush_metadata(s);
    if (ret < 0) {
        error_setg_errno(errp, -ret, "Failed to update snapshot status in disk");
        return ret;
    }
    return 0;
}

int qcow2_snapshot_delete(struct bnode *bs, const char *id, const char *name,
                          struct bsnapshot *gone, error **errp)
{
    struct qcow2_state *s = bs->opaque;
    co_mutex_lock(&s->lock);
    int ret = delete_locked(s, id, name, gone, errp);
    co_mutex_unlock(&s->lock);
    return ret;
}
