/*
 * libFuzzer target: the qcow2 open path and what an opened image serves.
 * An input is a qcow2 image file.  It is put in a memfd and opened as a
 * read-only qcow2 node (no backing chain: a name in the input must not
 * open other files) through the same blockdev_add() as --blockdev: header,
 * extensions, L1 and refcount tables, snapshot table, the metadata overlap
 * set.  If it opens, the first 4 MiB are read through the block layer (L2
 * lookups, compressed clusters, subclusters, the caches) and block status
 * is asked over the whole disk.  A refusal must come with a message.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>
#include "block/block.h"
#include "util/coroutine.h"
#include "util/loop.h"

#define READ_LIMIT (4u << 20)

struct reader {
    struct bnode *bs;
    uint64_t limit;
    int done;
};

static void read_all(void *opaque)
{
    struct reader *r = opaque;
    static uint8_t buf[256 * 1024];
    for (uint64_t off = 0; off < r->limit; off += sizeof(buf)) {
        uint64_t n = r->limit - off < sizeof(buf) ? r->limit - off : sizeof(buf);
        bnode_co_pread(r->bs, off, n, buf, 0);
    }
    r->done = 1;
    loop_stop(loop_main());
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int init;
    if (!init) {
        loop_main_init();
        init = 1;
    }
    int fd = memfd_create("qcow2-fuzz", MFD_CLOEXEC);
    if (fd < 0 || write(fd, data, size) != (ssize_t)size)
        abort();
    char json[256];
    snprintf(json, sizeof(json),
             "{\"driver\":\"qcow2\",\"node-name\":\"fz\",\"read-only\":true,\"backing\":null,"
             "\"file\":{\"driver\":\"file\",\"filename\":\"/proc/self/fd/%d\"}}", fd);
    json_t *opts = json_loads(json, 0, NULL);
    error *err = NULL;
    struct bnode *bs = blockdev_add(opts, &err);
    json_decref(opts);
    if (!bs) {
        if (!err || !err->msg[0])
            abort();                    /* a refusal always says why */
        error_free(err);
        close(fd);
        return 0;
    }
    struct reader r = { .bs = bs, .limit = bs->size < READ_LIMIT ? bs->size : READ_LIMIT };
    if (r.limit) {
        co_enter(co_create(read_all, &r));
        if (!r.done)                    /* I/O on a memfd usually completes inline */
            loop_run(loop_main());
    }
    unsigned steps = 0;
    for (uint64_t off = 0; off < bs->size && steps < 4096; steps++) {
        uint64_t pnum;
        unsigned flags;
        int depth;
        if (bnode_block_status(bs, off, bs->size - off, &pnum, &flags, &depth) < 0 || !pnum)
            break;
        off += pnum;
    }
    blockdev_del("fz", NULL);
    close(fd);
    return 0;
}
