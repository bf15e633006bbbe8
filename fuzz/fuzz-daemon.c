/* See fuzz-daemon.h. */
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include "fuzz-daemon.h"
#include "qmp/qmp.h"
#include "qmp/schema.h"
#include "util/log.h"
#include "util/loop.h"

struct boot {
    void (*setup)(void *opaque);
    void *opaque;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    bool done;
};

static void setup_cb(void *opaque)
{
    struct boot *b = opaque;

    b->setup(b->opaque);
    pthread_mutex_lock(&b->lock);
    b->done = true;
    pthread_cond_signal(&b->cond);
    pthread_mutex_unlock(&b->lock);
}

/* The main loop belongs to the thread that made it (loop_main_init). */
static void *main_loop_thread(void *opaque)
{
    loop_main_init();
    schema_init();
    loop_call(loop_main(), setup_cb, opaque);
    loop_run(loop_main());
    return NULL;
}

void fuzz_daemon_start(void (*setup)(void *opaque), void *opaque)
{
    static struct boot b = { .lock = PTHREAD_MUTEX_INITIALIZER,
                             .cond = PTHREAD_COND_INITIALIZER };
    pthread_t t;

    log_debug_enabled = false;
    b.setup = setup;
    b.opaque = opaque;
    pthread_create(&t, NULL, main_loop_thread, &b);
    pthread_mutex_lock(&b.lock);
    while (!b.done)
        pthread_cond_wait(&b.cond, &b.lock);
    pthread_mutex_unlock(&b.lock);
}

void fuzz_qmp(const char *fmt, ...)
{
    va_list ap;
    char *text;

    va_start(ap, fmt);
    if (vasprintf(&text, fmt, ap) < 0)
        abort();
    va_end(ap);
    json_t *req = json_loads(text, 0, NULL);
    json_t *rsp = qmp_dispatch(req, true);
    if (!json_object_get(rsp, "return")) {
        char *s = json_dumps(rsp, 0);
        fprintf(stderr, "fuzz set-up failed: %s -> %s\n", text, s);
        abort();
    }
    json_decref(rsp);
    json_decref(req);
    free(text);
}
