/*
 * Export registry and lifecycle, shared by every export type.
 *
 * block_export_add() (QMP block-export-add and --export) validates the common
 * options, resolves the node and iothread, takes the node (with WRITE if
 * writable), and calls the type's create().  block_export_del() marks the
 * export shutting down and calls the type's del() with the mode; the type
 * finishes the shutdown (now or when its last client leaves) by calling
 * export_shutdown_done() in the main thread, which releases the node, emits
 * BLOCK_EXPORT_DELETED and frees the export.
 *
 * Remove modes: safe (refused while in use), hard (drop clients now), hide
 * (no new clients; removed when the last leaves), soft (no new clients;
 * existing requests answered ESHUTDOWN).
 */
#pragma once
#include <stdbool.h>
#include <jansson.h>
#include "util/error.h"

struct bnode;
struct loop;
struct iothread;

enum export_remove_mode { EXPORT_DEL_SAFE, EXPORT_DEL_HARD, EXPORT_DEL_HIDE, EXPORT_DEL_SOFT };

struct export;

struct export_type {
    const char *name;            /* "nbd", "vhost-user-blk", "fuse" */
    size_t instance_size;        /* >= sizeof(struct export); export first member */
    /* opts: the validated BlockExportOptions object (type-specific members included). */
    int  (*create)(struct export *exp, json_t *opts, error **errp);
    /* True while clients are connected (safe mode refuses then). */
    bool (*in_use)(struct export *exp);
    /* Begin shutdown with mode (never SAFE-while-in-use; the registry checked).
     * Must eventually call export_shutdown_done(exp) in the main thread; it
     * may do so before returning (the registry does not touch exp after). */
    void (*shutdown)(struct export *exp, enum export_remove_mode mode);
    /* Free type-specific state; called from export_shutdown_done. */
    void (*free)(struct export *exp);
    /* Operations (ops): the clients connected now, as a JSON list of the
     * vendor schema's client objects, and their number.  NULL: none known. */
    json_t *(*query_clients)(struct export *exp);
    unsigned (*nclients)(struct export *exp);
    /* Counters of everything its clients did (same members as a client's). */
    json_t *(*query_totals)(struct export *exp);
    /* The node changed size (block_resize; main thread, never while the
     * export shuts down): tell the clients.  NULL: they see it next time
     * they ask (a new NBD client gets the new size). */
    void (*node_resized)(struct export *exp);
    /* exp->node is another node now (an overlay took its place; main
     * thread, writes held): drop what was kept of the old one.  NULL:
     * the type reads exp->node for each request. */
    void (*node_replaced)(struct export *exp);
    /* x-blockdev-set-iothread: may the export now move to another loop
     * (main thread)?  NULL: never. */
    bool (*can_move)(struct export *exp, error **errp);
    /* ... it did: exp->iothread and exp->loop are the new ones.  The type
     * moves what runs in the old loop (clients, queues) there, quiescing
     * each first; new clients start there.  NULL: nothing to move. */
    void (*moved)(struct export *exp);
    /* The type serves one export from several loops: `iothread` may be a
     * list (QEMU 10.1's BlockExportIothreads 'multi' branch). */
    bool multi_iothread;
};

struct export {
    char *id;
    const struct export_type *type;
    struct bnode *node;
    struct bnode_user *user;     /* the export's use of node; types may adjust its perms */
    bool writable;
    bool writethrough;
    bool fixed_iothread;
    struct iothread *iothread;   /* NULL = main loop */
    struct loop *loop;           /* where the export runs (iothread's or main) */
    /* `iothread` given as a list (multi-threaded export): the iothreads, in
     * the order given, duplicates dropped; loops[i] is iothreads[i]->loop
     * and loop == loops[0].  n_loops is 0 for a single-threaded export. */
    struct iothread **iothreads;
    struct loop **loops;
    unsigned n_loops;
    bool shutting_down;
    bool throttle_bypassed;      /* a hard removal lifted the throttle limits */
    enum export_remove_mode del_mode;
    struct export *next;
};

void export_type_register(const struct export_type *t);
int  block_export_add(json_t *opts, error **errp);
int  block_export_del(const char *id, enum export_remove_mode mode, error **errp);
struct export *export_find(const char *id);
struct export *export_first(void);   /* iterate with ->next */
json_t *query_block_exports(void);
void export_shutdown_done(struct export *exp);
/* Hard-delete every export (quit / SIGTERM); calls back when all are gone. */
void exports_shutdown_all(void (*all_done)(void *), void *opaque);
int  export_remove_mode_parse(const char *s);   /* -1 if unknown */
unsigned export_nclients(struct export *exp);
/* Shutdown deadline passed: log each export still shutting down. */
void exports_report_stuck(void);

#define EXPORT_TYPE_REGISTER(t) \
    __attribute__((constructor)) static void export_type_register_##t(void) { export_type_register(&t); }
