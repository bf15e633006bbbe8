"""What the page cache holds of a file range: cachestat(2) (Linux 6.5).

Durability tests use it to see that a FLUSH (or a FUA write) really reached
the disk: after fdatasync the file's pages are neither dirty nor under
writeback, while a plain write leaves them dirty for a while (the kernel
writes dirty pages back after vm.dirty_expire_centisecs, 30 s by default).
Reading the file cannot tell: it reads the page cache either way, and a
process killed with SIGKILL leaves its writes in the page cache.
"""
import ctypes
import errno
import os

import pytest

SYS_CACHESTAT = 451          # the same number on x86_64 and the generic table (arm64)


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in
                ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def unsynced_pages(path, off, length):
    """Pages of [off, off+length) of path that are dirty or under writeback:
    0 once they are on the disk.  Skips the test on a kernel without
    cachestat (a host lacking the feature)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        rng, st = _Range(off, length), _Stat()
        r = _libc.syscall(ctypes.c_long(SYS_CACHESTAT), ctypes.c_long(fd), ctypes.byref(rng),
                          ctypes.byref(st), ctypes.c_uint(0))
        if r != 0:
            e = ctypes.get_errno()
            if e == errno.ENOSYS:
                pytest.skip("kernel without cachestat(2)")
            raise OSError(e, os.strerror(e), path)
        return st.nr_dirty + st.nr_writeback
    finally:
        os.close(fd)
