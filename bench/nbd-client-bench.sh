#!/bin/sh
# The nbd block driver (an NBD client node) side by side: bexd vs
# qemu-storage-daemon (and nbdkit's nbd plugin as a proxy): mirror and
# backup onto an NBD target, and a remote export served again.  See
# bench/nbd_client_bench.py; --help for options.
PATH=/usr/bin:/usr/sbin:$PATH
export PATH
exec /usr/bin/python3 "$(dirname "$0")/nbd_client_bench.py" "$@"
