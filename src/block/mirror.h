/*
 * The mirror job (mirror.c) for block-commit of the active layer: what
 * the layers above base hold is written into base while peers write bs;
 * ready, then block-job-complete puts base in bs's place under its
 * exports (QEMU 7.2's commit_active_start).  Main thread; 0, or -1 with
 * QEMU's error.
 */
#pragma once
#include "block/block.h"
#include "block/block-job.h"

int mirror_commit_active(const char *job_id, struct bnode *bs, struct bnode *base,
                         unsigned flags, int64_t speed, enum block_on_error on_error,
                         const char *filter_node_name, error **errp);
