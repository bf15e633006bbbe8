/*
 * Character devices: the registry, frontends, the logfile, the QMP commands
 * (chardev-add, chardev-change, chardev-remove, chardev-send-break,
 * query-chardev, query-chardev-backends), --chardev and QOM's /chardevs.
 *
 * Theory of operation: a chardev is an id, a backend (char-*.c) and its
 * state, and at most one frontend.  The backend says when a peer arrives
 * and leaves (chardev_opened/closed) and passes readiness on; the frontend
 * reads and writes through the backend, and every byte written also goes
 * to the logfile (ChardevCommon's, for any backend).  QMP and the command
 * line build the same ChardevBackend object and reach chardev_new(); the
 * command line gives QemuOpts' defaults (server off, wait on), QMP QAPI's
 * (server on, wait off).  As in QEMU, chardev-change of a chardev nobody
 * uses removes it and adds the new one; bexd first runs the new backend's
 * checks, so a bad option does not lose the old chardev.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "chardev/chardev-int.h"
#include "object/qom.h"
#include "qmp/qmp.h"
#include "util/cleanup.h"
#include "util/id.h"
#include "util/opts.h"
#include "util/xalloc.h"

static const struct chardev_backend *backends[8];
static size_t n_backends;
static struct chardev *chardevs;          /* creation order */
static bool daemonized;

void chardev_backend_register(const struct chardev_backend *be)
{
    if (n_backends == ARRAY_SIZE(backends))
        abort();                           /* a new backend needs a bigger table */
    backends[n_backends++] = be;
}

static const struct chardev_backend *backend_find(const char *name)
{
    for (size_t i = 0; i < n_backends; i++)
        if (!strcmp(backends[i]->name, name))
            return backends[i];
    return NULL;
}

struct chardev *chardev_find(const char *id)
{
    for (struct chardev *c = chardevs; c; c = c->next)
        if (!strcmp(c->id, id))
            return c;
    return NULL;
}

const char *chardev_id(const struct chardev *c) { return c->id; }

void chardev_set_daemonized(void) { daemonized = true; }
bool chardev_daemonized(void) { return daemonized; }

/* ---- life ---- */

static int open_logfile(struct chardev *c, json_t *data, error **errp)
{
    const char *path = opt_str(data, "logfile", NULL);
    if (!path)
        return 0;
    int flags = O_WRONLY | O_CREAT | O_CLOEXEC |
                (opt_bool(data, "logappend", false) ? O_APPEND : O_TRUNC);
    c->logfd = open(path, flags, 0666);
    if (c->logfd < 0) {
        error_setg_errno(errp, errno, "Could not create '%s'", path);
        return -1;
    }
    return 0;
}

static void chardev_free(struct chardev *c)
{
    if (c->logfd >= 0)
        close(c->logfd);
    free(c->state);
    free(c->id);
    free(c);
}

static struct chardev *chardev_new(const char *id, const char *type, json_t *data, error **errp)
{
    const struct chardev_backend *be = backend_find(type);
    if (!be) {                             /* the schema lists only ours */
        error_setg(errp, "'%s' is not a valid char driver name", type);
        return NULL;
    }
    struct chardev *c = xzalloc(sizeof(*c));
    c->id = xstrdup(id);
    c->be = be;
    c->state = xzalloc(be->state_size ? be->state_size : 1);
    c->logfd = -1;
    /* the log file first, then the backend's own checks, as qemu_char_open */
    if (open_logfile(c, data, errp) < 0 || (be->check && be->check(data, errp) < 0)) {
        chardev_free(c);
        return NULL;
    }
    if (be->open(c, data, errp) < 0) {
        be->close(c);              /* whatever the backend took before failing */
        chardev_free(c);
        return NULL;
    }
    struct chardev **p = &chardevs;
    while (*p)
        p = &(*p)->next;
    *p = c;
    return c;
}

static void chardev_delete(struct chardev *c)
{
    for (struct chardev **p = &chardevs; *p; p = &(*p)->next)
        if (*p == c) {
            *p = c->next;
            break;
        }
    c->be->close(c);
    chardev_free(c);
}

int chardev_add(const char *id, json_t *backend, error **errp)
{
    if (chardev_find(id)) {
        error_setg(errp, "Chardev with id '%s' already exists", id);
        return -1;
    }
    error *err = NULL;
    if (!chardev_new(id, opt_str(backend, "type", ""), json_object_get(backend, "data"), &err)) {
        error_setg(errp, "Failed to add chardev '%s': %s", id, err->msg);
        error_free(err);
        return -1;
    }
    return 0;
}

void chardevs_close_all(void)
{
    while (chardevs)
        chardev_delete(chardevs);
}

/* ---- frontends ---- */

int chardev_attach(struct chardev *c, const struct chardev_fe_ops *ops, void *opaque,
                   error **errp)
{
    if (c->fe) {
        error_setg(errp, "Device '%s' is in use", c->id);
        return -1;
    }
    c->fe = ops;
    c->fe_opaque = opaque;
    if (c->be->attached)
        c->be->attached(c);
    if (c->open)
        ops->event(opaque, CHARDEV_OPENED);
    return 0;
}

bool chardev_has_frontend(const struct chardev *c) { return c->fe != NULL; }
bool chardev_offers_oob(const struct chardev *c) { return !c->be->no_oob; }

ssize_t chardev_read(struct chardev *c, void *buf, size_t len)
{
    return c->open ? c->be->read(c, buf, len) : 0;
}

ssize_t chardev_write(struct chardev *c, const void *buf, size_t len)
{
    if (!c->open)
        return -EPIPE;
    ssize_t n = c->be->write(c, buf, len);
    if (n > 0 && c->logfd >= 0 && write(c->logfd, buf, n) < 0) {
        close(c->logfd);                   /* a full disk: stop logging, keep serving */
        c->logfd = -1;
    }
    return n;
}

void chardev_set_interest(struct chardev *c, uint32_t events)
{
    if (c->interest == events || !c->open)
        return;
    c->interest = events;
    c->be->set_interest(c, events);
}

void chardev_disconnect(struct chardev *c)
{
    if (c->open && c->be->disconnect)
        c->be->disconnect(c);
}

void chardev_opened(struct chardev *c)
{
    c->open = true;
    c->interest = 0;
    if (c->fe)
        c->fe->event(c->fe_opaque, CHARDEV_OPENED);
}

void chardev_closed(struct chardev *c)
{
    if (!c->open)
        return;
    c->open = false;
    c->interest = 0;
    if (c->fe)
        c->fe->event(c->fe_opaque, CHARDEV_CLOSED);
}

void chardev_ready(struct chardev *c, uint32_t revents)
{
    if (c->fe && c->open)
        c->fe->ready(c->fe_opaque, revents);
}

/* ---- --chardev (QemuOpts) ---- */

int chardev_opt_bool(json_t *opts, const char *key, bool dflt, bool *out, error **errp)
{
    json_t *v = json_object_get(opts, key);
    const char *s = json_string_value(v);
    if (!v) {
        *out = dflt;
        return 0;
    }
    if (json_is_boolean(v)) {
        *out = json_is_true(v);
        return 0;
    }
    if (s && (!strcmp(s, "on") || !strcmp(s, "yes") || !strcmp(s, "true") || !strcmp(s, "y"))) {
        *out = true;
        return 0;
    }
    if (s && (!strcmp(s, "off") || !strcmp(s, "no") || !strcmp(s, "false") || !strcmp(s, "n"))) {
        *out = false;
        return 0;
    }
    error_setg(errp, "Parameter '%s' expects 'on' or 'off'", key);
    return -1;
}

const char *chardev_opt_text(json_t *opts, const char *key)
{
    json_t *v = json_object_get(opts, key);
    static char num[32];
    if (json_is_integer(v)) {
        snprintf(num, sizeof(num), "%lld", (long long)json_integer_value(v));
        return num;
    }
    return json_string_value(v);
}

static const char *const common_keys[] = { "backend", "id", "logfile", "logappend", "mux", NULL };

static bool key_in(const char *const *keys, const char *k)
{
    for (; keys && *keys; keys++)
        if (!strcmp(*keys, k))
            return true;
    return false;
}

static int check_keys(json_t *opts, const char *const *keys, error **errp)
{
    const char *k;
    json_t *v;
    json_object_foreach(opts, k, v) {
        if ((!key_in(common_keys, k) && !key_in(keys, k)) ||
            (!json_is_string(v) && !json_is_boolean(v) && !json_is_integer(v))) {
            error_setg(errp, "Invalid parameter '%s'", k);
            return -1;
        }
    }
    return 0;
}

json_t *chardev_check_opts(json_t *opts, const char **idp, const char **backendp, error **errp)
{
    const char *backend = chardev_opt_text(opts, "backend");
    const char *id = chardev_opt_text(opts, "id");

    if (!id) {
        error_setg(errp, "chardev: no id specified");
        return NULL;
    }
    if (!id_wellformed(id)) {
        error_setg(errp, "Parameter 'id' expects an identifier");
        return NULL;
    }
    if (!backend) {
        error_setg(errp, "chardev: \"%s\" missing backend", id);
        return NULL;
    }
    const struct chardev_backend *be = backend_find(backend);
    if (!be) {
        error_setg(errp, "'%s' is not a valid char driver name", backend);
        return NULL;
    }
    if (check_keys(opts, be->cli_keys, errp) < 0)
        return NULL;
    if (chardev_find(id)) {
        error_setg(errp, !strcmp(backend, "socket") ? "duplicate yank instance"
                   : "attempt to add duplicate property '%s' to object (type 'container')", id);
        return NULL;
    }
    json_t *data = be->parse_cli(opts, errp);
    if (!data)
        return NULL;
    const char *logfile = chardev_opt_text(opts, "logfile");
    bool append;
    if (chardev_opt_bool(opts, "logappend", false, &append, errp) < 0) {
        json_decref(data);
        return NULL;
    }
    if (logfile) {
        json_object_set_new(data, "logfile", json_string(logfile));
        json_object_set_new(data, "logappend", json_boolean(append));
    }
    *idp = id;
    *backendp = backend;
    return data;
}

int chardev_add_opts(json_t *opts, error **errp)
{
    const char *id, *backend;
    CLEANUP_JSON json_t *data = chardev_check_opts(opts, &id, &backend, errp);

    if (!data)
        return -1;
    return chardev_new(id, backend, data, errp) ? 0 : -1;
}

/* ---- QMP ---- */

static json_t *qmp_chardev_add(json_t *args, error **errp)
{
    if (chardev_add(opt_str(args, "id", ""), json_object_get(args, "backend"), errp) < 0)
        return NULL;
    return json_object();
}
QMP_COMMAND("chardev-add", qmp_chardev_add)

static json_t *qmp_chardev_remove(json_t *args, error **errp)
{
    const char *id = opt_str(args, "id", "");
    struct chardev *c = chardev_find(id);
    if (!c) {
        error_setg(errp, "Chardev '%s' not found", id);
        return NULL;
    }
    if (c->fe) {
        error_setg(errp, "Chardev '%s' is busy", id);
        return NULL;
    }
    chardev_delete(c);
    return json_object();
}
QMP_COMMAND("chardev-remove", qmp_chardev_remove)

static json_t *qmp_chardev_change(json_t *args, error **errp)
{
    const char *id = opt_str(args, "id", "");
    json_t *backend = json_object_get(args, "backend");
    struct chardev *c = chardev_find(id);
    if (!c) {
        error_setg(errp, "Chardev '%s' does not exist", id);
        return NULL;
    }
    if (c->fe) {                   /* monitors cannot follow a change */
        error_setg(errp, "Chardev user does not support chardev hotswap");
        return NULL;
    }
    const struct chardev_backend *be = backend_find(opt_str(backend, "type", ""));
    error *err = NULL;
    if (be && be->check && be->check(json_object_get(backend, "data"), &err) < 0) {
        error_setg(errp, "Failed to add chardev '%s': %s", id, err->msg);
        error_free(err);
        return NULL;
    }
    chardev_delete(c);
    if (chardev_add(id, backend, errp) < 0)
        return NULL;
    return json_object();
}
QMP_COMMAND("chardev-change", qmp_chardev_change)

static json_t *qmp_chardev_send_break(json_t *args, error **errp)
{
    const char *id = opt_str(args, "id", "");
    if (!chardev_find(id)) {
        error_setg(errp, "Chardev '%s' not found", id);
        return NULL;
    }
    return json_object();          /* a break means something only to telnet */
}
QMP_COMMAND("chardev-send-break", qmp_chardev_send_break)

static json_t *qmp_query_chardev(json_t *args, error **errp)
{
    json_t *list = json_array();
    for (struct chardev *c = chardevs; c; c = c->next) {
        CLEANUP_FREE char *fn = c->be->filename(c);
        json_array_append_new(list, json_pack("{s:s, s:s, s:b}", "label", c->id,
                                              "filename", fn, "frontend-open", c->fe != NULL));
    }
    return list;
}
QMP_COMMAND("query-chardev", qmp_query_chardev)

static json_t *qmp_query_chardev_backends(json_t *args, error **errp)
{
    json_t *list = json_array();
    for (size_t i = 0; i < n_backends; i++)
        json_array_append_new(list, json_pack("{s:s}", "name", backends[i]->name));
    return list;
}
QMP_COMMAND("query-chardev-backends", qmp_query_chardev_backends)

/* ---- QOM: the "/chardevs" container ---- */

static struct qom_class chardev_class = { .name = "chardev", .parent = "object", .abstract = true };
QOM_CLASS_REGISTER(chardev_class)

static void *chardevs_first(void) { return chardevs; }
static void *chardevs_next(void *c) { return ((struct chardev *)c)->next; }
static const char *chardevs_id(void *c) { return ((struct chardev *)c)->id; }
static const struct qom_class *chardevs_cls(void *c) { return ((struct chardev *)c)->be->qom; }

static json_t *chardevs_get(void *obj, const struct qom_prop *p)
{
    struct chardev *c = obj;
    json_t *v = c->be->qom_get ? c->be->qom_get(c, p->name) : NULL;
    return v ? v : qom_prop_default(p);
}

static int chardevs_set(void *obj, const struct qom_prop *p, json_t *value, error **errp)
{
    return 0;                      /* chardevs have no writable property */
}

const struct qom_container chardev_container = {
    .name = "chardevs", .first = chardevs_first, .next = chardevs_next, .id = chardevs_id,
    .cls = chardevs_cls, .get = chardevs_get, .set = chardevs_set,
};
