/*
 * The pull-mode backup client of bench/bitmap_bench.py's "backup" row, in
 * C with libnbd: it copies the dirty extents of a dirty-bitmap context of
 * an NBD export into a file, with many reads in flight, as a backup client
 * does.  The Python client it replaces spent as much time in its own loop
 * as either server needed; this one leaves the server as the measured part.
 *
 *   nbd-backup-client URI CONTEXT OUT DEPTH
 *
 * It makes its buffers, prints "ready", waits for a line on stdin (the
 * export exists), then connects, asks block status for CONTEXT over the
 * whole export, reads every extent with flag 1 (dirty), split at 1 MiB,
 * keeping DEPTH reads in flight, and writes each one to OUT at its offset
 * as it completes.  OUT is the previous copy (as large as the export).
 * libnbd's zeroing of each read buffer before the read (pread_initialize,
 * a guard against leaking old heap data on a short reply) is turned off:
 * the buffers hold nothing secret, and the bench compares every copy with
 * the image.
 *
 * Mapping OUT and receiving straight into the mapping (one copy of the
 * data instead of two) was tried and dropped: in this VM the first touch
 * of each page of a large mapping is costly, and the client spent 0.54 s
 * of CPU per backup against 0.07 s with buffers and pwrite.
 *
 * It prints the bytes copied, its seconds from the go to done, its own CPU
 * seconds, then the seconds from the go at which it was connected, had the
 * dirty extents, and had the last read: "BYTES SECS CPU CONN STATUS READS".
 * Exit status 1 on any failure.
 *
 * Built by the bench (cc -O2 ... -lnbd); needs libnbd-dev, which the bench
 * installs when it is missing.  Not part of the daemon or its tests.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <libnbd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (1u << 20)            /* the longest read: runs are split here */

struct extent { uint64_t off, len; };

static struct extent *todo;         /* reads to make, in order */
static size_t ntodo, captodo, next_todo;
static const char *ctx_name;
static uint64_t status_end;         /* block status known up to here */
static uint64_t copied;

struct slot {
    char *buf;
    uint64_t off, len;
    int busy;
};
static struct slot *slots;
static int out_fd;
static int failed;

static void die(const char *what)
{
    fprintf(stderr, "nbd-backup-client: %s: %s\n", what, nbd_get_error());
    exit(1);
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double cpu_seconds(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 +
           ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

static void add_read(uint64_t off, uint64_t len)
{
    while (len) {
        uint64_t n = len < CHUNK ? len : CHUNK;
        if (ntodo == captodo) {
            captodo = captodo ? 2 * captodo : 4096;
            todo = realloc(todo, captodo * sizeof(*todo));
            if (!todo) {
                perror("realloc");
                exit(1);
            }
        }
        todo[ntodo++] = (struct extent){ off, n };
        copied += n;
        off += n;
        len -= n;
    }
}

static int extent_cb(void *opaque, const char *metacontext, uint64_t offset,
                     uint32_t *entries, size_t nr_entries, int *error)
{
    (void)opaque;
    (void)error;
    if (strcmp(metacontext, ctx_name))
        return 0;
    for (size_t i = 0; i + 1 < nr_entries; i += 2) {
        if (entries[i + 1] & 1)
            add_read(offset, entries[i]);
        offset += entries[i];
    }
    status_end = offset;
    return 0;
}

static int read_done(void *opaque, int *error)
{
    struct slot *s = opaque;
    if (*error) {
        fprintf(stderr, "nbd-backup-client: read at %" PRIu64 ": %s\n", s->off,
                strerror(*error));
        failed = 1;
    } else {
        for (uint64_t done = 0; done < s->len;) {
            ssize_t w = pwrite(out_fd, s->buf + done, s->len - done, s->off + done);
            if (w < 0) {
                perror("pwrite");
                failed = 1;
                break;
            }
            done += (uint64_t)w;
        }
    }
    s->busy = 0;
    return 1;                       /* retire the command */
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: %s URI CONTEXT OUT DEPTH\n", argv[0]);
        return 2;
    }
    const char *uri = argv[1], *out = argv[3];
    int depth = atoi(argv[4]);
    ctx_name = argv[2];
    if (depth < 1)
        depth = 1;
    slots = calloc(depth, sizeof(*slots));
    if (!slots)
        return 1;
    for (int i = 0; i < depth; i++) {
        slots[i].buf = malloc(CHUNK);
        if (!slots[i].buf)
            return 1;
        memset(slots[i].buf, 0, CHUNK);     /* pages touched before the start */
    }
    out_fd = open(out, O_WRONLY);
    if (out_fd < 0) {
        perror(out);
        return 1;
    }
    printf("ready\n");
    fflush(stdout);
    char line[64];
    if (!fgets(line, sizeof(line), stdin))
        return 1;

    double t0 = now(), c0 = cpu_seconds();
    struct nbd_handle *h = nbd_create();
    if (!h)
        die("nbd_create");
    if (nbd_add_meta_context(h, ctx_name) < 0)
        die("nbd_add_meta_context");
    if (nbd_set_pread_initialize(h, false) < 0)
        die("nbd_set_pread_initialize");
    if (nbd_connect_uri(h, uri) < 0)
        die("nbd_connect_uri");
    double t_conn = now() - t0;
    int64_t size = nbd_get_size(h);
    if (size < 0)
        die("nbd_get_size");
    if (nbd_can_meta_context(h, ctx_name) != 1) {
        fprintf(stderr, "nbd-backup-client: the server has no %s\n", ctx_name);
        return 1;
    }
    while (status_end < (uint64_t)size) {
        uint64_t before = status_end;
        uint64_t n = (uint64_t)size - status_end;
        if (n > (1ull << 30))
            n = 1ull << 30;
        if (nbd_block_status(h, n, status_end,
                             (nbd_extent_callback){ .callback = extent_cb }, 0) < 0)
            die("nbd_block_status");
        if (status_end <= before) {
            fprintf(stderr, "nbd-backup-client: no progress in block status\n");
            return 1;
        }
    }
    double t_status = now() - t0;

    while (!failed && (next_todo < ntodo || nbd_aio_in_flight(h) > 0)) {
        for (int i = 0; i < depth && next_todo < ntodo; i++) {
            struct slot *s = &slots[i];
            if (s->busy)
                continue;
            s->off = todo[next_todo].off;
            s->len = todo[next_todo].len;
            next_todo++;
            s->busy = 1;
            if (nbd_aio_pread(h, s->buf, s->len, s->off,
                              (nbd_completion_callback){ .callback = read_done,
                                                         .user_data = s }, 0) < 0)
                die("nbd_aio_pread");
        }
        if (nbd_aio_in_flight(h) > 0 && nbd_poll(h, -1) < 0)
            die("nbd_poll");
    }
    if (failed)
        return 1;
    double t_reads = now() - t0;
    if (close(out_fd) < 0) {
        perror("close");
        return 1;
    }
    nbd_shutdown(h, 0);
    nbd_close(h);
    printf("%" PRIu64 " %.6f %.6f %.6f %.6f %.6f\n", copied, now() - t0, cpu_seconds() - c0,
           t_conn, t_status, t_reads);
    fflush(stdout);
    return 0;
}
