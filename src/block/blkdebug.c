/*
 * Driver "blkdebug": QEMU 7.2's fault-injection filter.  It sits on an
 * "image" child and passes every request down, except when a rule says
 * to fail it.
 *
 * Rules work as QEMU's: an `inject-error` or `set-state` rule belongs to
 * an event (BlkdebugEvent).  When a node above (or this one) raises the
 * event, every rule of it whose `state` is 0 or the current state fires:
 * the inject-error rules that fire replace the list of active rules, and
 * a set-state rule sets the state once all fired.  Every request this
 * node serves is then checked against the active rules: the first one
 * whose I/O type matches (default: all but block-status) and whose
 * `sector` (if any) lies in the request fails it with -errno, after a
 * turn of the loop unless `immediately`; a `once` rule is then deleted.
 *
 * Events raised in bexd, where QEMU raises them: read_aio and write_aio
 * by raw on its file child before a read or write; flush_to_os and
 * flush_to_disk on the primary child of a node being flushed; pwritev /
 * pwritev_zero on each node a write / write-zeroes is issued to and
 * pwritev_done when it completes; qcow2's events (l1_update, l2_load,
 * l2_update, l2_alloc_*, refblock_*, reftable_load, cluster_alloc,
 * cluster_free, cow_read/write, read_aio, read_backing_aio,
 * read_compressed, write_aio) by qcow2 on its file child where QEMU's
 * qcow2 raises them.  The other names are accepted and fire never.
 *
 * Limits, as QEMU's refresh_limits and generic block layer apply them:
 * align (request alignment), max-transfer (reads and writes are split),
 * opt-write-zero / max-write-zero (write-zeroes split at those; a piece
 * smaller than the alignment becomes a write of zeros, or -ENOTSUP under
 * NO_FALLBACK), opt-discard / max-discard (split; a piece smaller than
 * the request alignment is dropped, as QEMU's advisory discard).
 *
 * `config` names a file in QEMU's config syntax ([inject-error] and
 * [set-state] groups of `key = "value"` lines), read at open.
 */
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "block/block.h"
#include "util/keyval.h"
#include "util/loop.h"
#include "util/opts.h"
#include "util/xalloc.h"

static const char *const event_names[] = {
    "l1_update", "l1_grow_alloc_table", "l1_grow_write_table", "l1_grow_activate_table",
    "l2_load", "l2_update", "l2_update_compressed", "l2_alloc_cow_read", "l2_alloc_write",
    "read_aio", "read_backing_aio", "read_compressed", "write_aio", "write_compressed",
    "vmstate_load", "vmstate_save", "cow_read", "cow_write", "reftable_load",
    "reftable_grow", "reftable_update", "refblock_load", "refblock_update",
    "refblock_update_part", "refblock_alloc", "refblock_alloc_hookup",
    "refblock_alloc_write", "refblock_alloc_write_blocks", "refblock_alloc_write_table",
    "refblock_alloc_switch_table", "cluster_alloc", "cluster_alloc_bytes", "cluster_free",
    "flush_to_os", "flush_to_disk", "pwritev_rmw_head", "pwritev_rmw_after_head",
    "pwritev_rmw_tail", "pwritev_rmw_after_tail", "pwritev", "pwritev_zero",
    "pwritev_done", "empty_image_prepare", "l1_shrink_write_table",
    "l1_shrink_free_l2_clusters", "cor_write", "cluster_alloc_space", "none",
};
#define N_EVENTS ((int)ARRAY_SIZE(event_names))
_Static_assert(BLKDBG_L1_UPDATE == 0 && BLKDBG_L2_LOAD == 4 && BLKDBG_READ_AIO == 9 &&
               BLKDBG_WRITE_AIO == 12 && BLKDBG_COW_READ == 16 && BLKDBG_REFBLOCK_LOAD == 21 &&
               BLKDBG_CLUSTER_ALLOC == 30 && BLKDBG_FLUSH_TO_OS == 33 &&
               BLKDBG_PWRITEV == 39 && BLKDBG_PWRITEV_DONE == 41 &&
               BLKDBG_L1_SHRINK_WRITE_TABLE == 43 && BLKDBG_CLUSTER_ALLOC_SPACE == 46,
               "event numbers as in event_names");

enum io_type { IO_READ, IO_WRITE, IO_WRITE_ZEROES, IO_DISCARD, IO_FLUSH, IO_BLOCK_STATUS };
static const char *const iotype_names[] = {
    "read", "write", "write-zeroes", "discard", "flush", "block-status",
};

struct rule {
    int event;
    bool inject;                /* inject-error, else set-state */
    int state;                  /* 0: any */
    /* inject-error */
    uint64_t iotype_mask;
    int error;
    bool immediately, once;
    int64_t offset;             /* -1: any */
    /* set-state */
    int new_state;
    struct rule *next;          /* in rules[event], newest first (QEMU's order) */
    struct rule *active_next;
};

struct bd_state {
    pthread_mutex_t lock;
    struct rule *rules[N_EVENTS];
    struct rule *active;        /* fired by the last event that fired any */
    int state;
    uint32_t align, max_transfer, opt_write_zero, max_write_zero, opt_discard, max_discard;
    uint64_t take_perm, unshare_perm;
    char *config;
};

int blkdebug_nodes;

/* ---- rules ---- */

static int event_lookup(const char *name)
{
    for (int i = 0; i < N_EVENTS; i++)
        if (!strcmp(event_names[i], name))
            return i;
    return -1;
}

/* One rule from an object with the members of BlkdebugInjectErrorOptions
 * or BlkdebugSetStateOptions (strings for event and iotype). */
static int add_rule(struct bd_state *s, json_t *o, bool inject, error **errp)
{
    const char *ev = opt_str(o, "event", NULL);
    if (!ev) {
        error_setg(errp, "Missing event name for rule");
        return -1;
    }
    int event = event_lookup(ev);
    if (event < 0) {
        error_setg(errp, "invalid parameter value: %s", ev);
        return -1;
    }
    struct rule *r = xzalloc(sizeof(*r));
    r->event = event;
    r->inject = inject;
    r->state = (int)opt_int(o, "state", 0);
    if (inject) {
        const char *io = opt_str(o, "iotype", NULL);
        if (io) {
            int t = -1;
            for (int i = 0; i < (int)ARRAY_SIZE(iotype_names); i++)
                if (!strcmp(iotype_names[i], io))
                    t = i;
            if (t < 0) {
                error_setg(errp, "invalid parameter value: %s", io);
                free(r);
                return -1;
            }
            r->iotype_mask = 1ull << t;
        } else {
            r->iotype_mask = (1ull << IO_READ) | (1ull << IO_WRITE) |
                             (1ull << IO_WRITE_ZEROES) | (1ull << IO_DISCARD) |
                             (1ull << IO_FLUSH);
        }
        r->error = (int)opt_int(o, "errno", EIO);
        r->once = opt_bool(o, "once", false);
        r->immediately = opt_bool(o, "immediately", false);
        int64_t sector = opt_int(o, "sector", -1);
        r->offset = sector == -1 ? -1 : (int64_t)((uint64_t)sector * 512);
    } else {
        r->new_state = (int)opt_int(o, "new_state", 0);
    }
    r->next = s->rules[event];
    s->rules[event] = r;
    return 0;
}

static void remove_rule(struct bd_state *s, struct rule *r)
{
    for (struct rule **p = &s->rules[r->event]; *p; p = &(*p)->next)
        if (*p == r) {
            *p = r->next;
            break;
        }
    for (struct rule **p = &s->active; *p; p = &(*p)->active_next)
        if (*p == r) {
            *p = r->active_next;
            break;
        }
    free(r);
}

static void bd_debug_event(struct bnode *bs, int event)
{
    struct bd_state *s = bs->opaque;
    if (event < 0 || event >= N_EVENTS)
        return;
    pthread_mutex_lock(&s->lock);
    int new_state = s->state;
    int injects = 0;
    for (struct rule *r = s->rules[event]; r; r = r->next) {
        if (r->state && r->state != s->state)
            continue;
        if (r->inject) {
            if (++injects == 1)
                s->active = NULL;
            r->active_next = s->active;
            s->active = r;
        } else {
            new_state = r->new_state;
        }
    }
    s->state = new_state;
    pthread_mutex_unlock(&s->lock);
}

/* 0, or the -errno an active rule injects into this request. */
static int rule_check(struct bd_state *s, uint64_t offset, uint64_t bytes, enum io_type t,
                      bool *immediately)
{
    pthread_mutex_lock(&s->lock);
    struct rule *r;
    for (r = s->active; r; r = r->active_next) {
        bool at = r->offset == -1 ||
                  (bytes && (uint64_t)r->offset >= offset && (uint64_t)r->offset < offset + bytes);
        if (at && (r->iotype_mask & (1ull << t)))
            break;
    }
    if (!r || r->error <= 0) {
        pthread_mutex_unlock(&s->lock);
        return 0;
    }
    int err = r->error;
    *immediately = r->immediately;
    if (r->once)
        remove_rule(s, r);
    pthread_mutex_unlock(&s->lock);
    return -err;
}

/* ---- QEMU's config file ---- */

static const char *const inject_keys[] = {
    "event", "state", "iotype", "errno", "sector", "once", "immediately", NULL,
};
static const char *const set_state_keys[] = { "event", "state", "new_state", NULL };

static bool key_in(const char *const *keys, const char *k)
{
    for (; *keys; keys++)
        if (!strcmp(*keys, k))
            return true;
    return false;
}

/* qemu_opt_set of one "key = value" into a group object, with its errors. */
static int config_set(json_t *group, bool inject, const char *key, const char *value, error **errp)
{
    if (!key_in(inject ? inject_keys : set_state_keys, key)) {
        error_setg(errp, "Invalid parameter '%s'", key);
        return -1;
    }
    if (!strcmp(key, "event") || !strcmp(key, "iotype")) {
        json_object_set_new(group, key, json_string(value));
    } else if (!strcmp(key, "once") || !strcmp(key, "immediately")) {
        bool b;
        if (!strcmp(value, "on") || !strcmp(value, "yes") || !strcmp(value, "true") ||
            !strcmp(value, "y"))
            b = true;
        else if (!strcmp(value, "off") || !strcmp(value, "no") || !strcmp(value, "false") ||
                 !strcmp(value, "n"))
            b = false;
        else {
            error_setg(errp, "Parameter '%s' expects 'on' or 'off'", key);
            return -1;
        }
        json_object_set_new(group, key, json_boolean(b));
    } else {
        char *end;
        errno = 0;
        unsigned long long v = strtoull(value, &end, 0);
        if (!*value || *end || errno) {
            error_setg(errp, "Parameter '%s' expects a number", key);
            return -1;
        }
        json_object_set_new(group, key, json_integer((json_int_t)v));
    }
    return 0;
}

/* Parse the file into the two lists of groups, as qemu_config_parse. */
static int read_config(const char *filename, json_t *inject, json_t *set_state, error **errp)
{
    FILE *f = fopen(filename, "r");
    if (!f) {
        error_setg(errp, "Could not read blkdebug config file: %s", strerror(errno));
        return -1;
    }
    char line[1024], group[64], arg[64], value[1024];
    json_t *cur = NULL;
    bool cur_inject = false;
    int ret = -1;
    while (fgets(line, sizeof(line), f)) {
        size_t len = strlen(line);
        if (len && line[len - 1] != '\n' && !feof(f)) {
            error_setg(errp, "line too long");
            goto out;
        }
        if (line[0] == '\n' || line[0] == '#')
            continue;
        if (sscanf(line, "[%63s \"%1023[^\"]\"]", group, value) == 2 ||
            sscanf(line, "[%63[^]]]", group) == 1) {
            if (strcmp(group, "inject-error") && strcmp(group, "set-state")) {
                error_setg(errp, "There is no option group '%s'", group);
                goto out;
            }
            cur_inject = !strcmp(group, "inject-error");
            cur = json_object();
            json_array_append_new(cur_inject ? inject : set_state, cur);
            continue;
        }
        value[0] = '\0';
        if (sscanf(line, " %63s = \"%1023[^\"]\"", arg, value) == 2 ||
            sscanf(line, " %63s = \"\"", arg) == 1) {
            if (!cur) {
                error_setg(errp, "no group defined");
                goto out;
            }
            if (config_set(cur, cur_inject, arg, value, errp) < 0)
                goto out;
            continue;
        }
        error_setg(errp, "parse error");
        goto out;
    }
    ret = 0;
out:
    fclose(f);
    return ret;
}

/* ---- open / close ---- */

static int get_limit(json_t *opts, const char *key, uint64_t *out, error **errp)
{
    json_int_t v = opt_int(opts, key, 0);
    if (v < 0) {
        error_setg(errp, "Parameter '%s' expects a non-negative number below 2^64", key);
        return -1;
    }
    *out = (uint64_t)v;
    return 0;
}

static bool is_pow2(uint64_t v) { return v && !(v & (v - 1)); }

static uint64_t perm_list(json_t *list)
{
    static const char *const names[] = { "consistent-read", "write", "write-unchanged", "resize" };
    uint64_t p = 0;
    size_t i;
    json_t *v;
    json_array_foreach(list, i, v)
        for (int b = 0; b < 4; b++)
            if (json_is_string(v) && !strcmp(json_string_value(v), names[b]))
                p |= 1u << b;
    return p;
}

static void bd_close(struct bnode *bs)
{
    struct bd_state *s = bs->opaque;
    for (int e = 0; e < N_EVENTS; e++)
        while (s->rules[e])
            remove_rule(s, s->rules[e]);
    pthread_mutex_destroy(&s->lock);
    free(s->config);
    free(s);
    __atomic_sub_fetch(&blkdebug_nodes, 1, __ATOMIC_RELAXED);
}

static const char *const limit_keys[] = {
    "align", "max-transfer", "opt-write-zero", "max-write-zero", "opt-discard", "max-discard",
};

/* What QEMU's blkdebug_open does before it opens the image: its options'
 * types (a negative size, in QEMU's walk of the options), the config file,
 * the rules. */
static int bd_open_prepare(struct bnode *bs, json_t *opts, error **errp)
{
    struct bd_state *s = xzalloc(sizeof(*s));
    pthread_mutex_init(&s->lock, NULL);
    s->state = 1;
    bs->opaque = s;
    __atomic_add_fetch(&blkdebug_nodes, 1, __ATOMIC_RELAXED);

    CLEANUP_JSON json_t *ordered = qdict_ordered(opts);
    const char *k;
    json_t *v;
    json_object_foreach(ordered, k, v) {
        uint64_t unused;
        for (size_t i = 0; i < ARRAY_SIZE(limit_keys); i++)
            if (!strcmp(k, limit_keys[i]) && get_limit(opts, k, &unused, errp) < 0)
                return -1;
    }
    CLEANUP_JSON json_t *inject = json_array();
    CLEANUP_JSON json_t *set_state = json_array();
    const char *config = opt_str(opts, "config", NULL);
    if (config) {
        s->config = xstrdup(config);
        if (read_config(config, inject, set_state, errp) < 0)
            return -1;
    }
    json_array_extend(inject, json_object_get(opts, "inject-error"));
    json_array_extend(set_state, json_object_get(opts, "set-state"));
    size_t i;
    json_t *o;
    json_array_foreach(inject, i, o)
        if (add_rule(s, o, true, errp) < 0)
            return -1;
    json_array_foreach(set_state, i, o)
        if (add_rule(s, o, false, errp) < 0)
            return -1;
    return 0;
}

static int bd_open(struct bnode *bs, json_t *opts, error **errp)
{
    struct bd_state *s = bs->opaque;

    /* QEMU's checks, in its order, now that the image is open */
    uint64_t align, v;
    if (get_limit(opts, "align", &v, errp) < 0)
        return -1;
    if (v && (v >= INT_MAX || !is_pow2(v))) {
        error_setg(errp, "Cannot meet constraints with align %" PRIu64, v);
        return -1;
    }
    s->align = (uint32_t)v;
    align = MAX(s->align, bs->file->request_alignment);
    static const struct { const char *key; int base; } lim[] = {
        { "max-transfer", 0 }, { "opt-write-zero", 0 }, { "max-write-zero", 1 },
        { "opt-discard", 0 }, { "max-discard", 3 },
    };
    uint32_t *dst[] = { &s->max_transfer, &s->opt_write_zero, &s->max_write_zero,
                        &s->opt_discard, &s->max_discard };
    for (size_t k = 0; k < ARRAY_SIZE(lim); k++) {
        if (get_limit(opts, lim[k].key, &v, errp) < 0)
            return -1;
        /* max-write-zero and max-discard: aligned to their opt- as well */
        uint64_t a = lim[k].base ? MAX(*dst[lim[k].base], align) : align;
        if (v && (v >= INT_MAX || v % a)) {
            error_setg(errp, "Cannot meet constraints with %s %" PRIu64, lim[k].key, v);
            return -1;
        }
        *dst[k] = (uint32_t)v;
    }
    s->take_perm = perm_list(json_object_get(opts, "take-child-perms"));
    s->unshare_perm = perm_list(json_object_get(opts, "unshare-child-perms"));

    bs->size = bs->file->size;
    bs->request_alignment = MAX(s->align, bs->file->request_alignment);
    bs->max_transfer = s->max_transfer ? s->max_transfer : bs->file->max_transfer;
    return 0;     /* read-write over a read-only image, as QEMU: writers are refused */
}

/* ---- requests ---- */

static const unsigned char zero_buf[65536];

struct bd_req {
    struct bnode *bs;
    struct breq *parent;
    struct breq sub;
    struct iovec *iov;          /* the sub-request's slice of the parent's */
    uint64_t base;              /* node offset of the parent's first byte */
    uint64_t off, end;          /* progress, node offsets */
    uint64_t piece_end;         /* write-zeroes / discard: QEMU's current piece */
    uint64_t zalign, zmax;      /* write-zeroes / discard alignment and maximum */
    uint64_t head;
    bool fallback;              /* the piece is written as zero buffers */
    bool skip;                  /* the piece is a discard dropped */
    int levels;                 /* pwritev_done events to raise at the end */
    bool fua_checked;
    bool in_run, sub_done;
    int sub_ret, ret;
};

static void bd_finish_now(struct bd_req *d)
{
    struct breq *r = d->parent;
    int ret = d->ret;
    if (ret == 0 && (r->op == BREQ_WRITE || r->op == BREQ_WRITE_ZEROES)) {
        /* A write past the end (BREQ_BEYOND_EOF: qcow2 allocating) grew the
         * image: this node's length follows it (QEMU's blkdebug has no
         * length of its own), or the next request there would be refused
         * as past the end. */
        uint64_t fsz = __atomic_load_n(&d->bs->file->size, __ATOMIC_RELAXED);
        uint64_t cur = __atomic_load_n(&d->bs->size, __ATOMIC_RELAXED);
        while (fsz > cur && !__atomic_compare_exchange_n(&d->bs->size, &cur, fsz, true,
                                                          __ATOMIC_RELAXED, __ATOMIC_RELAXED))
            ;
    }
    for (int i = 0; i < d->levels; i++)
        bd_debug_event(d->bs, BLKDBG_PWRITEV_DONE);
    free(d->iov);
    free(d);
    breq_complete(r, ret);
}

static void bd_finish_cb(void *opaque)
{
    bd_finish_now(opaque);
}

static void bd_finish(struct bd_req *d, int ret, bool later)
{
    d->ret = ret;
    if (later)
        loop_call(d->parent->loop, bd_finish_cb, d);
    else
        bd_finish_now(d);
}

/* The parent's iovecs for [skip, skip+len) of its data. */
static int iov_slice(const struct iovec *src, int cnt, uint64_t skip, uint64_t len,
                     struct iovec *dst)
{
    int n = 0;
    for (int i = 0; i < cnt && len; i++) {
        if (skip >= src[i].iov_len) {
            skip -= src[i].iov_len;
            continue;
        }
        uint64_t take = MIN(src[i].iov_len - skip, len);
        dst[n].iov_base = (char *)src[i].iov_base + skip;
        dst[n].iov_len = take;
        n++;
        len -= take;
        skip = 0;
    }
    return n;
}

/* QEMU's split of write-zeroes (bdrv_co_do_pwrite_zeroes) and discard
 * (bdrv_co_pdiscard) into pieces: the next one from d->off. */
static void next_piece(struct bd_req *d)
{
    struct bd_state *s = d->bs->opaque;
    uint64_t ra = d->bs->request_alignment ? d->bs->request_alignment : 1;
    uint64_t bytes = d->end - d->off, num = bytes;
    uint64_t tail = d->end % d->zalign;
    if (d->parent->op == BREQ_WRITE_ZEROES) {
        if (d->head) {
            num = MIN(bytes, d->zalign - d->head);
            d->head = (d->head + num) % d->zalign;
        } else if (tail && num > d->zalign) {
            num -= tail;
        }
        num = MIN(num, d->zmax);
        d->fallback = num < d->zalign;
        d->skip = false;
    } else {
        if (d->head) {
            num = MIN(bytes, d->zalign - d->head);
            if (num % ra)
                num %= ra;
            d->head = (d->head + num) % d->zalign;
        } else if (tail) {
            if (num > d->zalign)
                num -= tail;
            else if (tail % ra && tail > ra)
                num -= tail % ra;
        }
        num = MIN(num, d->zmax);
        d->skip = num < ra;
        d->fallback = false;
    }
    (void)s;
    d->piece_end = d->off + num;
}

static void bd_sub_done(struct breq *sub, int ret);

/* Issue pieces until one is in flight or the request is done. */
static void bd_run(struct bd_req *d)
{
    struct bd_state *s = d->bs->opaque;
    struct breq *r = d->parent;
    for (;;) {
        if (d->off >= d->end && r->op != BREQ_FLUSH) {
            /* QEMU has no FUA through blkdebug: it writes, then flushes
             * (raising the flush events if a node above emulates it) */
            if ((r->flags & BREQ_FUA) && !d->fua_checked &&
                (r->op == BREQ_WRITE || r->op == BREQ_WRITE_ZEROES)) {
                d->fua_checked = true;
                if (d->levels > 1) {
                    bd_debug_event(d->bs, BLKDBG_FLUSH_TO_OS);
                    bd_debug_event(d->bs, BLKDBG_FLUSH_TO_DISK);
                }
                bool immediately = false;
                int err = rule_check(s, 0, 0, IO_FLUSH, &immediately);
                if (err) {
                    bd_finish(d, err, !immediately);
                    return;
                }
            }
            bd_finish(d, 0, false);
            return;
        }
        enum breq_op op = r->op;
        enum io_type t;
        uint64_t num = d->end - d->off;
        unsigned flags = r->flags & (BREQ_FUA | BREQ_BEYOND_EOF);
        switch (r->op) {
        case BREQ_READ:
        case BREQ_WRITE:
            t = r->op == BREQ_READ ? IO_READ : IO_WRITE;
            if (s->max_transfer)
                num = MIN(num, s->max_transfer);
            break;
        case BREQ_WRITE_ZEROES:
            if (d->off >= d->piece_end)
                next_piece(d);
            num = d->piece_end - d->off;
            if (d->fallback) {
                if (r->flags & BREQ_NO_FALLBACK) {
                    bd_finish(d, -ENOTSUP, false);
                    return;
                }
                op = BREQ_WRITE;
                t = IO_WRITE;
                num = MIN(num, sizeof(zero_buf));
                if (s->max_transfer)
                    num = MIN(num, s->max_transfer);
            } else {
                t = IO_WRITE_ZEROES;
                flags = r->flags;
            }
            break;
        case BREQ_DISCARD:
            next_piece(d);
            num = d->piece_end - d->off;
            t = IO_DISCARD;
            if (d->skip) {
                d->off += num;
                continue;
            }
            break;
        case BREQ_FLUSH:
            t = IO_FLUSH;
            num = 0;
            break;
        default:
            bd_finish(d, 0, false);
            return;
        }
        bool immediately = false;
        int err = rule_check(s, d->off, num, t, &immediately);
        if (err) {
            bd_finish(d, err, !immediately);
            return;
        }
        if (op == BREQ_DISCARD && !d->bs->file->discard) {
            d->off += num;           /* the child ignores discards (as raw passes them) */
            continue;
        }
        struct breq *sub = &d->sub;
        memset(sub, 0, sizeof(*sub));
        sub->op = op;
        sub->flags = flags;
        sub->offset = d->off;
        sub->len = num;
        sub->loop = r->loop;
        sub->done = bd_sub_done;
        sub->opaque = d;
        if (op == BREQ_READ || op == BREQ_WRITE) {
            if (r->op == BREQ_WRITE_ZEROES) {
                d->iov[0].iov_base = (void *)zero_buf;
                d->iov[0].iov_len = num;
                sub->iovcnt = 1;
            } else {
                sub->iovcnt = iov_slice(r->iov, r->iovcnt, d->off - d->base, num, d->iov);
            }
            sub->iov = d->iov;
        }
        d->in_run = true;
        d->sub_done = false;
        bnode_submit_child(d->bs->file, sub, d->off);
        d->in_run = false;
        if (!d->sub_done)
            return;                  /* bd_sub_done goes on */
        if (d->sub_ret < 0) {
            bd_finish(d, d->sub_ret, false);
            return;
        }
        d->off += num;
        if (r->op == BREQ_FLUSH) {
            bd_finish(d, 0, false);
            return;
        }
    }
}

static void bd_sub_done(struct breq *sub, int ret)
{
    struct bd_req *d = sub->opaque;
    if (d->in_run) {
        d->sub_done = true;
        d->sub_ret = ret;
        return;
    }
    if (ret < 0) {
        bd_finish(d, ret, false);
        return;
    }
    d->off += sub->len;
    if (d->parent->op == BREQ_FLUSH) {
        bd_finish(d, 0, false);
        return;
    }
    bd_run(d);
}

static void bd_submit(struct bnode *bs, struct breq *r, uint64_t offset)
{
    struct bd_state *s = bs->opaque;
    if (r->op == BREQ_CACHE) {
        breq_complete(r, 0);
        return;
    }
    struct bd_req *d = xzalloc(sizeof(*d));
    d->bs = bs;
    d->parent = r;
    d->base = d->off = offset;
    d->end = offset + r->len;
    d->iov = xmalloc(sizeof(*d->iov) * (size_t)MAX(r->iovcnt, 1));
    uint64_t ra = bs->request_alignment ? bs->request_alignment : 1;
    if (r->op == BREQ_WRITE || r->op == BREQ_WRITE_ZEROES)
        d->levels = r->acct_fwd + 1;     /* pwritev_done: this level and those above */
    if (r->op == BREQ_WRITE_ZEROES) {
        d->zalign = MAX(s->opt_write_zero, ra);
        uint64_t m = s->max_write_zero ? s->max_write_zero : INT64_MAX;
        d->zmax = m / d->zalign * d->zalign;
    } else if (r->op == BREQ_DISCARD) {
        d->zalign = MAX(s->opt_discard, ra);
        uint64_t m = s->max_discard ? s->max_discard : INT64_MAX;
        d->zmax = m / d->zalign * d->zalign;
    }
    if (d->zalign) {
        d->head = offset % d->zalign;
        d->piece_end = offset;
    }
    bd_run(d);
}

static int bd_block_status(struct bnode *bs, uint64_t offset, uint64_t bytes,
                           uint64_t *pnum, unsigned *flags)
{
    bool immediately;
    int err = rule_check(bs->opaque, offset, bytes, IO_BLOCK_STATUS, &immediately);
    if (err)
        return err;
    int depth;
    return bnode_block_status(bs->file, offset, bytes, pnum, flags, &depth);
}

/* take-child-perms / unshare-child-perms, as QEMU's blkdebug_child_perm */
static void bd_child_perm(struct bnode *bs, uint64_t *perm, uint64_t *shared)
{
    struct bd_state *s = bs->opaque;
    *perm |= s->take_perm;
    *shared &= ~s->unshare_perm;
}

static const char *const bd_strong_opts[] = {
    "config", "inject-error.", "set-state.", "align", "max-transfer", "opt-write-zero",
    "max-write-zero", "opt-discard", "max-discard", NULL
};

static const struct bdrv bdrv_blkdebug = {
    .is_protocol = true,
    .strong_opts = bd_strong_opts,
    .filename_rule = FNAME_BLKDEBUG,
    .name = "blkdebug",
    .is_filter = true,
    .child_key = "image",
    .open_prepare = bd_open_prepare,
    .open = bd_open,
    .close = bd_close,
    .submit = bd_submit,
    .block_status = bd_block_status,
    .truncate = bnode_filter_truncate,
    .child_resized = bnode_filter_child_resized,
    .child_perm = bd_child_perm,
    .debug_event = bd_debug_event,
    .can_write_zeroes_fast = bnode_filter_can_write_zeroes_fast,
    .can_discard = bnode_filter_can_discard,
};
BDRV_REGISTER(bdrv_blkdebug)
