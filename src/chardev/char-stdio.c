/*
 * The "stdio" chardev backend: the daemon's standard input and output, open
 * from the start.  As in QEMU, only one chardev may use them, and none once
 * --daemonize has pointed them at /dev/null.
 */
#include <errno.h>
#include <string.h>
#include <unistd.h>
#include "chardev/chardev-int.h"
#include "object/qom.h"
#include "util/loop.h"
#include "util/sockets.h"
#include "util/xalloc.h"

struct stdio {
    struct chardev *chr;
    struct loop_watch *in_w, *out_w;
};

static bool stdio_taken;

static void stdio_in(void *opaque, uint32_t revents)
{
    struct stdio *s = opaque;
    chardev_ready(s->chr, revents & ~LOOP_OUT);
}

static void stdio_out(void *opaque, uint32_t revents)
{
    struct stdio *s = opaque;
    chardev_ready(s->chr, revents & ~LOOP_IN);
}

static int stdio_open(struct chardev *c, json_t *data, error **errp)
{
    struct stdio *s = c->state;
    if (chardev_daemonized()) {
        error_setg(errp, "cannot use stdio with -daemonize");
        return -1;
    }
    if (stdio_taken) {
        error_setg(errp, "cannot use stdio by multiple character devices");
        return -1;
    }
    stdio_taken = true;
    s->chr = c;
    socket_set_nonblock(STDIN_FILENO, true);
    socket_set_nonblock(STDOUT_FILENO, true);
    s->in_w = loop_watch_fd(loop_main(), STDIN_FILENO, 0, stdio_in, s);
    s->out_w = loop_watch_fd(loop_main(), STDOUT_FILENO, 0, stdio_out, s);
    chardev_opened(c);
    return 0;
}

static void stdio_stop(struct stdio *s)
{
    if (s->in_w)
        loop_watch_del(s->in_w);
    if (s->out_w)
        loop_watch_del(s->out_w);
    s->in_w = s->out_w = NULL;
}

static void stdio_close(struct chardev *c)
{
    struct stdio *s = c->state;
    if (s->chr)
        stdio_taken = false;
    stdio_stop(s);
}

static ssize_t stdio_read(struct chardev *c, void *buf, size_t len)
{
    ssize_t n = read(STDIN_FILENO, buf, len);
    return n < 0 ? (errno == EWOULDBLOCK ? -EAGAIN : -errno) : n;
}

static ssize_t stdio_write(struct chardev *c, const void *buf, size_t len)
{
    ssize_t n = write(STDOUT_FILENO, buf, len);
    return n < 0 ? (errno == EWOULDBLOCK ? -EAGAIN : -errno) : n;
}

static void stdio_set_interest(struct chardev *c, uint32_t events)
{
    struct stdio *s = c->state;
    if (s->in_w)
        loop_watch_set(s->in_w, events & LOOP_IN);
    if (s->out_w)
        loop_watch_set(s->out_w, events & LOOP_OUT);
}

/* End of input: nothing more will come (the process keeps running). */
static void stdio_disconnect(struct chardev *c)
{
    stdio_stop(c->state);
    chardev_closed(c);
}

static char *stdio_filename(struct chardev *c) { return xstrdup("stdio"); }

static json_t *stdio_parse_cli(json_t *opts, error **errp)
{
    bool sig;
    if (chardev_opt_bool(opts, "signal", true, &sig, errp) < 0)
        return NULL;
    return json_pack("{s:b}", "signal", sig);
}

static const char *const stdio_keys[] = { "signal", NULL };

static struct qom_class chardev_fd_class = {
    .name = "chardev-fd", .parent = "chardev", .abstract = true,
};
static struct qom_class chardev_stdio_class = { .name = "chardev-stdio", .parent = "chardev-fd" };
QOM_CLASS_REGISTER(chardev_fd_class)
QOM_CLASS_REGISTER(chardev_stdio_class)

static const struct chardev_backend stdio_backend = {
    .name = "stdio",
    .qom = &chardev_stdio_class,
    .state_size = sizeof(struct stdio),
    .cli_keys = stdio_keys,
    .parse_cli = stdio_parse_cli,
    .open = stdio_open,
    .close = stdio_close,
    .read = stdio_read,
    .write = stdio_write,
    .set_interest = stdio_set_interest,
    .disconnect = stdio_disconnect,
    .filename = stdio_filename,
};
CHARDEV_BACKEND_REGISTER(stdio_backend)
