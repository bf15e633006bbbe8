/*
 * The "iothread" object: a thread running its own event loop (and so its
 * own I/O engine).  Exports given iothread=ID run their sockets and
 * requests there.
 */
#include <inttypes.h>
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
#include "object/iothread.h"
#include "object/qom.h"
#include "qmp/qmp.h"
#include "util/cleanup.h"
#include "util/keyval.h"
#include "util/loop.h"
#include "util/opts.h"

struct iothread_start {
    struct iothread *t;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    bool started;
};

static void *iothread_main(void *arg)
{
    struct iothread_start *st = arg;
    struct iothread *t = st->t;
    t->tid = syscall(SYS_gettid);
    pthread_mutex_lock(&st->lock);
    st->started = true;
    pthread_cond_signal(&st->cond);
    pthread_mutex_unlock(&st->lock);
    loop_run(t->loop);
    return NULL;
}

/* Event-loop parameters in the order QEMU sets (and so checks) them. */
static const char *const params[] = { "aio-max-batch", "thread-pool-min", "thread-pool-max",
                                      "poll-max-ns", "poll-grow", "poll-shrink" };

static int check_param(const char *name, int64_t v, error **errp)
{
    if (v < 0) {
        error_setg(errp, "%s value must be in range [0, %" PRId64 "]", name, INT64_MAX);
        return -1;
    }
    return 0;
}

static int check_pool(int64_t min, int64_t max, error **errp)
{
    if (max <= 0 || min > max || max > INT_MAX) {
        error_setg(errp, "bad thread-pool-min/thread-pool-max values");
        return -1;
    }
    return 0;
}

/* QEMU sets an event loop's properties one by one, in its QDict's order,
 * checking each value; the main loop's pool sizes are checked as each is
 * set (with the other's value so far), an iothread's once it starts. */
static int check_params(json_t *props, bool pool_each, error **errp)
{
    CLEANUP_JSON json_t *ordered = qdict_ordered(props);
    int64_t min = 0, max = IOTHREAD_POOL_MAX_DEFAULT;
    const char *k;
    json_t *v;
    json_object_foreach(ordered, k, v) {
        size_t i = 0;
        while (i < ARRAY_SIZE(params) && strcmp(params[i], k))
            i++;
        if (i == ARRAY_SIZE(params))
            continue;
        if (check_param(k, json_integer_value(v), errp) < 0)
            return -1;
        if (!strcmp(k, "thread-pool-min"))
            min = json_integer_value(v);
        else if (!strcmp(k, "thread-pool-max"))
            max = json_integer_value(v);
        if (pool_each && check_pool(min, max, errp) < 0)
            return -1;
    }
    return 0;
}

static int iothread_complete(struct object *obj, json_t *props, error **errp)
{
    struct iothread *t = (struct iothread *)obj;
    t->poll_max_ns = opt_int(props, "poll-max-ns", LOOP_POLL_NS_DEFAULT);
    t->poll_grow = opt_int(props, "poll-grow", 0);
    t->poll_shrink = opt_int(props, "poll-shrink", 0);
    t->aio_max_batch = opt_int(props, "aio-max-batch", 0);
    if (check_params(props, false, errp) < 0)
        return -1;
    if (check_pool(opt_int(props, "thread-pool-min", 0),
                   opt_int(props, "thread-pool-max", IOTHREAD_POOL_MAX_DEFAULT), errp) < 0)
        return -1;
    t->loop = loop_new(obj->id);
    loop_set_poll_ns(t->loop, t->poll_max_ns);
    loop_set_poll_grow_shrink(t->loop, t->poll_grow, t->poll_shrink);
    struct iothread_start st = { .t = t };
    pthread_mutex_init(&st.lock, NULL);
    pthread_cond_init(&st.cond, NULL);
    if (pthread_create(&t->thread, NULL, iothread_main, &st) != 0) {
        error_setg(errp, "Failed to create iothread thread");
        loop_free(t->loop);
        t->loop = NULL;
        return -1;
    }
    pthread_mutex_lock(&st.lock);
    while (!st.started)
        pthread_cond_wait(&st.cond, &st.lock);
    pthread_mutex_unlock(&st.lock);
    pthread_mutex_destroy(&st.lock);
    pthread_cond_destroy(&st.cond);
    return 0;
}

static void iothread_finalize(struct object *obj)
{
    struct iothread *t = (struct iothread *)obj;
    if (!t->loop)
        return;
    loop_stop(t->loop);
    pthread_join(t->thread, NULL);
    loop_free(t->loop);
}

/* qom-set of an event-loop parameter: its range, and the pool sizes it
 * makes with the other one (a refused value leaves the old one). */
static int check_set(struct object *obj, const char *name, int64_t v, error **errp)
{
    if (check_param(name, v, errp) < 0)
        return -1;
    if (!strcmp(name, "thread-pool-min"))
        return check_pool(v, opt_int(obj->props, "thread-pool-max", IOTHREAD_POOL_MAX_DEFAULT),
                          errp);
    if (!strcmp(name, "thread-pool-max"))
        return check_pool(opt_int(obj->props, "thread-pool-min", 0), v, errp);
    return 0;
}

/* qom-set: the polling parameters take effect at once, as QEMU's; the
 * others are recorded (bexd sizes its worker pools itself). */
static int iothread_set_prop(struct object *obj, const char *name, json_t *value, error **errp)
{
    struct iothread *t = (struct iothread *)obj;
    int64_t v = json_integer_value(value);
    if (check_set(obj, name, v, errp) < 0)
        return -1;
    if (!strcmp(name, "poll-max-ns")) {
        t->poll_max_ns = v;
        loop_set_poll_ns(t->loop, v);
    } else if (!strcmp(name, "poll-grow")) {
        t->poll_grow = v;
        loop_set_poll_grow_shrink(t->loop, t->poll_grow, t->poll_shrink);
    } else if (!strcmp(name, "poll-shrink")) {
        t->poll_shrink = v;
        loop_set_poll_grow_shrink(t->loop, t->poll_grow, t->poll_shrink);
    } else if (!strcmp(name, "aio-max-batch")) {
        t->aio_max_batch = v;
    }
    return 0;
}

static const struct qom_prop event_loop_base_props[] = {
    { "thread-pool-min", "int", "int", "0" },
    { "aio-max-batch", "int", "int", "0" },
    { "thread-pool-max", "int", "int", "64" },
    { NULL },
};
static struct qom_class event_loop_base_class = {
    .name = "event-loop-base", .parent = "object", .abstract = true, .user_creatable = true,
    .props = event_loop_base_props,
};
QOM_CLASS_REGISTER(event_loop_base_class)

static const struct qom_prop iothread_props[] = {
    { "poll-max-ns", "int", "int", "32768" },
    { "poll-grow", "int", "int", "0" },
    { "poll-shrink", "int", "int", "0" },
    { NULL },
};
static struct qom_class iothread_class = {
    .name = "iothread", .parent = "event-loop-base", .props = iothread_props,
};
QOM_CLASS_REGISTER(iothread_class)

static const struct object_type iothread_type = {
    .name = "iothread",
    .instance_size = sizeof(struct iothread),
    .qom = &iothread_class,
    .set_prop = iothread_set_prop,
    .complete = iothread_complete,
    .finalize = iothread_finalize,
};
OBJECT_TYPE_REGISTER(iothread_type)

/* ---- the "main-loop" object ----
 *
 * QEMU's handle on the main loop's event-loop parameters: at most one
 * exists, and it cannot be deleted.  bexd checks and records the values
 * (qom-get reports them); it sizes its worker pools itself. */

static struct object *main_loop_obj;

static int main_loop_complete(struct object *obj, json_t *props, error **errp)
{
    /* QEMU checks the values as they are set, before the object is */
    if (check_params(props, true, errp) < 0)
        return -1;
    if (main_loop_obj) {
        error_setg(errp, "only one main-loop instance allowed");
        return -1;
    }
    main_loop_obj = obj;
    return 0;
}

static int main_loop_set_prop(struct object *obj, const char *name, json_t *value, error **errp)
{
    return check_set(obj, name, json_integer_value(value), errp);
}

static bool main_loop_can_delete(struct object *obj)
{
    return false;                       /* QEMU: "... is in use, can not be deleted" */
}

static void main_loop_finalize(struct object *obj)
{
    if (main_loop_obj == obj)           /* at exit */
        main_loop_obj = NULL;
}

static struct qom_class main_loop_class = {
    .name = "main-loop", .parent = "event-loop-base",
};
QOM_CLASS_REGISTER(main_loop_class)

static const struct object_type main_loop_type = {
    .name = "main-loop",
    .instance_size = sizeof(struct object),
    .qom = &main_loop_class,
    .set_prop = main_loop_set_prop,
    .complete = main_loop_complete,
    .can_delete = main_loop_can_delete,
    .finalize = main_loop_finalize,
};
OBJECT_TYPE_REGISTER(main_loop_type)

struct iothread *iothread_find(const char *id, error **errp)
{
    struct object *o = object_find(id);
    if (!o || o->type != &iothread_type) {
        error_setg(errp, "iothread \"%s\" not found", id);
        return NULL;
    }
    return (struct iothread *)o;
}

static void add_info(json_t *list, struct object *o)
{
    struct iothread *t = (struct iothread *)o;
    json_array_append_new(list, json_pack("{s:s, s:i, s:I, s:I, s:I, s:I}",
                                          "id", o->id, "thread-id", (int)t->tid,
                                          "poll-max-ns", (json_int_t)t->poll_max_ns,
                                          "poll-grow", (json_int_t)t->poll_grow,
                                          "poll-shrink", (json_int_t)t->poll_shrink,
                                          "aio-max-batch", (json_int_t)t->aio_max_batch));
}

json_t *query_iothreads(void)
{
    json_t *list = json_array();
    /* objects are kept newest first; report in creation order */
    struct object *found[256];
    int n = 0;
    for (struct object *o = object_first(); o && n < 256; o = o->next)
        if (o->type == &iothread_type)
            found[n++] = o;
    while (n > 0)
        add_info(list, found[--n]);
    return list;
}

static json_t *qmp_query_iothreads(json_t *args, error **errp)
{
    return query_iothreads();
}
QMP_COMMAND("query-iothreads", qmp_query_iothreads)
