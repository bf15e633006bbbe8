/*
 * Error objects: a QMP error class plus a human-readable message.
 * Functions that can fail take `error **errp` last; errp may be NULL.
 * The QMP layer turns an error into {"error": {"class": ..., "desc": ...}},
 * the command line prints the message on one line and exits non-zero.
 */
#pragma once
#include <stdarg.h>

enum err_class {
    ERR_GENERIC,            /* "GenericError" */
    ERR_COMMAND_NOT_FOUND,  /* "CommandNotFound" */
    ERR_DEVICE_NOT_FOUND,   /* "DeviceNotFound" */
    ERR_DEVICE_NOT_ACTIVE,  /* "DeviceNotActive" (no such block job) */
};

typedef struct error {
    enum err_class cls;
    char *msg;
} error;

void error_set(error **errp, enum err_class cls, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
#define error_setg(errp, ...) error_set((errp), ERR_GENERIC, __VA_ARGS__)
/* errno-style: appends ": strerror(err)" */
void error_setg_errno(error **errp, int err, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Prefix an existing error's message ("fmt" + old message). No-op if none. */
void error_prepend(error **errp, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
void error_propagate(error **dst, error *src);
void error_free(error *e);
const char *error_class_name(enum err_class cls);
