/*
 * systemd socket activation and readiness notification (see systemd.h).
 *
 * Theory of operation: the service manager passes listening sockets as fds
 * 3 .. 3+LISTEN_FDS-1 with their names, colon-separated, in LISTEN_FDNAMES,
 * and says whom they are for in LISTEN_PID (a forked child must not take
 * its parent's sockets).  systemd_init() checks that, marks the sockets
 * close-on-exec and keeps them open for the life of the process; users get
 * duplicates.  Notification is one datagram per message to the AF_UNIX
 * socket named in NOTIFY_SOCKET ('@' = abstract namespace), sent without
 * blocking: a busy service manager drops a status line rather than stall
 * the daemon.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>
#include "util/log.h"
#include "util/systemd.h"
#include "util/xalloc.h"

#define LISTEN_FDS_START 3
#define LISTEN_MAX 64

static int n_listen;
static char *listen_names[LISTEN_MAX];
static int notify_fd = -1;
static struct sockaddr_un notify_addr;
static socklen_t notify_addrlen;
static uint64_t watchdog_usec;

static bool env_pid_is_me(const char *var)
{
    const char *s = getenv(var);
    char *end;
    if (!s || !*s)
        return false;
    long v = strtol(s, &end, 10);
    return !*end && v == (long)getpid();
}

static void listen_init(void)
{
    const char *fds = getenv("LISTEN_FDS");
    const char *names = getenv("LISTEN_FDNAMES");
    char *end;

    if (!fds || !env_pid_is_me("LISTEN_PID"))
        return;
    long n = strtol(fds, &end, 10);
    if (*end || n <= 0)
        return;
    if (n > LISTEN_MAX) {
        log_warn("systemd passed %ld sockets; using the first %d", n, LISTEN_MAX);
        n = LISTEN_MAX;
    }
    const char *p = names ? names : "";
    for (int i = 0; i < n; i++) {
        size_t len = strcspn(p, ":");
        listen_names[i] = len ? xstrndup(p, len) : xstrdup("unknown");
        p += len;
        if (*p == ':')
            p++;
        fcntl(LISTEN_FDS_START + i, F_SETFD, FD_CLOEXEC);
    }
    n_listen = n;
}

static void notify_init(void)
{
    const char *path = getenv("NOTIFY_SOCKET");
    size_t len;

    if (!path || (path[0] != '/' && path[0] != '@'))
        return;
    len = strlen(path);
    if (len >= sizeof(notify_addr.sun_path)) {
        log_warn("NOTIFY_SOCKET path too long; not notifying systemd");
        return;
    }
    notify_addr.sun_family = AF_UNIX;
    memcpy(notify_addr.sun_path, path, len);
    if (path[0] == '@')
        notify_addr.sun_path[0] = 0;
    notify_addrlen = offsetof(struct sockaddr_un, sun_path) + len + (path[0] == '/');
    notify_fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (notify_fd < 0) {
        log_warn("cannot create the systemd notification socket: %s", strerror(errno));
        return;
    }
    const char *wd = getenv("WATCHDOG_USEC");
    char *end;
    if (wd && (!getenv("WATCHDOG_PID") || env_pid_is_me("WATCHDOG_PID"))) {
        unsigned long long v = strtoull(wd, &end, 10);
        if (!*end)
            watchdog_usec = v;
    }
}

void systemd_init(void)
{
    listen_init();
    notify_init();
    static const char *const vars[] = {
        "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET",
        "WATCHDOG_USEC", "WATCHDOG_PID",
    };
    for (size_t i = 0; i < sizeof(vars) / sizeof(vars[0]); i++)
        unsetenv(vars[i]);
}

int systemd_listen_count(void)
{
    return n_listen;
}

const char *systemd_listen_name(int i)
{
    return i >= 0 && i < n_listen ? listen_names[i] : NULL;
}

int systemd_listen_fd_dup(const char *name)
{
    for (int i = 0; i < n_listen; i++)
        if (!strcmp(listen_names[i], name))
            return fcntl(LISTEN_FDS_START + i, F_DUPFD_CLOEXEC, 0);
    errno = ENOENT;
    return -1;
}

bool systemd_notify_enabled(void)
{
    return notify_fd >= 0;
}

uint64_t systemd_watchdog_usec(void)
{
    return notify_fd >= 0 ? watchdog_usec : 0;
}

void systemd_notify(const char *fmt, ...)
{
    char buf[4096];
    va_list ap;

    if (notify_fd < 0)
        return;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n >= sizeof(buf))
        n = sizeof(buf) - 1;
    if (sendto(notify_fd, buf, n, MSG_NOSIGNAL, (struct sockaddr *)&notify_addr,
               notify_addrlen) < 0 && errno != EAGAIN)
        log_debug("systemd notification failed: %s", strerror(errno));
}
