/*
 * qcow2 on-disk format (QEMU's docs/interop/qcow2.txt), shared by the
 * driver (qcow2*.c) and image creation (blockdev-create).
 *
 * Everything on disk is big-endian: the structs below are the raw layout
 * (packed); convert fields with be*toh / htobe*.
 */
#pragma once
#include <stdint.h>

#define QCOW2_MAGIC            0x514649fbu     /* "QFI\xfb" */
#define QCOW2_V2_HEADER_LEN    72
#define QCOW2_V3_HEADER_LEN    104             /* without compression_type */
#define QCOW2_V3_HEADER_LEN_CT 112             /* with compression_type, padded */

#define QCOW2_MIN_CLUSTER_BITS 9
#define QCOW2_MAX_CLUSTER_BITS 21              /* 2 MiB, QEMU's limit */
#define QCOW2_MIN_CLUSTER_BITS_EXTL2 14
#define QCOW2_MAX_REFCOUNT_ORDER 6
#define QCOW2_MAX_L1_SIZE      (32u << 20)     /* bytes: QEMU's QCOW_MAX_L1_SIZE */
#define QCOW2_MAX_REFTABLE_SIZE (8u << 20)     /* bytes: QCOW_MAX_REFTABLE_SIZE */
#define QCOW2_MAX_SNAPSHOTS    65536
#define QCOW2_MAX_SNAPSHOTS_SIZE (1024u * QCOW2_MAX_SNAPSHOTS)
#define QCOW2_MAX_BACKING_NAME 1023
#define QCOW2_SUBCLUSTERS      32              /* per cluster with extended L2 */

/* crypt_method */
#define QCOW2_CRYPT_NONE 0
#define QCOW2_CRYPT_AES  1
#define QCOW2_CRYPT_LUKS 2

/* incompatible_features */
#define QCOW2_INCOMPAT_DIRTY        (1ull << 0)
#define QCOW2_INCOMPAT_CORRUPT      (1ull << 1)
#define QCOW2_INCOMPAT_DATA_FILE    (1ull << 2)
#define QCOW2_INCOMPAT_COMPRESSION  (1ull << 3)
#define QCOW2_INCOMPAT_EXTL2        (1ull << 4)
#define QCOW2_INCOMPAT_MASK         0x1full
/* compatible_features */
#define QCOW2_COMPAT_LAZY_REFCOUNTS (1ull << 0)
/* autoclear_features */
#define QCOW2_AUTOCLEAR_BITMAPS       (1ull << 0)
#define QCOW2_AUTOCLEAR_DATA_FILE_RAW (1ull << 1)
#define QCOW2_AUTOCLEAR_MASK          0x3ull

/* compression_type */
#define QCOW2_COMPRESSION_ZLIB 0
#define QCOW2_COMPRESSION_ZSTD 1

/* Header extension types */
#define QCOW2_EXT_END          0x00000000u
#define QCOW2_EXT_BACKING_FMT  0xe2792acau
#define QCOW2_EXT_FEATURE_TABLE 0x6803f857u
#define QCOW2_EXT_BITMAPS      0x23852875u
#define QCOW2_EXT_CRYPTO       0x0537be77u
#define QCOW2_EXT_DATA_FILE    0x44415441u

struct qcow2_header {
    uint32_t magic;
    uint32_t version;
    uint64_t backing_file_offset;
    uint32_t backing_file_size;
    uint32_t cluster_bits;
    uint64_t size;
    uint32_t crypt_method;
    uint32_t l1_size;
    uint64_t l1_table_offset;
    uint64_t refcount_table_offset;
    uint32_t refcount_table_clusters;
    uint32_t nb_snapshots;
    uint64_t snapshots_offset;
    /* version 3 */
    uint64_t incompatible_features;
    uint64_t compatible_features;
    uint64_t autoclear_features;
    uint32_t refcount_order;
    uint32_t header_length;
    /* header_length > 104 */
    uint8_t compression_type;
    uint8_t padding[7];
} __attribute__((packed));

struct qcow2_ext_header {
    uint32_t type;
    uint32_t len;
} __attribute__((packed));

/* Feature name table entry (QCOW2_EXT_FEATURE_TABLE) */
#define QCOW2_FEAT_TYPE_INCOMPAT 0
#define QCOW2_FEAT_TYPE_COMPAT   1
#define QCOW2_FEAT_TYPE_AUTOCLEAR 2
struct qcow2_feature_name {
    uint8_t type;
    uint8_t bit;
    char name[46];
} __attribute__((packed));

/* QCOW2_EXT_BITMAPS data */
struct qcow2_bitmaps_ext {
    uint32_t nb_bitmaps;
    uint32_t reserved;
    uint64_t bitmap_directory_size;
    uint64_t bitmap_directory_offset;
} __attribute__((packed));

/* QCOW2_EXT_CRYPTO data */
struct qcow2_crypto_ext {
    uint64_t offset;
    uint64_t length;
} __attribute__((packed));

/* Snapshot table entry (followed by extra data, id, name, padding to 8) */
struct qcow2_snapshot_header {
    uint64_t l1_table_offset;
    uint32_t l1_size;
    uint16_t id_str_size;
    uint16_t name_size;
    uint32_t date_sec;
    uint32_t date_nsec;
    uint64_t vm_clock_nsec;
    uint32_t vm_state_size;
    uint32_t extra_data_size;
} __attribute__((packed));

struct qcow2_snapshot_extra {
    uint64_t vm_state_size_large;
    uint64_t disk_size;
    uint64_t icount;
} __attribute__((packed));

/* L1 entries and refcount table entries */
#define QCOW2_L1E_OFFSET_MASK   0x00fffffffffffe00ull
#define QCOW2_L1E_RESERVED_MASK 0x7f000000000001ffull
#define QCOW2_REFT_OFFSET_MASK  0xfffffffffffffe00ull
#define QCOW2_REFT_RESERVED_MASK 0x1ffull

/* L2 entries (the first 64 bits with extended L2) */
#define QCOW2_OFLAG_COPIED      (1ull << 63)
#define QCOW2_OFLAG_COMPRESSED  (1ull << 62)
#define QCOW2_OFLAG_ZERO        (1ull << 0)
#define QCOW2_L2E_OFFSET_MASK   0x00fffffffffffe00ull
#define QCOW2_L2E_STD_RESERVED_MASK 0x3f000000000001feull

/* Compressed cluster descriptor: x = 62 - (cluster_bits - 8) bits of host
 * offset, then the count of additional 512-byte sectors. */
static inline unsigned qcow2_csize_shift(unsigned cluster_bits) { return 62 - (cluster_bits - 8); }
static inline uint64_t qcow2_csize_mask(unsigned cluster_bits) { return (1ull << (cluster_bits - 8)) - 1; }
static inline uint64_t qcow2_coffset_mask(unsigned cluster_bits)
{
    return (1ull << qcow2_csize_shift(cluster_bits)) - 1;
}

/* Extended L2 bitmap: allocated bits 0-31, zero bits 32-63 */
#define QCOW2_SC_ALLOC(i)       (1ull << (i))
#define QCOW2_SC_ZERO(i)        (1ull << ((i) + 32))
#define QCOW2_SC_ALLOC_MASK     0x00000000ffffffffull
#define QCOW2_SC_ZERO_MASK      0xffffffff00000000ull

/* Refcount block entries of refcount_bits = 1 << order; below 8 bits the
 * entries are packed starting from the least significant bit of a byte. */
static inline uint64_t qcow2_refcount_get(const void *block, unsigned order, uint64_t i)
{
    const uint8_t *b = block;
    switch (order) {
    case 0: return (b[i / 8] >> (i % 8)) & 1;
    case 1: return (b[i / 4] >> (2 * (i % 4))) & 3;
    case 2: return (b[i / 2] >> (4 * (i % 2))) & 15;
    case 3: return b[i];
    case 4: return ((uint64_t)b[2 * i] << 8) | b[2 * i + 1];
    case 5: { uint64_t v = 0; for (int k = 0; k < 4; k++) v = (v << 8) | b[4 * i + k]; return v; }
    default: { uint64_t v = 0; for (int k = 0; k < 8; k++) v = (v << 8) | b[8 * i + k]; return v; }
    }
}

static inline void qcow2_refcount_set(void *block, unsigned order, uint64_t i, uint64_t v)
{
    uint8_t *b = block;
    switch (order) {
    case 0: b[i / 8] = (b[i / 8] & ~(1u << (i % 8))) | (unsigned)(v << (i % 8)); return;
    case 1: b[i / 4] = (b[i / 4] & ~(3u << (2 * (i % 4)))) | (unsigned)(v << (2 * (i % 4))); return;
    case 2: b[i / 2] = (b[i / 2] & ~(15u << (4 * (i % 2)))) | (unsigned)(v << (4 * (i % 2))); return;
    case 3: b[i] = (uint8_t)v; return;
    case 4: b[2 * i] = v >> 8; b[2 * i + 1] = (uint8_t)v; return;
    case 5: for (int k = 3; k >= 0; k--, v >>= 8) b[4 * i + k] = (uint8_t)v; return;
    default: for (int k = 7; k >= 0; k--, v >>= 8) b[8 * i + k] = (uint8_t)v; return;
    }
}
