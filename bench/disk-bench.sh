#!/bin/sh
# Real-disk benchmark (cache.direct=on, aio=io_uring/native) of bexd beside
# qemu-storage-daemon and nbdkit, over NBD, vhost-user-blk and FUSE, with a
# limit row (fio io_uring, direct=1, no server).  See bench/README.md and
# bench/disk_bench.py --help.
PATH=/usr/bin:/usr/sbin:$PATH
export PATH
exec /usr/bin/python3 "$(dirname "$0")/disk_bench.py" "$@"
