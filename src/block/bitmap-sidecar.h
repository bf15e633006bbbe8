/* Persistent dirty bitmaps of raw images in a sidecar file (see
 * bitmap-sidecar.c and docs/bitmaps.md): the persistence hooks of struct
 * bdrv for the file, host_device and raw drivers. */
#pragma once
#include <stdint.h>
#include "util/error.h"

struct bnode;

int  sidecar_file_load(struct bnode *bs, error **errp);
void sidecar_file_store(struct bnode *bs);
void sidecar_file_close(struct bnode *bs);
int  sidecar_raw_load(struct bnode *bs, error **errp);
void sidecar_raw_store(struct bnode *bs);
int  sidecar_can_store(struct bnode *bs, const char *name, uint32_t granularity, error **errp);
int  sidecar_update(struct bnode *bs, error **errp);
