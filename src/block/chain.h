/*
 * Backing chains for the jobs that shorten them (block-stream,
 * block-commit): finding nodes in a chain as QEMU does, relinking a node
 * to a new backing node with its image header, and the filter node such a
 * job shows while it runs.
 */
#pragma once
#include "block/block.h"

/* QEMU's bdrv_find_backing_image(): the backing node some layer of bs's
 * chain names with this file name (compared as canonical absolute paths,
 * each relative to the naming image), or NULL. */
struct bnode *chain_find_backing_image(struct bnode *bs, const char *name);
/* 1 for top itself, 2 for its backing node...; 0 if bs is not in the chain. */
int chain_depth(struct bnode *top, struct bnode *bs);
/* A node by name: "Cannot find device='' nor node-name='x'" if none. */
struct bnode *chain_lookup_node(const char *name, error **errp);
/* QEMU's qmp_get_root_bs(): the node named device, which no node and no
 * block job uses ("Need a root block node"); NULL with the error. */
struct bnode *chain_root_node(const char *device, error **errp);
/* The node whose backing node bs is, at or below top; NULL if none. */
struct bnode *chain_overlay(struct bnode *top, struct bnode *bs);

/* bs's backing node becomes base (NULL: none), holding what the old link
 * held; the nodes between leave the graph.  Then bs's image header names
 * backing_file (NULL: base's file name) with base's driver as format, or
 * nothing (QEMU's bdrv_set_backing_hd + bdrv_change_backing_file).
 * Main thread; 0 or -errno. */
int chain_set_backing(struct bnode *bs, struct bnode *base, const char *backing_file);
/* The link alone, the header as it is (QEMU's bdrv_set_backing_hd). */
int chain_link_backing(struct bnode *bs, struct bnode *base);

/* A job's filter node (driver "copy-on-read", "commit_top" or "mirror_top") over bs,
 * named name (NULL: generated), in use by the job as its users hold none:
 * listed and "in use" while the job runs.  NULL with the error if the name
 * is taken or not valid, after "Could not create node: " with prefix (as
 * QEMU's stream and commit say it; its mirror does not). */
struct bnode *chain_filter_open(const char *driver, struct bnode *bs, const char *name,
                                bool prefix, struct bnode_user **user, error **errp);
void chain_filter_close(struct bnode **filter, struct bnode_user **user);

/* A node a job made read-write goes read-only again (*bs, then NULL; a
 * failure is logged: it stays read-write). */
void chain_restore_read_only(struct bnode **bs, const char *job);
