/*
 * QMP monitors, each the frontend of one character device (chardev/).
 *
 * Theory of operation: when the chardev's peer arrives (CHARDEV_OPENED) the
 * monitor greets it, reads bytes into a QEMU-compatible JSON stream
 * (json-stream.c), dispatches each complete request and queues the
 * response; when the peer leaves (CHARDEV_CLOSED) the session's state goes
 * with it.  Output is written without blocking; while more than
 * MON_OUT_PAUSE bytes wait, no further request is taken: the rest of the
 * bytes read stay in the input buffer and the chardev is not read (so a
 * client that does not read cannot make the daemon buffer replies without
 * bound); when the output drains, a deferred call resumes the input.  A
 * command whose reply is held back (qmp_reply_hold: it waits for in-flight
 * writes) pauses the input the same way until the reply is sent.  A
 * client whose queue passes MON_OUT_MAX (events pile up too) is dropped.
 * A client that goes away loses only its own state.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "chardev/chardev.h"
#include "qmp/json-out.h"
#include "qmp/monitor.h"
#include "qmp/qmp-int.h"
#include "util/cleanup.h"
#include "util/json-stream.h"
#include "util/log.h"
#include "util/loop.h"
#include "util/xalloc.h"

#define MON_READ_CHUNK 65536
#define MON_OUT_PAUSE (1u << 20)
#define MON_OUT_MAX (64u << 20)

struct monitor {
    struct chardev *chr;
    bool pretty;
    bool connected;                    /* a peer is there */
    struct json_stream *js;
    struct json_stream *dead_js;       /* closed from inside its own callback */
    bool feeding;                      /* inside json_stream_feed() */
    struct qmp_session session;
    char *out;
    size_t out_len, out_cap, out_off;
    char *in;                          /* bytes read, not yet fed */
    size_t in_len, in_off;
    struct loop_defer resume;
    struct qmp_reply *waiting;         /* a command's reply held back */
    struct monitor *next;
};

static struct monitor *monitors;

/* ------------------------------------------------------------------ */
/* Output */

static void mon_update_interest(struct monitor *m);

static void mon_drop(struct monitor *m)
{
    chardev_disconnect(m->chr);        /* CHARDEV_CLOSED comes back at once */
}

static void mon_flush(struct monitor *m)
{
    while (m->connected && m->out_off < m->out_len) {
        ssize_t n = chardev_write(m->chr, m->out + m->out_off, m->out_len - m->out_off);
        if (n == -EAGAIN)
            break;
        if (n <= 0) {
            mon_drop(m);
            return;
        }
        m->out_off += n;
    }
    if (m->out_off == m->out_len)
        m->out_off = m->out_len = 0;
    mon_update_interest(m);
}

static void mon_send(struct monitor *m, json_t *msg)
{
    size_t len;
    if (!m->connected)
        return;
    CLEANUP_FREE char *text = qmp_json_line(msg, m->pretty, &len);
    if (m->out_len - m->out_off + len > MON_OUT_MAX) {
        log_warn("monitor %s: client does not read its output; disconnecting",
                 chardev_id(m->chr));
        mon_drop(m);
        return;
    }
    if (m->out_off && m->out_len + len > m->out_cap) {
        memmove(m->out, m->out + m->out_off, m->out_len - m->out_off);
        m->out_len -= m->out_off;
        m->out_off = 0;
    }
    if (m->out_len + len > m->out_cap) {
        size_t cap = m->out_cap ? m->out_cap : 4096;
        while (cap < m->out_len + len)
            cap *= 2;
        m->out = xrealloc(m->out, cap);
        m->out_cap = cap;
    }
    memcpy(m->out + m->out_len, text, len);
    m->out_len += len;
    mon_flush(m);
}

/* ------------------------------------------------------------------ */
/* Input */

/* No further request now: the output is too full, or a reply is held. */
static bool mon_output_full(struct monitor *m)
{
    return m->out_len - m->out_off > MON_OUT_PAUSE || m->waiting;
}

/* The held reply of the last request: send it, take requests again. */
static void mon_reply(void *opaque, json_t *rsp)
{
    struct monitor *m = opaque;
    m->waiting = NULL;
    mon_send(m, rsp);
    mon_update_interest(m);
}

static void mon_message(void *opaque, json_t *value, error *err)
{
    struct monitor *m = opaque;
    json_t *rsp;
    if (err) {
        rsp = qmp_error_response(error_class_name(err->cls), err->msg);
        error_free(err);
    } else {
        rsp = qmp_dispatch_session(value, &m->session, mon_reply, m, &m->waiting);
        json_decref(value);
    }
    if (rsp) {
        mon_send(m, rsp);
        json_decref(rsp);
    }
    if (m->js && (!m->connected || mon_output_full(m)))
        json_stream_stop(m->js);
}

/* Feed buffered input until it is used up or the output is too full. */
static void mon_process_input(struct monitor *m)
{
    while (m->connected && m->in_off < m->in_len && !mon_output_full(m)) {
        m->feeding = true;
        size_t used = json_stream_feed(m->js, m->in + m->in_off, m->in_len - m->in_off);
        m->feeding = false;
        if (m->dead_js) {               /* the client went away meanwhile */
            json_stream_free(m->dead_js);
            m->dead_js = NULL;
            return;
        }
        m->in_off += used;
    }
    if (m->connected && m->in_off == m->in_len)
        m->in_off = m->in_len = 0;
    mon_update_interest(m);
}

static void mon_resume(void *opaque)
{
    mon_process_input(opaque);
}

static void mon_readable(struct monitor *m)
{
    if (m->in_off < m->in_len)
        return;             /* still working through the last read */
    if (!m->in)
        m->in = xmalloc(MON_READ_CHUNK);
    ssize_t n = chardev_read(m->chr, m->in, MON_READ_CHUNK);
    if (n == -EAGAIN)
        return;
    if (n <= 0) {
        mon_drop(m);
        return;
    }
    m->in_off = 0;
    m->in_len = n;
    mon_process_input(m);
}

static void mon_update_interest(struct monitor *m)
{
    if (!m->connected)
        return;
    size_t pending = m->out_len - m->out_off;
    bool full = mon_output_full(m), unfed = m->in_off < m->in_len;
    if (!full && unfed && !m->resume.pending) {
        m->resume.fn = mon_resume;
        m->resume.opaque = m;
        loop_defer(loop_main(), &m->resume);
    }
    chardev_set_interest(m->chr, (full || unfed ? 0 : LOOP_IN) | (pending ? LOOP_OUT : 0));
}

static void mon_ready(void *opaque, uint32_t revents)
{
    struct monitor *m = opaque;
    if ((revents & (EPOLLERR | EPOLLHUP)) && !(revents & LOOP_IN)) {
        mon_drop(m);               /* gone, with nothing left to read */
        return;
    }
    if (revents & LOOP_OUT) {
        mon_flush(m);
        if (!m->connected)
            return;
    }
    if (revents & (LOOP_IN | EPOLLHUP | EPOLLERR))
        mon_readable(m);
}

/* ------------------------------------------------------------------ */
/* Sessions */

static void mon_closed(struct monitor *m)
{
    if (!m->connected)
        return;
    m->connected = false;
    if (m->waiting) {                  /* nobody to answer any more */
        qmp_reply_cancel(m->waiting);
        m->waiting = NULL;
    }
    if (m->js) {
        if (m->feeding) {
            /* inside the stream's own callback: stop it, free it after */
            json_stream_stop(m->js);
            m->dead_js = m->js;
        } else {
            json_stream_free(m->js);
        }
        m->js = NULL;
    }
    free(m->out);
    m->out = NULL;
    m->out_len = m->out_cap = m->out_off = 0;
    free(m->in);
    m->in = NULL;
    m->in_len = m->in_off = 0;
    m->session = (struct qmp_session){ 0 };
}

static void mon_opened(struct monitor *m)
{
    m->connected = true;
    m->in_off = m->in_len = 0;
    m->js = json_stream_new(mon_message, m);
    /* qsd offers it on sockets and stdio, not on a ring buffer */
    m->session = (struct qmp_session){ .oob_offered = chardev_offers_oob(m->chr) };
    json_t *greeting = qmp_greeting(m->session.oob_offered);
    mon_send(m, greeting);
    json_decref(greeting);
    mon_update_interest(m);
}

static void mon_event(void *opaque, enum chardev_event ev)
{
    if (ev == CHARDEV_OPENED)
        mon_opened(opaque);
    else
        mon_closed(opaque);
}

static const struct chardev_fe_ops monitor_fe = { .event = mon_event, .ready = mon_ready };

/* ------------------------------------------------------------------ */
/* --monitor */

int monitor_add(json_t *opts, error **errp)
{
    const char *id = json_string_value(json_object_get(opts, "chardev"));
    const char *mode = json_string_value(json_object_get(opts, "mode"));
    struct chardev *c = id ? chardev_find(id) : NULL;

    if (!c) {
        error_setg(errp, "chardev \"%s\" not found", id ? id : "");
        return -1;
    }
    if (mode && strcmp(mode, "control")) {
        error_setg(errp, "Only QMP is supported");
        return -1;
    }
    struct monitor *m = xzalloc(sizeof(*m));
    m->chr = c;
    m->pretty = json_is_true(json_object_get(opts, "pretty"));
    m->next = monitors;
    monitors = m;
    if (chardev_attach(c, &monitor_fe, m, errp) < 0) {
        monitors = m->next;
        free(m);
        return -1;
    }
    return 0;
}

void monitors_broadcast(json_t *event)
{
    for (struct monitor *m = monitors; m; m = m->next)
        if (m->connected && m->session.negotiated)
            mon_send(m, event);
}

void monitors_close_all(void)
{
    for (struct monitor *m = monitors; m; m = m->next) {
        if (m->connected && m->out_off < m->out_len)
            mon_flush(m);    /* best effort, never blocks: the final replies */
        mon_drop(m);
        mon_closed(m);       /* a chardev that cannot drop its peer (ringbuf) */
    }
}
