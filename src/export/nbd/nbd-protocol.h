/*
 * NBD wire format (NetworkBlockDevice/nbd doc/proto.md): constants and the
 * packed structs of every message bexd sends or receives.  All integers are
 * big-endian on the wire; the structs hold them in wire order (use be16toh /
 * htobe32...).  Shared by the server and by tests that craft raw traffic.
 */
#pragma once
#include <stdint.h>

/* ---- handshake ---- */
#define NBD_MAGIC               UINT64_C(0x4e42444d41474943)   /* "NBDMAGIC" */
#define NBD_OPTS_MAGIC          UINT64_C(0x49484156454F5054)   /* "IHAVEOPT" */
#define NBD_REP_MAGIC           UINT64_C(0x0003e889045565a9)

/* handshake flags (server) */
#define NBD_FLAG_FIXED_NEWSTYLE (1u << 0)
#define NBD_FLAG_NO_ZEROES      (1u << 1)
/* client flags */
#define NBD_FLAG_C_FIXED_NEWSTYLE (1u << 0)
#define NBD_FLAG_C_NO_ZEROES      (1u << 1)

/* transmission flags */
#define NBD_FLAG_HAS_FLAGS          (1u << 0)
#define NBD_FLAG_READ_ONLY          (1u << 1)
#define NBD_FLAG_SEND_FLUSH         (1u << 2)
#define NBD_FLAG_SEND_FUA           (1u << 3)
#define NBD_FLAG_ROTATIONAL         (1u << 4)
#define NBD_FLAG_SEND_TRIM          (1u << 5)
#define NBD_FLAG_SEND_WRITE_ZEROES  (1u << 6)
#define NBD_FLAG_SEND_DF            (1u << 7)
#define NBD_FLAG_CAN_MULTI_CONN     (1u << 8)
#define NBD_FLAG_SEND_RESIZE        (1u << 9)
#define NBD_FLAG_SEND_CACHE         (1u << 10)
#define NBD_FLAG_SEND_FAST_ZERO     (1u << 11)

/* options */
#define NBD_OPT_EXPORT_NAME       1
#define NBD_OPT_ABORT             2
#define NBD_OPT_LIST              3
#define NBD_OPT_STARTTLS          5
#define NBD_OPT_INFO              6
#define NBD_OPT_GO                7
#define NBD_OPT_STRUCTURED_REPLY  8
#define NBD_OPT_LIST_META_CONTEXT 9
#define NBD_OPT_SET_META_CONTEXT  10

/* option replies */
#define NBD_REP_ACK           1
#define NBD_REP_SERVER        2
#define NBD_REP_INFO          3
#define NBD_REP_META_CONTEXT  4
#define NBD_REP_ERR(v)        ((1u << 31) | (v))
#define NBD_REP_ERR_UNSUP           NBD_REP_ERR(1)
#define NBD_REP_ERR_POLICY          NBD_REP_ERR(2)
#define NBD_REP_ERR_INVALID         NBD_REP_ERR(3)
#define NBD_REP_ERR_PLATFORM        NBD_REP_ERR(4)
#define NBD_REP_ERR_TLS_REQD        NBD_REP_ERR(5)
#define NBD_REP_ERR_UNKNOWN         NBD_REP_ERR(6)
#define NBD_REP_ERR_SHUTDOWN        NBD_REP_ERR(7)
#define NBD_REP_ERR_BLOCK_SIZE_REQD NBD_REP_ERR(8)
#define NBD_REP_ERR_TOO_BIG         NBD_REP_ERR(9)

/* NBD_REP_INFO types */
#define NBD_INFO_EXPORT      0
#define NBD_INFO_NAME        1
#define NBD_INFO_DESCRIPTION 2
#define NBD_INFO_BLOCK_SIZE  3

struct nbd_new_handshake {
    uint64_t nbdmagic;
    uint64_t version;          /* NBD_OPTS_MAGIC */
    uint16_t gflags;
} __attribute__((packed));

struct nbd_option_hdr {
    uint64_t version;          /* NBD_OPTS_MAGIC */
    uint32_t option;
    uint32_t length;
} __attribute__((packed));

struct nbd_fixed_new_option_reply {
    uint64_t magic;            /* NBD_REP_MAGIC */
    uint32_t option;
    uint32_t reply;
    uint32_t replylen;
} __attribute__((packed));

/* NBD_OPT_EXPORT_NAME reply (followed by 124 zero bytes unless NO_ZEROES) */
struct nbd_export_name_reply {
    uint64_t exportsize;
    uint16_t eflags;
} __attribute__((packed));

struct nbd_info_export {
    uint16_t info;             /* NBD_INFO_EXPORT */
    uint64_t exportsize;
    uint16_t eflags;
} __attribute__((packed));

struct nbd_info_block_size {
    uint16_t info;             /* NBD_INFO_BLOCK_SIZE */
    uint32_t minimum;
    uint32_t preferred;
    uint32_t maximum;
} __attribute__((packed));

/* ---- transmission ---- */
#define NBD_REQUEST_MAGIC           0x25609513u
#define NBD_SIMPLE_REPLY_MAGIC      0x67446698u
#define NBD_STRUCTURED_REPLY_MAGIC  0x668e33efu

#define NBD_CMD_READ          0
#define NBD_CMD_WRITE         1
#define NBD_CMD_DISC          2
#define NBD_CMD_FLUSH         3
#define NBD_CMD_TRIM          4
#define NBD_CMD_CACHE         5
#define NBD_CMD_WRITE_ZEROES  6
#define NBD_CMD_BLOCK_STATUS  7

#define NBD_CMD_FLAG_FUA       (1u << 0)
#define NBD_CMD_FLAG_NO_HOLE   (1u << 1)
#define NBD_CMD_FLAG_DF        (1u << 2)
#define NBD_CMD_FLAG_REQ_ONE   (1u << 3)
#define NBD_CMD_FLAG_FAST_ZERO (1u << 4)

struct nbd_request {
    uint32_t magic;
    uint16_t flags;
    uint16_t type;
    uint64_t handle;           /* opaque cookie, echoed */
    uint64_t offset;
    uint32_t count;
} __attribute__((packed));

struct nbd_simple_reply {
    uint32_t magic;
    uint32_t error;
    uint64_t handle;
} __attribute__((packed));

#define NBD_REPLY_FLAG_DONE  (1u << 0)

#define NBD_REPLY_TYPE_NONE          0
#define NBD_REPLY_TYPE_OFFSET_DATA   1
#define NBD_REPLY_TYPE_OFFSET_HOLE   2
#define NBD_REPLY_TYPE_BLOCK_STATUS  5
#define NBD_REPLY_TYPE_ERROR         ((1u << 15) + 1)
#define NBD_REPLY_TYPE_ERROR_OFFSET  ((1u << 15) + 2)

struct nbd_structured_reply {
    uint32_t magic;
    uint16_t flags;
    uint16_t type;
    uint64_t handle;
    uint32_t length;           /* of the payload that follows */
} __attribute__((packed));

struct nbd_chunk_offset_hole {
    uint64_t offset;
    uint32_t length;
} __attribute__((packed));

struct nbd_chunk_error {
    uint32_t error;
    uint16_t len;              /* message length, message follows */
} __attribute__((packed));

struct nbd_block_descriptor {
    uint32_t length;
    uint32_t status_flags;
} __attribute__((packed));

/* base:allocation */
#define NBD_STATE_HOLE  (1u << 0)
#define NBD_STATE_ZERO  (1u << 1)
#define NBD_STATE_DIRTY (1u << 0)   /* qemu:dirty-bitmap:* */

/* errors on the wire */
#define NBD_SUCCESS    0
#define NBD_EPERM      1
#define NBD_EIO        5
#define NBD_ENOMEM    12
#define NBD_EINVAL    22
#define NBD_ENOSPC    28
#define NBD_EOVERFLOW 75
#define NBD_ENOTSUP   95
#define NBD_ESHUTDOWN 108

/* limits */
#define NBD_MAX_STRING_SIZE  4096
#define NBD_MAX_BUFFER_SIZE  (32u << 20)
#define NBD_DEFAULT_PORT     10809
