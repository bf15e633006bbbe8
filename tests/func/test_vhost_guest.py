"""vhost-user-blk with a real front-end: QEMU boots a Linux guest on the export.

tests/vhost/guest.py boots qemu-system-x86_64 (TCG) with
-device vhost-user-blk-pci on the export's socket; the guest reports what
it sees (size, block sizes, queues, read-only) and writes a pattern that
the test then finds in the image file.  The same scenarios run against
qemu-storage-daemon.  Skipped only when qemu-system-x86_64 is missing.
Each boot takes about 4-6 s; the module stays well under two minutes.
"""
import hashlib
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "vhost"))
import guest  # noqa: E402

SIZE = 64 << 20



@pytest.fixture(autouse=True)
def guest_tools():
    # qemu-system-x86 and the guest's kernel come from scripts/deps.sh
    if guest.missing():
        pytest.fail("cannot boot a guest: %s (run scripts/deps.sh)" % guest.missing(),
                    pytrace=False)


def start(start_daemon, image, tmpdir_short, impl, extra="", ro=False):
    img = image(SIZE, name="%s.img" % impl)
    sock = os.path.join(tmpdir_short, "%s.sock" % impl)
    node = "driver=file,node-name=disk,filename=%s" % img
    exp = ("type=vhost-user-blk,id=vub0,node-name=disk,addr.type=unix,addr.path=%s,writable=%s%s"
           % (sock, "off" if ro else "on", extra))
    d = start_daemon(impl, "--blockdev", node, "--export", exp)
    return d, sock, img


def image_sha(img, off, length):
    with open(img, "rb") as f:
        f.seek(off)
        return hashlib.sha256(f.read(length)).hexdigest()


def check_pass(rep):
    assert rep["result"] == "PASS", rep


@pytest.mark.parametrize("queues,lbs", [(1, 512), (2, 4096)])
def test_guest_rw(impl, start_daemon, image, tmpdir_short, queues, lbs):
    d, sock, img = start(start_daemon, image, tmpdir_short, impl,
                         ",num-queues=%d,logical-block-size=%d" % (queues, lbs))
    off = 3 << 20
    rep = guest.run_guest(sock, "rw", queues=queues, off=off, mb=1)
    check_pass(rep)
    assert rep["size"] == str(SIZE)
    assert rep["lbs"] == str(lbs)
    assert rep["queues"] == str(queues)
    assert rep["ro"] == "0"
    assert rep["write_cache"] == "write_through"     # wce=0 in the config space, as qsd
    assert image_sha(img, off, 1 << 20) == rep["pattern_sha256"]
    assert d.alive()


def test_guest_read_only(impl, start_daemon, image, tmpdir_short):
    d, sock, img = start(start_daemon, image, tmpdir_short, impl, ro=True)
    with open(img, "r+b") as f:
        f.write(b"\x5a" * (1 << 20))
    rep = guest.run_guest(sock, "ro")
    check_pass(rep)
    assert rep["ro"] == "1"
    assert rep["write_refused"] == "yes"
    assert rep["head_sha256"] == image_sha(img, 0, 1 << 20)


def test_guest_reconnect(impl, start_daemon, image, tmpdir_short):
    """Two guests one after the other on the same export: the first
    front-end disconnects, the export listens again without being
    recreated, and the second sees the first one's data."""
    d, sock, img = start(start_daemon, image, tmpdir_short, impl, ",num-queues=2")
    q = d.qmp()
    rep1 = guest.run_guest(sock, "rw", queues=2, off=0, mb=1)
    check_pass(rep1)
    rep2 = guest.run_guest(sock, "ro", queues=1)
    check_pass(rep2)
    assert rep2["head_sha256"] == rep1["pattern_sha256"]
    assert [e["id"] for e in q.execute("query-block-exports")] == ["vub0"]
    assert not [e for e in q.events if e["event"] == "BLOCK_EXPORT_DELETED"]


def test_guest_too_many_queues(impl, start_daemon, image, tmpdir_short):
    """A front-end asking for more queues than the export offers is refused
    by QEMU with the export's number; the export stays usable."""
    d, sock, img = start(start_daemon, image, tmpdir_short, impl, ",num-queues=1")
    rep = guest.run_guest(sock, "info", queues=2, timeout=guest.GUEST_TIMEOUT)
    assert rep["result"] != "PASS"
    assert "The maximum number of queues supported by the backend is 1" in rep["qemu_output"]
    check_pass(guest.run_guest(sock, "info", queues=1))


def test_guest_io_through_export_churn_and_a_killed_front_end(impl, start_daemon, image,
                                                             tmpdir_short):
    """Reliability with a real front-end (the long version runs in
    tests/soak/soak.py --guest): while QMP adds and removes other nodes
    and vhost-user-blk exports in a loop, a guest streaming I/O is killed
    with SIGKILL mid-stream; the export takes the next guest, whose
    pattern is written, read back and found in the image; the daemon
    stays up with its export, and the churn never failed.  The same
    against qemu-storage-daemon."""
    import threading
    d, sock, img = start(start_daemon, image, tmpdir_short, impl, ",num-queues=2")
    q = d.qmp()                         # one monitor: the churn thread's until it ends
    churn_q = q
    stop, churned, errors = threading.Event(), [0], []

    def churn():
        try:
            while not stop.is_set():
                i = churned[0]
                churn_q.execute("blockdev-add", driver="null-co", node_name="c%d" % i)
                churn_q.execute("block-export-add", type="vhost-user-blk", id="x%d" % i,
                                node_name="c%d" % i,
                                addr={"type": "unix", "path": os.path.join(tmpdir_short, "x.sock")})
                churn_q.execute("block-export-del", id="x%d" % i)
                churn_q.wait_event("BLOCK_EXPORT_DELETED")
                churn_q.execute("blockdev-del", node_name="c%d" % i)
                churned[0] += 1
        except Exception as e:          # reported by the main thread
            errors.append(e)

    t = threading.Thread(target=churn)
    t.start()
    try:
        g = guest.Guest(sock, "stream", queues=2, off=8 << 20, mb=1)
        try:
            g.wait_line("BEX: streaming")
        finally:
            g.kill()                      # SIGKILL: requests in flight on both queues
            g.finish()
        off = 20 << 20
        rep = guest.run_guest(sock, "rw", queues=2, off=off, mb=4)
    finally:
        stop.set()
        t.join()
    assert not errors, errors
    assert churned[0] > 0
    check_pass(rep)
    assert image_sha(img, off, 4 << 20) == rep["pattern_sha256"]
    assert d.alive()
    assert [e["id"] for e in q.execute("query-block-exports")] == ["vub0"]


def test_guest_streams_across_a_snapshot(impl, start_daemon, image, tmpdir_short):
    """blockdev-snapshot under a guest's stream of direct I/O on both
    queues: the front-end stays connected; what the next guest writes is
    read back by it, lands in the overlay and not in the old image, which
    no longer changes once the command has answered."""
    import json
    import subprocess
    d, sock, img = start(start_daemon, image, tmpdir_short, impl, ",num-queues=2")
    q = d.qmp()
    ov = os.path.join(tmpdir_short, "%s-ov.qcow2" % impl)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", ov, str(SIZE)], check=True)
    q.execute("blockdev-add", driver="qcow2", node_name="ov", backing=None,
              file={"driver": "file", "filename": ov})
    g = guest.Guest(sock, "stream", queues=2, off=8 << 20, mb=1)
    try:
        g.wait_line("BEX: streaming")
        q.execute("blockdev-snapshot", node="disk", overlay="ov")
        old_sha = image_sha(img, 0, SIZE)
    finally:
        g.kill()
        g.finish()
    off = 20 << 20
    rep = guest.run_guest(sock, "rw", queues=2, off=off, mb=1)
    check_pass(rep)
    assert image_sha(img, 0, SIZE) == old_sha
    assert image_sha(img, off, 1 << 20) != rep["pattern_sha256"]
    assert [e["node-name"] for e in q.execute("query-block-exports")] == ["ov"]
    d.stop()
    spec = {"driver": "qcow2", "file": {"driver": "file", "filename": ov},
            "backing": {"driver": "file", "filename": img}}
    flat = os.path.join(tmpdir_short, "%s-flat.raw" % impl)
    subprocess.run(["qemu-img", "convert", "-O", "raw", "json:" + json.dumps(spec), flat],
                   check=True)
    assert image_sha(flat, off, 1 << 20) == rep["pattern_sha256"]
