/*
 * QMP commands and events.
 *
 * A command handler gets its arguments already checked against the schema
 * (src/qmp/schema-*.c, QAPI syntax): member names, types, enums, defaults
 * are NOT filled in (absent optional members stay absent, as in QEMU).  It
 * returns a new reference to the return value (json_object() for "{}"), or
 * NULL with *errp set.  Handlers run in the main thread.
 *
 * Commands register themselves with QMP_COMMAND() next to their code; the
 * schema must define a command of the same name.
 */
#pragma once
#include <stdbool.h>
#include <jansson.h>
#include "util/error.h"

typedef json_t *qmp_cmd_fn(json_t *args, error **errp);

struct qmp_cmd {
    const char *name;
    qmp_cmd_fn *fn;
    struct qmp_cmd *next;
};

void qmp_register(struct qmp_cmd *cmd);
const struct qmp_cmd *qmp_find(const char *name);
const struct qmp_cmd *qmp_first(void);   /* iterate with ->next */

#define QMP_COMMAND(cmdname, func)                                        \
    static struct qmp_cmd qmp_cmd_##func = { .name = cmdname, .fn = func }; \
    __attribute__((constructor)) static void qmp_cmd_register_##func(void) \
    { qmp_register(&qmp_cmd_##func); }

/* A command that finishes after its handler returned (QEMU's commands that
 * drain the nodes first): qmp_reply_hold(), in the handler, keeps the
 * reply back until qmp_reply_release() was called as often; the monitor
 * takes no further request from that client meanwhile.  Main thread. */
struct qmp_reply;
struct qmp_reply *qmp_reply_hold(void);
void qmp_reply_release(struct qmp_reply *r);
/* A held reply's outcome, decided after the handler returned (whatever
 * the handler returned is replaced): ret (stolen) or err (taken). */
void qmp_reply_set(struct qmp_reply *r, json_t *ret, error *err);
/* Work done later for a held reply's command (qmp_reply_set) runs as its
 * handler: a qmp_reply_hold() in it holds r.  Returns what to restore
 * afterwards with qmp_reply_enter(). */
struct qmp_reply *qmp_reply_enter(struct qmp_reply *r);

/* Run a command's work fn(args) as a coroutine of the main loop that may
 * wait there for image I/O (co_set_waits_in_main): the loop serves
 * everything else meanwhile, and the reply waits for the work.  Work that
 * never waits answers at once.  Outside the running main loop (tests that
 * dispatch directly), fn runs as it is.  Main thread, from a handler. */
json_t *qmp_call_co(json_t *(*fn)(json_t *args, error **errp), json_t *args, error **errp);

/* Emit an event to every monitor that completed negotiation.  data is
 * stolen (may be NULL).  Thread-safe: other threads are forwarded to the
 * main loop. */
void qmp_event(const char *name, json_t *data);

/* Execute one request object (the monitor's dispatch, also used by tests):
 * returns the full response object ({"return":..} or {"error":..}, with
 * "id" echoed), never NULL. */
json_t *qmp_dispatch(json_t *request, bool negotiated);

/* Set by main: called by the "quit" command after its reply is queued. */
extern void (*qmp_quit_hook)(void);
