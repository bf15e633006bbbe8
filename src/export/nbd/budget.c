/*
 * The memory bound on NBD request buffers, across all connections.
 *
 * Theory of operation.  READ and WRITE data live in per-slot buffers.  A
 * connection may hold at most NBD_CONN_BUF_BUDGET of them, and all
 * connections together at most the budget (NBD_BUF_BUDGET): a buffer is
 * only allocated after nbd_budget_take() reserved its bytes, atomically,
 * so the bound is hard whatever the number of connections and threads.
 *
 * A connection that cannot get memory stops parsing and waits
 * (nbd_budget_wait): every release wakes the waiters, in their own loops,
 * and they try again.  While someone waits, released buffers are not kept
 * for reuse, and a timer in the main loop (every second) asks every
 * connection to drop the buffers it keeps idle.
 *
 * A client that stops reading its replies holds the buffers of the replies
 * queued for it, and could hold the whole budget with others.  It stalls
 * only itself: a connection whose output has not moved for NBD_STALL_MS
 * while others wait for memory is closed (its acknowledged writes are on
 * disk already; what it has not read, it did not want).
 *
 * Tests shrink the limits with BEXD_NBD_BUFFER_BUDGET (bytes) and
 * BEXD_NBD_STALL_MS, read when the server starts.
 */
#include <pthread.h>
#include <stdlib.h>
#include "util/log.h"
#include "nbd-internal.h"

static size_t budget_limit = NBD_BUF_BUDGET;
static uint64_t stall_ms = NBD_STALL_MS;
static size_t budget_used;                    /* atomic */
static int nwaiters;                          /* atomic */
static pthread_mutex_t waiters_lock = PTHREAD_MUTEX_INITIALIZER;
static struct nbd_conn *waiters;              /* through budget_next, each holding a ref */
static struct loop_timer *pressure_timer;     /* main loop */
static bool timer_armed;                      /* atomic */

static uint64_t env_u64(const char *name, uint64_t dflt)
{
    const char *s = getenv(name);
    char *end;
    if (!s || !*s)
        return dflt;
    unsigned long long v = strtoull(s, &end, 10);
    return *end ? dflt : v;
}

void nbd_budget_init(void)
{
    budget_limit = env_u64("BEXD_NBD_BUFFER_BUDGET", NBD_BUF_BUDGET);
    stall_ms = env_u64("BEXD_NBD_STALL_MS", NBD_STALL_MS);
}

bool nbd_budget_take(size_t bytes)
{
    size_t cur = __atomic_load_n(&budget_used, __ATOMIC_RELAXED);
    do {
        if (cur + bytes > budget_limit)
            return false;
    } while (!__atomic_compare_exchange_n(&budget_used, &cur, cur + bytes, true,
                                          __ATOMIC_ACQ_REL, __ATOMIC_RELAXED));
    return true;
}

size_t nbd_budget_used(void)
{
    return __atomic_load_n(&budget_used, __ATOMIC_RELAXED);
}

bool nbd_budget_pressure(void)
{
    return __atomic_load_n(&nwaiters, __ATOMIC_ACQUIRE) > 0;
}

static void wake_cb(void *opaque)
{
    struct nbd_conn *c = opaque;

    if (c->state == CONN_TRANSMISSION && c->rx_paused) {
        c->rx_paused = false;
        nbd_conn_update_watch(c);
        nbd_transmission_readable(c);
    }
    nbd_conn_unref(c);
}

static void wake_all(void)
{
    struct nbd_conn *list;

    pthread_mutex_lock(&waiters_lock);
    list = waiters;
    waiters = NULL;
    for (struct nbd_conn *c = list; c; c = c->budget_next)
        c->budget_waiting = false;
    __atomic_store_n(&nwaiters, 0, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&waiters_lock);
    while (list) {
        struct nbd_conn *c = list;
        list = c->budget_next;
        loop_call(c->loop, wake_cb, c);        /* the waiter's reference goes along */
    }
}

void nbd_budget_give(size_t bytes)
{
    if (!bytes)
        return;
    __atomic_sub_fetch(&budget_used, bytes, __ATOMIC_ACQ_REL);
    if (nbd_budget_pressure())
        wake_all();
}

static void trim_cb(void *opaque)
{
    struct nbd_conn *c = opaque;
    nbd_slots_trim(c);
    nbd_conn_unref(c);
}

/* Main loop, every second while someone waits: drop idle buffers
 * everywhere, close connections that hold memory and do not read. */
static void pressure_tick(void *opaque)
{
    uint64_t now = now_ms();

    if (!nbd_budget_pressure()) {
        __atomic_store_n(&timer_armed, false, __ATOMIC_RELEASE);
        return;
    }
    for (struct nbd_conn *c = nbd_srv.conns; c; c = c->next) {
        uint64_t since = __atomic_load_n(&c->out_stalled_since, __ATOMIC_ACQUIRE);
        if (__atomic_load_n(&c->buf_total, __ATOMIC_RELAXED) == 0)
            continue;
        if (since && now - since >= stall_ms) {
            log_warn("nbd: closing connection from %s: it has not read its replies for "
                     "%llu ms and others wait for buffer memory", c->peer,
                     (unsigned long long)(now - since));
            nbd_conn_close_remote(c, "stalled while others wait for memory");
        } else if (!c->moving && nbd_conn_tryref(c)) {   /* moving: no loop owns it */
            loop_call(c->loop, trim_cb, c);
        }
    }
    loop_timer_arm(pressure_timer, 1000);
}

static void arm_cb(void *opaque)
{
    if (!pressure_timer)
        pressure_timer = loop_timer_new(loop_main(), pressure_tick, NULL);
    pressure_tick(NULL);
}

void nbd_budget_wait(struct nbd_conn *c, size_t bytes)
{
    bool arm;

    pthread_mutex_lock(&waiters_lock);
    if (!c->budget_waiting) {
        c->budget_waiting = true;
        nbd_conn_ref(c);
        c->budget_next = waiters;
        waiters = c;
        __atomic_add_fetch(&nwaiters, 1, __ATOMIC_ACQ_REL);
    }
    pthread_mutex_unlock(&waiters_lock);
    arm = !__atomic_exchange_n(&timer_armed, true, __ATOMIC_ACQ_REL);
    if (arm)
        loop_call(loop_main(), arm_cb, NULL);
    /* memory may have come back between the failed take and now */
    if (__atomic_load_n(&budget_used, __ATOMIC_ACQUIRE) + bytes <= budget_limit)
        wake_all();
}
