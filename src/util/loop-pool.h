/*
 * Worker loops for exports without an iothread: the main loop plus one
 * loop thread per additional CPU (at most LOOP_POOL_MAX), created on first
 * use.  Connections are placed on the least busy loop, so several clients
 * of one export use every core while a single client stays on the main
 * loop.  Main thread only.
 */
#pragma once

struct loop;

#define LOOP_POOL_MAX 8

/* The least busy loop (ties: the main loop); *slot identifies it for release. */
struct loop *loop_pool_pick(int *slot);
void loop_pool_release(int slot);
