"""query-block and x-debug-query-block-graph, against bexd and qsd.

qemu-storage-daemon has no guest devices: query-block is always [].  The
graph lists a "block-backend" per export, a "block-driver" per node, and an
edge per use with the permissions held and shared, numbered and ordered as
QEMU walks it, so the whole answer is compared with qsd's for the same
configuration (only generated node names are normalised).
"""
import json
import os

import pytest

from conftest import QSD


def graph(q):
    g = q.execute("x-debug-query-block-graph")
    for n in g["nodes"]:
        if n["name"].startswith("#"):
            n["name"] = "#auto"
    return g


def named(g):
    """The graph as (parent, edge, child, perm, shared) with names for ids."""
    names = {n["id"]: "%s:%s" % (n["type"], n["name"]) for n in g["nodes"]}
    return sorted((names[e["parent"]], e["name"], names[e["child"]],
                   tuple(e["perm"]), tuple(e["shared-perm"])) for e in g["edges"])


def serve(start_daemon, impl, tmp, extra=()):
    img = os.path.join(tmp, "%s.img" % impl)
    with open(img, "wb") as f:
        f.truncate(1 << 20)
    mnt = os.path.join(tmp, "%s.mnt" % impl)
    open(mnt, "w").close()
    d = start_daemon(
        impl,
        "--blockdev", "driver=file,node-name=f0,filename=" + img,
        "--blockdev", "driver=raw,node-name=r0,file=f0",
        "--blockdev", "driver=null-co,node-name=n0",
        "--blockdev", json.dumps({"driver": "raw", "node-name": "r1", "read-only": True,
                                  "file": {"driver": "file", "filename": img,
                                           "read-only": True}}),
        "--nbd-server", "addr.type=unix,addr.path=%s/%s-nbd.sock" % (tmp, impl),
        "--export", "type=nbd,id=e0,node-name=r0,writable=on",
        "--export", "type=nbd,id=e1,node-name=n0",
        "--export", "type=vhost-user-blk,id=v0,node-name=f0,writable=on,"
                    "addr.type=unix,addr.path=%s/%s-vu.sock" % (tmp, impl),
        *extra)
    return d, mnt


def test_query_block_is_empty(impl, start_daemon, tmpdir_short):
    d, _ = serve(start_daemon, impl, tmpdir_short)
    q = d.qmp()
    assert q.execute("query-block") == []
    e = q.error("query-block", x=1)
    assert (e["class"], e["desc"]) == ("GenericError", "Parameter 'x' is unexpected")


def test_graph_structure(impl, start_daemon, tmpdir_short):
    d, _ = serve(start_daemon, impl, tmpdir_short)
    g = graph(d.qmp())
    ids = [n["id"] for n in g["nodes"]]
    assert sorted(ids) == list(range(1, 9))
    rw, r, all4 = ["write", "consistent-read"], ["consistent-read"], \
        ["resize", "write-unchanged", "write", "consistent-read"]
    no_resize = all4[1:]
    assert named(g) == sorted([
        ("block-backend:", "root", "block-driver:r0", tuple(rw), tuple(no_resize)),
        ("block-backend:", "root", "block-driver:n0", tuple(r), tuple(no_resize)),
        ("block-backend:", "root", "block-driver:f0", tuple(rw), tuple(all4)),
        ("block-driver:r0", "file", "block-driver:f0", tuple(rw), tuple(no_resize)),
        ("block-driver:r1", "file", "block-driver:#auto", (), tuple(all4)),
    ])
    # the first export's backend is numbered first, its node second
    assert g["edges"][-1] == {"parent": 1, "child": 2, "name": "root",
                              "perm": rw, "shared-perm": no_resize}


def test_graph_follows_changes(impl, start_daemon, tmpdir_short):
    d, mnt = serve(start_daemon, impl, tmpdir_short)
    q = d.qmp()
    q.execute("block-export-del", id="e0")
    q.wait_event("BLOCK_EXPORT_DELETED")
    q.execute("blockdev-del", node_name="r0")
    q.execute("blockdev-add", driver="raw", node_name="r2", file="f0", read_only=True)
    g = named(graph(q))
    assert ("block-driver:r2", "file", "block-driver:f0", ("consistent-read",),
            ("resize", "write-unchanged", "write", "consistent-read")) not in g
    assert ("block-driver:r2", "file", "block-driver:f0", (),
            ("resize", "write-unchanged", "write", "consistent-read")) in g
    assert not any("r0" in x[0] or "r0" in x[2] for x in g)


@pytest.mark.skipif(not QSD, reason="qemu-storage-daemon not installed")
@pytest.mark.parametrize("fuse", [False, True], ids=["nbd-vhost", "fuse"])
def test_graph_same_as_qsd(start_daemon, tmpdir_short, fuse):
    out = {}
    for impl in ("bexd", "qsd"):
        d, mnt = serve(start_daemon, impl, tmpdir_short)
        q = d.qmp()
        if fuse:
            q.execute("block-export-add", type="fuse", id="u0", node_name="r1", mountpoint=mnt)
        q.execute("blockdev-add", driver="null-co", node_name="n1", size=4096)
        q.execute("blockdev-add", driver="raw", node_name="r3",
                  file={"driver": "null-co", "size": 8192})
        q.execute("block-export-add", type="nbd", id="e3", node_name="r3", writable=True)
        q.execute("block-export-del", id="e1")
        q.wait_event("BLOCK_EXPORT_DELETED")
        out[impl] = graph(q)
        d.stop()
    assert out["bexd"] == out["qsd"]
