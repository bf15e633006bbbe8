"""drive-backup (deprecated in QEMU 7.2, still used by older tools): the
backup job with a target image the command makes or finds.

Against qemu-storage-daemon: QEMU's errors and their order (the image is
made before the backup's own checks), the target node while the job runs
(discard and detect-zeroes at unmap, opened with its backing file for
sync=top, backed by the source for sync=none), the node gone after the job,
the image's header, and its data, equal to the source's at the start.  Also
as a transaction action, which an abort in the same transaction undoes
(the image file stays, as QEMU leaves it).
"""
import json
import os
import subprocess

import pytest

from test_block_stream import SIZE, make_chain, qemu_img


@pytest.fixture
def chain(impl, start_daemon, tmpdir_short):
    paths, want = make_chain(tmpdir_short)
    daemon = start_daemon(impl)
    m = daemon.qmp()
    m.execute("blockdev-add", driver="qcow2", node_name="top",
              file={"driver": "file", "filename": paths[2]})
    return daemon, m, paths, tmpdir_short


def nodes(m):
    return sorted((n["node-name"] if not n["node-name"].startswith("#") else "#", n["drv"],
                   n["ro"], os.path.basename(n["file"]).split('"')[0],
                   os.path.basename(n.get("backing_file") or ""), n["detect_zeroes"])
                  for n in m.execute("query-named-block-nodes"))


def test_errors(chain):
    daemon, m, paths, d = chain

    def err(**a):
        a.setdefault("device", "top")
        a.setdefault("sync", "full")
        return m.error("drive-backup", **a)["desc"]
    assert err(device="nope", target=os.path.join(d, "x.qcow2")) == \
        "Cannot find device='nope' nor node-name='nope'"
    assert err(target=os.path.join(d, "x.raw"), sync="top", format="raw") == \
        "Backing file not supported for file format 'raw'"
    assert err(target="/nonexistent/x.qcow2") == \
        "Could not create '/nonexistent/x.qcow2': No such file or directory"
    missing = os.path.join(d, "missing.qcow2")
    assert err(target=missing, mode="existing") == \
        "Could not open '%s': No such file or directory" % missing
    assert err(target=os.path.join(d, "g.qcow2"), sync="bitmap") == \
        "must provide a valid bitmap name for 'bitmap' sync mode"
    assert os.path.exists(os.path.join(d, "g.qcow2"))      # made before the check
    assert not os.path.exists(os.path.join(d, "x.qcow2"))
    assert "g.qcow2" not in [n[3] for n in nodes(m)]


@pytest.mark.parametrize("sync, mode, name", [
    ("full", "absolute-paths", "f.qcow2"), ("top", "absolute-paths", "t2.qcow2"),
    ("none", "absolute-paths", "n.qcow2"), ("full", "existing", "ex.qcow2"),
    ("full", "absolute-paths", "r.raw")])
def test_backup(chain, sync, mode, name):
    daemon, m, paths, d = chain
    target = os.path.join(d, name)
    if mode == "existing":
        qemu_img("create", "-q", "-f", "qcow2", target, str(SIZE))
    before = nodes(m)
    a = {"format": "raw"} if name.endswith(".raw") else {}
    m.execute("drive-backup", device="top", target=target, sync=sync, mode=mode, job_id="b",
              speed=1 if sync == "none" else 0, **a)
    now = nodes(m)
    during = [n for n in now if n not in before]
    fmt = "raw" if name.endswith(".raw") else "qcow2"
    backing = {"full": "", "top": "mid.qcow2", "none": "top.qcow2"}[sync]
    assert ("#", fmt, False, name, backing, "unmap") in during
    if sync == "top":               # its backing file is opened anew, from its header
        assert [n[3] for n in now if n[1] == "qcow2"].count("mid.qcow2") == 2
    if sync == "none":
        m.execute("block-job-cancel", device="b")
        assert m.wait_event("BLOCK_JOB_CANCELLED")["data"]["type"] == "backup"
    else:
        e = m.wait_event("BLOCK_JOB_COMPLETED")["data"]
        assert (e["type"], e.get("error")) == ("backup", None)
    while m.wait_event("JOB_STATUS_CHANGE")["data"]["status"] != "null":
        pass
    assert nodes(m) == before
    daemon.stop()
    info = json.loads(qemu_img("info", "--output=json", target))
    assert info["format"] == fmt
    assert os.path.basename(info.get("backing-filename") or "") == backing
    if sync != "none":
        subprocess.run(["qemu-img", "compare", "-q", paths[2], target], check=True)


def test_transaction(chain):
    daemon, m, paths, d = chain
    target = os.path.join(d, "tx.qcow2")
    act = {"type": "drive-backup",
           "data": {"device": "top", "target": target, "sync": "full", "job-id": "t"}}
    e = m.error("transaction", actions=[act, {"type": "abort", "data": {}}])
    assert e["desc"] == "Transaction aborted using Abort action"
    assert os.path.exists(target) and m.execute("query-jobs") == []
    m.execute("transaction", actions=[act])
    e = m.wait_event("BLOCK_JOB_COMPLETED")["data"]
    assert (e["type"], e["len"], e.get("error")) == ("backup", SIZE, None)
    daemon.stop()
    subprocess.run(["qemu-img", "compare", "-q", paths[2], target], check=True)
