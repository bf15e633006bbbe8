#!/bin/sh
# Dirty bitmap and backup benchmark, bexd beside qemu-storage-daemon (see
# bench/bitmap_bench.py for the rows; --help for options).
PATH=/usr/bin:/usr/sbin:$PATH
export PATH
exec /usr/bin/python3 "$(dirname "$0")/bitmap_bench.py" "$@"
