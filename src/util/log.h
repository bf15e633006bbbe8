/* Logging to stderr, one line per message, prefixed with the program name. */
#pragma once
#include <stdbool.h>

extern bool log_debug_enabled;
void log_msg(const char *level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
#define log_error(...) log_msg("error", __VA_ARGS__)
#define log_warn(...)  log_msg("warning", __VA_ARGS__)
#define log_info(...)  log_msg("info", __VA_ARGS__)
#define log_debug(...) do { if (log_debug_enabled) log_msg("debug", __VA_ARGS__); } while (0)
