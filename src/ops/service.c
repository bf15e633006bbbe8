/*
 * bexd as a service (see service.h).
 *
 * Theory of operation: without NOTIFY_SOCKET nothing here arms a timer or
 * sends a datagram, so a daemon run by hand pays nothing.  Under systemd,
 * READY=1 goes out once the command line has been applied (so every export
 * it names is serving), then STATUS= is refreshed every few seconds and only
 * sent when its text changed, and WATCHDOG=1 is sent at half the interval
 * the unit asked for, from the main loop: a main loop that stops turning
 * stops the keep-alives, and systemd restarts the service.
 */
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include "export/export.h"
#include "object/object.h"
#include "ops/service.h"
#include "util/log.h"
#include "util/loop.h"
#include "util/systemd.h"

#define STATUS_PERIOD_MS 2000

static struct loop_timer *status_timer, *watchdog_timer;
static char last_status[256];
static uint64_t watchdog_ms;

void service_summary(char *buf, unsigned len)
{
    unsigned nexp = 0, nclients = 0;
    for (struct export *e = export_first(); e; e = e->next) {
        nexp++;
        nclients += export_nclients(e);
    }
    snprintf(buf, len, "%u export%s, %u client%s", nexp, nexp == 1 ? "" : "s",
             nclients, nclients == 1 ? "" : "s");
}

static void status_update(void *opaque)
{
    char buf[256];
    service_summary(buf, sizeof(buf));
    if (strcmp(buf, last_status)) {
        systemd_notify("STATUS=serving %s", buf);
        snprintf(last_status, sizeof(last_status), "%s", buf);
    }
    loop_timer_arm(status_timer, STATUS_PERIOD_MS);
}

static void watchdog_kick(void *opaque)
{
    systemd_notify("WATCHDOG=1");
    loop_timer_arm(watchdog_timer, watchdog_ms);
}

void service_ready(void)
{
    char buf[256];
    service_summary(buf, sizeof(buf));
    log_info("ready: %s", buf);
    if (!systemd_notify_enabled())
        return;
    snprintf(last_status, sizeof(last_status), "%s", buf);
    systemd_notify("READY=1\nSTATUS=serving %s\nMAINPID=%d", buf, (int)getpid());
    status_timer = loop_timer_new(loop_main(), status_update, NULL);
    loop_timer_arm(status_timer, STATUS_PERIOD_MS);
    if (systemd_watchdog_usec()) {
        watchdog_ms = systemd_watchdog_usec() / 2000;
        if (watchdog_ms == 0)
            watchdog_ms = 1;
        watchdog_timer = loop_timer_new(loop_main(), watchdog_kick, NULL);
        watchdog_kick(NULL);
    }
}

void service_stopping(const char *why)
{
    char buf[256];
    service_summary(buf, sizeof(buf));
    log_info("shutting down (%s): %s; finishing in-flight requests", why, buf);
    systemd_notify("STOPPING=1\nSTATUS=shutting down (%s): finishing requests of %s", why, buf);
}

void service_stopped(void)
{
    loop_timer_free(status_timer);
    status_timer = NULL;
    /* the watchdog keeps running until here: a slow flush is not a hang */
    loop_timer_free(watchdog_timer);
    watchdog_timer = NULL;
    log_info("stopped");
}

void service_reload(void)
{
    log_info("SIGHUP: reloading TLS credentials");
    systemd_notify("RELOADING=1");
    objects_reload(NULL, NULL);
    systemd_notify("READY=1");
}
