/*
 * bexd: block export daemon, a drop-in for qemu-storage-daemon.
 *
 * Start-up applies the command line in order (cli.c).  With --daemonize the
 * parent waits on a pipe and exits 0 only once the child has applied every
 * option, so a caller can use the sockets as soon as the parent returns.
 * Under systemd (Type=notify) READY=1 is sent at that same point: every
 * export of the command line is serving (service.c).
 *
 * Shutdown by SIGTERM or SIGINT is graceful: the NBD server stops
 * accepting and each client finishes the requests it has sent; then every
 * export is removed the hard way (vhost-user-blk and FUSE drain their own
 * in-flight requests), every node is flushed, the monitors are closed and
 * the pidfile removed.  Past the deadline (BEXD_STOP_TIMEOUT, seconds,
 * default 30) the log names what is still busy, and bexd flushes and exits
 * with status 1.
 * QMP quit skips the wait for clients, as qemu-storage-daemon's does.
 * SIGHUP reloads the TLS credentials (qemu-storage-daemon exits on it).
 * Jobs are cancelled once the exports are gone, and bexd waits for their work.
 */
#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <unistd.h>
#include "block/throttle-group.h"
#include "block/block.h"
#include "chardev/chardev.h"
#include "cli/cli.h"
#include "export/export.h"
#include "export/nbd/nbd.h"
#include "job/job.h"
#include "object/object.h"
#include "config.h"
#include "ops/metrics.h"
#include "ops/service.h"
#include "qmp/monitor.h"
#include "qmp/qmp.h"
#include "qmp/schema.h"
#include "util/log.h"
#include "util/loop.h"
#include "util/xalloc.h"
#include "util/systemd.h"

#define SHUTDOWN_GRACE_S_DEFAULT 30

static char *pidfile;
static bool shutting_down;
static struct loop_timer *grace_timer;
static struct loop_watch *sig_watch;

static unsigned shutdown_grace_s(void)
{
    const char *s = getenv("BEXD_STOP_TIMEOUT");
    char *end;
    if (s && *s) {
        unsigned long v = strtoul(s, &end, 10);
        if (!*end && v > 0 && v < 86400)
            return v;
    }
    return SHUTDOWN_GRACE_S_DEFAULT;
}

static void all_jobs_stopped(void *opaque)
{
    loop_stop(loop_main());
}

/* As qsd: exports first, then jobs are cancelled and waited for. */
static void all_exports_gone(void *opaque)
{
    jobs_cancel_all(all_jobs_stopped, NULL);
}

static void nbd_clients_finished(void *opaque)
{
    log_info("clients finished; removing exports");
    exports_shutdown_all(all_exports_gone, NULL);
}

static bool deadline_passed;

static void grace_expired(void *opaque)
{
    log_error("shutdown did not finish within %u s; exiting anyway", shutdown_grace_s());
    nbd_server_report_stuck();
    exports_report_stuck();
    deadline_passed = true;
    loop_stop(loop_main());
}

/* graceful: NBD clients finish what they sent first (signals); otherwise
 * they are dropped at once, as qemu-storage-daemon's quit does. */
static void begin_shutdown(const char *why, bool graceful)
{
    if (shutting_down)
        return;
    shutting_down = true;
    service_stopping(why);
    throttle_bypass_begin();            /* what waits in a throttle group goes now */
    grace_timer = loop_timer_new(loop_main(), grace_expired, NULL);
    loop_timer_arm(grace_timer, (uint64_t)shutdown_grace_s() * 1000);
    if (graceful)
        nbd_server_drain(nbd_clients_finished, NULL);
    else
        exports_shutdown_all(all_exports_gone, NULL);
}

static void quit_requested(void)
{
    begin_shutdown("QMP quit", false);
}

static void on_signal(void *opaque, uint32_t revents)
{
    int fd = *(int *)opaque;
    struct signalfd_siginfo si;
    while (read(fd, &si, sizeof(si)) == sizeof(si)) {
        if (si.ssi_signo == SIGHUP)
            service_reload();
        else
            begin_shutdown(strsignal(si.ssi_signo), true);
    }
}

static char *realpath_for_create(const char *path)
{
    char cwd[4096];
    char *abs;
    if (path[0] == '/' || !getcwd(cwd, sizeof(cwd)))
        return xstrdup(path);
    abs = xasprintf("%s/%s", cwd, path);
    return abs;
}

static int write_pidfile(const char *path)
{
    char buf[32];
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        return -errno;
    int n = snprintf(buf, sizeof(buf), "%d\n", (int)getpid());
    int ret = write(fd, buf, n) == n ? 0 : -EIO;
    close(fd);
    return ret;
}

/* Fork; the parent waits for the child's "ready" byte and exits with the
 * child's verdict.  Returns the write end of the pipe in the child. */
static int daemonize_start(void)
{
    int p[2];
    if (pipe2(p, O_CLOEXEC) < 0) {
        fprintf(stderr, "bexd: pipe: %s\n", strerror(errno));
        exit(1);
    }
    pid_t pid = fork();
    if (pid < 0) {
        fprintf(stderr, "bexd: fork: %s\n", strerror(errno));
        exit(1);
    }
    if (pid > 0) {
        close(p[1]);
        char c;
        ssize_t n;
        do {
            n = read(p[0], &c, 1);
        } while (n < 0 && errno == EINTR);
        _exit(n == 1 && c == 0 ? 0 : 1);
    }
    close(p[0]);
    setsid();
    return p[1];
}

/* BEXD_KEEP_STDERR=1 keeps standard error where the caller pointed it (a
 * test harness's file, so a daemonized bexd's log, a failed assert and a
 * sanitizer report are not lost); by default it goes to /dev/null with
 * stdin and stdout, as qemu-storage-daemon's. */
static void daemonize_finish(int fd)
{
    const char *keep = getenv("BEXD_KEEP_STDERR");
    int null = open("/dev/null", O_RDWR);
    if (null >= 0) {
        dup2(null, STDIN_FILENO);
        dup2(null, STDOUT_FILENO);
        if (!keep || strcmp(keep, "1"))
            dup2(null, STDERR_FILENO);
        if (null > STDERR_FILENO)
            close(null);
    }
    char ok = 0;
    if (write(fd, &ok, 1) != 1)
        _exit(1);
    close(fd);
}

/*
 * glibc raises its mmap threshold to the size of each large block freed
 * (up to 32 MiB): after the first 1 MiB NBD buffer of a closed connection
 * went back, every later one came from the heap, and the holes they left
 * stayed in it.  In the TLS soak the heap kept 15 MiB free next to 11 MiB
 * in use and RSS went 18 -> 32 MiB in 12 minutes (docs/reliability.md).
 * A fixed threshold keeps blocks of 128 KiB and more out of the heap, so
 * freeing them gives the memory back.  GLIBC_TUNABLES may still set it.
 */
static void malloc_setup(void)
{
    const char *t = getenv("GLIBC_TUNABLES");
    if (!t || !strstr(t, "mmap_threshold"))
        mallopt(M_MMAP_THRESHOLD, 128 * 1024);
}

int main(int argc, char **argv)
{
    int ready_fd = -1;
    malloc_setup();
    /* before forking: passed sockets are for this process (LISTEN_PID),
     * and the daemon child inherits them */
    systemd_init();
    log_init();
    if (cli_wants_daemonize(argc, argv)) {
        ready_fd = daemonize_start();
        chardev_set_daemonized();          /* stdin and stdout are not ours */
    }

    signal(SIGPIPE, SIG_IGN);
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGTERM);
    sigaddset(&mask, SIGINT);
    sigaddset(&mask, SIGHUP);
    sigprocmask(SIG_BLOCK, &mask, NULL);
    int sfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);

    loop_main_init();
    schema_init();
    qmp_quit_hook = quit_requested;
    sig_watch = loop_watch_fd(loop_main(), sfd, LOOP_IN, on_signal, &sfd);

    struct cli_result res = { 0 };
    error *err = NULL;
    int r = cli_parse(argc, argv, &cli_ops_apply, &res, &err);
    if (r < 0) {
        fprintf(stderr, "bexd: %s\n", err->msg);
        error_free(err);
        exit(1);
    }
    if (r > 0) {
        /* help or version (not daemonized: cli_wants_daemonize() saw it),
         * or --object help, which qsd too prints after forking */
        cli_print(&res);
        exit(0);
    }
    /* Absolute, since --daemonize changes to "/" before the file is removed. */
    pidfile = res.pidfile ? realpath_for_create(res.pidfile) : NULL;
    if (pidfile) {
        int ret = write_pidfile(pidfile);
        if (ret < 0) {
            fprintf(stderr, "bexd: cannot create PID file: %s\n", strerror(-ret));
            exit(1);
        }
    }
    if (ready_fd >= 0) {
        daemonize_finish(ready_fd);
        if (chdir("/") < 0)
            log_warn("chdir /: %s", strerror(errno));
    }

    service_ready();
    loop_run(loop_main());

    loop_timer_free(grace_timer);
#ifdef CONFIG_METRICS
    metrics_stop();
#endif
    log_info("flushing block nodes");
    block_flush_all_sync();
    if (deadline_passed) {
        /* What is stuck still holds nodes and buffers in other threads:
         * leave without tearing them down, the data is flushed. */
        if (pidfile)
            unlink(pidfile);
        service_stopped();
        _exit(1);
    }
    monitors_close_all();
    chardevs_close_all();
    jobs_free_all();
    block_close_all();
    objects_delete_all();
    if (pidfile)
        unlink(pidfile);
    free(pidfile);
    loop_watch_del(sig_watch);
    close(sfd);
    service_stopped();
    loop_free(loop_main());
    return 0;
}
