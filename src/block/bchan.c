/* Completion channels (bchan.h). */
#include <stdlib.h>
#include "block/bchan.h"
#include "util/loop.h"
#include "util/xalloc.h"

struct bchan {
    struct bchan_set *set;
    struct loop *loop;
    struct aio_req *head;           /* finished requests (aio_req_push) */
    struct bchan *next;
};

void bchan_set_init(struct bchan_set *set, void (*finish)(struct breq *r))
{
    pthread_mutex_init(&set->lock, NULL);
    set->chans = NULL;
    set->finish = finish;
}

void bchan_set_destroy(struct bchan_set *set)
{
    while (set->chans) {
        struct bchan *c = set->chans;
        set->chans = c->next;
        free(c);
    }
    pthread_mutex_destroy(&set->lock);
}

struct bchan *bchan_get(struct bchan_set *set, struct loop *l)
{
    pthread_mutex_lock(&set->lock);
    struct bchan *c = set->chans;
    while (c && c->loop != l)
        c = c->next;
    if (!c) {
        c = xzalloc(sizeof(*c));
        c->set = set;
        c->loop = l;
        c->next = set->chans;
        set->chans = c;
    }
    pthread_mutex_unlock(&set->lock);
    return c;
}

/* In the loop: finish everything pushed so far, oldest first.  The channel
 * is not touched after the last one (finishing it may close the node). */
static void bchan_drain(void *opaque)
{
    struct bchan *c = opaque;
    void (*finish)(struct breq *) = c->set->finish;
    struct aio_req *r = aio_req_take_all(&c->head);

    while (r) {
        struct aio_req *next = r->next;
        finish(container_of(r, struct breq, aio));
        r = next;
    }
}

void bchan_push(struct bchan *c, struct breq *r, int64_t res)
{
    r->aio.res = res;
    if (aio_req_push(&c->head, &r->aio))
        loop_call(c->loop, bchan_drain, c);
}
