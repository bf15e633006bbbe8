#!/bin/sh
# qcow2 rows beside qemu-storage-daemon and qemu-nbd -f qcow2 (see qcow2_bench.py --help).
PATH=/usr/bin:/usr/sbin:$PATH
export PATH
exec /usr/bin/python3 "$(dirname "$0")/qcow2_bench.py" "$@"
