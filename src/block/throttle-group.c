/*
 * Throttle groups (throttle-group.h).
 *
 * Theory of operation.  A group has six leaky buckets, as QEMU's: bytes
 * and operations, each for reads and writes together ("total") or for
 * one direction.  A bucket with a rate (avg, per second) drains at that
 * rate; every request that goes through adds its bytes, or its operations
 * (one, or bytes / iops-size when larger), to the buckets of its
 * direction.  A request may go while each of those buckets holds no more
 * than its size: a tenth of a second's worth, or with a burst rate (max)
 * max * burst-length, the burst level also staying under a tenth of max.
 * So a request larger than the bucket still goes, and the ones after it
 * wait until it has drained.
 *
 * Requests that must wait queue in the group, one FIFO per direction,
 * whichever node and loop they come from, so a node never overtakes
 * another's waiting request (QEMU takes the group's nodes in turn; here
 * the turn is the request's).  One timer per direction, of the main loop
 * (armed there; another loop asks it to), wakes when the head's wait is
 * over: it lets through every request that may go by then and hands each
 * back to the loop that submitted it.  The queues and buckets are under
 * the group's lock, from any loop; the timers go with the object, and the
 * state with the last of the object and a pending request to arm.
 * While a drain is under way (throttle_bypass_begin) nothing waits, as in
 * QEMU: a snapshot, an export's removal or the daemon's stop would
 * otherwise wait out the limits of every request queued.
 *
 * Limits come from "limits" (ThrottleLimits) or the older flat x-*
 * properties, which win; qom-set of "limits" changes only the fields it
 * names and takes effect at once (the buckets start empty again); the x-*
 * ones cannot change after creation.  Checks and messages are QEMU's.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "block/throttle-group.h"
#include "object/object.h"
#include "object/qom.h"
#include "util/loop.h"
#include "util/xalloc.h"

#define THROTTLE_VALUE_MAX 1000000000000000ull
#define NS 1000000000.0

enum { B_BPS_TOTAL, B_BPS_READ, B_BPS_WRITE, B_OPS_TOTAL, B_OPS_READ, B_OPS_WRITE, B_COUNT };
enum what { AVG, MAX, LEN, SIZE };

struct bucket {
    uint64_t avg, max, burst_length;
    double level, burst_level;
};

struct limits {
    struct bucket b[B_COUNT];
    uint64_t op_size;
};

/* ThrottleLimits, in QAPI's order. */
static const struct {
    const char *name;
    int bucket;
    enum what what;
} fields[] = {
    { "iops-total", B_OPS_TOTAL, AVG }, { "iops-total-max", B_OPS_TOTAL, MAX },
    { "iops-total-max-length", B_OPS_TOTAL, LEN },
    { "iops-read", B_OPS_READ, AVG }, { "iops-read-max", B_OPS_READ, MAX },
    { "iops-read-max-length", B_OPS_READ, LEN },
    { "iops-write", B_OPS_WRITE, AVG }, { "iops-write-max", B_OPS_WRITE, MAX },
    { "iops-write-max-length", B_OPS_WRITE, LEN },
    { "bps-total", B_BPS_TOTAL, AVG }, { "bps-total-max", B_BPS_TOTAL, MAX },
    { "bps-total-max-length", B_BPS_TOTAL, LEN },
    { "bps-read", B_BPS_READ, AVG }, { "bps-read-max", B_BPS_READ, MAX },
    { "bps-read-max-length", B_BPS_READ, LEN },
    { "bps-write", B_BPS_WRITE, AVG }, { "bps-write-max", B_BPS_WRITE, MAX },
    { "bps-write-max-length", B_BPS_WRITE, LEN },
    { "iops-size", 0, SIZE },
};
#define NFIELDS (sizeof(fields) / sizeof(fields[0]))

struct waiter {
    struct throttle_group *g;
    struct bnode *bs;
    struct breq *req;
    uint64_t offset;
    struct waiter *next;
};

/* The group's state outlives its object while a timer is armed (refs). */
struct throttle_group {
    struct object *obj;                 /* NULL once deleted */
    int refs;                           /* the object, armed timers (atomic) */
    struct throttle_group *next_group;  /* every live group (main thread) */
    pthread_mutex_t lock;
    struct limits lim;
    uint64_t last_ns;
    struct waiter *head[2], **tail[2];
    bool armed[2];                      /* its timer runs */
    bool arming[2];                     /* the main loop is asked to arm it */
    struct dir_timer {
        struct throttle_group *g;
        bool write;
        struct loop_timer *timer;
    } timers[2];
};

/* The QOM object: object-del and the waiters' pins act on it. */
struct tg_object {
    struct object obj;
    struct throttle_group *g;
};

static void group_unref(struct throttle_group *g)
{
    if (__atomic_sub_fetch(&g->refs, 1, __ATOMIC_ACQ_REL) == 0) {
        pthread_mutex_destroy(&g->lock);
        free(g);
    }
}

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static uint64_t *field_ptr(struct limits *l, size_t i)
{
    struct bucket *b = &l->b[fields[i].bucket];
    switch (fields[i].what) {
    case AVG: return &b->avg;
    case MAX: return &b->max;
    case LEN: return &b->burst_length;
    default: return &l->op_size;
    }
}

/* Field i of l, named name in the caller's input. */
static int set_field(struct limits *l, size_t i, uint64_t n, const char *name, error **errp)
{
    if (fields[i].what == LEN && n > 0xffffffffu) {
        error_setg(errp, "%s value must be in the range [0, %u]", name, 0xffffffffu);
        return -1;
    }
    *field_ptr(l, i) = n;
    return 0;
}

static void limits_init(struct limits *l)
{
    memset(l, 0, sizeof(*l));
    for (int i = 0; i < B_COUNT; i++)
        l->b[i].burst_length = 1;
}

/* QEMU's throttle_limits_to_config: the fields v names, into l. */
static int limits_apply(struct limits *l, json_t *v, error **errp)
{
    for (size_t i = 0; i < NFIELDS; i++) {
        json_t *x = json_object_get(v, fields[i].name);
        if (x && set_field(l, i, (uint64_t)json_integer_value(x), fields[i].name, errp) < 0)
            return -1;
    }
    return 0;
}

/* QEMU's throttle_is_valid. */
static int limits_check(const struct limits *l, error **errp)
{
    const struct bucket *b = l->b;
    bool bps = b[B_BPS_TOTAL].avg && (b[B_BPS_READ].avg || b[B_BPS_WRITE].avg);
    bool ops = b[B_OPS_TOTAL].avg && (b[B_OPS_READ].avg || b[B_OPS_WRITE].avg);
    bool bps_max = b[B_BPS_TOTAL].max && (b[B_BPS_READ].max || b[B_BPS_WRITE].max);
    bool ops_max = b[B_OPS_TOTAL].max && (b[B_OPS_READ].max || b[B_OPS_WRITE].max);

    if (bps || ops || bps_max || ops_max) {
        error_setg(errp, "bps/iops/max total values and read/write values cannot be used "
                   "at the same time");
        return -1;
    }
    if (l->op_size && !b[B_OPS_TOTAL].avg && !b[B_OPS_READ].avg && !b[B_OPS_WRITE].avg) {
        error_setg(errp, "iops size requires an iops value to be set");
        return -1;
    }
    for (int i = 0; i < B_COUNT; i++) {
        if (b[i].avg > THROTTLE_VALUE_MAX || b[i].max > THROTTLE_VALUE_MAX) {
            error_setg(errp, "bps/iops/max values must be within [0, %llu]",
                       THROTTLE_VALUE_MAX);
            return -1;
        }
        if (!b[i].burst_length) {
            error_setg(errp, "the burst length cannot be 0");
            return -1;
        }
        if (b[i].burst_length > 1 && !b[i].max) {
            error_setg(errp, "burst length set without burst rate");
            return -1;
        }
        if (b[i].max && b[i].burst_length > THROTTLE_VALUE_MAX / b[i].max) {
            error_setg(errp, "burst length too high for this burst rate");
            return -1;
        }
        if (b[i].max && !b[i].avg) {
            error_setg(errp, "bps_max/iops_max require corresponding bps/iops values");
            return -1;
        }
        if (b[i].max && b[i].max < b[i].avg) {
            error_setg(errp, "bps_max/iops_max cannot be lower than bps/iops");
            return -1;
        }
    }
    return 0;
}

/* ---- the buckets (group lock held) ---- */

static double drain(double level, uint64_t rate, double dt)
{
    double x = level - (double)rate * dt / NS;
    return x > 0 ? x : 0;
}

static void leak(struct throttle_group *g, uint64_t now)
{
    double dt = (double)(now - g->last_ns);
    g->last_ns = now;
    for (int i = 0; i < B_COUNT; i++) {
        struct bucket *b = &g->lim.b[i];
        b->level = drain(b->level, b->avg, dt);
        if (b->max > b->avg)
            b->burst_level = drain(b->burst_level, b->max, dt);
    }
}

static uint64_t bucket_wait(const struct bucket *b)
{
    if (!b->avg)
        return 0;
    double size = b->max ? (double)b->max * (double)b->burst_length : (double)b->avg / 10;
    double extra = b->level - size;
    if (extra > 0)
        return (uint64_t)(extra / (double)b->avg * NS);
    if (b->burst_length > 1) {
        extra = b->burst_level - (double)b->max / 10;
        if (extra > 0)
            return (uint64_t)(extra / (double)b->max * NS);
    }
    return 0;
}

static uint64_t dir_wait(const struct throttle_group *g, bool write)
{
    const int kinds[4] = { B_BPS_TOTAL, write ? B_BPS_WRITE : B_BPS_READ,
                           B_OPS_TOTAL, write ? B_OPS_WRITE : B_OPS_READ };
    uint64_t w = 0;
    for (int i = 0; i < 4; i++) {
        uint64_t x = bucket_wait(&g->lim.b[kinds[i]]);
        w = x > w ? x : w;
    }
    return w;
}

static void account(struct throttle_group *g, bool write, uint64_t bytes)
{
    double units = 1;
    if (g->lim.op_size && bytes > g->lim.op_size)
        units = (double)bytes / (double)g->lim.op_size;
    const int bps[2] = { B_BPS_TOTAL, write ? B_BPS_WRITE : B_BPS_READ };
    const int ops[2] = { B_OPS_TOTAL, write ? B_OPS_WRITE : B_OPS_READ };
    for (int i = 0; i < 2; i++) {
        struct bucket *b = &g->lim.b[bps[i]], *o = &g->lim.b[ops[i]];
        b->level += (double)bytes;
        o->level += units;
        if (b->burst_length > 1)
            b->burst_level += (double)bytes;
        if (o->burst_length > 1)
            o->burst_level += units;
    }
}

/* ---- waiting requests ---- */

static void resubmit(void *opaque)
{
    struct waiter *w = opaque;
    struct object *o = w->g->obj;
    bnode_submit_child(w->bs->file, w->req, w->offset);
    free(w);
    object_unref(o);
}

/* Requests let through: each goes on in the loop that submitted it. */
static void dispatch(struct waiter *list)
{
    while (list) {
        struct waiter *w = list;
        list = w->next;
        if (loop_in_thread(w->req->loop))
            resubmit(w);
        else
            loop_call(w->req->loop, resubmit, w);
    }
}

/* Main thread, group lock held: the timer of a direction whose head waits. */
static void arm(struct throttle_group *g, bool write)
{
    g->armed[write] = true;
    loop_timer_arm(g->timers[write].timer, (dir_wait(g, write) + 999999) / 1000000);
}

/* The head's wait is over: let through what may go now. */
static void timer_fired(void *opaque)
{
    struct dir_timer *t = opaque;
    struct throttle_group *g = t->g;
    bool write = t->write;
    struct waiter *go = NULL, **go_tail = &go;

    pthread_mutex_lock(&g->lock);
    g->armed[write] = false;
    leak(g, now_ns());
    while (g->head[write] && dir_wait(g, write) == 0) {
        struct waiter *w = g->head[write];
        g->head[write] = w->next;
        if (!g->head[write])
            g->tail[write] = &g->head[write];
        account(g, write, w->req->len);
        w->next = NULL;
        *go_tail = w;
        go_tail = &w->next;
    }
    if (g->head[write])
        arm(g, write);
    pthread_mutex_unlock(&g->lock);
    dispatch(go);
}

/* A request queued in another loop's thread: the main loop arms. */
struct arm_call {
    struct throttle_group *g;
    bool write;
};

static void arm_in_main(void *opaque)
{
    struct arm_call *c = opaque;
    struct throttle_group *g = c->g;
    pthread_mutex_lock(&g->lock);
    if (g->obj && g->head[c->write] && !g->armed[c->write])
        arm(g, c->write);
    g->arming[c->write] = false;
    pthread_mutex_unlock(&g->lock);
    group_unref(g);
    free(c);
}

static int bypass;                      /* drains under way (atomic) */
static struct throttle_group *groups;

bool throttle_group_intercept(struct throttle_group *g, bool write, struct bnode *bs,
                              struct breq *req, uint64_t offset)
{
    pthread_mutex_lock(&g->lock);
    leak(g, now_ns());
    if (__atomic_load_n(&bypass, __ATOMIC_ACQUIRE) ||
        (!g->head[write] && !dir_wait(g, write))) {
        account(g, write, req->len);
        pthread_mutex_unlock(&g->lock);
        return false;
    }
    struct waiter *w = xzalloc(sizeof(*w));
    w->g = g;
    w->bs = bs;
    w->req = req;
    w->offset = offset;
    object_ref(g->obj);                 /* the group outlives its waiters */
    *g->tail[write] = w;
    g->tail[write] = &w->next;
    if (!g->armed[write] && loop_in_thread(loop_main())) {
        arm(g, write);
    } else if (!g->armed[write] && !g->arming[write]) {
        struct arm_call *c = xzalloc(sizeof(*c));
        c->g = g;
        c->write = write;
        g->arming[write] = true;
        __atomic_add_fetch(&g->refs, 1, __ATOMIC_ACQ_REL);
        loop_call(loop_main(), arm_in_main, c);
    }
    pthread_mutex_unlock(&g->lock);
    return true;
}

void throttle_bypass_begin(void)
{
    if (__atomic_fetch_add(&bypass, 1, __ATOMIC_ACQ_REL) > 0)
        return;
    for (struct throttle_group *g = groups; g; g = g->next_group) {
        struct waiter *go[2];
        pthread_mutex_lock(&g->lock);
        for (int d = 0; d < 2; d++) {
            go[d] = g->head[d];
            g->head[d] = NULL;
            g->tail[d] = &g->head[d];
            for (struct waiter *w = go[d]; w; w = w->next)
                account(g, d, w->req->len);
        }
        pthread_mutex_unlock(&g->lock);
        dispatch(go[0]);
        dispatch(go[1]);
    }
}

void throttle_bypass_end(void)
{
    __atomic_sub_fetch(&bypass, 1, __ATOMIC_ACQ_REL);
}

/* ---- the object ---- */

static const struct object_type throttle_group_type;

struct throttle_group *throttle_group_get(const char *id, error **errp)
{
    struct object *o = object_find(id);
    if (!o || o->type != &throttle_group_type) {
        error_setg(errp, "Throttle group '%s' does not exist", id);
        return NULL;
    }
    object_ref(o);
    return ((struct tg_object *)o)->g;
}

void throttle_group_put(struct throttle_group *g)
{
    if (g)
        object_unref(g->obj);
}

/* x-NAME: the flat property of a ThrottleLimits field, or -1. */
static int flat_field(const char *prop)
{
    if (strncmp(prop, "x-", 2))
        return -1;
    for (size_t i = 0; i < NFIELDS; i++)
        if (!strcmp(prop + 2, fields[i].name))
            return (int)i;
    return -1;
}

static int tg_complete(struct object *obj, json_t *props, error **errp)
{
    struct limits l;

    limits_init(&l);
    json_t *lim = json_object_get(props, "limits");
    if (lim && limits_apply(&l, lim, errp) < 0)
        return -1;
    const char *key;
    json_t *v;
    json_object_foreach(props, key, v) {
        int i = flat_field(key);
        if (i < 0)
            continue;
        json_int_t n = json_integer_value(v);
        if (n < 0) {
            error_setg(errp, "Property values cannot be negative");
            return -1;
        }
        if (set_field(&l, (size_t)i, (uint64_t)n, key, errp) < 0)
            return -1;
    }
    if (limits_check(&l, errp) < 0)
        return -1;
    struct throttle_group *g = xzalloc(sizeof(*g));
    ((struct tg_object *)obj)->g = g;
    g->obj = obj;
    g->refs = 1;
    pthread_mutex_init(&g->lock, NULL);
    g->lim = l;
    g->last_ns = now_ns();
    for (int d = 0; d < 2; d++) {
        g->tail[d] = &g->head[d];
        /* one main-loop timer per direction, freed with the object, so
         * none outlives the group */
        g->timers[d] = (struct dir_timer){ .g = g, .write = d };
        g->timers[d].timer = loop_timer_new(loop_main(), timer_fired, &g->timers[d]);
    }
    g->next_group = groups;
    groups = g;
    return 0;
}

static void tg_finalize(struct object *obj)
{
    struct throttle_group *g = ((struct tg_object *)obj)->g;
    if (!g)                             /* never completed */
        return;
    for (struct throttle_group **p = &groups; *p; p = &(*p)->next_group)
        if (*p == g) {
            *p = g->next_group;
            break;
        }
    pthread_mutex_lock(&g->lock);
    g->obj = NULL;
    for (int d = 0; d < 2; d++)
        loop_timer_free(g->timers[d].timer);
    pthread_mutex_unlock(&g->lock);
    group_unref(g);                     /* a pending arm_in_main may hold it still */
}

static int tg_set_prop(struct object *obj, const char *name, json_t *value, error **errp)
{
    struct throttle_group *g = ((struct tg_object *)obj)->g;
    if (strcmp(name, "limits")) {
        error_setg(errp, "Property cannot be set after initialization");
        return -1;
    }
    pthread_mutex_lock(&g->lock);
    struct limits l = g->lim;
    int ret = limits_apply(&l, value, errp);
    if (ret == 0)
        ret = limits_check(&l, errp);
    if (ret == 0) {
        for (int i = 0; i < B_COUNT; i++)
            l.b[i].level = l.b[i].burst_level = 0;
        g->lim = l;
        g->last_ns = now_ns();
    }
    pthread_mutex_unlock(&g->lock);
    return ret;
}

static json_t *tg_get_prop(struct object *obj, const char *name)
{
    struct throttle_group *g = ((struct tg_object *)obj)->g;
    pthread_mutex_lock(&g->lock);
    struct limits l = g->lim;
    pthread_mutex_unlock(&g->lock);
    int i = flat_field(name);
    if (i >= 0)
        return json_integer((json_int_t)*field_ptr(&l, (size_t)i));
    if (strcmp(name, "limits"))
        return NULL;
    json_t *o = json_object();
    for (size_t k = 0; k < NFIELDS; k++)
        json_object_set_new(o, fields[k].name, json_integer((json_int_t)*field_ptr(&l, k)));
    return o;
}

static const struct qom_prop tg_props[] = {
    { "limits", "ThrottleLimits", "ThrottleLimits", NULL },
#define X(n) { "x-" n, "int", "int", NULL }
    X("iops-total"), X("iops-total-max"), X("iops-total-max-length"),
    X("iops-read"), X("iops-read-max"), X("iops-read-max-length"),
    X("iops-write"), X("iops-write-max"), X("iops-write-max-length"),
    X("bps-total"), X("bps-total-max"), X("bps-total-max-length"),
    X("bps-read"), X("bps-read-max"), X("bps-read-max-length"),
    X("bps-write"), X("bps-write-max"), X("bps-write-max-length"),
    X("iops-size"),
#undef X
    { NULL },
};

static struct qom_class tg_class = {
    .name = "throttle-group", .parent = "object", .user_creatable = true, .props = tg_props,
};
QOM_CLASS_REGISTER(tg_class)

static const struct object_type throttle_group_type = {
    .name = "throttle-group",
    .instance_size = sizeof(struct tg_object),
    .qom = &tg_class,
    .complete = tg_complete,
    .finalize = tg_finalize,
    .set_prop = tg_set_prop,
    .get_prop = tg_get_prop,
};
OBJECT_TYPE_REGISTER(throttle_group_type)
