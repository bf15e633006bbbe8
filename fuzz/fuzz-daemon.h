/*
 * What the fuzz targets that drive a running daemon share: its main loop in
 * a thread of its own, set up with QMP commands before the first input.
 */
#ifndef BEXD_FUZZ_DAEMON_H
#define BEXD_FUZZ_DAEMON_H

/* Starts the main loop in a new thread, runs setup(opaque) there and
 * returns once it has run. */
void fuzz_daemon_start(void (*setup)(void *opaque), void *opaque);

/* Runs one QMP command (printf-style text) in the main loop thread, from
 * setup: a set-up that fails is the harness's bug, so it aborts. */
void fuzz_qmp(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif
