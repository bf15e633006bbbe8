/*
 * Block layer: named nodes in a graph, requests, block status.
 *
 * A node (struct bnode) is an instance of a driver (file, host_device, raw,
 * null-co, rbd...).  Nodes may have a "file" child (raw over file) and a
 * "backing" child (format drivers with backing chains).  Users of a node are
 * its parent nodes and the exports on it; each holds a reference and may hold
 * the WRITE permission (refused on a read-only node; the file driver then
 * takes its image lock for writing).
 *
 * Requests are asynchronous.  The submitter fills a struct breq it owns
 * (exports pre-allocate them per queue slot) and calls bnode_submit() from a
 * loop thread; req->done runs in that same thread, possibly before
 * bnode_submit() returns.  Requests are validated here (range, alignment,
 * read-only), so drivers see only valid ones.
 *
 * Control operations (blockdev_add/del, queries) run in the main thread.
 */
#pragma once
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/uio.h>
#include <jansson.h>
#include "util/aio.h"
#include "util/error.h"
#include "util/cleanup.h"

struct loop;
struct bnode;
struct bnode_align;
struct bstats;
struct job;

enum breq_op {
    BREQ_READ,
    BREQ_WRITE,
    BREQ_FLUSH,
    BREQ_DISCARD,
    BREQ_WRITE_ZEROES,
    BREQ_CACHE,        /* prefetch hint; may complete at once */
};

enum {
    BREQ_FUA        = 1u << 0,  /* WRITE/WRITE_ZEROES: durable on completion */
    BREQ_MAY_UNMAP  = 1u << 1,  /* WRITE_ZEROES: may punch a hole */
    BREQ_NO_FALLBACK = 1u << 2, /* WRITE_ZEROES: fail with -ENOTSUP rather than write zero buffers (NBD FAST_ZERO) */
    BREQ_COPY_INLINE = 1u << 3, /* READ/WRITE: a large RAM-backed copy may run in the
                                 * submitting loop (its clients are spread over loops
                                 * already, or it has no other work to overlap the copy
                                 * with) rather than in the worker pool */
    BREQ_WRITE_COMPRESSED = 1u << 6, /* WRITE: store compressed (QEMU's
                                 * BDRV_REQ_WRITE_COMPRESSED): whole clusters of a
                                 * driver with bdrv.compressed_writes, into clusters
                                 * not allocated yet; -ENOTSUP on other nodes */
    BREQ_BEYOND_EOF = 1u << 4,  /* internal (a format driver on its file child, image
                                 * creation): a WRITE may extend a protocol node,
                                 * whose size grows; a READ past its end reads zeros */
    BREQ_WRITE_UNCHANGED = 1u << 8, /* WRITE/WRITE_ZEROES of what the node reads
                                 * already (a stream job's copy, QEMU's
                                 * BDRV_REQ_WRITE_UNCHANGED): marks no dirty
                                 * bitmap and passes the node's intercept */
    BREQ_PEER       = 1u << 7,  /* a peer's request, as an export submits it: its
                                 * bounce buffer (block/align.c) waits for the
                                 * bounce budget, a WRITE waits while writes are
                                 * held (block_writes_hold); the block layer's own
                                 * requests (drivers, jobs, an align op's) never
                                 * wait there */
};

struct breq {
    enum breq_op op;
    unsigned flags;
    uint64_t offset;
    uint64_t len;
    struct iovec *iov;           /* READ/WRITE; sum of lengths == len */
    int iovcnt;
    struct loop *loop;           /* submitting loop; done runs there */
    void (*done)(struct breq *req, int ret);  /* ret: 0 or -errno */
    void *opaque;                /* for the submitter */
    struct aio_fixed *fixed;     /* optional: a buffer holding iov (util/aio.h) */
    /* private to the block layer and drivers */
    struct aio_req aio;
    struct bnode *bs;
    uint64_t drv_offset;
    uint64_t done_bytes;
    int stage;
    uint64_t step_off, step_len;     /* file.c write-zeroes: the extent in hand */
    struct iovec tmp_iov;
    /* drivers that complete in threads of their own (rbd, nbd): the
     * submitting loop's completion channel (bchan.h), and the pieces a
     * request was split into that have not finished (atomic) */
    struct bchan *chan;
    int pending;
    struct bnode_align *align_track; /* counted fast-path write (block/align.c) */
    /* accounting (block/stats.c): the node counted, op, start, levels forwarded */
    struct bnode *acct;
    uint64_t acct_start_ns;
    uint64_t acct_lat_ns;       /* set on completion: how long it took */
    uint8_t acct_op;
    uint8_t acct_fwd;
    bool write_counted;              /* in bs->writes_in_flight (block.c) */
    struct bnode *counted_bs;        /* ... of this node (drivers change bs) */
    struct breq *held_next;          /* held by block_writes_hold() */
};

/* Block status flags, as in QEMU: DATA = reads return data from this layer,
 * ZERO = reads return zeros, ALLOCATED = this layer (not a backing file)
 * decides the content. */
enum {
    BS_DATA      = 1u << 0,
    BS_ZERO      = 1u << 1,
    BS_ALLOCATED = 1u << 2,
};

enum detect_zeroes { DETECT_ZEROES_OFF, DETECT_ZEROES_ON, DETECT_ZEROES_UNMAP };

/* Permissions a user of a node holds, or shares with the other users (QEMU's). */
enum {
    PERM_CONSISTENT_READ = 1u << 0,
    PERM_WRITE           = 1u << 1,
    PERM_WRITE_UNCHANGED = 1u << 2,
    PERM_RESIZE          = 1u << 3,
    PERM_ALL             = 0xf,
};

/* One user of a node: an export, or a parent node through one of its
 * children.  Holds a reference to the node. */
struct bnode_user {
    struct bnode *bs;
    uint64_t perm, shared;
    char *name;                 /* "an unnamed block device", "node 'r0'" */
    const char *role;           /* "root", "file" */
    bool anonymous;             /* made by bnode_ref_user() */
    struct bnode *parent;       /* a child link's parent node; NULL for exports and
                                 * other root users (bnode_attach_child sets it) */
    uint64_t seq;               /* creation order, for x-debug-query-block-graph */
    /* The node's size changed (main thread): exports tell their clients,
     * parent nodes follow their child.  NULL: nothing to do. */
    void (*resized)(struct bnode_user *u);
    /* u->bs is another node now (bnode_user_move: an overlay took the
     * old one's place); the data path must use it.  NULL: such a user
     * cannot be moved. */
    void (*replaced)(struct bnode_user *u);
    void *opaque;               /* for resized and replaced */
    struct bnode_user *next;
};

struct bchan;
struct bdrv;
struct bsnapshot;
struct dirty_bitmap;

struct bnode {
    char *node_name;
    bool auto_named;
    /* when the node got its name (QEMU's bdrv_assign_node_name): the node
     * list, newest first, is in this order, as QEMU's graph_bdrv_states */
    uint64_t name_seq;
    const struct bdrv *drv;
    void *opaque;               /* driver state */
    struct bnode *file;         /* "file" child or NULL */
    struct bnode *backing;      /* "backing" child or NULL */
    uint64_t size;
    bool read_only;
    bool force_share;           /* force-share=on: parents share everything with it */
    bool discard;               /* discard=unmap */
    enum detect_zeroes detect_zeroes;
    bool cache_direct, cache_no_flush;
    uint32_t request_alignment; /* 1 unless O_DIRECT or the driver says so */
    uint32_t max_transfer;      /* 0 = no limit */
    struct bnode_align *align;  /* request_alignment > 1: unaligned requests (align.c) */
    int refcnt;                 /* parents + exports + 1 while named (monitor-owned) */
    struct bnode_user *users;   /* who uses this node, with which permissions */
    struct bnode_user *file_link;   /* this node as a user of its file child */
    uint64_t write_threshold;   /* block-set-write-threshold; 0 = off (atomic) */
    struct bnode *next;         /* in the named-node list */
    json_t *options;            /* the blockdev-add options, for queries */

    /* dirty bitmaps (dirty-bitmap.h) */
    struct dirty_bitmap *dirty_bitmaps;  /* newest first */
    pthread_mutex_t dirty_lock;          /* the list and their bits */
    int dirty_recording;                 /* atomic: bitmaps recording writes */
    void *bitmap_store;                  /* the driver's persistence state */
    struct bstats *stats;       /* I/O accounting (block/stats.h) */

    /* writes issued and not completed (atomic), for block_writes_hold() */
    int writes_in_flight;
    /* a copy-before-write filter inserted above this node: writes reaching
     * the node go through it (atomic; NULL = none) */
    struct bnode_intercept *intercept;
    /* why operations on the node are blocked (a block job uses it), as
     * QEMU's op blockers: "block device is in use by block job: backup";
     * NULL = free.  Main thread. */
    const char *blocker;

    /* blockdev-reopen (reopen.c): the parent that opened this node from an
     * inline definition (it is reopened with that parent), or NULL; and
     * whether "read-only" in options was inherited rather than given. */
    struct bnode *inherits_from;
    bool ro_inherited;
    /* ... likewise cache.direct / cache.no-flush (INHERITED_*) and discard */
    unsigned cache_inherited;
    bool discard_inherited;
    /* The backing file the image header names, or that backing node's
     * file name when bexd opened it from the header (QEMU's
     * auto_backing_file); NULL = none.  Set by the driver at open. */
    char *auto_backing_file;
};
#define INHERITED_DIRECT   1u
#define INHERITED_NO_FLUSH 2u

/* blockdev-reopen of one node (reopen.c): the new explicit options (as
 * checked by the schema) and the generic values they give; the driver
 * checks its own options in reopen_prepare, keeps what it needs in drv,
 * and applies it in reopen_commit (or frees it in reopen_abort). */
struct reopen_state {
    struct bnode *bs;
    json_t *opts;
    bool read_only;
    bool discard;
    enum detect_zeroes detect_zeroes;
    bool cache_direct, cache_no_flush;
    struct bnode *new_file;      /* the "file" child after the reopen */
    bool was_read_only;          /* before the reopen */
    bool backing_missing;        /* named in the list without "backing" (a child
                                  * queued with its parent keeps its backing) */
    void *drv;
};

/* Writes of a node diverted before they reach its driver (a backup job's
 * copy-before-write filter).  submit() owns the request and eventually
 * passes it on with bnode_submit_driver() or completes it. */
struct bnode_intercept {
    void (*submit)(struct bnode_intercept *ic, struct bnode *bs, struct breq *req,
                   uint64_t offset);
};

/* How a driver names its nodes beyond the generic rule (filename.c). */
enum fname_rule {
    FNAME_DEFAULT,      /* "filename" option, or the primary child's exact name */
    FNAME_NULL,         /* null-co: "null-co://" without strong options */
    FNAME_BLKDEBUG,     /* "blkdebug:CONFIG:IMAGE" without rules or limits */
    FNAME_FILE_CHILD,   /* the file child's name (copy-before-write, snapshot-access) */
    FNAME_NBD,          /* nbd: "nbd+unix:///EXPORT?socket=PATH", "nbd://HOST:PORT/EXPORT" */
};

struct bdrv {
    const char *name;                   /* "file", "raw", ... */
    bool is_format;                     /* sits on a "file" child */
    bool is_filter;
    /* a job's filter node (chain.c): QEMU inserts it above the node the job
     * works on, whose exports are then the filter's users (blockdev-del of
     * that node says "busy", not "in use") */
    bool job_filter;
    /* File names (filename.c, QEMU's bdrv_refresh_filename): a protocol
     * driver (QEMU's bdrv_file_open), the options that change the data
     * (strong runtime options; a name ending in '.' is a prefix), and the
     * driver's own naming rule. */
    bool is_protocol;
    bool needs_filename;                /* an empty "filename" is refused up front */
    const char *const *strong_opts;
    enum fname_rule filename_rule;
    bool compressed_writes;             /* takes BREQ_WRITE_COMPRESSED */
    const char *child_key;              /* the option naming that child; NULL = "file" */
    /* What the driver checks before the generic code opens its child
     * (blkdebug: option types, its config file and rules, after the
     * node's name).  May set bs->opaque; close is called on failure. */
    int  (*open_prepare)(struct bnode *bs, json_t *opts, error **errp);
    /* Open: opts is the validated blockdev-add object.  Set bs->size. */
    int  (*open)(struct bnode *bs, json_t *opts, error **errp);
    void (*close)(struct bnode *bs);
    /* Submit a valid request at driver offset `offset` (== req->offset for
     * leaf use; raw passes offset+its base to its child). */
    void (*submit)(struct bnode *bs, struct breq *req, uint64_t offset);
    /* Status of [offset, offset+bytes): sets *pnum (> 0, <= bytes) and the
     * BS_* flags for that first extent.  NULL = all DATA|ALLOCATED.
     * *file_depth_out: not used by leaf drivers. */
    int  (*block_status)(struct bnode *bs, uint64_t offset, uint64_t bytes,
                         uint64_t *pnum, unsigned *flags);
    /* 0, or 1 when the node keeps its size (a driver that may ignore a
     * shrink, as QEMU's block_resize asks for it with exact=false), or
     * -errno with errp set. */
    int  (*truncate)(struct bnode *bs, uint64_t size, error **errp);
    /* The "file" child changed size (block_resize of the child): update
     * bs->size if it follows the child's.  NULL: it does not. */
    void (*child_resized)(struct bnode *bs);
    /* The users' permissions changed: perm = what they hold together,
     * shared = what they all share (image locking).  NULL = nothing to do. */
    int  (*set_perm)(struct bnode *bs, uint64_t perm, uint64_t shared, error **errp);
    /* query-named-block-nodes: adjust the node's info object (its "file"
     * and "image" members) as QEMU reports this driver.  NULL = generic. */
    void (*query_info)(struct bnode *bs, json_t *info);
    /* Make written data durable now, synchronously (shutdown path). */
    int  (*flush_sync)(struct bnode *bs);
    /* Zero-copy reads: if [offset, offset+bytes) reads straight from a
     * file whose pages are in RAM, set *fd and *fd_offset and return 0;
     * with need_holes, only if the range is known to hold no hole.
     * -ENOTSUP otherwise.  NULL = never. */
    int  (*splice_source)(struct bnode *bs, uint64_t offset, uint64_t bytes, bool need_holes,
                          int *fd, uint64_t *fd_offset);
    /* Read [offset, offset+bytes) into buf now, in the calling thread,
     * where that cannot wait on a device (the page cache: not O_DIRECT);
     * past the end reads zeros.  -ENOTSUP where it would.  NULL = never. */
    int  (*pread_sync)(struct bnode *bs, uint64_t offset, uint64_t bytes, void *buf);
    /* Capabilities */
    bool (*can_write_zeroes_fast)(struct bnode *bs);   /* NULL = false */
    bool (*can_discard)(struct bnode *bs);             /* NULL = false */
    /* Cluster size in bytes, 0 if none (default dirty bitmap granularity). */
    uint32_t (*cluster_size)(struct bnode *bs);        /* NULL = none */
    /* Persistent dirty bitmaps (dirty-bitmap.h); all NULL = not supported.
     * load: after open, create the stored bitmaps on bs (persistent, and
     * inconsistent if stored in use) and mark them in use when writable;
     * store: before close, store every persistent bitmap for good;
     * can_store: may bs store a new one (QEMU's error if not);
     * update: the set of persistent bitmaps of bs changed, store it. */
    int  (*bitmaps_load)(struct bnode *bs, error **errp);
    void (*bitmaps_store)(struct bnode *bs);
    int  (*bitmap_can_store)(struct bnode *bs, const char *name, uint32_t granularity,
                             error **errp);
    int  (*bitmaps_update)(struct bnode *bs, error **errp);
    /* Adjust what bs's file child is asked to hold and share, from what
     * bs's users hold and share (QEMU's child_perm).  NULL = as they are. */
    void (*child_perm)(struct bnode *bs, uint64_t *perm, uint64_t *shared);
    /* blockdev-reopen (QEMU's bdrv_reopen_prepare/commit/abort).  NULL
     * prepare: the driver cannot be reopened.  reopen_keys: the driver's
     * options that a reopen may change (a key, or the prefix of flattened
     * "key.sub" names); any other must keep its value.  reopen_resettable:
     * those of them that may be left out (back to their default).
     * prepare checks and returns 0 or -1 with errp; commit cannot fail. */
    const char *const *reopen_keys;
    const char *const *reopen_resettable;
    int  (*reopen_prepare)(struct reopen_state *rs, error **errp);
    void (*reopen_commit)(struct reopen_state *rs);
    void (*reopen_abort)(struct reopen_state *rs);
    /* after every entry committed (a format node's file is writable now) */
    void (*reopen_commit_post)(struct reopen_state *rs);
    /* read-write needs a read-write "file" child (it writes metadata) */
    bool reopen_needs_rw_file;
    /* where the driver keeps its "backing" link: reopen may change it */
    struct bnode_user **(*reopen_backing_link)(struct bnode *bs);
    /* A node above (or this one) raised a BLKDBG_* event (blkdebug). */
    void (*debug_event)(struct bnode *bs, int event);
    /* x-blockdev-amend's work, in the main thread: opts is the command's
     * BlockdevAmendOptions for this driver.  NULL: not supported. */
    int  (*amend)(struct bnode *bs, json_t *opts, bool force, error **errp);
    /* Internal snapshots (QEMU's bdrv_snapshot_*).  list: a copy of the
     * table (free it with bsnapshots_free) and its length, or -errno.
     * create and delete run in a coroutine of the main loop, with the
     * peers' writes held: create adds sn (the driver sets sn->id), 0 or
     * -errno; delete removes the one with id and/or name and moves its
     * entry to *gone (which the caller clears either way).  All NULL =
     * none (QEMU falls back to the file child: internal-snapshot.c). */
    int  (*snapshot_list)(struct bnode *bs, struct bsnapshot **list);
    int  (*snapshot_create)(struct bnode *bs, struct bsnapshot *sn);
    int  (*snapshot_delete)(struct bnode *bs, const char *id, const char *name,
                            struct bsnapshot *gone, error **errp);
};

/* One internal snapshot, as QEMU's QEMUSnapshotInfo. */
struct bsnapshot {
    char *id, *name;
    uint64_t vm_state_size;
    uint32_t date_sec, date_nsec;
    uint64_t vm_clock_nsec;
    uint64_t icount;                 /* UINT64_MAX: not recorded */
};
void bsnapshot_clear(struct bsnapshot *sn);
void bsnapshots_free(struct bsnapshot *list, int n);
/* QEMU's SnapshotInfo object (query-named-block-nodes, the delete's reply) */
json_t *bsnapshot_info(const struct bsnapshot *sn);

/* Events of QEMU's BlkdebugEvent that bexd raises (numbers as QEMU's enum). */
enum {
    BLKDBG_L1_UPDATE = 0,
    BLKDBG_L1_GROW_ALLOC_TABLE = 1,
    BLKDBG_L1_GROW_WRITE_TABLE = 2,
    BLKDBG_L1_GROW_ACTIVATE_TABLE = 3,
    BLKDBG_L2_LOAD = 4,
    BLKDBG_L2_UPDATE = 5,
    BLKDBG_L2_UPDATE_COMPRESSED = 6,
    BLKDBG_L2_ALLOC_COW_READ = 7,
    BLKDBG_L2_ALLOC_WRITE = 8,
    BLKDBG_READ_AIO = 9,
    BLKDBG_READ_BACKING_AIO = 10,
    BLKDBG_READ_COMPRESSED = 11,
    BLKDBG_WRITE_AIO = 12,
    BLKDBG_WRITE_COMPRESSED = 13,
    BLKDBG_COW_READ = 16,
    BLKDBG_COW_WRITE = 17,
    BLKDBG_REFTABLE_LOAD = 18,
    BLKDBG_REFTABLE_GROW = 19,
    BLKDBG_REFBLOCK_LOAD = 21,
    BLKDBG_REFBLOCK_UPDATE_PART = 23,
    BLKDBG_REFBLOCK_ALLOC = 24,
    BLKDBG_REFBLOCK_ALLOC_HOOKUP = 25,
    BLKDBG_REFBLOCK_ALLOC_WRITE = 26,
    BLKDBG_REFBLOCK_ALLOC_WRITE_BLOCKS = 27,
    BLKDBG_REFBLOCK_ALLOC_WRITE_TABLE = 28,
    BLKDBG_REFBLOCK_ALLOC_SWITCH_TABLE = 29,
    BLKDBG_CLUSTER_ALLOC = 30,
    BLKDBG_CLUSTER_ALLOC_BYTES = 31,
    BLKDBG_CLUSTER_FREE = 32,
    BLKDBG_FLUSH_TO_OS = 33,
    BLKDBG_FLUSH_TO_DISK = 34,
    BLKDBG_PWRITEV_RMW_HEAD = 35,
    BLKDBG_PWRITEV_RMW_AFTER_HEAD = 36,
    BLKDBG_PWRITEV_RMW_TAIL = 37,
    BLKDBG_PWRITEV_RMW_AFTER_TAIL = 38,
    BLKDBG_PWRITEV = 39,
    BLKDBG_PWRITEV_ZERO = 40,
    BLKDBG_PWRITEV_DONE = 41,
    BLKDBG_L1_SHRINK_WRITE_TABLE = 43,
    BLKDBG_L1_SHRINK_FREE_L2_CLUSTERS = 44,
    BLKDBG_CLUSTER_ALLOC_SPACE = 46,
};
extern int blkdebug_nodes;             /* atomic: blkdebug nodes open */
void bnode_debug_event_slow(struct bnode *bs, int event);
/* Raise an event on bs: the first node down its primary (file) children
 * that handles events gets it, as QEMU's bdrv_debug_event.  Costs one
 * load while no blkdebug node exists. */
static inline void bnode_debug_event(struct bnode *bs, int event)
{
    if (unlikely(__atomic_load_n(&blkdebug_nodes, __ATOMIC_RELAXED)))
        bnode_debug_event_slow(bs, event);
}

/* ---- graph / control (main thread) ---- */
/* blockdev-add: opts validated by the QMP schema (BlockdevOptions). */
struct bnode *blockdev_add(json_t *opts, error **errp);
/* A child node from a BlockdevRef (a node name: a new reference to it; or
 * inline options: a new node with a generated name), for drivers that open
 * children of their own (backing, data-file).  An inline child inherits
 * read-only from its parent unless it says otherwise. */
struct bnode *bnode_open_ref(json_t *ref, bool parent_ro, error **errp);
/* A child of parent (file, backing when cow, data-file, target) given as a
 * BlockdevRef: inline options inherit from the parent as in QEMU's
 * bdrv_inherited_options (read-only, cache modes, discard=unmap). */
struct bnode *bnode_open_child(json_t *ref, struct bnode *parent, bool cow, error **errp);
int  blockdev_del(const char *node_name, error **errp);
struct bnode *bnode_find(const char *node_name);
/* A node whose backing child bs is (QEMU blocks deleting and snapshotting
 * a backing node: "node is used as backing hd of 'P'"), or NULL. */
struct bnode *bnode_backing_parent(struct bnode *bs);
/* Whether another node uses bs (as file, backing or any child): QEMU's
 * !bdrv_is_root_node(). */
bool bnode_has_parent_node(struct bnode *bs);
/* The job filter node (bdrv job_filter) over bs, or NULL: in QEMU's graph
 * it stands in bs's place under bs's exports. */
struct bnode *bnode_job_filter_above(struct bnode *bs);
/* "Cannot find device=X nor node-name=X"-style lookup used by exports */
struct bnode *bnode_lookup(const char *name, error **errp);
json_t *query_named_block_nodes(bool flat);
void block_close_all(void);
void bnode_ref(struct bnode *bs);
void bnode_unref(struct bnode *bs);     /* the last reference closes the node */
/* Flush every node synchronously (shutdown: "data flushed"). */
void block_flush_all_sync(void);

/* Users: exports and parent nodes.  Attaching checks the permissions
 * against every other user of the node (and, through format nodes, of
 * their children) and fails with QEMU's "Permission conflict" message. */
struct bnode_user *bnode_attach(struct bnode *bs, uint64_t perm, uint64_t shared,
                                const char *name, const char *role, error **errp);
/* A parent node's link to its child (role "file", "backing", "data-file"...):
 * named "node 'PARENT'", holding nothing yet and sharing everything. */
struct bnode_user *bnode_attach_child(struct bnode *parent, struct bnode *child,
                                      const char *role, error **errp);
int  bnode_user_set_perm(struct bnode_user *u, uint64_t perm, uint64_t shared, error **errp);
void bnode_detach(struct bnode_user *u);
/* Move u to another node (QEMU's bdrv_replace_node for one parent): its
 * permissions are checked there and given back here.  The caller calls
 * u->replaced once the data path may switch. */
int  bnode_user_move(struct bnode_user *u, struct bnode *to, error **errp);
/* Users of one node (exports: each with replaced) all move to `to`, or
 * none does (QEMU's bdrv_replace_node); 0 or -1 with the error. */
int  bnode_users_move(struct bnode_user **users, size_t n, struct bnode *to, error **errp);
/* They moved from a node of old_size bytes: the data path uses their new
 * node from now on (replaced), and a new size reaches their clients. */
void bnode_users_replaced(struct bnode_user **users, size_t n, uint64_t old_size);
/* Is anc bs itself, or above it through parent links? */
bool bnode_is_ancestor_or_self(struct bnode *anc, struct bnode *bs);
/* Work out again what bs asks of its file child (its read-only changed,
 * or it was just opened): QEMU's "Failed to get \"write\" lock" etc. */
int  bnode_refresh_perms(struct bnode *bs, error **errp);
const char *bnode_perm_name(int bit);   /* bit 0 = "consistent read", ... */
/* Shorthand for an unnamed user reading (and writing) that shares everything. */
int  bnode_ref_user(struct bnode *bs, bool write, error **errp);
void bnode_unref_user(struct bnode *bs, bool write);

/* ---- data path (any loop thread) ---- */
void bnode_submit(struct bnode *bs, struct breq *req);
/* Bounce buffers of unaligned requests, all nodes together (bytes): held
 * now, the most ever held, and the budget (block/align.c, "Memory"). */
void bnode_bounce_stats(uint64_t *used, uint64_t *peak, uint64_t *limit);
/* Driver-to-child forwarding, no validation. */
void bnode_submit_child(struct bnode *child, struct breq *req, uint64_t offset);
/* Past validation and interception: to bs's driver (an intercept passing a
 * write on). */
void bnode_submit_driver(struct bnode *bs, struct breq *req, uint64_t offset);

/* Hold every new write of a peer (BREQ_PEER: an export's; they wait,
 * queued) and call drained(opaque) in the main loop, never inside this
 * call, once the writes already issued have completed: the point where a
 * snapshot can start (QEMU's drain, which stops the requests of its
 * BlockBackends).  The block layer's own writes go on meanwhile: a format
 * driver's metadata (a peer's write in flight may wait for it), a job's
 * copies.  Held writes go on when every hold is released.  Main thread. */
void block_writes_hold(void (*drained)(void *opaque), void *opaque);
void block_writes_release(void);
/* While writes are held: those addressed to `from` (held now or later)
 * go to `to` instead when the last hold is released (a node replaced by
 * an overlay under its exports).  Main thread. */
void block_writes_redirect(struct bnode *from, struct bnode *to);
/* Called by drivers when a request finishes. */
void breq_complete(struct breq *req, int ret);

/* Block status of the node including its backing chain.
 * *depth: 0 = unallocated in the whole chain, 1 = this node, 2 = its backing...
 * Returns 0 or -errno. */
int bnode_block_status(struct bnode *bs, uint64_t offset, uint64_t bytes,
                       uint64_t *pnum, unsigned *flags, int *depth);
/* BLOCK_WRITE_THRESHOLD: a write or write-zeroes ending past the node's
 * threshold emits the event once and turns the threshold off (any thread). */
void bnode_write_threshold_hit(struct bnode *bs, uint64_t end);
static inline void bnode_check_write_threshold(struct bnode *bs, const struct breq *req,
                                               uint64_t offset)
{
    uint64_t t = __atomic_load_n(&bs->write_threshold, __ATOMIC_RELAXED);
    if (unlikely(t) && (req->op == BREQ_WRITE || req->op == BREQ_WRITE_ZEROES) &&
        offset + req->len > t)
        bnode_write_threshold_hit(bs, offset + req->len);
}

/* The largest node size, as QEMU's BDRV_MAX_LENGTH (2^63 - 2^30). */
#define BNODE_MAX_LENGTH (INT64_MAX - (1ll << 30) + 1)

/* A node's size as QEMU reports it: a length rounded up to whole 512-byte
 * sectors (bdrv_getlength); reads of the rest of the last sector give zeros. */
static inline uint64_t bnode_round_size(uint64_t len)
{
    return len > UINT64_MAX - 511 ? len : (len + 511) & ~511ull;
}

/* Resize (main thread): QEMU's errors ("Image is read-only", "Image format
 * driver does not support resize", the driver's); on success every user
 * whose node changed size is told (bnode_user.resized). */
int bnode_truncate(struct bnode *bs, uint64_t size, error **errp);
/* Tell bs's users that its size changed (drivers whose size follows a child). */
void bnode_notify_resized(struct bnode *bs);
/* Hooks that only pass on to the file child: a filter's, raw's (block.c). */
int  bnode_filter_block_status(struct bnode *bs, uint64_t offset, uint64_t bytes,
                               uint64_t *pnum, unsigned *flags);
void bnode_filter_child_resized(struct bnode *bs);      /* follows the child's size */
int  bnode_filter_truncate(struct bnode *bs, uint64_t size, error **errp);
bool bnode_filter_can_write_zeroes_fast(struct bnode *bs);
bool bnode_filter_can_discard(struct bnode *bs);
/* Where a read of [offset, offset+bytes) can be spliced from (see
 * bdrv.splice_source): 0 and *fd / *fd_offset, or -ENOTSUP.  The fd lives
 * as long as the node; reading it is a READ of the node. */
/* Read now without a loop or a coroutine (bdrv.pread_sync): a format's
 * block status reads its metadata this way.  -ENOTSUP where the node
 * cannot; the caller then reads as usual. */
int bnode_pread_sync(struct bnode *bs, uint64_t offset, uint64_t bytes, void *buf);
int bnode_splice_source(struct bnode *bs, uint64_t offset, uint64_t bytes, bool need_holes,
                        int *fd, uint64_t *fd_offset);
bool bnode_can_write_zeroes_fast(struct bnode *bs);
/* A READ served without bnode_submit() (spliced from bnode_splice_source):
 * count it in the node's statistics. */
void bnode_account_read(struct bnode *bs, uint64_t bytes);

/* ---- coroutine wrappers (block-co.c) ----
 * In a coroutine (util/coroutine.h): submit one request to bs through
 * bnode_submit() (validated like any other) and yield until it completes;
 * correct when it completes before the submission returns.  The request
 * runs in the coroutine's loop.  Return 0 or -errno.  flags are BREQ_*.
 * Jobs and format drivers use these; a driver calling its own children
 * passes BREQ_BEYOND_EOF to let the file grow. */
int bnode_co_preadv(struct bnode *bs, uint64_t offset, uint64_t bytes,
                    struct iovec *iov, int iovcnt, unsigned flags);
int bnode_co_pwritev(struct bnode *bs, uint64_t offset, uint64_t bytes,
                     struct iovec *iov, int iovcnt, unsigned flags);
int bnode_co_pread(struct bnode *bs, uint64_t offset, uint64_t bytes, void *buf,
                   unsigned flags);
int bnode_co_pwrite(struct bnode *bs, uint64_t offset, uint64_t bytes, const void *buf,
                    unsigned flags);
int bnode_co_pwrite_zeroes(struct bnode *bs, uint64_t offset, uint64_t bytes, unsigned flags);
int bnode_co_pdiscard(struct bnode *bs, uint64_t offset, uint64_t bytes);
int bnode_co_flush(struct bnode *bs);
/* Main thread: run fn(opaque) in a coroutine of a loop thread of its own
 * and wait for its end (QEMU's synchronous image creation; nothing else
 * runs in the main loop meanwhile).  Returns what fn returned. */
int bnode_co_run_sync(int (*fn)(void *opaque), void *opaque);

/* blockdev-create, per driver name (create.c).  create() starts making
 * the image that opts (the checked BlockdevCreateOptions) describe, as the
 * work of job (job.h; job->opaque is the driver's), and ends the work with
 * blockdev_create_done() (or, from job_run_co(), by returning after
 * job_progress_update(job, 1)).  A driver name without one: "Driver does
 * not support blockdev-create". */
struct blockdev_create_driver {
    const char *name;
    void (*create)(struct job *job, json_t *opts);
    struct blockdev_create_driver *next;
};
void blockdev_create_register(struct blockdev_create_driver *d);
#define BLOCKDEV_CREATE_REGISTER(drv_name, fn)                                    \
    static struct blockdev_create_driver blockdev_create_##fn = { drv_name, fn, NULL }; \
    __attribute__((constructor)) static void blockdev_create_register_##fn(void)   \
    { blockdev_create_register(&blockdev_create_##fn); }
void blockdev_create_done(struct job *job, int ret, error *err);
/* Make a qcow2 image now, from the main thread (blockdev-snapshot-sync):
 * opts as blockdev-create's BlockdevCreateOptionsQcow2. */
int qcow2_create_sync(json_t *opts, error **errp);
/* ... and its file, of size bytes, as blockdev-create of driver "file"
 * makes it (refused while another user holds its image locks). */
int file_create_now(const char *filename, uint64_t size, error **errp);
/* An image file of format qcow2 or raw, size bytes, naming backing (NULL:
 * none) with backing_fmt, made now (QEMU's bdrv_img_create and its
 * errors).  Main thread; 0 or -1. */
int image_create(const char *path, const char *format, uint64_t size, const char *backing,
                 const char *backing_fmt, error **errp);
/* "qcow2" if the file starts as a qcow2 image does, else "raw" (QEMU's
 * probing, for the formats bexd has). */
const char *bnode_probe_format(const char *path);
/* A qcow2 node opened without its backing file (backing: null) opens the
 * one its header names now (QEMU's bdrv_open_backing_file).  0 or -errno. */
int qcow2_open_backing_file(struct bnode *bs, error **errp);

/* Driver registry */
void bdrv_register(const struct bdrv *drv);
const struct bdrv *bdrv_find(const char *name);

#define BDRV_REGISTER(drv) \
    __attribute__((constructor)) static void bdrv_register_##drv(void) { bdrv_register(&drv); }

/* blockdev-reopen of a list of BlockdevOptions (reopen.c), all or nothing. */
int bnode_reopen_multiple(json_t *list, error **errp);
/* Reopen bs read-only or read-write with its other options as they are
 * (QEMU's bdrv_reopen_set_read_only). */
int bnode_reopen_set_read_only(struct bnode *bs, bool read_only, error **errp);
/* A child link a reopen replaced: its permissions go now; the child goes
 * once nothing can still be reading it (a node other users keep at once;
 * an inline child only when the daemon exits: requests forwarded to it
 * before the change are not tracked). */
void bnode_retire_link(struct bnode_user *u);

/* Iterate every node (named and generated) with ->next. */
struct bnode *bnode_first(void);

/* The path of the file or host device at the bottom of bs's file chain,
 * or NULL when that leaf is another driver (null-co, rbd, ...). */
const char *bnode_leaf_path(struct bnode *bs);
/* The bytes allocated to the leaf file under bs (fstat: never the path,
 * which an export of ours may have been mounted over), or -errno /
 * -ENOTSUP when the leaf is not a file.  Any thread. */
int64_t bnode_leaf_allocated(struct bnode *bs);
/* QEMU's bs->filename after bdrv_refresh_filename: the exact file name, or
 * "json:{...}" of the options that make the node (filename.c).  Main
 * thread; caller frees. */
char *bnode_filename(struct bnode *bs);
/* What QEMU reports as bs->filename: the leaf's path, or "DRIVER://". */
const char *bnode_leaf_filename(struct bnode *bs, char *buf, size_t len);
