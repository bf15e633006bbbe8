"""Throttle groups (--object throttle-group) and the throttle filter node,
on both daemons: the rates a client sees through an NBD export of a
throttled node, a group shared by two nodes, limits changed at run time
with qom-set, and QEMU's checks, errors and QOM view.
"""
import os
import threading
import time

import nbd
import pytest

from conftest import xfail_if_reference_died

KiB = 1 << 10
MiB = 1 << 20


def serve(impl, start_daemon, tmpdir, *group, nodes=("t0",), iothread=False):
    """A raw image behind throttle nodes of one group, each exported over
    NBD under its own name: (daemon, monitor, socket)."""
    img = os.path.join(tmpdir, "d.img")
    with open(img, "wb") as f:
        f.write(b"\x5a" * (8 * MiB))
    sock = os.path.join(tmpdir, "nbd.sock")
    args = ["--object", "throttle-group,id=tg0" + "".join("," + g for g in group),
            "--blockdev", "driver=file,node-name=f0,filename=%s" % img,
            "--nbd-server", "addr.type=unix,addr.path=%s" % sock]
    if iothread:
        args += ["--object", "iothread,id=io0"]
    for n in nodes:
        args += ["--blockdev", "driver=throttle,node-name=%s,throttle-group=tg0,file=f0" % n,
                 "--export", "type=nbd,id=e%s,node-name=%s,name=%s,writable=on%s"
                 % (n, n, n, ",iothread=io0" if iothread else "")]
    d = start_daemon(impl, *args)
    return d, d.qmp(), sock


def connect(sock, name="t0"):
    h = nbd.NBD()
    h.connect_uri("nbd+unix:///%s?socket=%s" % (name, sock))
    return h


def timed(fn):
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


def read_all(h, total, size):
    for off in range(0, total, size):
        assert h.pread(size, off % (8 * MiB)) == b"\x5a" * size


@pytest.mark.parametrize("iothread", [False, True], ids=["main", "iothread"])
def test_bytes_per_second(impl, start_daemon, tmpdir_short, iothread):
    # 1 MiB/s: the first tenth of a second's worth goes at once, then the rate
    d, m, sock = serve(impl, start_daemon, tmpdir_short, "x-bps-total=%d" % MiB,
                       iothread=iothread)
    h = connect(sock)
    t = timed(lambda: read_all(h, 2 * MiB, 64 * KiB))
    assert 1.6 < t < 3.0, t
    # writes share the total
    t = timed(lambda: [h.pwrite(b"\x5a" * (64 * KiB), o) for o in range(0, MiB, 64 * KiB)])
    assert 0.7 < t < 1.8, t
    if iothread:
        h.shutdown()
        xfail_if_reference_died(d, "aborted when a client left an iothread NBD export")


def test_operations_per_second_and_directions(impl, start_daemon, tmpdir_short):
    d, m, sock = serve(impl, start_daemon, tmpdir_short, "limits.iops-write=50")
    h = connect(sock)
    # reads are not limited
    assert timed(lambda: read_all(h, 4 * MiB, 4 * KiB)) < 1.5
    # 55 writes at 50/s: five at once, then one each 20 ms
    t = timed(lambda: [h.pwrite(b"\x5a" * 4096, i * 4096) for i in range(55)])
    assert 0.8 < t < 1.8, t


def test_iops_size_counts_large_requests_as_several(impl, start_daemon, tmpdir_short):
    d, m, sock = serve(impl, start_daemon, tmpdir_short, "x-iops-total=40,x-iops-size=4096")
    h = connect(sock)
    # 64 KiB reads count as 16 operations each: 10 of them are 160 at 40/s
    t = timed(lambda: read_all(h, 640 * KiB, 64 * KiB))
    assert 3.0 < t < 5.5, t


def test_a_group_limits_its_nodes_together(impl, start_daemon, tmpdir_short):
    d, m, sock = serve(impl, start_daemon, tmpdir_short, "limits.bps-read=%d" % MiB,
                       nodes=("t0", "t1"))
    hs = [connect(sock, "t0"), connect(sock, "t1")]
    th = [threading.Thread(target=read_all, args=(h, MiB, 64 * KiB)) for h in hs]
    t0 = time.monotonic()
    for t in th:
        t.start()
    for t in th:
        t.join()
    t = time.monotonic() - t0
    assert 1.6 < t < 3.0, t             # 2 MiB through one 1 MiB/s group


def test_limits_change_at_run_time(impl, start_daemon, tmpdir_short):
    d, m, sock = serve(impl, start_daemon, tmpdir_short, "limits.bps-total=%d" % (256 * KiB))
    h = connect(sock)
    t = timed(lambda: read_all(h, 512 * KiB, 64 * KiB))
    assert 1.5 < t < 3.0, t
    m.execute("qom-set", path="/objects/tg0", property="limits",
              value={"bps-total": 64 * MiB})
    assert timed(lambda: read_all(h, 4 * MiB, 64 * KiB)) < 1.0
    lim = m.execute("qom-get", path="/objects/tg0", property="limits")
    assert lim["bps-total"] == 64 * MiB and lim["bps-total-max-length"] == 1
    assert m.execute("qom-get", path="/objects/tg0", property="x-bps-total") == 64 * MiB
    # only the fields named change; a bad combination changes nothing
    m.execute("qom-set", path="/objects/tg0", property="limits", value={"iops-total": 1000})
    lim = m.execute("qom-get", path="/objects/tg0", property="limits")
    assert (lim["bps-total"], lim["iops-total"]) == (64 * MiB, 1000)
    assert m.error("qom-set", path="/objects/tg0", property="limits",
                   value={"iops-read": 5})["desc"] == \
        "bps/iops/max total values and read/write values cannot be used at the same time"
    assert m.error("qom-set", path="/objects/tg0", property="x-iops-total",
                   value=5)["desc"] == "Property cannot be set after initialization"


def test_errors_and_lifetime(impl, start_daemon, tmpdir_short):
    m = start_daemon(impl, "--object", "throttle-group,id=tg0,x-bps-total=1000000").qmp()

    def add_err(**props):
        return m.error("object-add", qom_type="throttle-group", id="tg1", **props)["desc"]

    assert add_err(limits={"bps-total": 10, "bps-read": 5}) == \
        "bps/iops/max total values and read/write values cannot be used at the same time"
    assert add_err(limits={"bps-total-max": 10}) == \
        "bps_max/iops_max require corresponding bps/iops values"
    assert add_err(limits={"bps-total": 10, "bps-total-max": 5}) == \
        "bps_max/iops_max cannot be lower than bps/iops"
    assert add_err(limits={"bps-total": 10, "bps-total-max-length": 5}) == \
        "burst length set without burst rate"
    assert add_err(limits={"bps-total": 10, "bps-total-max-length": 0}) == \
        "the burst length cannot be 0"
    assert add_err(limits={"iops-size": 4096}) == "iops size requires an iops value to be set"
    assert add_err(limits={"bps-total": 10 ** 16}) == \
        "bps/iops/max values must be within [0, 1000000000000000]"
    assert add_err(x_bps_total=-1) == "Property values cannot be negative"
    # the flat properties win over limits
    m.execute("object-add", qom_type="throttle-group", id="tg1", limits={"bps-total": 10},
              x_bps_total=20)
    assert m.execute("qom-get", path="/objects/tg1", property="limits")["bps-total"] == 20
    names = {p["name"] for p in m.execute("qom-list-properties", typename="throttle-group")}
    assert {"type", "limits", "x-bps-total", "x-iops-size", "x-iops-write-max-length"} <= names
    assert len(names) == 21

    m.execute("blockdev-add", driver="null-co", node_name="n0")
    assert m.error("blockdev-add", driver="throttle", node_name="t0", file="n0")["desc"] == \
        "Parameter 'throttle-group' is missing"
    assert m.error("blockdev-add", driver="throttle", node_name="t0", file="n0",
                   throttle_group="nope")["desc"] == "Throttle group 'nope' does not exist"
    m.execute("blockdev-add", driver="throttle", node_name="t0", file="n0",
              throttle_group="tg0")
    node = {n["node-name"]: n for n in m.execute("query-named-block-nodes")}["t0"]
    assert node["drv"] == "throttle"
    assert node["file"] == ('json:{"throttle-group": "tg0", "driver": "throttle", '
                            '"file": {"driver": "null-co"}}')
    assert m.error("object-del", id="tg0")["desc"] == \
        "object 'tg0' is in use, can not be deleted"
    # a reopen moves the node to another group; the old one is free again
    m.execute("blockdev-reopen", options=[{"driver": "throttle", "node-name": "t0",
                                           "file": "n0", "throttle-group": "tg1"}])
    m.execute("object-del", id="tg0")
    assert m.error("object-del", id="tg1")["desc"] == \
        "object 'tg1' is in use, can not be deleted"
    m.execute("blockdev-del", node_name="t0")
    m.execute("object-del", id="tg1")



def test_removal_and_stop_do_not_wait_out_the_limits(impl, start_daemon, tmpdir_short):
    """Writes queued in a group when their export is removed (hard) go at
    once, as QEMU's drain lets them: at 2 writes a second, 20 would keep
    the export for 10 s.  The same for the daemon's stop."""
    d, m, sock = serve(impl, start_daemon, tmpdir_short, "x-iops-total=2")
    h = connect(sock)
    cookies = [h.aio_pwrite(bytes([i]) * 4096, i * 4096) for i in range(1, 21)]
    while not h.aio_command_completed(cookies[0]):
        h.poll(1)                       # the server has them: the first is answered
    t0 = time.monotonic()
    m.execute("block-export-del", id="et0", mode="hard")
    m.wait_event("BLOCK_EXPORT_DELETED")
    t = time.monotonic() - t0
    if impl == "qsd" and t >= 2:
        pytest.xfail("qemu-storage-daemon 7.2 waits out the limits (%.1f s)" % t)
    assert t < 2, t
    m.execute("blockdev-del", node_name="t0")
    m.execute("object-del", id="tg0")

    # a stop: SIGTERM with writes queued
    other = os.path.join(tmpdir_short, "b")
    os.makedirs(other)
    d2, m2, sock2 = serve(impl, start_daemon, other, "x-iops-total=2")
    h2 = connect(sock2)
    cookies = [h2.aio_pwrite(bytes([i]) * 4096, i * 4096) for i in range(1, 21)]
    while not h2.aio_command_completed(cookies[0]):
        h2.poll(1)
    t = timed(d2.stop)
    if impl == "qsd" and t >= 3:
        pytest.xfail("qemu-storage-daemon 7.2 waits out the limits at a stop (%.1f s)" % t)
    assert t < 3, t
