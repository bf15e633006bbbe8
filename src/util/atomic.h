/*
 * Small atomic helpers shared by threads that update one value.
 */
#ifndef BEXD_UTIL_ATOMIC_H
#define BEXD_UTIL_ATOMIC_H

#include <stdbool.h>
#include <stdint.h>

/* *p = max(*p, v), for writers on any thread (relaxed: a size that only
 * grows, read without a lock). */
static inline void atomic_max_u64(uint64_t *p, uint64_t v)
{
    uint64_t cur = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (v > cur && !__atomic_compare_exchange_n(p, &cur, v, true,
                                                    __ATOMIC_RELAXED, __ATOMIC_RELAXED))
        ;
}

#endif
