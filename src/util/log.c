/*
 * One-line log messages on stderr (see log.h).
 *
 * Each message is formatted into one buffer and written with one write(2),
 * so lines from different threads never interleave.  Newlines inside a
 * message (a peer's string, a file's error) become spaces: one event, one
 * line.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include "util/log.h"

bool log_debug_enabled;

static bool to_journal;
static int min_prio = 6;          /* info */

static const struct {
    const char *name;
    int prio;                     /* syslog(3) priority */
} levels[] = {
    { "error", 3 }, { "warning", 4 }, { "info", 6 }, { "debug", 7 },
};

static int level_prio(const char *level)
{
    for (size_t i = 0; i < sizeof(levels) / sizeof(levels[0]); i++)
        if (!strcmp(levels[i].name, level))
            return levels[i].prio;
    return 6;
}

/* JOURNAL_STREAM is "DEV:INODE" of the stream systemd connected; it is
 * inherited, so compare it with what stderr really is. */
static bool stderr_is_journal(void)
{
    const char *js = getenv("JOURNAL_STREAM");
    unsigned long long dev, ino;
    struct stat st;

    if (!js || sscanf(js, "%llu:%llu", &dev, &ino) != 2 || fstat(STDERR_FILENO, &st) < 0)
        return false;
    return st.st_dev == dev && st.st_ino == ino;
}

void log_init(void)
{
    const char *lvl = getenv("BEXD_LOG");
    if (lvl && *lvl)
        min_prio = level_prio(lvl);
    log_debug_enabled = min_prio >= 7;
    to_journal = stderr_is_journal();
}

void log_msg(const char *level, const char *fmt, ...)
{
    char buf[1200];
    int prio = level_prio(level);
    int n;
    va_list ap;

    if (prio > min_prio)
        return;
    if (to_journal)
        n = snprintf(buf, sizeof(buf), "<%d>%s: ", prio, level);
    else
        n = snprintf(buf, sizeof(buf), "bexd: %s: ", level);
    va_start(ap, fmt);
    vsnprintf(buf + n, sizeof(buf) - n - 1, fmt, ap);
    va_end(ap);
    for (char *p = buf + n; *p; p++)
        if (*p == '\n' || *p == '\r')
            *p = ' ';
    n = strlen(buf);
    buf[n++] = '\n';
    if (write(STDERR_FILENO, buf, n) < 0) {
        /* nowhere left to say it */
    }
}
