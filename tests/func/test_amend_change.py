"""x-blockdev-amend and x-blockdev-change, as qemu-storage-daemon 7.2 has
them.

qcow2's amend changes only the keys of an encrypted image, and bexd opens
no encrypted image: an amend job of a qcow2 node ends well having changed
nothing, one that names keys fails as QEMU's does (the job's error).  Only
quorum nodes take or give children in QEMU, and bexd has none: every
x-blockdev-change ends in QEMU's error for its arguments.  Both daemons
run the same commands and must answer alike, events and job states too.
"""
import os
import subprocess

import pytest


@pytest.fixture
def nodes(impl, start_daemon, tmpdir_short):
    q = os.path.join(tmpdir_short, "a.qcow2")
    r = os.path.join(tmpdir_short, "r.raw")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", q, "1M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", r, "1M"], check=True)
    m = start_daemon(impl).qmp()
    m.execute("blockdev-add", driver="qcow2", node_name="q",
              file={"driver": "file", "filename": q, "node-name": "qf"})
    m.execute("blockdev-add", driver="raw", node_name="r",
              file={"driver": "file", "filename": r, "node-name": "rf"})
    return m, q


@pytest.mark.parametrize("args, desc", [
    ({"parent": "q"}, "Either child or node must be specified"),
    ({"parent": "nope", "node": "r"}, "Cannot find device='nope' nor node-name='nope'"),
    ({"parent": "q", "child": "x"}, "Node 'q' does not have child 'x'"),
    ({"parent": "q", "child": "x", "node": "r"}, "The parameters child and node are in conflict"),
    ({"parent": "q", "child": "file"}, "The node q does not support removing a child"),
    ({"parent": "q", "node": "r"}, "The node q does not support adding a child"),
    ({"parent": "qf", "node": "rf"}, "The node qf does not support adding a child"),
    ({"parent": "q", "node": "nope"}, "Node 'nope' not found"),
])
def test_change_errors(nodes, args, desc):
    m, _ = nodes
    e = m.error("x-blockdev-change", **args)
    assert (e["class"], e["desc"]) == ("GenericError", desc)


@pytest.mark.parametrize("args, desc", [
    ({"job_id": "j", "node_name": "nope", "options": {"driver": "qcow2"}},
     "Cannot find device='' nor node-name='nope'"),
    ({"job_id": "j", "node_name": "q", "options": {"driver": "raw"}},
     "x-blockdev-amend doesn't support changing the block driver"),
    ({"job_id": "j", "node_name": "r", "options": {"driver": "raw"}},
     "Driver does not support x-blockdev-amend"),
    ({"job_id": "j", "node_name": "qf", "options": {"driver": "file"}},
     "Driver does not support x-blockdev-amend"),
    ({"job_id": "", "node_name": "q", "options": {"driver": "qcow2"}}, "Invalid job ID ''"),
    ({"node_name": "q", "options": {"driver": "qcow2"}}, "Parameter 'job-id' is missing"),
    ({"job_id": "j", "node_name": "q", "options": {"driver": "qcow2", "encrypt": {}}},
     "Parameter 'options.encrypt.format' is missing"),
    ({"job_id": "j", "node_name": "q",
      "options": {"driver": "qcow2", "encrypt": {"format": "luks"}}},
     "Parameter 'options.encrypt.state' is missing"),
])
def test_amend_errors(nodes, args, desc):
    m, _ = nodes
    e = m.error("x-blockdev-amend", **args)
    assert (e["class"], e["desc"]) == ("GenericError", desc)


def statuses(m, job):
    out = []
    while not out or out[-1] != "concluded":
        e = m.wait_event("JOB_STATUS_CHANGE")
        if e["data"]["id"] == job:
            out.append(e["data"]["status"])
    return out


@pytest.mark.parametrize("encrypt", [False, True], ids=["plain", "keys"])
def test_amend_job(nodes, encrypt):
    m, path = nodes
    with open(path, "rb") as f:
        before = f.read()
    opts = {"driver": "qcow2"}
    if encrypt:
        opts["encrypt"] = {"format": "luks", "state": "active", "new-secret": "s"}
    m.execute("x-blockdev-amend", job_id="j", node_name="q", options=opts, force=True)
    if encrypt:
        assert statuses(m, "j") == ["created", "running", "aborting", "concluded"]
    else:
        assert statuses(m, "j") == ["created", "running", "waiting", "pending", "concluded"]
    [j] = m.execute("query-jobs")
    want = {"id": "j", "type": "amend", "status": "concluded", "current-progress": 1,
            "total-progress": 1}
    if encrypt:
        want["error"] = "image is not encrypted, can't amend"
    assert j == want
    assert m.error("x-blockdev-amend", job_id="j", node_name="q",
                   options={"driver": "qcow2"})["desc"] == "Job ID 'j' already in use"
    m.execute("job-dismiss", id="j")
    assert m.wait_event("JOB_STATUS_CHANGE")["data"] == {"id": "j", "status": "null"}
    assert m.execute("query-jobs") == []
    # the node goes on, and the image is as it was
    m.execute("blockdev-del", node_name="q")
    with open(path, "rb") as f:
        assert f.read() == before
