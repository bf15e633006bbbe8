"""Commands that write a qcow2 image's metadata while the main loop has
image I/O of its own under way.

A block job runs in the main loop; its reads of a qcow2 node take the
image's metadata lock on an L2 table miss and wait for the file's I/O,
which the main loop completes.  block-dirty-bitmap-add and -remove of a
persistent bitmap write the image's bitmap directory under the same lock.
bexd used to do that work on a thread of its own while the main thread
waited for it: the job could never give the lock back, and the daemon hung
for ever.  The work now waits in the main loop (qmp_call_co), as QEMU's
coroutine does.

The image has 512-byte clusters and a tiny L2 cache, on a real file system
with cache.direct=on, so the job misses the cache at almost every read and
those reads really wait.  Every command must answer within the monitor's
timeout, and the image must be clean afterwards.
"""
import json
import os
import socket
import subprocess

import pytest

import needs

from conftest import tool_text

MiB = 1 << 20


def qemu_img(*args):
    r = subprocess.run(["qemu-img"] + list(args), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT)
    assert r.returncode == 0, tool_text(r.stdout)
    return r.stdout


def job_reading(impl, start_daemon, tmpdir_short):
    """A daemon whose mirror job reads a qcow2 image of 512-byte clusters
    through a tiny L2 cache, with O_DIRECT: (image, daemon, monitor)."""
    img = os.path.join(tmpdir_short, "q.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", img, "64M")
    subprocess.run(["qemu-io", "-c", "write -P 1 0 32M", img], stdout=subprocess.DEVNULL,
                   check=True)
    if not needs.o_direct_works(img):
        pytest.skip("no O_DIRECT in %s" % tmpdir_short)
    d = start_daemon(impl,
                     "--blockdev", "driver=file,node-name=f0,filename=%s,cache.direct=on" % img,
                     "--blockdev", "driver=qcow2,node-name=q0,file=f0,l2-cache-size=4096",
                     "--blockdev", "driver=null-co,node-name=t0,size=%d" % (64 * MiB))
    q = d.qmp()
    q.sock.settimeout(20)          # a hang is a failure, not a wait
    q.execute("blockdev-mirror", job_id="m0", device="q0", target="t0", sync="full")
    return img, d, q


def stop_and_list_bitmaps(img, d, q):
    """Cancel the job, stop the daemon: the bitmaps stored in the image."""
    q.execute("block-job-cancel", device="m0", force=True)
    q.wait_event("BLOCK_JOB_CANCELLED")
    d.stop()
    info = json.loads(qemu_img("info", "--output=json", img))
    return [b["name"] for b in info["format-specific"]["data"].get("bitmaps", [])]


def test_bitmaps_while_a_job_reads(impl, start_daemon, tmpdir_short):
    img, d, q = job_reading(impl, start_daemon, tmpdir_short)
    try:
        for i in range(60):
            q.execute("block-dirty-bitmap-add", node="q0", name="b%d" % i, persistent=True)
            q.execute("block-dirty-bitmap-remove", node="q0", name="b%d" % i)
        q.execute("block-dirty-bitmap-add", node="q0", name="kept", persistent=True)
    except socket.timeout:
        pytest.fail("a bitmap command did not answer while the job read the image")
    names = stop_and_list_bitmaps(img, d, q)
    assert names == ["kept"]
    qemu_img("check", img)


def test_transaction_bitmap_while_a_job_reads(impl, start_daemon, tmpdir_short):
    """A transaction's bitmap actions run in the main thread with every
    bitmap frozen, and cannot wait there for the job's lock.  They succeed
    all the same: the bitmap is in memory at once and its directory entry
    is written as soon as the main loop gets the lock (qsd 7.2 writes it at
    close).  Every bitmap added is in the image after the stop."""
    img, d, q = job_reading(impl, start_daemon, tmpdir_short)
    added = []
    try:
        for i in range(40):
            q.execute("transaction", actions=[
                {"type": "block-dirty-bitmap-add",
                 "data": {"node": "q0", "name": "t%d" % i, "persistent": True}}])
            added.append("t%d" % i)
            if i % 4 == 3:          # and a removal now and then
                q.execute("transaction", actions=[
                    {"type": "block-dirty-bitmap-remove",
                     "data": {"node": "q0", "name": added.pop(0)}}])
    except socket.timeout:
        pytest.fail("a transaction did not answer while the job read the image")
    names = stop_and_list_bitmaps(img, d, q)
    assert sorted(names) == sorted(added)
    qemu_img("check", img)
