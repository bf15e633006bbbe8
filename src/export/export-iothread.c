/*
 * x-blockdev-set-iothread: move a node, and the exports on the part of the
 * graph it belongs to, to another iothread (or the main loop).
 *
 * bexd's nodes are not bound to a loop (requests run in the loop that
 * submits them), so what moves are the exports: each export whose node is
 * the node, one of its parents or one of its children, as QEMU moves the
 * whole connected graph.  QEMU's checks and words: a node used directly
 * by an export needs force=true; an export with fixed-iothread refuses.
 * An export moves when its type allows it (all three do); otherwise the
 * command fails and nothing moved.  An export whose iothread is a list
 * stays where it is, as QEMU 10.1's multi-threaded exports do: its threads
 * were chosen for it and are not the node's (QEMU moves the node's
 * context and leaves the export's queues in theirs).  The reply comes once the export is
 * the new loop's: new clients start there.  Clients and queues already
 * running follow asynchronously, each quiesced first (requests in flight
 * complete in the old loop, none is lost or answered twice), usually
 * within a millisecond; until then the old iothread stays pinned, so
 * object-del of it may still answer that it is in use.
 */
#include <string.h>
#include "block/block.h"
#include "export/export.h"
#include "object/iothread.h"
#include "qmp/qmp.h"
#include "util/loop.h"
#include "util/opts.h"

static bool below(struct bnode *top, struct bnode *bs)
{
    if (!top)
        return false;
    return top == bs || below(top->file, bs) || below(top->backing, bs);
}

static bool affected(struct export *e, struct bnode *bs)
{
    return below(e->node, bs) || below(bs, e->node);
}

static json_t *qmp_x_blockdev_set_iothread(json_t *args, error **errp)
{
    const char *name = opt_str(args, "node-name", "");
    json_t *io = json_object_get(args, "iothread");
    struct bnode *bs = bnode_find(name);
    struct iothread *iot = NULL;

    if (!bs) {
        error_setg(errp, "Failed to find node with node-name='%s'", name);
        return NULL;
    }
    if (!opt_bool(args, "force", false)) {
        for (struct export *e = export_first(); e; e = e->next)
            if (e->node == bs) {
                error_setg(errp, "Node %s is associated with a BlockBackend and could be in "
                           "use (use force=true to override this check)", name);
                return NULL;
            }
    }
    if (json_is_string(io)) {
        error *err = NULL;
        iot = iothread_find(json_string_value(io), &err);
        if (!iot) {
            error_free(err);
            error_setg(errp, "Cannot find iothread %s", json_string_value(io));
            return NULL;
        }
    }
    /* Check every export first: all move or none does. */
    for (struct export *e = export_first(); e; e = e->next) {
        if (!affected(e, bs) || e->n_loops || e->iothread == iot)
            continue;
        if (e->fixed_iothread) {
            error_setg(errp, "Cannot change iothread of active block backend");
            return NULL;
        }
        if (e->shutting_down || !e->type->can_move) {
            error_setg(errp, "Cannot move export '%s' (%s) to another iothread", e->id,
                       e->type->name);
            return NULL;
        }
        if (!e->type->can_move(e, errp))
            return NULL;
    }
    for (struct export *e = export_first(); e; e = e->next) {
        if (!affected(e, bs) || e->n_loops || e->iothread == iot)
            continue;
        if (e->iothread)
            object_unref(&e->iothread->obj);
        if (iot)
            object_ref(&iot->obj);
        e->iothread = iot;
        e->loop = iot ? iot->loop : loop_main();
        if (e->type->moved)
            e->type->moved(e);
    }
    return json_object();
}
QMP_COMMAND("x-blockdev-set-iothread", qmp_x_blockdev_set_iothread)
