/* SHA-256 (FIPS 180-4), streaming: for x-debug-block-dirty-bitmap-sha256,
 * which must hash a bitmap exactly as QEMU does, without a crypto library. */
#pragma once
#include <stddef.h>
#include <stdint.h>

struct sha256 {
    uint32_t h[8];
    uint64_t total;              /* bytes hashed */
    uint8_t buf[64];
    size_t used;
};

void sha256_init(struct sha256 *s);
void sha256_update(struct sha256 *s, const void *data, size_t len);
void sha256_final(struct sha256 *s, uint8_t digest[32]);
/* digest as 64 lower-case hex digits and a NUL */
void sha256_hex(const uint8_t digest[32], char out[65]);
