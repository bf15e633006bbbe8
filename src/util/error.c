/* Error objects: see error.h. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "util/error.h"
#include "util/xalloc.h"

static error *error_new(enum err_class cls, char *msg)
{
    error *e = xmalloc(sizeof(*e));
    e->cls = cls;
    e->msg = msg;
    return e;
}

static char *vformat(const char *fmt, va_list ap)
{
    char *s;
    s = xvasprintf(fmt, ap);
    return s;
}

void error_set(error **errp, enum err_class cls, const char *fmt, ...)
{
    va_list ap;
    if (!errp)
        return;
    va_start(ap, fmt);
    char *msg = vformat(fmt, ap);
    va_end(ap);
    if (*errp) {            /* keep the first error, as QEMU does */
        free(msg);
        return;
    }
    *errp = error_new(cls, msg);
}

void error_setg_errno(error **errp, int err, const char *fmt, ...)
{
    va_list ap;
    if (!errp || *errp)
        return;
    va_start(ap, fmt);
    char *msg = vformat(fmt, ap);
    va_end(ap);
    char *full;
    full = xasprintf("%s: %s", msg, strerror(err));
    free(msg);
    *errp = error_new(ERR_GENERIC, full);
}

void error_prepend(error **errp, const char *fmt, ...)
{
    va_list ap;
    if (!errp || !*errp)
        return;
    va_start(ap, fmt);
    char *pre = vformat(fmt, ap);
    va_end(ap);
    char *full;
    full = xasprintf("%s%s", pre, (*errp)->msg);
    free(pre);
    free((*errp)->msg);
    (*errp)->msg = full;
}

void error_propagate(error **dst, error *src)
{
    if (!src)
        return;
    if (dst && !*dst)
        *dst = src;
    else
        error_free(src);
}

void error_free(error *e)
{
    if (e) {
        free(e->msg);
        free(e);
    }
}

const char *error_class_name(enum err_class cls)
{
    switch (cls) {
    case ERR_COMMAND_NOT_FOUND: return "CommandNotFound";
    case ERR_DEVICE_NOT_FOUND:  return "DeviceNotFound";
    case ERR_DEVICE_NOT_ACTIVE: return "DeviceNotActive";
    case ERR_GENERIC:           break;
    }
    return "GenericError";
}
