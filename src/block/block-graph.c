/*
 * query-block, x-debug-query-block-graph and x-blockdev-change.
 *
 * qemu-storage-daemon has no guest devices, so query-block answers an
 * empty list.  The graph is QEMU's BlockGraphInfo: one node per user of a
 * node that is not itself a node (an export, a job: QEMU's BlockBackend,
 * nameless, edge "root") and one per block node; one edge per user, with
 * the permissions it holds and shares.  Numbers and order follow QEMU's
 * walk, so the answer is the same list as qsd's for the same graph: users
 * in creation order, then nodes in creation order each with its children
 * newest first; an id is given when a thing is first met, and both lists
 * come out in reverse (QEMU prepends).
 *
 * x-blockdev-change adds a child to a node or takes one away; in QEMU only
 * quorum nodes can, and bexd has none: the command checks its arguments
 * in QEMU's order and says which node cannot.
 */
#include <stdlib.h>
#include <string.h>
#include "block/block.h"
#include "qmp/qmp.h"
#include "util/opts.h"
#include "util/xalloc.h"

struct graph {
    const void **seen;       /* id - 1 -> thing */
    size_t nseen;
    json_t *nodes, *edges;
};

static json_int_t graph_id(struct graph *g, const void *thing)
{
    for (size_t i = 0; i < g->nseen; i++)
        if (g->seen[i] == thing)
            return i + 1;
    g->seen = xrealloc(g->seen, (g->nseen + 1) * sizeof(*g->seen));
    g->seen[g->nseen++] = thing;
    return g->nseen;
}

static void graph_node(struct graph *g, const void *thing, const char *type, const char *name)
{
    json_array_insert_new(g->nodes, 0, json_pack("{s:I, s:s, s:s}", "id", graph_id(g, thing),
                                                  "type", type, "name", name));
}

static json_t *perm_list(uint64_t perm)
{
    static const char *const names[] = { "consistent-read", "write", "write-unchanged",
                                         "resize" };
    json_t *l = json_array();
    for (int b = 0; b < 4; b++)
        if (perm & (1u << b))
            json_array_insert_new(l, 0, json_string(names[b]));
    return l;
}

static void graph_edge(struct graph *g, const void *parent, struct bnode_user *u)
{
    json_int_t p = graph_id(g, parent), c = graph_id(g, u->bs);
    json_array_insert_new(g->edges, 0, json_pack("{s:I, s:I, s:s, s:o, s:o}",
                                                  "parent", p, "child", c, "name", u->role,
                                                  "perm", perm_list(u->perm),
                                                  "shared-perm", perm_list(u->shared)));
}

static int by_seq(const void *a, const void *b)
{
    const struct bnode_user *x = *(struct bnode_user *const *)a;
    const struct bnode_user *y = *(struct bnode_user *const *)b;
    return x->seq < y->seq ? -1 : x->seq > y->seq;
}

/* Users matching parent (NULL: root users of every node), oldest first. */
static struct bnode_user **users_of(struct bnode *parent, size_t *n)
{
    struct bnode_user **v = NULL;
    *n = 0;
    for (struct bnode *bs = bnode_first(); bs; bs = bs->next)
        for (struct bnode_user *u = bs->users; u; u = u->next)
            if (u->parent == parent) {
                v = xrealloc(v, (*n + 1) * sizeof(*v));
                v[(*n)++] = u;
            }
    if (*n)
        qsort(v, *n, sizeof(*v), by_seq);
    return v;
}

json_t *block_graph(void)
{
    struct graph g = { .nodes = json_array(), .edges = json_array() };
    size_t n, nnodes = 0;

    struct bnode_user **roots = users_of(NULL, &n);
    for (size_t i = 0; i < n; i++) {
        graph_node(&g, roots[i], "block-backend", "");
        graph_edge(&g, roots[i], roots[i]);
    }
    free(roots);
    for (struct bnode *bs = bnode_first(); bs; bs = bs->next)
        nnodes++;
    struct bnode **order = xcalloc(nnodes ? nnodes : 1, sizeof(*order));
    size_t i = nnodes;
    for (struct bnode *bs = bnode_first(); bs; bs = bs->next)
        order[--i] = bs;                   /* the list is newest first */
    for (i = 0; i < nnodes; i++) {
        graph_node(&g, order[i], "block-driver", order[i]->node_name);
        struct bnode_user **kids = users_of(order[i], &n);
        for (size_t k = n; k > 0; k--)     /* QEMU lists children newest first */
            graph_edge(&g, order[i], kids[k - 1]);
        free(kids);
    }
    free(order);
    free(g.seen);
    return json_pack("{s:o, s:o}", "nodes", g.nodes, "edges", g.edges);
}

static json_t *qmp_x_debug_query_block_graph(json_t *args, error **errp)
{
    return block_graph();
}
QMP_COMMAND("x-debug-query-block-graph", qmp_x_debug_query_block_graph)

static json_t *qmp_query_block(json_t *args, error **errp)
{
    return json_array();        /* no guest devices in a storage daemon */
}
QMP_COMMAND("query-block", qmp_query_block)

static json_t *qmp_x_blockdev_change(json_t *args, error **errp)
{
    const char *parent = opt_str(args, "parent", "");
    const char *child = opt_str(args, "child", NULL), *node = opt_str(args, "node", NULL);
    struct bnode *bs = bnode_find(parent);
    if (!bs) {
        error_setg(errp, "Cannot find device='%s' nor node-name='%s'", parent, parent);
        return NULL;
    }
    if (!child == !node) {
        error_setg(errp, child ? "The parameters child and node are in conflict"
                               : "Either child or node must be specified");
        return NULL;
    }
    if (child) {
        size_t n;
        struct bnode_user **kids = users_of(bs, &n);
        bool found = false;
        for (size_t i = 0; i < n; i++)
            found |= !strcmp(kids[i]->role, child);
        free(kids);
        if (!found) {
            error_setg(errp, "Node '%s' does not have child '%s'", parent, child);
            return NULL;
        }
        error_setg(errp, "The node %s does not support removing a child", parent);
        return NULL;
    }
    if (!bnode_find(node)) {
        error_setg(errp, "Node '%s' not found", node);
        return NULL;
    }
    error_setg(errp, "The node %s does not support adding a child", parent);
    return NULL;
}
QMP_COMMAND("x-blockdev-change", qmp_x_blockdev_change)
