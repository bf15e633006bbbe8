/*
 * QMP dispatch, events, and the monitor's own commands.
 *
 * Theory of operation: a request passes the same steps, with the same
 * messages, as in QEMU's qapi/qmp-dispatch.c: check the request's members,
 * find the command (before negotiation only qmp_capabilities exists, and
 * a missing command is reported as "Expecting capabilities negotiation"),
 * check the arguments against the schema, run the handler.  The response
 * echoes "id".  Events get a timestamp and go to every negotiated monitor,
 * through the main loop when raised from another thread.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include "config.h"
#include "qmp/qmp-int.h"
#include "qmp/qmp.h"
#include "qmp/schema.h"
#include "util/cleanup.h"
#include "util/coroutine.h"
#include "util/loop.h"
#include "util/sockets.h"
#include "util/xalloc.h"

static struct qmp_cmd *commands;
void (*qmp_quit_hook)(void);

void qmp_register(struct qmp_cmd *cmd)
{
    cmd->next = commands;
    commands = cmd;
}

const struct qmp_cmd *qmp_find(const char *name)
{
    for (struct qmp_cmd *c = commands; c; c = c->next)
        if (!strcmp(c->name, name))
            return c;
    return NULL;
}

const struct qmp_cmd *qmp_first(void)
{
    return commands;
}

/* ------------------------------------------------------------------ */
/* Responses */

/* A message may quote a string the client sent, \u0000 included (kept as
 * QEMU keeps it, the bytes C0 80: json-stream.c): no UTF-8 check. */
static json_t *error_object(const char *cls, const char *desc)
{
    return json_pack("{s:s, s:o}", "class", cls, "desc", json_string_nocheck(desc));
}

json_t *qmp_error_response(const char *cls, const char *desc)
{
    return json_pack("{s:o}", "error", error_object(cls, desc));
}

static json_t *error_response(json_t *id, error *err)
{
    json_t *rsp = json_object();
    if (id)
        json_object_set(rsp, "id", id);
    json_object_set_new(rsp, "error", error_object(error_class_name(err->cls), err->msg));
    error_free(err);
    return rsp;
}

static json_t *return_response(json_t *id, json_t *ret)
{
    json_t *rsp = json_object();
    json_object_set_new(rsp, "return", ret ? ret : json_object());
    if (id)
        json_object_set(rsp, "id", id);
    return rsp;
}

static void version_numbers(int *major, int *minor, int *micro)
{
    *major = *minor = *micro = 0;
    sscanf(BEXD_VERSION, "%d.%d.%d", major, minor, micro);
}

static json_t *version_info(void)
{
    int major, minor, micro;
    version_numbers(&major, &minor, &micro);
    return json_pack("{s:{s:i, s:i, s:i}, s:s}", "qemu", "micro", micro,
                     "minor", minor, "major", major, "package", "bexd");
}

json_t *qmp_greeting(bool offer_oob)
{
    json_t *caps = json_array();
    if (offer_oob)
        json_array_append_new(caps, json_string("oob"));
    return json_pack("{s:{s:o, s:o}}", "QMP", "version", version_info(),
                     "capabilities", caps);
}

/* ------------------------------------------------------------------ */
/* Dispatch */

/* QEMU's qmp_dispatch_check_obj(). */
static int check_request(json_t *req, bool allow_oob, const char **cmd,
                         bool *oob, error **errp)
{
    const char *key, *exec_key = NULL;
    json_t *v;

    json_object_foreach(req, key, v) {
        if (!strcmp(key, "execute") || (allow_oob && !strcmp(key, "exec-oob"))) {
            if (!json_is_string(v)) {
                error_setg(errp, "QMP input member '%s' must be a string", key);
                return -1;
            }
            if (exec_key) {
                error_setg(errp, "QMP input member '%s' clashes with '%s'", key, exec_key);
                return -1;
            }
            exec_key = key;
            *cmd = json_string_value(v);
            *oob = !strcmp(key, "exec-oob");
        } else if (!strcmp(key, "arguments")) {
            if (!json_is_object(v)) {
                error_setg(errp, "QMP input member 'arguments' must be an object");
                return -1;
            }
        } else if (strcmp(key, "id")) {
            error_setg(errp, "QMP input member '%s' is unexpected", key);
            return -1;
        }
    }
    if (!exec_key) {
        error_setg(errp, "QMP input lacks member 'execute'");
        return -1;
    }
    return 0;
}

static json_t *do_capabilities(json_t *args, struct qmp_session *s, error **errp)
{
    if (s->negotiated) {
        error_set(errp, ERR_COMMAND_NOT_FOUND,
                  "Capabilities negotiation is already complete, command ignored");
        return NULL;
    }
    CLEANUP_JSON json_t *checked = schema_check_command("qmp_capabilities", args, errp);
    if (!checked)
        return NULL;
    json_t *enable = json_object_get(checked, "enable");
    size_t i;
    json_t *cap;
    bool oob = false;
    json_array_foreach(enable, i, cap) {
        if (!strcmp(json_string_value(cap), "oob")) {
            if (!s->oob_offered) {
                error_setg(errp, "Capability 'oob' not available");
                return NULL;
            }
            oob = true;
        }
    }
    s->oob_enabled = oob;
    s->negotiated = true;
    return json_object();
}

static json_t *run_command(const char *name, bool oob, json_t *args,
                           struct qmp_session *s, error **errp)
{
    bool is_caps = !strcmp(name, "qmp_capabilities");
    const struct qmp_cmd *cmd = is_caps ? NULL : qmp_find(name);

    if (!s->negotiated && !is_caps) {
        error_set(errp, ERR_COMMAND_NOT_FOUND,
                  "Expecting capabilities negotiation with 'qmp_capabilities'");
        return NULL;
    }
    if (!is_caps && (!cmd || !schema_command_exists(name))) {
        error_set(errp, ERR_COMMAND_NOT_FOUND, "The command %s has not been found", name);
        return NULL;
    }
    if (oob) {
        error_setg(errp, "The command %s does not support OOB", name);
        return NULL;
    }
    if (is_caps)
        return do_capabilities(args, s, errp);
    CLEANUP_JSON json_t *checked = schema_check_command(name, args, errp);
    if (!checked)
        return NULL;
    error *err = NULL;
    socket_set_monitor_context(true);
    json_t *ret = cmd->fn(checked, &err);
    socket_set_monitor_context(false);
    if (err) {
        json_decref(ret);
        error_propagate(errp, err);
        return NULL;
    }
    return ret ? ret : json_object();
}

/* ---- replies held back ---- */

struct qmp_reply {
    int holds;
    json_t *rsp;
    void (*send)(void *opaque, json_t *rsp);
    void *opaque;
};

static struct qmp_reply *running;   /* the command's, while its handler runs */

struct qmp_reply *qmp_reply_hold(void)
{
    struct qmp_reply *r = running ? running : xzalloc(sizeof(*r));   /* nobody waits */
    r->holds++;
    return r;
}

void qmp_reply_release(struct qmp_reply *r)
{
    if (--r->holds > 0)
        return;
    if (r->send)
        r->send(r->opaque, r->rsp);
    json_decref(r->rsp);
    free(r);
}

struct qmp_reply *qmp_reply_enter(struct qmp_reply *r)
{
    struct qmp_reply *outer = running;
    running = r;
    return outer;
}

void qmp_reply_set(struct qmp_reply *r, json_t *ret, error *err)
{
    json_t *id = json_incref(json_object_get(r->rsp, "id"));
    json_decref(r->rsp);
    r->rsp = err ? error_response(id, err) : return_response(id, ret);
    json_decref(id);
}

struct co_call {
    json_t *(*fn)(json_t *args, error **errp);
    json_t *args;
    struct qmp_reply *reply;
    json_t *ret;
    error *err;
    bool done;                      /* finished before the handler returned */
    bool later;                     /* ... or after: it answers itself */
};

static void co_call_body(void *opaque)
{
    struct co_call *c = opaque;
    co_set_waits_in_main(true);
    c->ret = c->fn(c->args, &c->err);
    co_set_waits_in_main(false);
    if (!c->later) {
        c->done = true;
        return;
    }
    qmp_reply_set(c->reply, c->ret, c->err);
    qmp_reply_release(c->reply);
    json_decref(c->args);
    free(c);
}

json_t *qmp_call_co(json_t *(*fn)(json_t *args, error **errp), json_t *args, error **errp)
{
    if (!loop_in_thread(loop_main()))
        return fn(args, errp);
    struct co_call *c = xzalloc(sizeof(*c));
    c->fn = fn;
    c->args = json_incref(args);
    c->reply = qmp_reply_hold();
    co_enter(co_create(co_call_body, c));
    if (!c->done) {
        c->later = true;
        return json_object();       /* replaced by what fn returns */
    }
    json_t *ret = c->ret;
    if (c->err)
        error_propagate(errp, c->err);
    qmp_reply_release(c->reply);    /* the handler's own hold answers */
    json_decref(c->args);
    free(c);
    return ret;
}

void qmp_reply_cancel(struct qmp_reply *r)
{
    r->send = NULL;
}

static json_t *dispatch(json_t *req, struct qmp_session *s)
{
    error *err = NULL;
    const char *name = NULL;
    bool oob = false;

    if (!json_is_object(req)) {
        error_setg(&err, "QMP input must be a JSON object");
        return error_response(NULL, err);
    }
    json_t *id = json_object_get(req, "id");
    if (check_request(req, s->oob_enabled, &name, &oob, &err) < 0)
        return error_response(id, err);
    json_t *ret = run_command(name, oob, json_object_get(req, "arguments"), s, &err);
    if (!ret)
        return error_response(id, err);
    return return_response(id, ret);
}

json_t *qmp_dispatch_session(json_t *req, struct qmp_session *s,
                             void (*send)(void *opaque, json_t *rsp), void *opaque,
                             struct qmp_reply **pending)
{
    struct qmp_reply *r = xzalloc(sizeof(*r));
    r->holds = 1;                   /* until the handler has returned */
    struct qmp_reply *outer = qmp_reply_enter(r);
    json_t *rsp = dispatch(req, s);
    qmp_reply_enter(outer);
    if (r->holds == 1) {
        free(r);
        return rsp;
    }
    r->rsp = send ? rsp : json_incref(rsp);
    r->send = send;
    r->opaque = opaque;
    if (pending)
        *pending = r;
    qmp_reply_release(r);
    return send ? NULL : rsp;
}

json_t *qmp_dispatch(json_t *request, bool negotiated)
{
    struct qmp_session s = { .negotiated = negotiated };
    return qmp_dispatch_session(request, &s, NULL, NULL, NULL);
}

/* ------------------------------------------------------------------ */
/* Events */

static void event_in_main(void *opaque)
{
    json_t *ev = opaque;
    monitors_broadcast(ev);
    json_decref(ev);
}

void qmp_event(const char *name, json_t *data)
{
    struct timeval tv;
    gettimeofday(&tv, NULL);
    json_t *ev = json_pack("{s:{s:I, s:I}, s:s}", "timestamp",
                           "seconds", (json_int_t)tv.tv_sec,
                           "microseconds", (json_int_t)tv.tv_usec, "event", name);
    if (data)
        json_object_set_new(ev, "data", data);
    struct loop *main_loop = loop_main();
    if (!main_loop || loop_in_thread(main_loop)) {
        event_in_main(ev);
        return;
    }
    loop_call(main_loop, event_in_main, ev);
}

/* ------------------------------------------------------------------ */
/* The monitor's own commands */

static json_t *qmp_query_version(json_t *args, error **errp)
{
    return version_info();
}
QMP_COMMAND("query-version", qmp_query_version)

static json_t *qmp_query_commands(json_t *args, error **errp)
{
    json_t *list = json_array();
    json_array_append_new(list, json_pack("{s:s}", "name", "qmp_capabilities"));
    for (const struct qmp_cmd *c = qmp_first(); c; c = c->next)
        if (schema_command_exists(c->name))
            json_array_append_new(list, json_pack("{s:s}", "name", c->name));
    return list;
}
QMP_COMMAND("query-commands", qmp_query_commands)

static json_t *qmp_query_qmp_schema(json_t *args, error **errp)
{
    return schema_introspect();
}
QMP_COMMAND("query-qmp-schema", qmp_query_qmp_schema)

static void quit_later(void *opaque)
{
    if (qmp_quit_hook)
        qmp_quit_hook();
}

static json_t *qmp_quit(json_t *args, error **errp)
{
    /* The reply is queued by the caller before the loop runs the hook. */
    if (loop_main())
        loop_call(loop_main(), quit_later, NULL);
    else
        quit_later(NULL);
    return json_object();
}
QMP_COMMAND("quit", qmp_quit)
