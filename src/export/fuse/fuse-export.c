/*
 * FUSE export: lifecycle (block-export-add type=fuse, block-export-del).
 *
 * Theory of operation.  create() checks the mountpoint the way QEMU does
 * (it must be an existing regular file, which the mount will shadow), makes
 * a libfuse low-level session and mounts it there, with allow_other when
 * asked (auto: try with it, fall back without when the mount refuses), then
 * starts serving the session fd on the export's loop (fuse-session.c).
 *
 * in_use() is true while a file handle on the mount is open, so a safe
 * block-export-del is refused then; shutdown (hard, or safe when idle, and
 * quit/SIGTERM through the registry) stops reading requests, lets the ones
 * in the block layer answer, then unmounts and destroys the session in the
 * main thread and calls export_shutdown_done().
 *
 * A daemon killed with SIGKILL leaves a dead mount behind: stat() on it
 * fails with ENOTCONN.  The next start reports that with QEMU's message and
 * a hint to run `fusermount3 -u`.
 */
#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/stat.h>
#include <unistd.h>
#include "export/fuse/fuse-export.h"
#include "util/cleanup.h"
#include "util/xalloc.h"

static const struct export_type fuse_export_type;

static struct fuse_export *to_fuse(struct export *e)
{
    return container_of(e, struct fuse_export, common);
}

/* Another live FUSE export of ours on the same path?  Checked before stat():
 * stat() on our own mount would wait on a loop that may be this thread. */
static bool mountpoint_taken(struct fuse_export *self, const char *path)
{
    for (struct export *e = export_first(); e; e = e->next) {
        struct fuse_export *o;
        if (e->type != &fuse_export_type || e == &self->common)
            continue;
        o = to_fuse(e);
        if (o->se && o->mountpoint && strcmp(o->mountpoint, path) == 0)
            return true;
    }
    return false;
}

static bool check_mountpoint(const char *path, error **errp)
{
    struct stat st;

    if (stat(path, &st) < 0) {
        int err = errno;
        if (err == ENOTCONN) {
            error_setg(errp, "Failed to stat '%s': %s (a stale FUSE mount left "
                       "by a killed daemon? clean it up with 'fusermount3 -u %s')",
                       path, strerror(err), path);
        } else {
            error_setg_errno(errp, err, "Failed to stat '%s'", path);
        }
        return false;
    }
    if (!S_ISREG(st.st_mode)) {
        error_setg(errp, "'%s' is not a regular file", path);
        return false;
    }
    return true;
}

static int fuse_mount(struct fuse_export *exp, bool allow_other, error **errp)
{
    char opts[128];
    char *argv[] = { (char *)"bexd", (char *)"-o", opts, NULL };
    struct fuse_args args = FUSE_ARGS_INIT(3, argv);
    struct fuse_session *se;

    /* max_read must match what op_init() sets. */
    snprintf(opts, sizeof(opts), "max_read=%u,default_permissions%s",
             FUSE_RW_MAX, allow_other ? ",allow_other" : "");
    se = fuse_session_new(&args, &fuse_export_ops, sizeof(fuse_export_ops), exp);
    fuse_opt_free_args(&args);
    if (!se) {
        error_setg(errp, "Failed to set up FUSE session");
        return -EIO;
    }
    if (fuse_session_mount(se, exp->mountpoint) < 0) {
        fuse_session_destroy(se);
        error_setg(errp, "Failed to mount FUSE session to export");
        return -EIO;
    }
    exp->se = se;
    exp->mounted = true;
    exp->mounted_at = time(NULL);
    exp->allow_other = allow_other;
    return 0;
}

static int fuse_mount_auto(struct fuse_export *exp, const char *mode, error **errp)
{
    if (strcmp(mode, "on") == 0)
        return fuse_mount(exp, true, errp);
    if (strcmp(mode, "off") == 0)
        return fuse_mount(exp, false, errp);
    /* auto: fusermount3 refuses allow_other without user_allow_other */
    if (fuse_mount(exp, true, NULL) == 0)
        return 0;
    return fuse_mount(exp, false, errp);
}

static void fuse_export_cleanup(struct fuse_export *exp)
{
    fuse_queues_free(exp);   /* rings and clone fds before the session */
    if (exp->se) {
        if (exp->mounted)
            fuse_session_unmount(exp->se);
        fuse_session_destroy(exp->se);
        exp->se = NULL;
        exp->mounted = false;
    }
    free(exp->mountpoint);
    exp->mountpoint = NULL;
}

static int fuse_export_create(struct export *e, json_t *opts, error **errp)
{
    struct fuse_export *exp = to_fuse(e);
    const char *mp = json_string_value(json_object_get(opts, "mountpoint"));
    const char *ao = json_string_value(json_object_get(opts, "allow-other"));
    int ret;

    /* Growable and writable exports can change the size (truncate): they
     * need RESIZE, which e.g. an NBD export of the same node does not share. */
    if (json_is_true(json_object_get(opts, "growable")) || e->writable) {
        if (bnode_user_set_perm(e->user, e->user->perm | PERM_RESIZE, e->user->shared,
                                errp) < 0)
            return -EPERM;
    }
    if (!mp) {
        error_setg(errp, "Parameter 'mountpoint' is missing");
        return -EINVAL;
    }
    if (mountpoint_taken(exp, mp)) {
        error_setg(errp, "There already is a FUSE export on '%s'", mp);
        return -EEXIST;
    }
    if (!check_mountpoint(mp, errp))
        return -EINVAL;
    exp->mountpoint = xstrdup(mp);
    exp->growable = json_is_true(json_object_get(opts, "growable"));
    exp->st_mode = S_IFREG | S_IRUSR | (e->writable ? S_IWUSR : 0);
    exp->st_uid = getuid();
    exp->st_gid = getgid();
    exp->max_inflight = FUSE_MAX_INFLIGHT;
    /* test knob: a lower limit than the kernel's own max_background, so a
     * test can show bexd's limit holding (tests/func/test_reliability.py) */
    const char *knob = getenv("BEXD_FUSE_MAX_INFLIGHT");
    if (knob && atoi(knob) > 0 && atoi(knob) < FUSE_MAX_INFLIGHT)
        exp->max_inflight = atoi(knob);

    ret = fuse_mount_auto(exp, ao ? ao : "auto", errp);
    if (ret < 0) {
        fuse_export_cleanup(exp);
        return ret;
    }
    ret = fuse_queues_setup(exp, json_is_true(json_object_get(opts, "__org.bexd_io-uring")),
                            errp);
    if (ret < 0) {
        fuse_export_cleanup(exp);
        return ret;
    }
    fuse_session_start(exp);
    return 0;
}

static bool fuse_export_in_use(struct export *e)
{
    struct fuse_export *exp = to_fuse(e);

    /* close() returns before the kernel's RELEASE has been served: take
     * what is queued on every queue first, so a file closed before the
     * command counts as closed. */
    fuse_session_poll_now(exp);
    return __atomic_load_n(&exp->open_handles, __ATOMIC_SEQ_CST) > 0;
}

static void fuse_export_shutdown(struct export *e, enum export_remove_mode mode)
{
    struct fuse_export *exp = to_fuse(e);

    /* Every mode ends the same way for a mount: no new requests, answer
     * those in flight, unmount (lazily: open handles then see ENOTCONN).
     * The registry may call again to escalate (quit after a pending
     * removal): once is enough, and a second stop could race the free. */
    if (exp->stop_requested)
        return;
    exp->stop_requested = true;
    fuse_session_stop(exp);
}

static void fuse_export_free(struct export *e)
{
    fuse_export_cleanup(to_fuse(e));
}

static void fuse_export_node_resized(struct export *e)
{
    struct fuse_export *exp = (struct fuse_export *)e;
    if (!exp->self_resizing && !exp->stop_requested)
        fuse_session_node_resized(exp);
}

static bool fuse_export_can_move(struct export *e, error **errp)
{
    return fuse_session_can_move(to_fuse(e), errp);
}

static void fuse_export_moved(struct export *e)
{
    fuse_session_move(to_fuse(e));
}

static unsigned fuse_export_nclients(struct export *e)
{
    return ((struct fuse_export *)e)->mounted ? 1 : 0;
}

static json_t *fuse_export_totals(struct export *e)
{
    struct fuse_export *exp = (struct fuse_export *)e;
    struct client_stats sum = { 0 }, v;

    /* each queue counts what it served (one writer per counter set) */
    for (unsigned i = 0; i < exp->nqueues; i++) {
        client_stats_read(&exp->queues[i].st, &v);
        client_stats_add(&sum, &v);
    }
    return client_stats_json(&sum);
}

static unsigned fuse_inflight(struct fuse_export *exp)
{
    unsigned n = 0;
    for (unsigned i = 0; i < exp->nqueues; i++)
        n += __atomic_load_n(&exp->queues[i].inflight, __ATOMIC_RELAXED);
    return n;
}

/* The one client of a FUSE export is the kernel's mount: every process
 * using the file reaches bexd through it. */
static json_t *fuse_export_clients(struct export *e)
{
    struct fuse_export *exp = (struct fuse_export *)e;
    json_t *list = json_array();

    if (!exp->mounted)
        return list;
    json_t *o = fuse_export_totals(e);
    json_object_set_new(o, "transport", json_string("fuse"));
    json_object_set_new(o, "peer", json_string(exp->mountpoint));
    json_object_set_new(o, "tls", json_false());
    json_object_set_new(o, "connected-since", json_integer(exp->mounted_at));
    json_object_set_new(o, "requests-in-flight",
                        json_integer(fuse_inflight(exp)));
    json_array_append_new(list, o);
    return list;
}

static const struct export_type fuse_export_type = {
    .nclients = fuse_export_nclients,
    .query_clients = fuse_export_clients,
    .query_totals = fuse_export_totals,
    .name = "fuse",
    .instance_size = sizeof(struct fuse_export),
    .create = fuse_export_create,
    .in_use = fuse_export_in_use,
    .shutdown = fuse_export_shutdown,
    .free = fuse_export_free,
    .node_resized = fuse_export_node_resized,
    .can_move = fuse_export_can_move,
    .moved = fuse_export_moved,
    .multi_iothread = true,
};

EXPORT_TYPE_REGISTER(fuse_export_type);
