/*
 * authz-listfile: the rules of an authz-list, read from a JSON file
 * ({"policy": ..., "rules": [...]}, checked against AuthZListProperties).
 *
 * With refresh (the default, as in QEMU on Linux) an inotify watch on the
 * file's directory, in the main loop, reloads the rules whenever the file
 * is written and closed or renamed into place.  A reload that fails
 * leaves no rules, so every check is denied until the file is fixed
 * (QEMU's choice: a broken policy must not fall back to an old one).
 */
#include <errno.h>
#include <libgen.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <unistd.h>
#include "crypto/authz.h"
#include "object/qom.h"
#include "crypto/tls-creds.h"
#include "qmp/schema.h"
#include "util/cleanup.h"
#include "util/log.h"
#include "util/loop.h"
#include "util/xalloc.h"
#include "util/opts.h"

struct authz_listfile {
    struct authz a;
    char *filename;
    char *base;                       /* file name inside the watched directory */
    bool loaded;
    struct authz_rules rules;
    int ino_fd;
    struct loop_watch *watch;
};

static int listfile_load(struct authz_listfile *f, error **errp)
{
    CLEANUP_FREE char *text = NULL;
    CLEANUP_JSON json_t *doc = NULL;
    CLEANUP_JSON json_t *checked = NULL;
    json_error_t jerr;
    size_t len;

    authz_rules_clear(&f->rules);
    f->loaded = false;
    text = tls_read_file(f->filename, &len);
    if (!text) {
        error_setg_errno(errp, errno, "Unable to read '%s': Failed to open file \u201c%s\u201d",
                         f->filename, f->filename);
        return -1;
    }
    doc = json_loadb(text, len, JSON_DECODE_ANY, &jerr);
    if (!doc) {
        error_setg(errp, "JSON parse error, %s", jerr.text);
        return -1;
    }
    if (!json_is_object(doc)) {
        error_setg(errp, "File '%s' must contain a JSON object", f->filename);
        return -1;
    }
    checked = schema_check_type("AuthZListProperties", doc, false, "", errp);
    if (!checked || authz_rules_parse(&f->rules, checked, errp) < 0)
        return -1;
    f->loaded = true;
    return 0;
}

static void listfile_event(void *opaque, uint32_t revents)
{
    struct authz_listfile *f = opaque;
    char buf[4096] __attribute__((aligned(__alignof__(struct inotify_event))));
    bool hit = false;
    ssize_t n;

    while ((n = read(f->ino_fd, buf, sizeof(buf))) > 0) {
        for (char *p = buf; p < buf + n;) {
            const struct inotify_event *ev = (const struct inotify_event *)p;
            if (ev->len && !strcmp(ev->name, f->base))
                hit = true;
            p += sizeof(*ev) + ev->len;
        }
    }
    if (hit) {
        error *err = NULL;
        if (listfile_load(f, &err) < 0) {
            log_error("authz-listfile '%s': %s", f->a.obj.id, err->msg);
            error_free(err);
        }
    }
}

static int listfile_watch(struct authz_listfile *f, error **errp)
{
    CLEANUP_FREE char *d1 = xstrdup(f->filename);
    CLEANUP_FREE char *d2 = xstrdup(f->filename);
    const char *dir, *base;

    dir = dirname(d1);
    base = basename(d2);
    if (!strcmp(dir, ".")) {
        error_setg(errp, "Filename must be an absolute path");
        return -1;
    }
    if (!strcmp(base, ".") || !strcmp(base, "/")) {
        error_setg(errp, "Path has no trailing filename component");
        return -1;
    }
    f->base = xstrdup(base);
    f->ino_fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
    if (f->ino_fd < 0) {
        error_setg_errno(errp, errno, "Unable to initialize inotify");
        return -1;
    }
    if (inotify_add_watch(f->ino_fd, dir, IN_CLOSE_WRITE | IN_MOVED_TO) < 0) {
        error_setg_errno(errp, errno, "Unable to watch '%s'", dir);
        return -1;
    }
    f->watch = loop_watch_fd(loop_main(), f->ino_fd, LOOP_IN, listfile_event, f);
    return 0;
}

static int listfile_complete(struct object *obj, json_t *props, error **errp)
{
    struct authz_listfile *f = (struct authz_listfile *)obj;

    f->ino_fd = -1;
    f->filename = xstrdup(opt_str(props, "filename", ""));
    if (listfile_load(f, errp) < 0)
        return -1;
    if (!opt_bool(props, "refresh", true))
        return 0;
    return listfile_watch(f, errp);
}

static void listfile_finalize(struct object *obj)
{
    struct authz_listfile *f = (struct authz_listfile *)obj;

    if (f->watch)
        loop_watch_del(f->watch);
    if (f->ino_fd >= 0)
        close(f->ino_fd);
    authz_rules_clear(&f->rules);
    free(f->filename);
    free(f->base);
}

static int listfile_is_allowed(struct authz *a, const char *identity, error **errp)
{
    struct authz_listfile *f = (struct authz_listfile *)a;

    return f->loaded && authz_rules_allow(&f->rules, identity);
}

/* QOM: QEMU's type name; filename and refresh are read once, at creation
 * (setting them later is recorded, as in QEMU). */
static const struct qom_prop authz_list_file_props[] = {
    { "filename", "string", "str", "\"\"" },
    { "refresh", "bool", "bool", "true" },
    { NULL },
};
static struct qom_class authz_list_file_class = {
    .name = "authz-list-file", .parent = "authz", .user_creatable = true,
    .props = authz_list_file_props,
};
QOM_CLASS_REGISTER(authz_list_file_class)

static struct authz_type authz_listfile_type = {
    .base = {
        .name = "authz-listfile",
        .instance_size = sizeof(struct authz_listfile),
        .qom = &authz_list_file_class,
        .complete = listfile_complete,
        .finalize = listfile_finalize,
    },
    .is_allowed = listfile_is_allowed,
};
AUTHZ_TYPE_REGISTER(authz_listfile_type)
