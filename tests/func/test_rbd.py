"""The rbd block driver against a real one-node Ceph cluster (cephcluster.py).

Data written through an NBD export of an RBD image must be what `rbd export`
and QEMU's own rbd driver (qemu-img) read back; holes are reported where the
image was never written; errors (missing pool/image/namespace/secret, wrong
key, read-write snapshot) carry qemu-storage-daemon's exact messages (the
`impl` tests run against both daemons).  bexd-only behaviours: an
unreachable monitor fails blockdev-add within a bound, a frozen cluster
turns I/O into EIO while the daemon keeps serving other exports and
recovers when the cluster returns, and a second writer is refused by the
image's exclusive lock.
"""
import base64
import errno
import json
import os
import random
import re
import subprocess
import threading
import time
import uuid

import pytest

import needs
from cephcluster import CLIENT_TIMEOUT, ceph, private_ceph, rbd_image  # noqa: F401 (fixtures)
from conftest import BUILD, tool_json, tool_text, xfail_if_reference_died
from nbdwire import free_tcp_port, pattern

import nbd  # noqa: E402 (python3-libnbd, which scripts/deps.sh installs)

QEMU_RBD = any(os.path.exists(os.path.join(d, "block-rbd.so"))
               for d in ("/usr/lib/x86_64-linux-gnu/qemu", "/usr/lib/aarch64-linux-gnu/qemu",
                         "/usr/lib64/qemu", "/usr/lib/qemu"))


def bexd_has_rbd():
    try:
        with open(os.path.join(BUILD, "config.h")) as f:
            return "#define CONFIG_RBD" in f.read()
    except OSError:
        return True          # an installed bexd: let the tests say


@pytest.fixture(autouse=True)
def bexd_built_with_rbd():
    # scripts/deps.sh installs librbd-dev, so bexd's build has the driver:
    # a build without it did not build what the project ships.
    if not bexd_has_rbd():
        pytest.fail("bexd was built without librbd (%s/config.h lacks CONFIG_RBD): "
                    "install librbd-dev (scripts/deps.sh) and reconfigure" % BUILD,
                    pytrace=False)


@pytest.fixture(autouse=True)
def qsd_needs_rbd(request):
    # qemu-storage-daemon's rbd driver is a module (Debian: qemu-block-extra)
    if "impl" in request.fixturenames and request.getfixturevalue("impl") == "qsd" \
            and not QEMU_RBD:
        pytest.skip("qemu-storage-daemon has no rbd module (qemu-block-extra)")

MiB = 1 << 20
SIZE = 16 * MiB
RBD_MOUNT_TIMEOUT = 10      # bexd's client_mount_timeout (src/block/rbd.c)
OBJ = 4 * MiB
ENV = dict(os.environ, PATH="/usr/bin:" + os.environ.get("PATH", ""))


def rbd_opts(ceph, image, extra="", conf=None):
    return "driver=rbd,node-name=r0,pool=rbd,image=%s,conf=%s%s" % (image, conf or ceph.conf,
                                                                    extra)


def serve_rbd(start_daemon, impl, ceph, image, sock, writable=True, extra="", args=()):
    return start_daemon(
        impl,
        "--blockdev", rbd_opts(ceph, image, extra),
        "--nbd-server", "addr.type=unix,addr.path=%s" % sock,
        "--export", "type=nbd,id=e0,node-name=r0,name=r0,writable=%s"
        % ("on" if writable else "off"),
        *args)


def handle(sock, name="r0", contexts=()):
    h = nbd.NBD()
    h.set_export_name(name)
    for c in contexts:
        h.add_meta_context(c)
    h.connect_unix(sock)
    return h


def uri(sock, name="r0"):
    return "nbd+unix:///%s?socket=%s" % (name, sock)


def run(*argv, timeout=60, input_bytes=None):
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=timeout, env=ENV, input=input_bytes)
    assert r.returncode == 0, "%s -> %d: %s" % (argv, r.returncode, tool_text(r.stderr))
    return tool_text(r.stdout)


def nbd_map(sock):
    out = run("nbdinfo", "--map", "--json", uri(sock))
    return [(e["offset"], e["length"], e["description"]) for e in json.loads(out)]


# ---- data ----

def test_write_through_nbd_matches_rbd_export(impl, ceph, rbd_image, start_daemon,
                                              tmpdir_short):
    sock = os.path.join(tmpdir_short, "nbd.sock")
    serve_rbd(start_daemon, impl, ceph, rbd_image, sock)
    a, b = pattern(2 * MiB, seed=3), pattern(64 * 1024, seed=5)
    h = handle(sock)
    assert h.get_size() == SIZE
    h.pwrite(a, 1 * MiB + 512)            # unaligned, across no object boundary
    h.pwrite(b, OBJ - 32 * 1024)          # straddles objects 0 and 1
    h.flush()
    assert h.pread(len(a), 1 * MiB + 512) == a
    h.shutdown()

    expect = bytearray(SIZE)
    expect[MiB + 512:MiB + 512 + len(a)] = a
    expect[OBJ - 32 * 1024:OBJ + 32 * 1024] = b
    got = ceph.export_image(rbd_image, os.path.join(tmpdir_short, "exported.img"))
    assert got == bytes(expect)
    out = run("qemu-img", "compare", "-f", "raw", "-F", "raw", uri(sock),
              ceph.qemu_uri(rbd_image))
    assert "Images are identical" in out


def test_holes_where_never_written(impl, ceph, rbd_image, start_daemon, tmpdir_short):
    sock = os.path.join(tmpdir_short, "nbd.sock")
    serve_rbd(start_daemon, impl, ceph, rbd_image, sock)
    assert nbd_map(sock) == [(0, SIZE, "hole,zero")]
    h = handle(sock)
    h.pwrite(pattern(4096), 2 * OBJ + 4096)     # one write into object 2
    h.flush()
    h.shutdown()
    # whole objects, as QEMU reports with rbd_diff_iterate2(whole_object)
    assert nbd_map(sock) == [(0, 2 * OBJ, "hole,zero"), (2 * OBJ, OBJ, "data"),
                             (3 * OBJ, OBJ, "hole,zero")]


def test_discard_and_write_zeroes(ceph, rbd_image, start_daemon, tmpdir_short):
    sock = os.path.join(tmpdir_short, "nbd.sock")
    serve_rbd(start_daemon, "bexd", ceph, rbd_image, sock, extra=",discard=unmap")
    h = handle(sock)
    h.pwrite(pattern(2 * OBJ), 0)
    h.zero(OBJ, 0)                               # may unmap: object 0 becomes a hole
    h.zero(64 * 1024, OBJ + 4096, nbd.CMD_FLAG_NO_HOLE)   # stays allocated
    h.trim(OBJ, OBJ * 2)                         # discard never-written object 2
    h.flush()
    assert h.pread(OBJ, 0) == bytes(OBJ)
    data = h.pread(OBJ, OBJ)
    h.shutdown()
    expect = bytearray(pattern(2 * OBJ)[OBJ:])
    expect[4096:4096 + 64 * 1024] = bytes(64 * 1024)
    assert data == bytes(expect)
    assert nbd_map(sock)[0] == (0, OBJ, "hole,zero")
    got = ceph.export_image(rbd_image, os.path.join(tmpdir_short, "e.img"))
    assert got[OBJ:2 * OBJ] == bytes(expect) and got[:OBJ] == bytes(OBJ)


def test_snapshot_is_read_only_and_frozen(impl, ceph, rbd_image, start_daemon, tmpdir_short):
    sock = os.path.join(tmpdir_short, "nbd.sock")
    old = pattern(MiB, seed=7)
    d = serve_rbd(start_daemon, impl, ceph, rbd_image, sock)
    h = handle(sock)
    h.pwrite(old, 0)
    h.flush()
    ceph.rbd("snap", "create", "rbd/%s@s1" % rbd_image)
    h.pwrite(pattern(MiB, seed=8), 0)
    h.flush()
    h.shutdown()
    q = d.qmp()
    e = q.error("blockdev-add", driver="rbd", node_name="snap", pool="rbd", image=rbd_image,
                conf=ceph.conf, snapshot="s1")
    assert (e["class"], e["desc"]) == ("GenericError", "rbd snapshots are read-only")
    q.execute("blockdev-add", driver="rbd", node_name="snap", pool="rbd", image=rbd_image,
              conf=ceph.conf, snapshot="s1", read_only=True)
    q.execute("block-export-add", type="nbd", id="e1", node_name="snap", name="snap")
    h = handle(sock, "snap")
    assert h.pread(MiB, 0) == old
    assert not h.can_trim() and h.is_read_only()
    h.shutdown()


def test_internal_snapshot_commands(impl, ceph, rbd_image, start_daemon, tmpdir_short):
    """blockdev-snapshot-internal-sync and -delete- make and remove the
    image's RBD snapshots (the name is the id), on the rbd node and through
    a raw node over it, with QEMU's errors."""
    sock = os.path.join(tmpdir_short, "nbd.sock")
    d = serve_rbd(start_daemon, impl, ceph, rbd_image, sock,
                  args=("--blockdev", "driver=raw,file=r0,node-name=top"))
    h = handle(sock)
    old = pattern(MiB, seed=3)
    h.pwrite(old, 0)
    q = d.qmp()
    q.execute("blockdev-snapshot-internal-sync", device="top", name="s1")
    h.pwrite(pattern(MiB, seed=4), 0)
    h.shutdown()
    e = q.error("blockdev-snapshot-internal-sync", device="top", name="s1")
    assert e["desc"] == "Snapshot with name 's1' already exists on device 'top'"
    e = q.error("blockdev-snapshot-internal-sync", device="top", name="x" * 128)
    assert e["desc"] == ("Failed to create snapshot '%s' on device 'top': Numerical result "
                         "out of range" % ("x" * 128))
    listed = {n["node-name"]: n["image"].get("snapshots")
              for n in q.execute("query-named-block-nodes", flat=True)}
    assert [(s["id"], s["name"], s["vm-state-size"]) for s in listed["top"]] \
        == [("s1", "s1", SIZE)]
    assert "s1" in run("rbd", "-c", ceph.conf, "snap", "ls", "rbd/" + rbd_image)
    q.execute("blockdev-add", driver="rbd", node_name="snap", pool="rbd", image=rbd_image,
              conf=ceph.conf, snapshot="s1", read_only=True)
    q.execute("block-export-add", type="nbd", id="e1", node_name="snap", name="snap")
    h = handle(sock, "snap")
    assert h.pread(MiB, 0) == old
    h.shutdown()
    q.execute("block-export-del", id="e1")
    q.execute("blockdev-del", node_name="snap")
    e = q.error("blockdev-snapshot-delete-internal-sync", device="top", id="s1", name="s2")
    assert e["desc"] == "Snapshot with id 's1' and name 's2' does not exist on device 'top'"
    e = q.error("blockdev-snapshot-delete-internal-sync", device="top", id="s1")
    assert e["desc"] == "rbd need a valid snapshot name"
    info = q.execute("blockdev-snapshot-delete-internal-sync", device="top", name="s1")
    assert (info["id"], info["name"], info["vm-state-size"]) == ("s1", "s1", SIZE)
    assert "s1" not in run("rbd", "-c", ceph.conf, "snap", "ls", "rbd/" + rbd_image)


# ---- bad inputs: qsd's messages ----

BAD = [
    (dict(pool="nopool"), "error opening pool nopool: No such file or directory"),
    (dict(image="noimage"), "error reading header from noimage: No such file or directory"),
    (dict(conf="/nonexistent.conf"),
     "error reading conf file /nonexistent.conf: No such file or directory"),
    (dict(namespace="nons"), "namespace 'nons' does not exist"),
    (dict(snapshot="nosnap", read_only=True),
     "error reading header from IMG: No such file or directory"),
    (dict(key_secret="nosecret"), "No secret with id 'nosecret'"),
    (dict(key_secret="io0"), "Object with id 'io0' is not a secret"),
    (dict(user="nobody"), "error connecting: Permission denied"),
]


@pytest.mark.parametrize("opts,msg", BAD, ids=[m.split(":")[0][:24] for _, m in BAD])
def test_bad_inputs(impl, ceph, rbd_image, start_daemon, opts, msg):
    q = start_daemon(impl, "--object", "iothread,id=io0").qmp()
    args = dict(driver="rbd", node_name="r0", pool="rbd", image=rbd_image, conf=ceph.conf)
    args.update(opts)
    e = q.error("blockdev-add", **args)
    assert (e["class"], e["desc"]) == ("GenericError", msg.replace("IMG", rbd_image))
    assert q.execute("query-named-block-nodes") == []


def key_args(ceph, image, secret):
    # no conf file at all: monitor and key come from the options
    return dict(driver="rbd", node_name="r0", pool="rbd", image=image, conf="/dev/null",
                server=[{"host": "127.0.0.1", "port": ceph.mon_port}], key_secret=secret)


def test_key_secret(impl, ceph, rbd_image, start_daemon, tmpdir_short):
    keyfile = os.path.join(tmpdir_short, "key")
    with open(keyfile, "w") as f:
        f.write(ceph.key())
    q = start_daemon(impl).qmp()
    q.execute("object-add", qom_type="secret", id="k0", file=keyfile, format="base64")
    # the base64 text taken as raw bytes: a wrong key
    q.execute("object-add", qom_type="secret", id="k1", data=ceph.key())
    e = q.error("blockdev-add", **key_args(ceph, rbd_image, "k1"))
    assert (e["class"], e["desc"]) == ("GenericError", "error connecting: Invalid argument")
    q.execute("blockdev-add", **key_args(ceph, rbd_image, "k0"))
    nodes = q.execute("query-named-block-nodes")
    assert [(n["node-name"], n["drv"], n["image"]["virtual-size"]) for n in nodes] == \
        [("r0", "rbd", SIZE)]


def test_encrypted_key_secret(impl, ceph, rbd_image, start_daemon):
    needs.tool("openssl", "openssl")
    # libvirt's way: the key AES-256-CBC encrypted with a master secret
    master, iv = os.urandom(32), os.urandom(16)
    enc = subprocess.run(["openssl", "enc", "-aes-256-cbc", "-K", master.hex(), "-iv", iv.hex()],
                         input=base64.b64decode(ceph.key()), stdout=subprocess.PIPE,
                         check=True).stdout
    q = start_daemon(impl).qmp()
    q.execute("object-add", qom_type="secret", id="master",
              data=base64.b64encode(master).decode(), format="base64")
    q.execute("object-add", qom_type="secret", id="k0", keyid="master", format="base64",
              data=base64.b64encode(enc).decode(), iv=base64.b64encode(iv).decode())
    q.execute("blockdev-add", **key_args(ceph, rbd_image, "k0"))


def test_unreachable_monitor_fails_in_bounded_time(ceph, start_daemon):
    # librados alone would wait client_mount_timeout=300 s (qsd does)
    q = start_daemon("bexd").qmp()
    q.execute("object-add", qom_type="secret", id="k0", data=ceph.key(), format="base64")
    args = key_args(ceph, "img", "k0")
    args["server"] = [{"host": "127.0.0.1", "port": str(free_tcp_port())}]
    t0 = time.monotonic()
    e = q.error("blockdev-add", **args)
    took = time.monotonic() - t0
    assert (e["class"], e["desc"]) == ("GenericError", "error connecting: Connection timed out")
    # librados gives up after bexd's client_mount_timeout (measured: 10.6 s
    # on a loaded machine); qsd's librados default is 300 s
    assert RBD_MOUNT_TIMEOUT - 0.5 <= took < 2 * RBD_MOUNT_TIMEOUT, took
    assert q.execute("query-named-block-nodes") == []


# ---- a cluster that stops answering ----

def test_frozen_cluster_gives_eio_and_recovers(private_ceph, start_daemon, tmpdir_short,
                                               image):
    # A cluster of its own (the shared one never sees the outage), and the
    # daemon alone gets librados timeouts of CLIENT_TIMEOUT s (timeout_conf).
    ceph, T = private_ceph, CLIENT_TIMEOUT
    img = ceph.new_image()
    sock = os.path.join(tmpdir_short, "nbd.sock")
    other = image(MiB, name="other.img", data=pattern(MiB, seed=9))
    d = start_daemon(
        "bexd", "--blockdev", rbd_opts(ceph, img, conf=ceph.timeout_conf),
        "--blockdev", "driver=file,node-name=f0,filename=%s" % other,
        "--nbd-server", "addr.type=unix,addr.path=%s" % sock,
        "--export", "type=nbd,id=e0,node-name=r0,name=r0,writable=on",
        "--export", "type=nbd,id=e1,node-name=f0,name=f0")
    before = pattern(MiB, seed=11)
    h = handle(sock)
    h.pwrite(before, 0)
    h.flush()
    q = d.qmp()
    ceph.pause()
    try:
        failures, took = {}, {}

        def io(what, fn):
            try:
                fn()
                failures[what] = None
            except nbd.Error as ex:
                failures[what] = ex.errnum
            took[what] = time.monotonic() - t0

        def write_flush():
            # librbd's cache (on, as in QEMU) may take the write: the flush
            # cannot complete without the cluster
            h.pwrite(b"x" * 4096, OBJ)
            h.flush()
        t0 = time.monotonic()
        threads = [threading.Thread(target=io, args=("read", lambda: h.pread(4096, 4096))),
                   threading.Thread(target=io, args=("write", write_flush))]
        for t in threads:
            t.start()
        # meanwhile the daemon serves the other export and its monitor at
        # once: well before the cluster's requests time out
        f = handle(sock, "f0")
        assert f.pread(MiB, 0) == pattern(MiB, seed=9)
        assert sorted(x["id"] for x in q.execute("query-block-exports")) == ["e0", "e1"]
        # answered while both cluster requests still wait (neither has timed
        # out yet): nothing here waited for the cluster.  An order, not a
        # wall-clock bound, so a loaded machine cannot make it flake.
        assert not took, took
        f.shutdown()
        for t in threads:
            t.join(60)
        assert failures == {"read": errno.EIO, "write": errno.EIO}, took
        # each librados op is bounded by T (timeout_conf), and a request may
        # chain several: a first write to an object up to three (object map
        # update, write, flush), and a read was seen to take three timeouts
        # in a row too (9.0 s with T=3 on a loaded machine).  Bounds from
        # that limit: at least one timeout, at most four in a row plus
        # scheduling, far below "never".
        assert T - 0.5 < took["read"] < 4 * T + 6, took
        assert took["write"] < 4 * T + 6, took
        # block status does not wait for the cluster again
        t1 = time.monotonic()
        assert nbd_map(sock) == [(0, SIZE, "data")]
        assert time.monotonic() - t1 < T
        # opening another image (on the same connection) fails within the
        # bound too
        t1 = time.monotonic()
        e = q.error("blockdev-add", driver="rbd", node_name="r1", pool="rbd", image=img,
                    conf=ceph.timeout_conf, read_only=True)
        assert (e["class"], e["desc"]) == (
            "GenericError", "error reading header from %s: Connection timed out" % img)
        assert time.monotonic() - t1 < 2 * T + 3
    finally:
        ceph.resume()
    # the cluster serves again: the daemon recovers by itself (its first
    # requests may still time out while librados reconnects: EIO, retried).
    # The thawed mon and OSD need their own time to find each other again:
    # over 60 s was seen on a machine loaded twentyfold, so wait up to 120.
    deadline = time.monotonic() + 120
    ceph.wait_serving(deadline)
    after = pattern(4096, seed=12)
    errors = []
    while True:
        try:
            h.pwrite(after, OBJ)
            h.flush()
            break
        except nbd.Error as ex:
            errors.append(ex.errnum)
            assert ex.errnum == errno.EIO and time.monotonic() < deadline, errors
    assert h.pread(MiB, 0) == before and h.pread(4096, OBJ) == after
    h.shutdown()
    got = ceph.export_image(img, os.path.join(tmpdir_short, "e.img"))
    assert got[:MiB] == before and got[OBJ:OBJ + 4096] == after


# ---- two daemons on one image ----

def test_two_readers(ceph, rbd_image, start_daemon, tmpdir_short):
    data = pattern(MiB, seed=13)
    w = os.path.join(tmpdir_short, "w.sock")
    d = serve_rbd(start_daemon, "bexd", ceph, rbd_image, w)
    h = handle(w)
    h.pwrite(data, 0)
    h.flush()
    h.shutdown()
    d.stop()
    socks = [os.path.join(tmpdir_short, "r%d.sock" % i) for i in range(2)]
    for s in socks:
        serve_rbd(start_daemon, "bexd", ceph, rbd_image, s, writable=False,
                  extra=",read-only=on")
    for s in socks:
        h = handle(s)
        assert h.is_read_only() and h.pread(MiB, 0) == data
        h.shutdown()


def test_second_writer_refused_by_exclusive_lock(ceph, rbd_image, start_daemon, tmpdir_short):
    s1, s2 = (os.path.join(tmpdir_short, n) for n in ("a.sock", "b.sock"))
    d1 = serve_rbd(start_daemon, "bexd", ceph, rbd_image, s1)
    d2 = start_daemon("bexd", "--blockdev", rbd_opts(ceph, rbd_image),
                      "--nbd-server", "addr.type=unix,addr.path=%s" % s2)
    q2 = d2.qmp()
    e = q2.error("block-export-add", type="nbd", id="e0", node_name="r0", writable=True)
    assert e["class"] == "GenericError"
    assert e["desc"].startswith("Failed to get the exclusive lock of rbd image '%s': "
                                "another client holds it (127.0.0.1:" % rbd_image)
    # a read-only export of the same node is fine, and sees the writer's data
    h1 = handle(s1)
    h1.pwrite(pattern(4096, seed=14), 0)
    h1.flush()
    q2.execute("block-export-add", type="nbd", id="e0", node_name="r0")
    h2 = handle(s2)
    assert h2.pread(4096, 0) == pattern(4096, seed=14)
    h2.shutdown()
    q2.execute("block-export-del", id="e0")
    # once the first writer is gone, the second one gets the lock
    h1.shutdown()
    d1.stop()
    q2.execute("block-export-add", type="nbd", id="e1", node_name="r0", writable=True)
    h2 = handle(s2)
    h2.pwrite(pattern(4096, seed=15), 0)
    h2.flush()
    h2.shutdown()
    assert ceph.export_image(rbd_image, os.path.join(tmpdir_short, "e.img"))[:4096] == \
        pattern(4096, seed=15)


def test_iothread_export(ceph, rbd_image, start_daemon, tmpdir_short):
    # requests submitted from an iothread complete in that iothread.  (qsd
    # 7.2 aborts when a client leaves an iothread export: "Assertion
    # `qemu_in_main_thread() && nbd_server' failed", so bexd only.)
    sock = os.path.join(tmpdir_short, "nbd.sock")
    start_daemon("bexd", "--object", "iothread,id=io0",
                 "--blockdev", rbd_opts(ceph, rbd_image),
                 "--nbd-server", "addr.type=unix,addr.path=%s" % sock,
                 "--export", "type=nbd,id=e0,node-name=r0,name=r0,writable=on,iothread=io0")
    data = pattern(3 * MiB, seed=21)
    run("nbdcopy", "--flush", "--connections=2", "--requests=32", "--request-size=65536",
        "-", uri(sock), input_bytes=data)
    h = handle(sock)
    assert h.pread(len(data), 0) == data
    h.shutdown()
    got = ceph.export_image(rbd_image, os.path.join(tmpdir_short, "e.img"))
    assert got[:len(data)] == data and got[len(data):] == bytes(SIZE - len(data))


def test_nodes_share_one_cluster_connection(ceph, start_daemon, tmpdir_short):
    # nodes opened with the same connection options share one librados
    # handle (its ~15 threads): the second and third node add no thread,
    # and deleting one leaves the others working
    imgs = [ceph.new_image(prefix="share") for _ in range(3)]
    sock = os.path.join(tmpdir_short, "nbd.sock")
    d = start_daemon("bexd", "--nbd-server", "addr.type=unix,addr.path=%s" % sock)
    q = d.qmp()

    def threads():
        return len(os.listdir("/proc/%d/task" % d.pid))
    counts = []
    for i, img in enumerate(imgs):
        q.execute("blockdev-add", driver="rbd", node_name="n%d" % i, pool="rbd", image=img,
                  conf=ceph.conf)
        q.execute("block-export-add", type="nbd", id="e%d" % i, node_name="n%d" % i,
                  writable=True)
        counts.append(threads())
    assert counts[2] == counts[1] == counts[0]
    q.execute("block-export-del", id="e0")
    q.wait_event("BLOCK_EXPORT_DELETED")
    q.execute("blockdev-del", node_name="n0")
    for i in (1, 2):
        h = handle(sock, "n%d" % i)
        h.pwrite(pattern(4096, seed=i), 0)
        h.flush()
        assert h.pread(4096, 0) == pattern(4096, seed=i)
        h.shutdown()
    for img in imgs:
        assert ceph.rbd("info", "rbd/" + img).returncode == 0


@pytest.fixture(scope="module")
def luks2_image(ceph):
    """A 32 MiB LUKS2 image (formatting costs seconds of key derivation:
    done once) and the file holding its passphrase."""
    name = ceph.new_image(size="32M", prefix="enc")
    pw = os.path.join(ceph.dir, "tmp", "pass-" + name)
    with open(pw, "w") as f:
        f.write("s3cret pass")
    ceph.rbd("encryption", "format", "rbd/" + name, "luks2", pw, timeout=120)
    return name, pw


LUKS_ERRORS = [
    ("luks", "pw", "encryption load fail: Invalid argument"),
    ("luks-any", "pw", "Parameter 'format' does not accept value 'luks-any'"),
    ("luks2", "nopw", "No secret with id 'nopw'"),
]


@pytest.mark.parametrize("fmt,sec,msg", LUKS_ERRORS, ids=[f for f, _, _ in LUKS_ERRORS])
def test_luks_errors(impl, ceph, luks2_image, start_daemon, fmt, sec, msg):
    # (a wrong passphrase gives "encryption load fail: Operation not
    # permitted" after seconds of key derivation: not tested here)
    name, pw = luks2_image
    q = start_daemon(impl).qmp()
    q.execute("object-add", qom_type="secret", id="pw", file=pw)
    e = q.error("blockdev-add", driver="rbd", node_name="x", pool="rbd", image=name,
                conf=ceph.conf, encrypt={"format": fmt, "key-secret": sec})
    assert (e["class"], e["desc"]) == ("GenericError", msg)


def test_luks2_encrypted_image(ceph, luks2_image, start_daemon, tmpdir_short):
    name, pw = luks2_image
    sock = os.path.join(tmpdir_short, "nbd.sock")
    d = start_daemon("bexd", "--nbd-server", "addr.type=unix,addr.path=%s" % sock)
    q = d.qmp()
    q.execute("object-add", qom_type="secret", id="pw", file=pw)
    q.execute("blockdev-add", driver="rbd", node_name="r0", pool="rbd", image=name,
              conf=ceph.conf, encrypt={"format": "luks2", "key-secret": "pw"})
    q.execute("block-export-add", type="nbd", id="e0", node_name="r0", writable=True)
    data = pattern(MiB, seed=31)
    h = handle(sock)
    assert h.get_size() == 16 * MiB        # 32 MiB less the LUKS2 header
    h.pwrite(data, 3 * MiB + 512)
    h.flush()
    assert h.pread(MiB, 3 * MiB + 512) == data
    h.shutdown()
    raw = ceph.export_image(name, os.path.join(tmpdir_short, "raw.img"))
    assert data[:4096] not in raw          # what RADOS holds is ciphertext


# ---- qcow2 on RBD: the image grows (issue 11) ----

@pytest.mark.parametrize("iothread", [False, True], ids=["main", "iothread"])
def test_qcow2_allocating_writes_grow_the_rbd_image(impl, ceph, start_daemon, tmpdir_short,
                                                    iothread):
    """A qcow2 image on RBD that holds only its header (an `rbd import` of
    a fresh qemu-img image, 192 KiB): clusters allocated past the end of
    the RBD image grow it, as QEMU 7.2's rbd driver resizes the image before
    a write that does not fit (librbd refuses such a write: bexd answered
    EINVAL to every allocating write).  32 writes at once, to distinct
    places, partial clusters and whole ones, some FUA; with an iothread
    the export's loop grows it.  Afterwards `qemu-img check` of the
    exported image finds no error and no leak, and it holds exactly the
    writes."""
    hdr = os.path.join(tmpdir_short, "hdr.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", hdr, str(32 * MiB))
    img = "q2grow-%s" % uuid.uuid4().hex[:8]
    ceph.rbd("import", "--no-progress", hdr, "rbd/" + img)
    size0 = tool_json(ceph.rbd("info", "--format", "json", "rbd/" + img).stdout)["size"]
    sock = os.path.join(tmpdir_short, "q.sock")
    args = ["--blockdev", rbd_opts(ceph, img),
            "--blockdev", "driver=qcow2,node-name=q0,file=r0",
            "--nbd-server", "addr.type=unix,addr.path=%s" % sock,
            "--export", "type=nbd,id=e0,node-name=q0,name=q0,writable=on%s"
            % (",iothread=io0" if iothread else "")]
    if iothread:
        args = ["--object", "iothread,id=io0"] + args
    d = start_daemon(impl, *args)
    size = 32 * MiB
    mirror = bytearray(size)
    rnd = random.Random(23)
    slot = 256 * 1024
    h = handle(sock, "q0")
    for round_ in range(2):
        cookies = []
        for n, s in enumerate(rnd.sample(range(size // slot), 32)):
            off = s * slot + rnd.choice([0, 512, 4096, 65536, 65536 + 1024])
            ln = min(rnd.choice([4096, 65536, 150 * 1024]), (s + 1) * slot - off)
            data = bytes([n + 1 + 32 * round_]) * ln
            mirror[off:off + ln] = data
            cookies.append(h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), off,
                                        flags=nbd.CMD_FLAG_FUA if n % 5 == 0 else 0))
        while h.aio_in_flight() > 0:
            h.poll(-1)
        for c in cookies:
            assert h.aio_command_completed(c)     # raises the write's error
    h.flush()
    got = bytearray()
    for off in range(0, size, 4 * MiB):
        got += h.pread(4 * MiB, off)
    assert got == mirror
    h.shutdown()
    if iothread:
        xfail_if_reference_died(d, "aborted when the client left an iothread NBD export")
    d.stop()
    grown = tool_json(ceph.rbd("info", "--format", "json", "rbd/" + img).stdout)["size"]
    exported = os.path.join(tmpdir_short, "exported.qcow2")
    ceph.export_image(img, exported)
    check = tool_json(subprocess.run(["qemu-img", "check", "--output=json", exported],
                                      stdout=subprocess.PIPE, timeout=60).stdout)
    assert check.get("corruptions", 0) == 0 and check.get("leaks", 0) == 0, check
    # the image grew to the end of the last write; its last cluster may end
    # after it (bexd skips zeroing a fresh cluster's unwritten tail)
    assert size0 < grown and size0 < check["image-end-offset"] < grown + 65536, \
        (size0, check, grown)
    ref = os.path.join(tmpdir_short, "mirror.raw")
    with open(ref, "wb") as f:
        f.write(mirror)
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", exported, ref)
    ceph.rbd("rm", "--no-progress", "rbd/" + img)


def test_named_block_nodes_same_as_qsd(ceph, rbd_image, start_daemon, tmpdir_short):
    """query-named-block-nodes over rbd nodes, whole replies, the same in
    both daemons: by name and inline, with options that enter QEMU's json:
    file name (user, snapshot, server) and one that does not (key-secret)."""
    if not QEMU_RBD:
        pytest.skip("qemu-storage-daemon has no rbd module (qemu-block-extra)")
    ceph.rbd("snap", "create", "rbd/%s@s1" % rbd_image)
    keyfile = os.path.join(tmpdir_short, "key")
    with open(keyfile, "w") as f:
        f.write(ceph.key())
    base = {"driver": "rbd", "pool": "rbd", "image": rbd_image, "conf": ceph.conf}
    res = {}
    for impl in ("bexd", "qsd"):
        q = start_daemon(impl).qmp()
        q.execute("object-add", qom_type="secret", id="k0", file=keyfile, format="base64")
        q.execute("blockdev-add", node_name="r0", read_only=True, **base)
        q.execute("blockdev-add", node_name="r1", read_only=True, user="admin", snapshot="s1",
                  **base)
        q.execute("blockdev-add", node_name="r2", read_only=True, key_secret="k0", **base)
        q.execute("blockdev-add", read_only=True, **dict(key_args(ceph, rbd_image, "k0"),
                                                         node_name="r3"))
        q.execute("blockdev-add", driver="raw", node_name="w0", file="r0")
        q.execute("blockdev-add", driver="raw", node_name="w1", read_only=True,
                  file=dict(base, snapshot="s1"))
        q.execute("blockdev-add", driver="raw", node_name="w2", read_only=True, offset=512,
                  file=dict(base, user="admin"))
        res[impl] = [json.loads(re.sub(r"#block(\d+)\d\d", r"#block\1XX", json.dumps(n)))
                     for n in q.execute("query-named-block-nodes")]
        q.execute("quit")
    assert [n["node-name"] for n in res["bexd"]] == [n["node-name"] for n in res["qsd"]]
    for b, q in zip(res["bexd"], res["qsd"]):
        assert b == q, b["node-name"]
