/*
 * Accepting connections when file descriptors run out (see accept.h).
 *
 * The reserve is a small array of fds on /dev/null guarded by a mutex:
 * listeners run in the main loop and in iothreads.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include "util/accept.h"
#include "util/log.h"

static pthread_mutex_t reserve_lock = PTHREAD_MUTEX_INITIALIZER;
static int reserve[ACCEPT_FD_RESERVE] = { -1, -1 };
static bool reserve_init;

void accept_reserve_refill(void)
{
    pthread_mutex_lock(&reserve_lock);
    if (!reserve_init) {
        for (int i = 0; i < ACCEPT_FD_RESERVE; i++)
            reserve[i] = -1;
        reserve_init = true;
    }
    for (int i = 0; i < ACCEPT_FD_RESERVE; i++)
        if (reserve[i] < 0)
            reserve[i] = open("/dev/null", O_RDONLY | O_CLOEXEC);
    pthread_mutex_unlock(&reserve_lock);
}

/* Close one reserved fd so that the next open or accept can succeed. */
static bool reserve_spend(void)
{
    bool spent = false;

    pthread_mutex_lock(&reserve_lock);
    for (int i = 0; i < ACCEPT_FD_RESERVE && !spent; i++) {
        if (reserve[i] >= 0) {
            close(reserve[i]);
            reserve[i] = -1;
            spent = true;
        }
    }
    pthread_mutex_unlock(&reserve_lock);
    return spent;
}

int accept_conn(int lfd, bool management)
{
    int fd;

    accept_reserve_refill();
    fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd >= 0)
        return fd;
    if (management && (errno == EMFILE || errno == ENFILE) && reserve_spend()) {
        fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd >= 0) {
            log_warn("out of file descriptors: management connection taken from the reserve");
            return fd;
        }
    }
    return -errno;
}

static void backoff_resume(void *opaque)
{
    struct accept_backoff *b = opaque;

    accept_reserve_refill();
    b->resume(b->opaque);
}

bool accept_backoff(struct accept_backoff *b, int err)
{
    uint64_t now;

    if (err != EMFILE && err != ENFILE && err != ENOBUFS && err != ENOMEM)
        return false;
    now = now_ms();
    if (!b->last_log_ms || now - b->last_log_ms >= ACCEPT_LOG_MS) {
        if (b->unlogged)
            log_warn("%s: cannot accept: %s; pausing (%u more since the last message)",
                     b->who, strerror(err), b->unlogged);
        else
            log_warn("%s: cannot accept: %s; pausing", b->who, strerror(err));
        b->last_log_ms = now;
        b->unlogged = 0;
    } else {
        b->unlogged++;
    }
    if (!b->timer)
        b->timer = loop_timer_new(b->loop, backoff_resume, b);
    loop_timer_arm(b->timer, ACCEPT_PAUSE_MS);
    return true;
}

void accept_backoff_cleanup(struct accept_backoff *b)
{
    if (b->timer)
        loop_timer_free(b->timer);
    b->timer = NULL;
}
