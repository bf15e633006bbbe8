/*
 * Users of nodes and their permissions, as QEMU's block graph has them.
 *
 * Every user (an export, or a parent node through its child link) holds a
 * set of permissions (consistent read, write, write unchanged, resize) and
 * shares a set with the other users.  A change is checked against the other
 * users of the node, then propagated: a format node passes what its own
 * users hold and share on to its "file" child, and a leaf driver turns the
 * result into image locks.  A failure anywhere rolls the change back.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "block/block.h"
#include "util/cleanup.h"
#include "util/xalloc.h"

static const char *const perm_names[] = { "consistent read", "write", "write unchanged",
                                          "resize" };

const char *bnode_perm_name(int bit)
{
    return bit >= 0 && bit < 4 ? perm_names[bit] : "?";
}

static void perm_list(uint64_t perm, char *buf, size_t len)
{
    buf[0] = 0;
    for (int b = 0; b < 4; b++)
        if (perm & (1u << b))
            snprintf(buf + strlen(buf), len - strlen(buf), "%s%s", buf[0] ? ", " : "",
                     perm_names[b]);
}

static void conflict(error **errp, struct bnode *bs, uint64_t perm,
                     struct bnode_user *needs, struct bnode_user *refuses)
{
    char names[96];
    perm_list(perm, names, sizeof(names));
    error_setg(errp, "Permission conflict on node '%s': permissions '%s' are both required "
               "by %s (uses node '%s' as '%s' child) and unshared by %s (uses node '%s' "
               "as '%s' child).", bs->node_name, names, needs->name, bs->node_name,
               needs->role, refuses->name, bs->node_name, refuses->role);
}

static int check(struct bnode_user *u, uint64_t perm, uint64_t shared, error **errp)
{
    struct bnode *bs = u->bs;
    if ((perm & PERM_WRITE) && bs->read_only) {
        error_setg(errp, "Block node is read-only");
        return -1;
    }
    for (struct bnode_user *o = bs->users; o; o = o->next) {
        if (o == u)
            continue;
        if (perm & ~o->shared) {
            conflict(errp, bs, perm & ~o->shared, u, o);
            return -1;
        }
        if (o->perm & ~shared) {
            conflict(errp, bs, o->perm & ~shared, o, u);
            return -1;
        }
    }
    return 0;
}

/* What the users of bs hold together and share between them. */
static void cumulative(struct bnode *bs, uint64_t *perm, uint64_t *shared)
{
    *perm = 0;
    *shared = PERM_ALL;
    for (struct bnode_user *o = bs->users; o; o = o->next) {
        *perm |= o->perm;
        *shared &= o->shared;
    }
}

/* Pass the users' permissions down to the child and the driver. */
static int propagate(struct bnode *bs, error **errp)
{
    uint64_t perm, shared;
    cumulative(bs, &perm, &shared);
    if (bs->file_link) {
        uint64_t child_perm = perm ? perm | PERM_CONSISTENT_READ : 0, child_shared = shared;
        if (bs->drv->child_perm)
            bs->drv->child_perm(bs, &child_perm, &child_shared);
        if (bs->drv->reopen_needs_rw_file) {
            /* a format node writing metadata (QEMU's METADATA child role):
             * it reads its file consistently, writes it when read-write even
             * without users, and lets nobody else write or resize it */
            child_perm |= PERM_CONSISTENT_READ | (bs->read_only ? 0 : PERM_WRITE | PERM_RESIZE);
            child_shared &= ~(uint64_t)(PERM_WRITE | PERM_RESIZE);
        }
        if (bnode_user_set_perm(bs->file_link, child_perm, child_shared, errp) < 0)
            return -1;
    }
    struct bnode_user *bl = bs->drv->reopen_backing_link ?
                            *bs->drv->reopen_backing_link(bs) : NULL;
    if (bl) {
        /* QEMU's bdrv_default_perms_for_cow: consistent reads if the
         * parent's users read so; writes and resizes shared only where
         * they share them */
        uint64_t cow_shared = PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED |
                              ((shared & PERM_WRITE) ? PERM_WRITE | PERM_RESIZE : 0);
        if (bnode_user_set_perm(bl, perm & PERM_CONSISTENT_READ, cow_shared, errp) < 0)
            return -1;
    }
    if (bs->drv->set_perm && bs->drv->set_perm(bs, perm, shared, errp) < 0)
        return -1;
    return 0;
}

int bnode_refresh_perms(struct bnode *bs, error **errp)
{
    return propagate(bs, errp);
}

int bnode_user_set_perm(struct bnode_user *u, uint64_t perm, uint64_t shared, error **errp)
{
    /* QEMU's bdrv_child_perm: a child opened with force-share=on (read-only)
     * is shared in full by its parent, so no other process's writer is
     * refused for it and its image locks unshare nothing */
    if (u->parent && u->bs->force_share)
        shared = PERM_ALL;
    if (check(u, perm, shared, errp) < 0)
        return -1;
    uint64_t old_perm = u->perm, old_shared = u->shared;
    u->perm = perm;
    u->shared = shared;
    if (propagate(u->bs, errp) < 0) {
        u->perm = old_perm;
        u->shared = old_shared;
        propagate(u->bs, NULL);
        return -1;
    }
    return 0;
}

struct bnode_user *bnode_attach(struct bnode *bs, uint64_t perm, uint64_t shared,
                                const char *name, const char *role, error **errp)
{
    static uint64_t seq;
    struct bnode_user *u = xzalloc(sizeof(*u));
    *u = (struct bnode_user){ .bs = bs, .shared = PERM_ALL, .name = xstrdup(name),
                              .role = role, .seq = ++seq, .next = bs->users };
    bs->users = u;
    bnode_ref(bs);
    if (bnode_user_set_perm(u, perm, shared, errp) < 0) {
        bnode_detach(u);
        return NULL;
    }
    return u;
}

struct bnode_user *bnode_attach_child(struct bnode *parent, struct bnode *child,
                                      const char *role, error **errp)
{
    CLEANUP_FREE char *me = xasprintf("node '%s'", parent->node_name);
    struct bnode_user *u = bnode_attach(child, 0, PERM_ALL, me, role, errp);
    if (u)
        u->parent = parent;
    return u;
}

void bnode_detach(struct bnode_user *u)
{
    struct bnode *bs = u->bs;
    for (struct bnode_user **p = &bs->users; *p; p = &(*p)->next)
        if (*p == u) {
            *p = u->next;
            break;
        }
    propagate(bs, NULL);          /* giving permissions back cannot conflict */
    free(u->name);
    free(u);
    bnode_unref(bs);
}

static void unlink_user(struct bnode_user *u)
{
    for (struct bnode_user **p = &u->bs->users; *p; p = &(*p)->next)
        if (*p == u) {
            *p = u->next;
            break;
        }
}

static void link_user(struct bnode_user *u, struct bnode *bs)
{
    u->bs = bs;
    u->next = bs->users;
    bs->users = u;
}

int bnode_user_move(struct bnode_user *u, struct bnode *to, error **errp)
{
    struct bnode *from = u->bs;
    unlink_user(u);
    link_user(u, to);
    bnode_ref(to);
    if (check(u, u->perm, u->shared, errp) < 0 || propagate(to, errp) < 0) {
        unlink_user(u);
        propagate(to, NULL);
        link_user(u, from);
        bnode_unref(to);
        return -1;
    }
    propagate(from, NULL);        /* giving permissions back cannot conflict */
    bnode_unref(from);
    return 0;
}

int bnode_users_move(struct bnode_user **users, size_t n, struct bnode *to, error **errp)
{
    struct bnode *from = n ? users[0]->bs : NULL;
    for (size_t i = 0; i < n; i++)
        if (bnode_user_move(users[i], to, errp) < 0) {
            while (i > 0)
                bnode_user_move(users[--i], from, NULL);
            return -1;
        }
    return 0;
}

void bnode_users_replaced(struct bnode_user **users, size_t n, uint64_t old_size)
{
    for (size_t i = 0; i < n; i++) {
        users[i]->replaced(users[i]);
        if (users[i]->bs->size != old_size && users[i]->resized)
            users[i]->resized(users[i]);
    }
}

int bnode_ref_user(struct bnode *bs, bool write, error **errp)
{
    uint64_t perm = PERM_CONSISTENT_READ | (write ? PERM_WRITE : 0);
    struct bnode_user *u = bnode_attach(bs, perm, PERM_ALL, "an unnamed block device",
                                        "root", errp);
    if (u)
        u->anonymous = true;
    return u ? 0 : -1;
}

void bnode_unref_user(struct bnode *bs, bool write)
{
    uint64_t perm = PERM_CONSISTENT_READ | (write ? PERM_WRITE : 0);
    for (struct bnode_user *u = bs->users; u; u = u->next)
        if (u->anonymous && u->perm == perm) {
            bnode_detach(u);
            return;
        }
}
