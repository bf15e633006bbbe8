/*
 * bexd as a service: what it tells systemd and the log at start-up, while
 * it runs and when it stops (READY=1, STATUS=, STOPPING=1, WATCHDOG=1), and
 * what SIGHUP does (reload TLS credentials).  Main thread only.
 */
#pragma once

/* The command line is applied: every export is serving. */
void service_ready(void);
/* Shutdown begins (why: "Terminated", "QMP quit"...). */
void service_stopping(const char *why);
/* Everything is flushed and closed. */
void service_stopped(void);
/* SIGHUP: reread the TLS credentials' files. */
void service_reload(void);
/* "3 exports, 5 clients": the summary STATUS= and the log use. */
void service_summary(char *buf, unsigned len);
