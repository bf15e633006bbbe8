/*
 * The "ringbuf" (and "memory", its old name) chardev backend and the QMP
 * commands ringbuf-write / ringbuf-read.
 *
 * Theory of operation: a power-of-two ring of bytes with a producer and a
 * consumer count, as QEMU's.  Whatever the frontend writes goes in, and so
 * does ringbuf-write; ringbuf-read takes the oldest bytes out.  When the
 * ring is full the oldest bytes are overwritten.  A frontend is open at
 * once and never receives input.  ringbuf-read returns text as QEMU's JSON
 * writer would: up to the first NUL byte, invalid UTF-8 replaced by
 * U+FFFD, and "\xC0\x80" read as U+0000.
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "chardev/chardev-int.h"
#include "object/qom.h"
#include "object/secret.h"
#include "qmp/qmp.h"
#include "util/cleanup.h"
#include "util/opts.h"
#include "util/xalloc.h"

#define RINGBUF_DEFAULT_SIZE 65536
#define RINGBUF_MAX_SIZE     (1u << 30)

struct ring {
    uint8_t *buf;
    uint32_t size;              /* a power of two */
    uint32_t prod, cons;        /* free-running counts */
};

static int ring_check(json_t *data, error **errp)
{
    long long size = opt_int(data, "size", 0);
    uint64_t u = (uint64_t)size;     /* QEMU's size_t: no signed overflow below */
    if (u & (u - 1)) {
        error_setg(errp, "size of ringbuf chardev must be power of two");
        return -1;
    }
    if (size < 0 || size > RINGBUF_MAX_SIZE) {
        error_setg(errp, "size of ringbuf chardev must be at most %u", RINGBUF_MAX_SIZE);
        return -1;
    }
    return 0;
}

/* size 0 means the default, as on QEMU's command line (over QMP QEMU 7.2
 * makes a ring of 0 bytes and writes out of it). */
static int ring_open(struct chardev *c, json_t *data, error **errp)
{
    struct ring *r = c->state;
    r->size = opt_int(data, "size", 0) ?: RINGBUF_DEFAULT_SIZE;
    r->buf = xmalloc(r->size);
    chardev_opened(c);
    return 0;
}

static void ring_close(struct chardev *c)
{
    free(((struct ring *)c->state)->buf);
}

static void ring_put(struct ring *r, const uint8_t *p, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        r->buf[r->prod++ & (r->size - 1)] = p[i];
        if (r->prod - r->cons > r->size)
            r->cons = r->prod - r->size;
    }
}

static size_t ring_get(struct ring *r, uint8_t *p, size_t len)
{
    size_t n = 0;
    while (n < len && r->cons != r->prod)
        p[n++] = r->buf[r->cons++ & (r->size - 1)];
    return n;
}

static ssize_t ring_read(struct chardev *c, void *buf, size_t len) { return -EAGAIN; }

static ssize_t ring_write(struct chardev *c, const void *buf, size_t len)
{
    ring_put(c->state, buf, len);
    return len;
}

static void ring_set_interest(struct chardev *c, uint32_t events) {}

static char *ring_filename(struct chardev *c) { return xstrdup(c->be->name); }

static json_t *ring_parse_cli(json_t *opts, error **errp)
{
    json_t *v = json_object_get(opts, "size");
    json_t *d = json_object();
    if (!v)
        return d;
    const char *s = chardev_opt_text(opts, "size");
    unsigned long long size;
    char *end;
    static const char units[] = "kMGTPE";
    errno = 0;
    size = s && *s != '-' ? strtoull(s, &end, 10) : 0;
    if (!s || *s == '-' || end == s || errno ||
        (*end && (!strchr(units, *end) || end[1]))) {
        json_decref(d);
        error_setg(errp, "Parameter 'size' expects a non-negative number below 2^64\n"
                   "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, "
                   "peta-\nand exabytes, respectively.");
        return NULL;
    }
    if (*end)
        size <<= 10 * (strchr(units, *end) - units + 1);
    if (size)                   /* QemuOpts: 0 leaves the default */
        json_object_set_new(d, "size", json_integer(size > INT64_MAX ? INT64_MAX : size));
    return d;
}

static const char *const ring_keys[] = { "size", NULL };

static struct qom_class chardev_ringbuf_class = { .name = "chardev-ringbuf", .parent = "chardev" };
static struct qom_class chardev_memory_class = {
    .name = "chardev-memory", .parent = "chardev-ringbuf",
};
QOM_CLASS_REGISTER(chardev_ringbuf_class)
QOM_CLASS_REGISTER(chardev_memory_class)

#define RING_BACKEND(var, nm, cls)                                               \
    static const struct chardev_backend var = {                                  \
        .name = nm, .qom = &cls, .state_size = sizeof(struct ring), .no_oob = true, \
        .cli_keys = ring_keys, .parse_cli = ring_parse_cli, .check = ring_check, \
        .open = ring_open, .close = ring_close, .read = ring_read,                \
        .write = ring_write, .set_interest = ring_set_interest,                  \
        .filename = ring_filename,                                               \
    };                                                                           \
    CHARDEV_BACKEND_REGISTER(var)
RING_BACKEND(ringbuf_backend, "ringbuf", chardev_ringbuf_class)
RING_BACKEND(memory_backend, "memory", chardev_memory_class)

/* ---- ringbuf-write, ringbuf-read ---- */

static struct ring *ring_lookup(const char *id, error **errp)
{
    struct chardev *c = chardev_find(id);
    if (!c) {
        error_setg(errp, "Device '%s' not found", id);
        return NULL;
    }
    if (c->be != &ringbuf_backend && c->be != &memory_backend) {
        error_setg(errp, "%s is not a ringbuf device", id);
        return NULL;
    }
    return c->state;
}

static json_t *qmp_ringbuf_write(json_t *args, error **errp)
{
    struct ring *r = ring_lookup(opt_str(args, "device", ""), errp);
    const char *data = opt_str(args, "data", "");
    if (!r)
        return NULL;
    if (!strcmp(opt_str(args, "format", "utf8"), "base64")) {
        size_t len;
        CLEANUP_FREE uint8_t *bytes = secret_base64_decode(data, strlen(data), &len, errp);
        if (!bytes)
            return NULL;
        ring_put(r, bytes, len);
    } else {
        ring_put(r, (const uint8_t *)data, strlen(data));
    }
    return json_object();
}
QMP_COMMAND("ringbuf-write", qmp_ringbuf_write)

/* One character of QEMU's modified UTF-8 at p (n bytes left): the code
 * point, or -1 for an invalid sequence; *used: bytes consumed. */
static long mod_utf8(const uint8_t *p, size_t n, size_t *used)
{
    static const long min_cp[] = { 0x80, 0x800, 0x10000, 0x200000, 0x4000000 };
    unsigned byte = p[0], len = 0;
    long cp;

    *used = 1;
    if (byte < 0x80)
        return byte;
    if (byte >= 0xFE || !(byte & 0x40))
        return -1;                          /* 0xFE, 0xFF, a stray continuation */
    unsigned mask = 0x80;
    for (; byte & mask; mask >>= 1)
        len++;
    cp = byte & (mask - 1);
    for (unsigned i = 1; i < len; i++) {
        if (i >= n || (p[i] & 0xC0) != 0x80)
            return -1;                      /* a continuation byte is missing */
        (*used)++;
        cp = (cp << 6) | (p[i] & 0x3F);
    }
    if (len == 2 && cp == 0)
        return 0;                           /* "\xC0\x80" is U+0000 */
    if (cp > 0x10FFFF || (cp >= 0xFDD0 && cp <= 0xFDEF) || (cp & 0xFFFE) == 0xFFFE ||
        (cp >= 0xD800 && cp <= 0xDFFF) || cp < min_cp[len - 2])
        return -1;
    return cp;
}

static size_t put_utf8(char *out, long cp)
{
    if (cp < 0x80) {
        out[0] = cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = 0xC0 | (cp >> 6);
        out[1] = 0x80 | (cp & 0x3F);
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = 0xE0 | (cp >> 12);
        out[1] = 0x80 | ((cp >> 6) & 0x3F);
        out[2] = 0x80 | (cp & 0x3F);
        return 3;
    }
    out[0] = 0xF0 | (cp >> 18);
    out[1] = 0x80 | ((cp >> 12) & 0x3F);
    out[2] = 0x80 | ((cp >> 6) & 0x3F);
    out[3] = 0x80 | (cp & 0x3F);
    return 4;
}

static json_t *text_as_qemu(const uint8_t *p, size_t n)
{
    CLEANUP_FREE char *out = xmalloc(n * 3 + 1);   /* U+FFFD is 3 bytes for 1 */
    size_t o = 0, used;
    for (size_t i = 0; i < n && p[i]; i += used) {
        long cp = mod_utf8(p + i, n - i, &used);
        o += put_utf8(out + o, cp < 0 ? 0xFFFD : cp);
    }
    return json_stringn(out, o);
}

static json_t *qmp_ringbuf_read(json_t *args, error **errp)
{
    struct ring *r = ring_lookup(opt_str(args, "device", ""), errp);
    long long size = opt_int(args, "size", 0);
    if (!r)
        return NULL;
    if (size <= 0) {
        error_setg(errp, "size must be greater than zero");
        return NULL;
    }
    size_t want = (size_t)size < r->size ? (size_t)size : r->size;
    CLEANUP_FREE uint8_t *bytes = xmalloc(want ? want : 1);
    size_t got = ring_get(r, bytes, want);
    if (!strcmp(opt_str(args, "format", "utf8"), "base64")) {
        CLEANUP_FREE char *b64 = secret_base64_encode(bytes, got);
        return json_string(b64);
    }
    return text_as_qemu(bytes, got);
}
QMP_COMMAND("ringbuf-read", qmp_ringbuf_read)
