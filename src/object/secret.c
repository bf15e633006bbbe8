/*
 * The "secret" object, with QEMU 7.2's semantics and messages.
 *
 * Theory of operation: complete() loads the input (data= or the whole of
 * file=), then turns it into the secret bytes once: base64-decoded for
 * format=base64, or AES-256-CBC decrypted with the 32-byte secret named by
 * keyid= and the 16-byte base64 iv= (PKCS#7 padding stripped).  The bytes
 * are kept in memory (wiped on deletion); users read them by id with
 * secret_lookup*() at the moment they need them (QEMU reads a secret when
 * a block node is opened, so deleting it later does not affect the node).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include "config.h"
#include "object/object.h"
#include "object/secret.h"
#include "object/qom.h"
#include "util/cleanup.h"
#include "util/xalloc.h"
#include "util/opts.h"
#ifdef CONFIG_TLS
#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>
#endif

#define SECRET_FILE_MAX (1u << 20)      /* file= larger than this is refused */

struct secret {
    struct object obj;
    uint8_t *data;
    size_t len;
};

/* ---- base64 ---- */

static const char b64_alphabet[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

char *secret_base64_encode(const uint8_t *data, size_t len)
{
    char *out = xmalloc((len + 2) / 3 * 4 + 1), *p = out;
    for (size_t i = 0; i < len; i += 3) {
        uint32_t v = (uint32_t)data[i] << 16;
        if (i + 1 < len)
            v |= (uint32_t)data[i + 1] << 8;
        if (i + 2 < len)
            v |= data[i + 2];
        *p++ = b64_alphabet[(v >> 18) & 63];
        *p++ = b64_alphabet[(v >> 12) & 63];
        *p++ = i + 1 < len ? b64_alphabet[(v >> 6) & 63] : '=';
        *p++ = i + 2 < len ? b64_alphabet[v & 63] : '=';
    }
    *p = '\0';
    return out;
}

static int b64_rank(unsigned char c)
{
    const char *p = c ? strchr(b64_alphabet, c) : NULL;
    if (p)
        return (int)(p - b64_alphabet);
    return c == '=' ? 0 : -1;     /* '=' decodes as 0, as glib does */
}

/* QEMU's qbase64_decode(): validate, then decode like g_base64_decode()
 * (groups of 4 significant characters; '=' suppresses output bytes;
 * a trailing partial group is dropped). */
uint8_t *secret_base64_decode(const char *in, size_t in_len, size_t *out_len, error **errp)
{
    if (memchr(in, '\0', in_len)) {
        error_setg(errp, "Base64 data contains embedded NUL characters");
        return NULL;
    }
    for (size_t i = 0; i < in_len; i++) {
        if (in[i] != '\n' && b64_rank((unsigned char)in[i]) < 0) {
            error_setg(errp, "Base64 data contains invalid characters");
            return NULL;
        }
    }
    uint8_t *out = xmalloc(in_len / 4 * 3 + 1), *p = out;
    uint32_t v = 0;
    int n = 0;
    char last[2] = { 0, 0 };
    for (size_t i = 0; i < in_len; i++) {
        int r = b64_rank((unsigned char)in[i]);
        if (r < 0)
            continue;                 /* newline */
        last[1] = last[0];
        last[0] = in[i];
        v = (v << 6) | (uint32_t)r;
        if (++n == 4) {
            *p++ = v >> 16;
            if (last[1] != '=')
                *p++ = v >> 8;
            if (last[0] != '=')
                *p++ = v;
            n = 0;
        }
    }
    *p = '\0';
    *out_len = p - out;
    return out;
}

/* ---- loading ---- */

static int read_file(const char *path, char **buf, size_t *len, error **errp)
{
    CLEANUP_CLOSE int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        error_setg(errp, "Unable to read %s: Failed to open file \u201c%s\u201d: %s",
                   path, path, strerror(errno));
        return -1;
    }
    char *b = xmalloc(SECRET_FILE_MAX + 1);
    size_t n = 0;
    while (n <= SECRET_FILE_MAX) {
        ssize_t r = read(fd, b + n, SECRET_FILE_MAX + 1 - n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            error_setg(errp, "Unable to read %s: Error reading file \u201c%s\u201d: %s",
                       path, path, strerror(errno));
            free(b);
            return -1;
        }
        if (r == 0)
            break;
        n += r;
    }
    if (n > SECRET_FILE_MAX) {
        error_setg(errp, "Unable to read %s: file is larger than %u bytes", path, SECRET_FILE_MAX);
        free(b);
        return -1;
    }
    b[n] = '\0';
    *buf = b;
    *len = n;
    return 0;
}

#ifdef CONFIG_TLS
static int decrypt(json_t *props, const char *input, size_t input_len, bool base64,
                   uint8_t **out, size_t *out_len, error **errp)
{
    const char *keyid = opt_str(props, "keyid", "");
    const char *iv_b64 = opt_str(props, "iv", NULL);
    CLEANUP_FREE uint8_t *key = NULL;
    CLEANUP_FREE uint8_t *iv = NULL;
    CLEANUP_FREE uint8_t *cipher = NULL;
    size_t keylen, ivlen, clen;

    if (secret_lookup(keyid, &key, &keylen, errp) < 0)
        return -1;
    if (keylen != 32) {
        error_setg(errp, "Key should be 32 bytes in length");
        return -1;
    }
    if (!iv_b64) {
        error_setg(errp, "IV is required to decrypt secret");
        return -1;
    }
    iv = secret_base64_decode(iv_b64, strlen(iv_b64), &ivlen, errp);
    if (!iv)
        return -1;
    if (ivlen != 16) {
        error_setg(errp, "IV should be 16 bytes in length not %zu", ivlen);
        return -1;
    }
    if (base64) {
        cipher = secret_base64_decode(input, input_len, &clen, errp);
        if (!cipher)
            return -1;
    } else {
        cipher = xmalloc(input_len + 1);
        memcpy(cipher, input, input_len);
        clen = input_len;
    }
    if (clen % 16) {
        error_setg(errp, "Length %zu must be a multiple of block size 16", clen);
        return -1;
    }
    gnutls_cipher_hd_t h;
    gnutls_datum_t k = { key, 32 }, v = { iv, 16 };
    if (gnutls_cipher_init(&h, GNUTLS_CIPHER_AES_256_CBC, &k, &v) < 0) {
        error_setg(errp, "Cannot initialize cipher");
        return -1;
    }
    int r = clen ? gnutls_cipher_decrypt(h, cipher, clen) : 0;
    gnutls_cipher_deinit(h);
    if (r < 0) {
        error_setg(errp, "Cannot decrypt data: %s", gnutls_strerror(r));
        return -1;
    }
    unsigned pad = clen ? cipher[clen - 1] : 0;
    if (!clen || pad > 16 || pad > clen) {
        error_setg(errp, "Incorrect number of padding bytes (%u) found on decrypted data", pad);
        return -1;
    }
    clen -= pad;
    cipher[clen] = '\0';
    *out = cipher;
    *out_len = clen;
    cipher = NULL;
    return 0;
}
#else
static int decrypt(json_t *props, const char *input, size_t input_len, bool base64,
                   uint8_t **out, size_t *out_len, error **errp)
{
    error_setg(errp, "Encrypted secrets (keyid) need bexd built with TLS support");
    return -1;
}
#endif

static int secret_complete(struct object *obj, json_t *props, error **errp)
{
    struct secret *s = (struct secret *)obj;
    const char *data = opt_str(props, "data", NULL);
    const char *file = opt_str(props, "file", NULL);
    bool base64 = !strcmp(opt_str(props, "format", "raw"), "base64");
    CLEANUP_FREE char *input = NULL;
    size_t input_len;

    if (data && file) {
        error_setg(errp, "'file' and 'data' are mutually exclusive");
        return -1;
    }
    if (!data && !file) {
        error_setg(errp, "Either 'file' or 'data' must be provided");
        return -1;
    }
    if (data) {
        input = xstrdup(data);
        input_len = strlen(data);
    } else if (read_file(file, &input, &input_len, errp) < 0) {
        return -1;
    }
    if (json_object_get(props, "keyid"))
        return decrypt(props, input, input_len, base64, &s->data, &s->len, errp);
    if (base64) {
        s->data = secret_base64_decode(input, input_len, &s->len, errp);
        return s->data ? 0 : -1;
    }
    s->data = (uint8_t *)input;
    s->len = input_len;
    input = NULL;
    return 0;
}

static void secret_finalize(struct object *obj)
{
    struct secret *s = (struct secret *)obj;
    if (s->data)
        explicit_bzero(s->data, s->len);
    free(s->data);
}

/* QOM: as in QEMU, the source properties may be set again but the secret
 * was loaded once, at creation (nothing reloads it). */
static const struct qom_prop secret_common_props[] = {
    { "iv", "string", "str", "\"\"" },
    { "keyid", "string", "str", "\"\"" },
    { "loaded", "bool", NULL, "true" },
    { "format", "QCryptoSecretFormat", "QCryptoSecretFormat", "\"raw\"" },
    { NULL },
};
static struct qom_class secret_common_class = {
    .name = "secret_common", .parent = "object", .abstract = true, .user_creatable = true,
    .props = secret_common_props,
};
QOM_CLASS_REGISTER(secret_common_class)

static const struct qom_prop secret_props[] = {
    { "file", "string", "str", "\"\"" },
    { "data", "string", "str", "\"\"" },
    { NULL },
};
static struct qom_class secret_class = {
    .name = "secret", .parent = "secret_common", .props = secret_props,
};
QOM_CLASS_REGISTER(secret_class)

static const struct object_type secret_type = {
    .name = "secret",
    .instance_size = sizeof(struct secret),
    .qom = &secret_class,
    .complete = secret_complete,
    .finalize = secret_finalize,
};
OBJECT_TYPE_REGISTER(secret_type)

/* ---- lookup ---- */

int secret_lookup(const char *id, uint8_t **data, size_t *len, error **errp)
{
    struct object *o = object_find(id);
    if (!o) {
        error_setg(errp, "No secret with id '%s'", id);
        return -1;
    }
    if (o->type != &secret_type) {
        error_setg(errp, "Object with id '%s' is not a secret", id);
        return -1;
    }
    struct secret *s = (struct secret *)o;
    *data = xmalloc(s->len + 1);
    memcpy(*data, s->data, s->len);
    (*data)[s->len] = '\0';
    *len = s->len;
    return 0;
}

static bool utf8_valid(const uint8_t *p, size_t n)
{
    size_t i = 0;
    while (i < n) {
        unsigned c = p[i], extra;
        if (c < 0x80)
            extra = 0;
        else if (c >= 0xc2 && c <= 0xdf)
            extra = 1;
        else if (c >= 0xe0 && c <= 0xef)
            extra = 2;
        else if (c >= 0xf0 && c <= 0xf4)
            extra = 3;
        else
            return false;
        if (extra > n - i - 1)
            return false;
        for (unsigned k = 1; k <= extra; k++)
            if ((p[i + k] & 0xc0) != 0x80)
                return false;
        i += extra + 1;
    }
    return true;
}

char *secret_lookup_as_utf8(const char *id, error **errp)
{
    uint8_t *data;
    size_t len;
    if (secret_lookup(id, &data, &len, errp) < 0)
        return NULL;
    if (!utf8_valid(data, len) || memchr(data, '\0', len)) {
        error_setg(errp, "Data from secret %s is not valid UTF-8", id);
        explicit_bzero(data, len);
        free(data);
        return NULL;
    }
    return (char *)data;
}

char *secret_lookup_as_base64(const char *id, error **errp)
{
    uint8_t *data;
    size_t len;
    if (secret_lookup(id, &data, &len, errp) < 0)
        return NULL;
    char *b64 = secret_base64_encode(data, len);
    explicit_bzero(data, len);
    free(data);
    return b64;
}
