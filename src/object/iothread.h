#pragma once
#include <sys/types.h>
#include <pthread.h>
#include "object/object.h"

struct loop;

struct iothread {
    struct object obj;
    struct loop *loop;
    pthread_t thread;
    pid_t tid;
    int64_t poll_max_ns, poll_grow, poll_shrink, aio_max_batch;
};

#define IOTHREAD_POOL_MAX_DEFAULT 64   /* QEMU's thread-pool-max */

struct iothread *iothread_find(const char *id, error **errp);
json_t *query_iothreads(void);
