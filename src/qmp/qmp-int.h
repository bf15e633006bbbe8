/* Internal interface between the QMP dispatcher (qmp.c) and the monitors
 * (monitor.c). */
#pragma once
#include <stdbool.h>
#include <jansson.h>

struct qmp_reply;

/* Per-monitor protocol state that dispatch reads and qmp_capabilities sets. */
struct qmp_session {
    bool negotiated;
    bool oob_offered;     /* "oob" was in the greeting */
    bool oob_enabled;     /* negotiated with qmp_capabilities */
};

/* Dispatch one parsed request for a session: the response, or NULL when
 * the command held its reply back (qmp_reply_hold): send(opaque, response)
 * comes later, and *pending identifies the wait until then, for
 * qmp_reply_cancel() (the peer left: the response is dropped).  Without
 * send, never NULL: a held reply is returned at once. */
json_t *qmp_dispatch_session(json_t *request, struct qmp_session *s,
                             void (*send)(void *opaque, json_t *rsp), void *opaque,
                             struct qmp_reply **pending);
void qmp_reply_cancel(struct qmp_reply *r);
/* {"QMP": {"version": ..., "capabilities": [...]}} */
json_t *qmp_greeting(bool offer_oob);
/* {"error": {"class": ..., "desc": ...}} for a message that did not parse. */
json_t *qmp_error_response(const char *cls, const char *desc);

/* monitor.c: send an event object to every negotiated monitor (main thread). */
void monitors_broadcast(json_t *event);
