/*
 * Event loop: one per thread (the main loop, plus one per iothread object).
 *
 * epoll for file descriptors, a timer list for timeouts, and an eventfd so
 * other threads can hand work to the loop (loop_call).  Callbacks run in the
 * loop's thread only.  Watches and timers may be deleted from inside any
 * callback, including their own.  Each loop also owns an I/O engine (aio.h)
 * whose completions are dispatched from the same loop.
 *
 * Functions run with loop_defer() run in the loop's thread at the end of the
 * current iteration, just before it sleeps: exports use it to batch replies.
 */
#pragma once
#include <stdbool.h>
#include <stdint.h>
#include <sys/epoll.h>

struct loop;
struct loop_watch;
struct loop_timer;
struct aio_engine;

#define LOOP_IN  EPOLLIN
#define LOOP_OUT EPOLLOUT
/* revents may also carry EPOLLERR / EPOLLHUP / EPOLLRDHUP */

typedef void loop_fd_fn(void *opaque, uint32_t revents);
typedef void loop_fn(void *opaque);

struct loop *loop_new(const char *name);
void loop_free(struct loop *l);
const char *loop_name(const struct loop *l);

/* Before sleeping, a loop polls its fds this long (QEMU's iothread
 * poll-max-ns, whose default it shares): a client that answers at once
 * is then served without a sleep and a wake-up.  0 disables polling. */
#define LOOP_POLL_NS_DEFAULT 32768
void loop_set_poll_ns(struct loop *l, uint64_t ns);
/* How the window adapts (QEMU's poll-grow / poll-shrink): a sleep shorter
 * than poll-max-ns multiplies it by grow (0: by 2, starting at 4 us), a
 * longer one divides it by shrink (0: polling stops).  Any thread. */
void loop_set_poll_grow_shrink(struct loop *l, uint64_t grow, uint64_t shrink);
/* The new window after a sleep of blocked ns (pure; the rule above). */
uint64_t loop_poll_adjust(uint64_t cur, uint64_t blocked, uint64_t max,
                          uint64_t grow, uint64_t shrink);
/* Same-thread: do not poll before the loop next sleeps, and do not let that
 * sleep move the window.  For a reader left waiting for the rest of a large
 * payload: the rest comes as fast as the sender can copy it, polling for it
 * only takes CPU from the sender, and a short wait there says nothing about
 * how soon the next request comes (an NBD WRITE of 1 MiB arrives in about 6
 * pieces: polling made 1M writes 10-40% slower). */
void loop_poll_skip(struct loop *l);
struct loop_poll_stats {
    uint64_t polled;      /* sleeps preceded by polling */
    uint64_t skipped;     /* sleeps that would have polled but for loop_poll_skip */
    uint64_t window_ns;   /* the current window */
};
/* Same-thread (or with the loop stopped). */
void loop_get_poll_stats(const struct loop *l, struct loop_poll_stats *st);

/* Run until loop_stop(); returns 0.  Must be called in the thread that owns the loop. */
int loop_run(struct loop *l);
/* Thread-safe. */
void loop_stop(struct loop *l);

/* The main loop (created by loop_main_init at start-up). */
void loop_main_init(void);
struct loop *loop_main(void);
/* The loop run by the calling thread, or NULL. */
struct loop *loop_current(void);
static inline bool loop_in_thread(struct loop *l) { return loop_current() == l; }

/* fd watches.  events is a mask of LOOP_IN | LOOP_OUT (0 = paused). */
struct loop_watch *loop_watch_fd(struct loop *l, int fd, uint32_t events,
                                 loop_fd_fn *fn, void *opaque);
void loop_watch_set(struct loop_watch *w, uint32_t events);
uint32_t loop_watch_events(const struct loop_watch *w);
/* Stops watching (does not close fd).  Safe from callbacks. */
void loop_watch_del(struct loop_watch *w);

/* One-shot timers, millisecond resolution, monotonic clock. */
struct loop_timer *loop_timer_new(struct loop *l, loop_fn *fn, void *opaque);
void loop_timer_arm(struct loop_timer *t, uint64_t ms_from_now);
void loop_timer_cancel(struct loop_timer *t);
void loop_timer_free(struct loop_timer *t);   /* cancels too */

/* Thread-safe: run fn(opaque) in l's thread soon (FIFO order). */
void loop_call(struct loop *l, loop_fn *fn, void *opaque);
/* Main thread: run done(opaque) in the main loop once every other loop
 * has finished what it was doing when this was called (each ran a call
 * queued now; a loop freed meanwhile counts as passed).  What a loop
 * thread reads after that sees every store the caller made before. */
void loop_barrier(loop_fn *done, void *opaque);
/* The same, but done runs in the thread of the last loop to pass (the
 * caller's, at once, if there is no other loop), so it runs even when the
 * main loop no longer does (the daemon stopping): freeing what loops
 * might still have been using. */
void loop_barrier_any_thread(loop_fn *done, void *opaque);
/* Same-thread: run fn(opaque) before the loop next sleeps.  The caller
 * provides the storage so that the data path needs no allocation; a
 * pending defer must not be queued twice (check loop_defer_pending). */
struct loop_defer {
    loop_fn *fn;
    void *opaque;
    struct loop_defer *next;
    bool pending;
};
void loop_defer(struct loop *l, struct loop_defer *d);
/* Same-thread: unqueue d if it is pending (its owner is going away; the
 * loop may stop before it would have run, and nothing may run it later). */
void loop_defer_cancel(struct loop *l, struct loop_defer *d);

/* The I/O engine of this loop (created lazily, in the loop's thread). */
struct aio_engine *loop_aio(struct loop *l);

/* Milliseconds of CLOCK_MONOTONIC. */
uint64_t now_ms(void);
