/*
 * Logging to stderr, one line per message.
 *
 * On a terminal or a file a line reads "bexd: LEVEL: message".  When stderr
 * is systemd's journal (JOURNAL_STREAM names it), a line starts with the
 * syslog priority instead ("<4>warning: message"), so journald files each
 * message at its level.  log_init() reads the environment: BEXD_LOG sets
 * the lowest level printed (error, warning, info, debug; default info).
 */
#pragma once
#include <stdbool.h>

extern bool log_debug_enabled;
void log_init(void);
void log_msg(const char *level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
#define log_error(...) log_msg("error", __VA_ARGS__)
#define log_warn(...)  log_msg("warning", __VA_ARGS__)
#define log_info(...)  log_msg("info", __VA_ARGS__)
#define log_debug(...) do { if (log_debug_enabled) log_msg("debug", __VA_ARGS__); } while (0)
