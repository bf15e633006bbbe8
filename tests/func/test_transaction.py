"""`transaction`: block actions all or nothing, against bexd and
qemu-storage-daemon (impl): the same errors, and after a failure the same
state as before (bitmaps, their bits, whether they record, busy)."""
import os
import subprocess

import pytest

MiB = 1 << 20


@pytest.fixture
def daemon(start_daemon, image, tmpdir_short):
    def start(impl):
        img = image(64 * MiB, name="%s.img" % impl)
        sock = os.path.join(tmpdir_short, "nbd-%s.sock" % impl)
        d = start_daemon(impl, "--blockdev", "driver=file,node-name=f0,filename=%s" % img,
                         "--blockdev", "driver=raw,node-name=r0,file=f0",
                         "--nbd-server", "addr.type=unix,addr.path=%s" % sock)
        qmp = d.qmp()
        qmp.execute("block-export-add", type="nbd", id="e0", node_name="r0", name="x",
                    writable=True)
        return qmp, "nbd+unix:///x?socket=%s" % sock
    return start


def A(kind, **data):
    return {"type": kind, "data": data}


def write(uri, *cmds):
    argv = ["qemu-io", "-f", "raw"]
    for c in cmds:
        argv += ["-c", c]
    subprocess.run(argv + [uri], check=True, stdout=subprocess.DEVNULL, timeout=60)


def state(qmp, node="r0"):
    """name -> (count, recording, busy, sha256) of every bitmap on node."""
    out = {}
    for n in qmp.execute("query-named-block-nodes"):
        if n["node-name"] == node:
            for b in n.get("dirty-bitmaps", []):
                h = qmp.execute("x-debug-block-dirty-bitmap-sha256", node=node,
                                name=b["name"])["sha256"]
                out[b["name"]] = (b["count"], b["recording"], b["busy"], h)
    return out


def fails(qmp, actions, desc, **kw):
    e = qmp.error("transaction", actions=actions, **kw)
    assert (e["class"], e["desc"]) == ("GenericError", desc)


def test_abort_undoes_every_bitmap_action(impl, daemon):
    qmp, uri = daemon(impl)
    qmp.execute("block-dirty-bitmap-add", node="r0", name="a")
    qmp.execute("block-dirty-bitmap-add", node="r0", name="d", disabled=True)
    qmp.execute("block-dirty-bitmap-add", node="r0", name="m", granularity=512)
    write(uri, "write 0 1", "write 5M 3M")
    qmp.execute("block-dirty-bitmap-merge", node="r0", target="d", bitmaps=["a"])
    write(uri, "write 40M 1")
    before = state(qmp)
    fails(qmp, [A("block-dirty-bitmap-add", node="r0", name="new"),
                A("block-dirty-bitmap-clear", node="r0", name="a"),
                A("block-dirty-bitmap-merge", node="r0", target="m", bitmaps=["d"]),
                A("block-dirty-bitmap-enable", node="r0", name="d"),
                A("block-dirty-bitmap-disable", node="r0", name="a"),
                A("block-dirty-bitmap-remove", node="r0", name="m"),
                A("abort")],
          "Transaction aborted using Abort action")
    assert state(qmp) == before
    # and the bitmaps still work as before: a records, d does not
    write(uri, "write 60M 1")
    after = state(qmp)
    assert after["a"][0] == before["a"][0] + 65536
    assert after["d"] == before["d"]


def test_commit(impl, daemon):
    qmp, uri = daemon(impl)
    qmp.execute("block-dirty-bitmap-add", node="r0", name="old")
    write(uri, "write 1M 1")
    # the freeze of an incremental backup: a new bitmap starts, the old one stops
    qmp.execute("transaction", actions=[
        A("block-dirty-bitmap-add", node="r0", name="new"),
        A("block-dirty-bitmap-disable", node="r0", name="old")])
    write(uri, "write 2M 1")
    s = state(qmp)
    assert s["old"][:3] == (65536, False, False)
    assert s["new"][:3] == (65536, True, False)
    # clear and merge together: the target gets the merge of what was there
    qmp.execute("transaction", actions=[
        A("block-dirty-bitmap-merge", node="r0", target="new", bitmaps=["old"]),
        A("block-dirty-bitmap-clear", node="r0", name="old"),
        A("block-dirty-bitmap-enable", node="r0", name="old")])
    s = state(qmp)
    assert s["new"][0] == 2 * 65536
    assert s["old"][:2] == (0, True)
    qmp.execute("transaction", actions=[
        A("block-dirty-bitmap-add", node="r0", name="tmp"),
        A("block-dirty-bitmap-remove", node="r0", name="tmp"),
        A("block-dirty-bitmap-remove", node="r0", name="old")])
    assert sorted(state(qmp)) == ["new"]
    qmp.execute("transaction", actions=[])


def test_errors(impl, daemon):
    qmp, uri = daemon(impl)
    qmp.execute("block-dirty-bitmap-add", node="r0", name="b")
    fails(qmp, [A("block-dirty-bitmap-add", node="r0", name="a"),
                A("block-dirty-bitmap-add", node="r0", name="a")],
          "Bitmap already exists: a")
    # a removed bitmap is busy for the rest of the transaction
    fails(qmp, [A("block-dirty-bitmap-remove", node="r0", name="b"),
                A("block-dirty-bitmap-clear", node="r0", name="b")],
          "Bitmap 'b' is currently in use by another operation and cannot be used")
    fails(qmp, [A("block-dirty-bitmap-remove", node="r0", name="b"),
                A("block-dirty-bitmap-add", node="r0", name="b")],
          "Bitmap already exists: b")
    fails(qmp, [A("block-dirty-bitmap-enable", node="r0", name="b"),
                A("block-dirty-bitmap-merge", node="r0", target="b", bitmaps=["zz"])],
          "Dirty bitmap 'zz' not found")
    fails(qmp, [A("block-dirty-bitmap-add", node="r0", name="c")],
          "Action 'block-dirty-bitmap-add' does not support Transaction property "
          "completion-mode = grouped", properties={"completion-mode": "grouped"})
    assert sorted(state(qmp)) == ["b"]
    assert state(qmp)["b"][:3] == (0, True, False)
    qmp.execute("transaction", actions=[A("block-dirty-bitmap-add", node="r0", name="c")],
                properties={"completion-mode": "individual"})
    # malformed actions are refused by the schema, as QEMU words it
    fails(qmp, [A("abort", x=1)], "Parameter 'actions[0].data.x' is unexpected")
    fails(qmp, [{"type": "abort"}], "Parameter 'actions[0].data' is missing")
    fails(qmp, [{"type": "nope", "data": {}}], "Parameter 'type' does not accept value 'nope'")
