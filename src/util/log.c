/* One-line log messages on stderr. */
#include <stdarg.h>
#include <stdio.h>
#include "util/log.h"

bool log_debug_enabled;

void log_msg(const char *level, const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    fprintf(stderr, "bexd: %s: %s\n", level, buf);
}
