/*
 * Event loop (see loop.h).
 *
 * Theory of operation: each iteration (1) runs deferred functions and
 * cross-thread calls queued so far, (2) polls the fds for up to poll_ns
 * (unless worker threads, the io_uring ring or the Linux AIO context hold
 * some of its file I/O: see aio.c), then sleeps in epoll_wait until an fd
 * is ready or the earliest timer is due, (3) dispatches ready fds, (4) fires
 * due timers, (5) frees watches deleted during the iteration.  A deleted
 * watch is only marked dead, so an event already fetched for it in the same
 * batch is skipped instead of touching freed memory.  Other threads enqueue
 * work with loop_call() and wake the loop through an eventfd.
 */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>
#include "util/aio-int.h"
#include "util/cleanup.h"
#include "util/loop.h"
#include "util/log.h"
#include "util/xalloc.h"

struct loop_watch {
    struct loop *l;
    int fd;
    uint32_t events;
    bool registered;
    bool dead;
    loop_fd_fn *fn;
    void *opaque;
    struct loop_watch *next_dead;
};

struct loop_timer {
    struct loop *l;
    loop_fn *fn;
    void *opaque;
    uint64_t deadline;
    bool armed;
    struct loop_timer *prev, *next;
};

struct loop_call_item {
    loop_fn *fn;
    void *opaque;
    struct loop_call_item *next;
};

struct loop {
    char *name;
    int epfd;
    int wakefd;
    struct loop_watch wake_watch;
    volatile bool stop;
    pthread_mutex_t lock;              /* protects calls */
    struct loop_call_item *calls, **calls_tail;
    struct loop_defer *defer_head, **defer_tail;
    struct loop_timer *timers;         /* sorted by deadline */
    struct loop_timer *timers_tail;
    struct loop_watch *dead;
    struct aio_engine *aio;
    uint64_t poll_ns;                  /* busy-poll at most this long before sleeping */
    uint64_t poll_grow, poll_shrink;   /* QEMU's poll-grow / poll-shrink (0: defaults) */
    uint64_t poll_cur;                 /* ... and now this long (adaptive, loop thread) */
    bool poll_skip;                    /* loop thread: no polling before the next sleep */
    struct loop_poll_stats stats;      /* loop thread */
    struct loop *all_next;             /* every loop (loop_barrier) */
};

static __thread struct loop *current_loop;
static struct loop *main_loop;
static pthread_mutex_t all_lock = PTHREAD_MUTEX_INITIALIZER;
static struct loop *all_loops;         /* every loop that exists */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void wake_read(void *opaque, uint32_t revents)
{
    struct loop *l = opaque;
    uint64_t v;
    /* one read empties the eventfd (see aio.c engine_event) */
    if (read(l->wakefd, &v, sizeof(v)) < 0 && errno != EAGAIN)
        log_error("loop wake-up read: %s", strerror(errno));
}

struct loop *loop_new(const char *name)
{
    struct loop *l = xzalloc(sizeof(*l));
    l->name = xstrdup(name);
    l->epfd = epoll_create1(EPOLL_CLOEXEC);
    l->wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (l->epfd < 0 || l->wakefd < 0) {
        log_error("cannot create event loop: %s", strerror(errno));
        abort();
    }
    pthread_mutex_init(&l->lock, NULL);
    l->calls_tail = &l->calls;
    l->defer_tail = &l->defer_head;
    l->poll_ns = LOOP_POLL_NS_DEFAULT;
    l->wake_watch = (struct loop_watch){ .l = l, .fd = l->wakefd, .events = EPOLLIN,
                                         .registered = true, .fn = wake_read, .opaque = l };
    struct epoll_event ev = { .events = EPOLLIN, .data.ptr = &l->wake_watch };
    epoll_ctl(l->epfd, EPOLL_CTL_ADD, l->wakefd, &ev);
    pthread_mutex_lock(&all_lock);
    l->all_next = all_loops;
    all_loops = l;
    pthread_mutex_unlock(&all_lock);
    return l;
}

const char *loop_name(const struct loop *l) { return l->name; }

/* Any thread (qom-set from the monitor): the loop reads it each iteration. */
void loop_set_poll_ns(struct loop *l, uint64_t ns)
{
    __atomic_store_n(&l->poll_ns, ns, __ATOMIC_RELAXED);
}

void loop_set_poll_grow_shrink(struct loop *l, uint64_t grow, uint64_t shrink)
{
    __atomic_store_n(&l->poll_grow, grow, __ATOMIC_RELAXED);
    __atomic_store_n(&l->poll_shrink, shrink, __ATOMIC_RELAXED);
}

void loop_poll_skip(struct loop *l)
{
    l->poll_skip = true;
}

void loop_get_poll_stats(const struct loop *l, struct loop_poll_stats *st)
{
    *st = l->stats;
    st->window_ns = l->poll_cur;
}

/* QEMU's adjust_polling_time (util/aio-posix.c): a sleep that polling of
 * the current window would have covered changes nothing; one longer than the
 * most we may poll would not have been saved by polling, so poll less
 * (divide by shrink, or stop at once: a client that thinks, or a loaded
 * machine, where polling only takes the CPU the client needs); one in
 * between would have been, so poll longer (times grow, default 2), from
 * 4 us up to the maximum. */
uint64_t loop_poll_adjust(uint64_t cur, uint64_t blocked, uint64_t max,
                          uint64_t grow, uint64_t shrink)
{
    if (blocked <= cur)
        return cur;
    if (blocked > max)
        return shrink ? cur / shrink : 0;
    if (cur < max && blocked < max) {
        uint64_t next = cur ? cur * (grow ? grow : 2) : 4000;
        if (next > max || (cur && next / cur != (grow ? grow : 2)))   /* or overflowed */
            next = max;
        return next;
    }
    return cur;
}

static void free_dead(struct loop *l)
{
    while (l->dead) {
        struct loop_watch *w = l->dead;
        l->dead = w->next_dead;
        free(w);
    }
}

/* ---- barriers ---- */

struct barrier {
    int pending;                       /* atomic */
    bool any_thread;                   /* done runs where the last loop passes */
    loop_fn *done;
    void *opaque;
};

static void barrier_pass(void *opaque)
{
    struct barrier *b = opaque;
    if (__atomic_sub_fetch(&b->pending, 1, __ATOMIC_ACQ_REL) == 0) {
        if (b->any_thread)
            b->done(b->opaque);
        else
            loop_call(main_loop, b->done, b->opaque);
        free(b);
    }
}

static void barrier_start(loop_fn *done, void *opaque, bool any_thread)
{
    struct barrier *b = xzalloc(sizeof(*b));
    b->pending = 1;                    /* ours, dropped once every loop is asked */
    b->any_thread = any_thread;
    b->done = done;
    b->opaque = opaque;
    pthread_mutex_lock(&all_lock);
    for (struct loop *l = all_loops; l; l = l->all_next)
        if (l != main_loop) {
            __atomic_add_fetch(&b->pending, 1, __ATOMIC_RELAXED);
            loop_call(l, barrier_pass, b);
        }
    pthread_mutex_unlock(&all_lock);
    barrier_pass(b);
}

void loop_barrier(loop_fn *done, void *opaque)
{
    barrier_start(done, opaque, false);
}

void loop_barrier_any_thread(loop_fn *done, void *opaque)
{
    barrier_start(done, opaque, true);
}

void loop_free(struct loop *l)
{
    if (!l)
        return;
    pthread_mutex_lock(&all_lock);
    for (struct loop **p = &all_loops; *p; p = &(*p)->all_next)
        if (*p == l) {
            *p = l->all_next;
            break;
        }
    pthread_mutex_unlock(&all_lock);
    if (l->aio)
        aio_engine_free(l->aio);
    free_dead(l);
    close(l->epfd);
    close(l->wakefd);
    pthread_mutex_destroy(&l->lock);
    while (l->calls) {
        struct loop_call_item *c = l->calls;
        l->calls = c->next;
        if (c->fn == barrier_pass)
            c->fn(c->opaque);          /* a barrier passes a loop that is gone */
        free(c);
    }
    free(l->name);
    free(l);
}

void loop_main_init(void)
{
    main_loop = loop_new("main");
    current_loop = main_loop;
}

struct loop *loop_main(void) { return main_loop; }
struct loop *loop_current(void) { return current_loop; }

struct aio_engine *loop_aio(struct loop *l)
{
    if (!l->aio)
        l->aio = aio_engine_new(l);
    return l->aio;
}

/* ---- fd watches ---- */

static void watch_apply(struct loop_watch *w)
{
    struct epoll_event ev = { .events = w->events, .data.ptr = w };
    if (w->events == 0) {
        /* Unregister while paused: epoll reports HUP/ERR even for an empty mask. */
        if (w->registered)
            epoll_ctl(w->l->epfd, EPOLL_CTL_DEL, w->fd, NULL);
        w->registered = false;
        return;
    }
    if (epoll_ctl(w->l->epfd, w->registered ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, w->fd, &ev) < 0)
        log_error("epoll_ctl(fd %d): %s", w->fd, strerror(errno));
    else
        w->registered = true;
}

struct loop_watch *loop_watch_fd(struct loop *l, int fd, uint32_t events,
                                 loop_fd_fn *fn, void *opaque)
{
    struct loop_watch *w = xzalloc(sizeof(*w));
    *w = (struct loop_watch){ .l = l, .fd = fd, .events = events, .fn = fn, .opaque = opaque };
    watch_apply(w);
    return w;
}

void loop_watch_set(struct loop_watch *w, uint32_t events)
{
    if (w->dead || w->events == events)
        return;
    w->events = events;
    watch_apply(w);
}

uint32_t loop_watch_events(const struct loop_watch *w) { return w->events; }

void loop_watch_del(struct loop_watch *w)
{
    if (!w || w->dead)
        return;
    if (w->registered)
        epoll_ctl(w->l->epfd, EPOLL_CTL_DEL, w->fd, NULL);
    w->registered = false;
    w->dead = true;
    w->next_dead = w->l->dead;
    w->l->dead = w;
}

/* ---- timers ---- */

struct loop_timer *loop_timer_new(struct loop *l, loop_fn *fn, void *opaque)
{
    struct loop_timer *t = xzalloc(sizeof(*t));
    t->l = l;
    t->fn = fn;
    t->opaque = opaque;
    return t;
}

void loop_timer_cancel(struct loop_timer *t)
{
    if (!t || !t->armed)
        return;
    struct loop *l = t->l;
    if (t->prev)
        t->prev->next = t->next;
    else
        l->timers = t->next;
    if (t->next)
        t->next->prev = t->prev;
    else
        l->timers_tail = t->prev;
    t->prev = t->next = NULL;
    t->armed = false;
}

void loop_timer_arm(struct loop_timer *t, uint64_t ms_from_now)
{
    struct loop *l = t->l;
    loop_timer_cancel(t);
    t->deadline = now_ms() + ms_from_now;
    /* Scan from the tail: deadlines mostly grow, so this is usually O(1). */
    struct loop_timer *after = l->timers_tail;
    while (after && after->deadline > t->deadline)
        after = after->prev;
    t->prev = after;
    t->next = after ? after->next : l->timers;
    if (t->next)
        t->next->prev = t;
    else
        l->timers_tail = t;
    if (after)
        after->next = t;
    else
        l->timers = t;
    t->armed = true;
}

void loop_timer_free(struct loop_timer *t)
{
    if (!t)
        return;
    loop_timer_cancel(t);
    free(t);
}

static void run_timers(struct loop *l)
{
    uint64_t now = now_ms();
    while (l->timers && l->timers->deadline <= now) {
        struct loop_timer *t = l->timers;
        loop_timer_cancel(t);
        t->fn(t->opaque);
    }
}

static int next_timeout(struct loop *l)
{
    if (l->defer_head || l->calls)
        return 0;
    if (!l->timers)
        return -1;
    uint64_t now = now_ms();
    if (l->timers->deadline <= now)
        return 0;
    uint64_t d = l->timers->deadline - now;
    return d > 60000 ? 60000 : (int)d;
}

/* ---- calls and defers ---- */

void loop_call(struct loop *l, loop_fn *fn, void *opaque)
{
    struct loop_call_item *c = xmalloc(sizeof(*c));
    c->fn = fn;
    c->opaque = opaque;
    c->next = NULL;
    pthread_mutex_lock(&l->lock);
    *l->calls_tail = c;
    l->calls_tail = &c->next;
    pthread_mutex_unlock(&l->lock);
    if (current_loop != l) {
        uint64_t one = 1;
        if (write(l->wakefd, &one, sizeof(one)) < 0 && errno != EAGAIN)
            log_error("loop wake-up failed: %s", strerror(errno));
    }
}

static void run_calls(struct loop *l)
{
    pthread_mutex_lock(&l->lock);
    struct loop_call_item *c = l->calls;
    l->calls = NULL;
    l->calls_tail = &l->calls;
    pthread_mutex_unlock(&l->lock);
    while (c) {
        struct loop_call_item *next = c->next;
        c->fn(c->opaque);
        free(c);
        c = next;
    }
}

void loop_defer(struct loop *l, struct loop_defer *d)
{
    if (d->pending)
        return;
    d->pending = true;
    d->next = NULL;
    *l->defer_tail = d;
    l->defer_tail = &d->next;
}

void loop_defer_cancel(struct loop *l, struct loop_defer *d)
{
    if (!d->pending)
        return;
    for (struct loop_defer **pp = &l->defer_head; *pp; pp = &(*pp)->next) {
        if (*pp == d) {
            *pp = d->next;
            if (l->defer_tail == &d->next)
                l->defer_tail = pp;
            break;
        }
    }
    d->pending = false;
}

static void run_defers(struct loop *l)
{
    while (l->defer_head) {
        struct loop_defer *d = l->defer_head;
        l->defer_head = d->next;
        if (!l->defer_head)
            l->defer_tail = &l->defer_head;
        d->pending = false;
        d->fn(d->opaque);
    }
}

/* ---- run ---- */

void loop_stop(struct loop *l)
{
    l->stop = true;
    uint64_t one = 1;
    if (write(l->wakefd, &one, sizeof(one)) < 0 && errno != EAGAIN)
        log_error("loop wake-up failed: %s", strerror(errno));
}

/* epoll_wait, resumed after EINTR.  io_uring runs a completion as task
 * work, which interrupts the sleeping thread: the wait returns EINTR, the
 * work posts the completion on the way out, and the ring's fd is readable
 * at once.  Resuming keeps that one wait one wait, so the adaptive polling
 * sees how long the wait was instead of a long wait followed by a wait of
 * no time, which grew the window only to poll in vain before the next
 * sleep.  A FUSE-over-io_uring queue, whose requests come as completions
 * of its own ring while the clients' window is on, is such a loop
 * (test-aio's test_eintr_is_one_wait: 14 vain polls in 12 rounds before). */
static int sleep_wait(struct loop *l, struct epoll_event *evs, int timeout)
{
    uint64_t deadline = timeout > 0 ? now_ns() + (uint64_t)timeout * 1000000 : 0;
    for (;;) {
        int n = epoll_wait(l->epfd, evs, 64, timeout);
        if (n >= 0 || errno != EINTR)
            return n;
        if (timeout > 0) {
            uint64_t t = now_ns();
            timeout = t >= deadline ? 0 : (int)((deadline - t + 999999) / 1000000);
        }
    }
}

int loop_run(struct loop *l)
{
    struct epoll_event evs[64];
    current_loop = l;
    l->stop = false;
    while (!l->stop) {
        run_calls(l);
        run_defers(l);
        if (l->stop)
            break;
        int timeout = next_timeout(l);
        int n = 0;
        uint64_t poll_max = __atomic_load_n(&l->poll_ns, __ATOMIC_RELAXED), t0 = 0;
        bool adapt = timeout != 0 && poll_max && !(l->aio && aio_engine_waits(l->aio));
        if (l->poll_cur > poll_max)
            l->poll_cur = poll_max;
        if (adapt && l->poll_skip) {
            /* a client is in the middle of sending (see loop_poll_skip):
             * neither poll nor let this wait move the window */
            adapt = false;
            l->stats.skipped++;
        }
        l->poll_skip = false;
        if (adapt) {
            t0 = now_ns();
            if (l->poll_cur) {
                /* Poll briefly before sleeping: a client answering at once
                 * is served without the cost of a sleep and a wake-up. */
                uint64_t until = t0 + l->poll_cur;
                if (timeout > 0 && until > t0 + (uint64_t)timeout * 1000000)
                    until = t0 + (uint64_t)timeout * 1000000;   /* timers stay on time */
                l->stats.polled++;
                do {
                    n = epoll_wait(l->epfd, evs, 64, 0);
                } while (n == 0 && now_ns() < until);
            }
        }
        if (n == 0) {
            n = sleep_wait(l, evs, timeout);
            if (adapt)
                l->poll_cur = loop_poll_adjust(l->poll_cur, now_ns() - t0, poll_max,
                                               __atomic_load_n(&l->poll_grow, __ATOMIC_RELAXED),
                                               __atomic_load_n(&l->poll_shrink, __ATOMIC_RELAXED));
        }
        if (n < 0 && errno != EINTR) {
            log_error("epoll_wait: %s", strerror(errno));
            break;
        }
        for (int i = 0; i < n; i++) {
            struct loop_watch *w = evs[i].data.ptr;
            if (!w->dead)
                w->fn(w->opaque, evs[i].events);
        }
        run_timers(l);
        free_dead(l);
    }
    return 0;
}
