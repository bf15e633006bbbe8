#!/bin/sh
# Side-by-side NBD benchmark: bexd vs qemu-storage-daemon, qemu-nbd, nbdkit,
# nbd-server on one RAM-backed image.  See bench/README.md; --help for options.
# The work is done by nbd_bench.py (system python: it needs nothing but fio,
# nbdcopy and the servers on PATH).
PATH=/usr/bin:/usr/sbin:$PATH
export PATH
exec /usr/bin/python3 "$(dirname "$0")/nbd_bench.py" "$@"
