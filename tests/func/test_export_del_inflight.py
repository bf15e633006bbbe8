"""block-export-del mode=hard while a request is in flight on a slow node
(null-co latency-ns), for every export type.

The export stays listed with shutting-down: true until the request has
completed; a second delete says it is already shutting down; the id cannot
be used again and the node cannot be deleted meanwhile; BLOCK_EXPORT_DELETED
comes only once the request is done, after which the id is free.

NBD runs against both daemons.  vhost-user-blk: qsd 7.2 forgets the export
at once (event before the reply) while the request still runs on its node;
bexd holds it as for NBD, and that difference is asserted.  FUSE runs on
bexd only: qsd 7.2 serves a FUSE request synchronously in its main loop, so
its monitor is blocked and cannot delete anything while one is in flight.

A request is known to be in flight without sleeping: NBD sends a
BLOCK_STATUS behind the READ (null-co does not delay it) and waits for its
reply;
vhost-user-blk does the same with a GET_ID; FUSE waits until the reader
sleeps in pread on its page (the READ is queued by then), then asks for a
statfs, which the kernel queues behind it.
"""
import json
import os
import subprocess
import threading
import time

import needs
from conftest import BUILD, TIMER_EARLY
from nbdwire import CMD_BLOCK_STATUS, CMD_READ, Conn

LAT_S = 1.5
VUB = os.environ.get("VUB_CLIENT", os.path.join(BUILD, "tests", "vhost", "vub-client"))


def slow_node(zeroes=True):
    # NBD reads without read-zeroes: QEMU would answer a hole without reading
    return ["--blockdev", "driver=null-co,node-name=n0,size=1048576,read-zeroes=%s,"
            "latency-ns=%d" % ("on" if zeroes else "off", int(LAT_S * 1e9))]


def err(q, cmd, **args):
    e = q.error(cmd, **args)
    return e["class"], e["desc"]


def check_held(q, exp_id, exp_type, t0, readd):
    """Delete hard with the request in flight; everything QEMU promises until
    the event; returns the time the event came."""
    assert q.execute("block-export-del", id=exp_id, mode="hard") == {}
    assert [e for e in q.events if e["event"] == "BLOCK_EXPORT_DELETED"] == []
    assert q.execute("query-block-exports") == [
        {"id": exp_id, "type": exp_type, "node-name": "n0", "shutting-down": True}]
    for mode in ("hard", "safe"):
        assert err(q, "block-export-del", id=exp_id, mode=mode) == \
            ("GenericError", "Export '%s' is already shutting down" % exp_id)
    assert err(q, "block-export-add", id=exp_id, **readd) == \
        ("GenericError", "Block export id '%s' is already in use" % exp_id)
    assert err(q, "blockdev-del", node_name="n0") == ("GenericError", "Node n0 is in use")
    assert q.wait_event("BLOCK_EXPORT_DELETED")["data"] == {"id": exp_id}
    done = time.monotonic()
    # null-co's delay is a bexd timer (TIMER_EARLY: its millisecond clock)
    assert done - t0 >= LAT_S - TIMER_EARLY, "deleted before the request completed"
    assert q.execute("query-block-exports") == []
    assert q.execute("block-export-add", id=exp_id, **readd) == {}
    return done


def test_nbd(impl, start_daemon, tmpdir_short):
    sock = os.path.join(tmpdir_short, "nbd.sock")
    d = start_daemon(impl, *slow_node(zeroes=False), "--nbd-server", "addr.type=unix,addr.path=" + sock,
                     "--export", "type=nbd,id=e0,node-name=n0,name=e0")
    q = d.qmp()
    c = Conn(sock, timeout=30).connect("e0", contexts=["base:allocation"])
    t0 = time.monotonic()
    c.request(CMD_READ, 0, 4096)
    status = c.request(CMD_BLOCK_STATUS, 0, 4096)
    assert c.reply().cookie == status         # the READ is in the server's hands
    check_held(q, "e0", "nbd", t0, dict(type="nbd", node_name="n0"))
    assert c.eof()                            # the client was dropped


def start_vub(sock):
    p = subprocess.Popen([VUB, sock, "inflight", "0", "4096"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    assert json.loads(p.stdout.readline()) == {"submitted": True}
    return p


def test_vhost_user_blk(impl, start_daemon, tmpdir_short):
    needs.built(VUB, "vub-client")
    sock = os.path.join(tmpdir_short, "vu.sock")
    d = start_daemon(impl, *slow_node(), "--export",
                     "type=vhost-user-blk,id=v0,node-name=n0,addr.type=unix,addr.path=" + sock)
    q = d.qmp()
    t0 = time.monotonic()
    p = start_vub(sock)
    readd = dict(type="vhost-user-blk", node_name="n0", addr={"type": "unix", "path": sock})
    if impl == "qsd":
        # 7.2 releases the export (and its node) while the request still runs
        assert q.execute("block-export-del", id="v0", mode="hard") == {}
        assert q.events[-1]["event"] == "BLOCK_EXPORT_DELETED"
        assert q.execute("query-block-exports") == []
        p.wait(timeout=30)
        return
    check_held(q, "v0", "vhost-user-blk", t0, readd)
    # hard: the front-end was dropped, its request not answered
    assert json.loads(p.stdout.readline()) == {"status": -1}
    assert p.wait(timeout=30) == 0


def test_fuse(start_daemon, tmpdir_short):
    mnt = os.path.join(tmpdir_short, "mnt")
    open(mnt, "w").close()
    d = start_daemon("bexd", *slow_node(), "--export",
                     "type=fuse,id=u0,node-name=n0,mountpoint=" + mnt)
    q = d.qmp()
    fd = os.open(mnt, os.O_RDONLY)
    got = {}

    def reader():
        got["tid"] = threading.get_native_id()
        try:
            got["data"] = os.pread(fd, 4096, 0)
        except OSError as e:
            got["error"] = e.errno

    t0 = time.monotonic()
    th = threading.Thread(target=reader)
    th.start()
    deadline = time.monotonic() + 10
    while True:                               # until the reader sleeps inside pread
        assert time.monotonic() < deadline
        if "tid" not in got:
            continue
        task = "/proc/self/task/%d/" % got["tid"]
        try:
            syscall = open(task + "syscall").read().split()[0]
            wchan = open(task + "wchan").read().strip()
        except (FileNotFoundError, IndexError):
            continue
        if syscall == "17" and wchan not in ("", "0"):
            break
    # The READ was queued before the reader went to sleep on its page, and
    # the kernel hands requests over in order: once a STATFS is answered,
    # the daemon has taken the READ.
    os.statvfs(mnt)
    check_held(q, "u0", "fuse", t0, dict(type="fuse", node_name="n0", mountpoint=mnt))
    th.join(timeout=30)
    try:
        os.close(fd)                          # the mount is gone: ENOTCONN
    except OSError:
        pass
    # the request in flight was answered before the unmount
    assert got.get("data") == bytes(4096), got
