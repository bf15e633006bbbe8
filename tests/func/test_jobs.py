"""Jobs and blockdev-create, against bexd and qemu-storage-daemon 7.2.

A create job says "created" and "running" before the command's reply, and
then, when the driver is done, "waiting", "pending", "concluded" (or
"aborting", "concluded"); it stays concluded until job-dismiss ("null").
Those statuses, query-jobs' entries, the verbs' errors in every status a
create job can be observed in, and the files made, are asserted for both
daemons.  Where a job must be caught while it works, the image is a file
on a FUSE export of a stopped daemon (SIGSTOP), so the work blocks until
the test lets it go; qsd opens the file in its main loop (and so would hang
there), so those tests run against bexd alone.
"""
import os
import signal
import subprocess

import pytest

from conftest import QSD

MiB = 1 << 20


def job_statuses(q, job_id, until=("concluded",)):
    """JOB_STATUS_CHANGE statuses of job_id, up to one in `until`."""
    out = []
    while not out or out[-1] not in until:
        ev = q.wait_event("JOB_STATUS_CHANGE")
        if ev["data"]["id"] == job_id:
            out.append(ev["data"]["status"])
    return out


def create(q, job_id, **opts):
    """blockdev-create; returns (statuses up to concluded, query-jobs entry)
    and dismisses the job."""
    q.execute("blockdev-create", job_id=job_id, options=opts)
    statuses = job_statuses(q, job_id)
    info = [j for j in q.execute("query-jobs") if j["id"] == job_id]
    q.execute("job-dismiss", id=job_id)
    assert job_statuses(q, job_id, ("null",)) == ["null"]
    assert all(j["id"] != job_id for j in q.execute("query-jobs"))
    return statuses, info[0]


OK = ["created", "running", "waiting", "pending", "concluded"]
FAILED = ["created", "running", "aborting", "concluded"]


def done_info(job_id, error=None):
    info = {"id": job_id, "type": "create", "status": "concluded",
            "current-progress": 1, "total-progress": 1}
    if error:
        info["error"] = error
    return info


@pytest.mark.parametrize("prealloc", [None, "off", "falloc", "full"])
def test_create_file(impl, start_daemon, tmpdir_short, prealloc):
    q = start_daemon(impl).qmp()
    path = os.path.join(tmpdir_short, "new.img")
    opts = {"driver": "file", "filename": path, "size": 3 * MiB}
    if prealloc:
        opts["preallocation"] = prealloc
    statuses, info = create(q, "c0", **opts)
    assert statuses == OK
    assert info == done_info("c0")
    st = os.stat(path)
    assert st.st_size == 3 * MiB
    allocated = st.st_blocks * 512
    if prealloc in ("falloc", "full"):
        assert allocated >= 3 * MiB
    else:
        assert allocated <= 64 * 1024      # only the first block, as QEMU writes it
    with open(path, "rb") as f:
        assert f.read() == bytes(3 * MiB)
    # the same file again, smaller: created anew (truncated first)
    statuses, info = create(q, "c1", **{"driver": "file", "filename": path, "size": 4096,
                                        "nocow": True, "extent-size-hint": 0})
    assert statuses == OK
    assert os.stat(path).st_size == 4096


def test_create_file_map_matches_qemu_img(start_daemon, tmpdir_short):
    """The new file's allocation (qemu-img map) is what qsd's is."""
    if not QSD:
        pytest.skip("qemu-storage-daemon not installed")
    maps = {}
    for impl in ("bexd", "qsd"):
        q = start_daemon(impl).qmp()
        path = os.path.join(tmpdir_short, impl + ".img")
        assert create(q, "c", driver="file", filename=path, size=2 * MiB)[0] == OK
        r = subprocess.run(["qemu-img", "map", "--output=json", "-f", "raw", path],
                           stdout=subprocess.PIPE, check=True)
        maps[impl] = r.stdout
    assert maps["bexd"] == maps["qsd"]


@pytest.mark.parametrize("opts,error", [
    ({"filename": "@DIR@/nodir/x.img", "size": MiB},
     "Could not create '@DIR@/nodir/x.img': No such file or directory"),
    ({"filename": "@DIR@", "size": MiB}, "Could not create '@DIR@': Is a directory"),
    ({"filename": "", "size": 0}, "Could not create '': No such file or directory"),
    ({"filename": "@DIR@/x.img", "size": MiB, "preallocation": "metadata"},
     "Unsupported preallocation mode: metadata"),
    ({"filename": "@DIR@/x.img", "size": MiB, "extent-size-hint": 1 << 32},
     "Extent size hint is too large"),
    ({"filename": "@DIR@/x.img", "size": -1}, "Could not resize file: Invalid argument"),
], ids=["nodir", "isdir", "empty", "metadata", "hint", "negative"])
def test_create_file_fails(impl, start_daemon, tmpdir_short, opts, error):
    q = start_daemon(impl).qmp()
    opts = {k: v.replace("@DIR@", tmpdir_short) if isinstance(v, str) else v
            for k, v in opts.items()}
    statuses, info = create(q, "bad", driver="file", **opts)
    assert statuses == FAILED
    assert info == done_info("bad", error.replace("@DIR@", tmpdir_short))


def test_create_file_locked(impl, start_daemon, tmpdir_short, image):
    """A file another process writes (a writable bexd export) cannot be made anew."""
    img = image(MiB)
    holder = start_daemon("bexd", "--blockdev", "driver=file,node-name=d,filename=" + img,
                          "--nbd-server", "addr.type=unix,addr.path=%s/nbd.sock" % tmpdir_short,
                          "--export", "type=nbd,id=e,node-name=d,writable=on")
    q = start_daemon(impl).qmp()
    statuses, info = create(q, "c", driver="file", filename=img, size=2 * MiB)
    assert statuses == FAILED
    assert info == done_info("c", 'Failed to get "write" lock')
    assert os.stat(img).st_size == MiB
    holder.stop()
    assert create(q, "c", driver="file", filename=img, size=2 * MiB)[0] == OK
    assert os.stat(img).st_size == 2 * MiB


@pytest.mark.parametrize("args,error", [
    ({"job-id": "1j", "options": {"driver": "file", "filename": "/x", "size": 0}},
     "Invalid job ID '1j'"),
    ({"job-id": "j", "options": {"driver": "raw"}}, "Driver does not support blockdev-create"),
    ({"job-id": "1j", "options": {"driver": "null-co"}}, "Driver does not support blockdev-create"),
    ({"job-id": "j", "options": {"driver": "host_device"}},
     "Driver does not support blockdev-create"),
    ({"job-id": "j", "options": {"driver": "host_device", "filename": "/x", "size": 0}},
     "Parameter 'options.filename' is unexpected"),
    ({"job-id": "j", "options": {"driver": "file", "filename": "/x"}},
     "Parameter 'options.size' is missing"),
    ({"job-id": "j", "options": {"driver": "file", "filename": "/x", "size": 0,
                                 "preallocation": "sparse"}},
     "Parameter 'preallocation' does not accept value 'sparse'"),
    ({"job-id": "j", "options": {"driver": "file", "filename": "/x", "size": "1M"}},
     "Parameter 'options.size' expects uint64"),
    ({"job-id": "j", "options": {"driver": "file", "filename": "/x", "size": 0, "nocow": 1}},
     "Invalid parameter type for 'options.nocow', expected: boolean"),
    ({"job-id": "j"}, "Parameter 'options' is missing"),
    ({"options": {"driver": "file", "filename": "/x", "size": 0}},
     "Parameter 'job-id' is missing"),
    ({"job-id": "j", "options": {"filename": "/x", "size": 0}},
     "Parameter 'options.driver' is missing"),
], ids=["jobid", "raw", "null", "hostdev", "hostdev-args", "nosize", "prealloc", "sizetype",
        "nocow", "nooptions", "nojobid", "nodriver"])
def test_create_refused(impl, start_daemon, args, error):
    q = start_daemon(impl).qmp()
    r = q.request("blockdev-create", args)
    assert r["error"] == {"class": "GenericError", "desc": error}
    assert q.execute("query-jobs") == []
    assert q.events == []


def test_verbs_of_a_concluded_job(impl, start_daemon, tmpdir_short):
    q = start_daemon(impl).qmp()
    bad = os.path.join(tmpdir_short, "nodir", "x")
    q.execute("blockdev-create", job_id="j0", options={"driver": "file", "filename": bad, "size": 0})
    assert job_statuses(q, "j0") == FAILED
    # the id stays taken until the job is dismissed
    r = q.request("blockdev-create", {"job-id": "j0", "options": {"driver": "file",
                                                                   "filename": bad, "size": 0}})
    assert r["error"]["desc"] == "Job ID 'j0' already in use"
    for verb in ("cancel", "pause", "complete", "finalize"):
        assert q.error("job-" + verb, id="j0") == {
            "class": "GenericError",
            "desc": "Job 'j0' in state 'concluded' cannot accept command verb '%s'" % verb}
    assert q.error("job-resume", id="j0")["desc"] == "Can't resume a job that was not paused"
    for verb in ("cancel", "pause", "resume", "complete", "finalize", "dismiss"):
        assert q.error("job-" + verb, id="nope") == {"class": "GenericError",
                                                      "desc": "Job not found"}
    assert q.error("job-pause") == {"class": "GenericError", "desc": "Parameter 'id' is missing"}
    assert q.execute("job-dismiss", id="j0") == {}
    assert job_statuses(q, "j0", ("null",)) == ["null"]
    assert q.error("job-dismiss", id="j0")["desc"] == "Job not found"


def test_query_jobs_lists_newest_first(impl, start_daemon, tmpdir_short):
    q = start_daemon(impl).qmp()
    for n in range(3):
        q.execute("blockdev-create", job_id="j%d" % n,
                  options={"driver": "file", "filename": os.path.join(tmpdir_short, str(n)),
                           "size": 4096})
        assert job_statuses(q, "j%d" % n) == OK
    assert [j["id"] for j in q.execute("query-jobs")] == ["j2", "j1", "j0"]


def test_quit_with_concluded_job(impl, start_daemon, tmpdir_short):
    d = start_daemon(impl)
    q = d.qmp()
    q.execute("blockdev-create", job_id="j",
              options={"driver": "file", "filename": os.path.join(tmpdir_short, "x"), "size": 0})
    assert job_statuses(q, "j") == OK
    q.execute("quit")
    d.wait_exit()


# ---- jobs caught while they work (bexd only: see the module's docstring) ----

@pytest.fixture
def stalled_path(start_daemon, tmpdir_short, image):
    """A path whose file system does not answer until the test says so:
    yields (path, release)."""
    img = image(MiB, name="under.img")
    mnt = os.path.join(tmpdir_short, "mnt")
    open(mnt, "w").close()
    server = start_daemon("bexd", "--blockdev", "driver=file,node-name=d,filename=" + img,
                          "--export", "type=fuse,id=f,node-name=d,mountpoint=%s,writable=on" % mnt)
    os.kill(server.pid, signal.SIGSTOP)
    stopped = [True]

    def release():
        if stopped[0]:
            os.kill(server.pid, signal.SIGCONT)
            stopped[0] = False

    yield mnt, release
    release()
    server.stop()
    subprocess.run(["fusermount3", "-u", "-z", mnt], stderr=subprocess.DEVNULL)


@pytest.fixture
def stalled_job(start_daemon, stalled_path):
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    path, release = stalled_path
    q = start_daemon("bexd").qmp()
    q.execute("blockdev-create", job_id="j", options={"driver": "file", "filename": path,
                                                      "size": MiB})
    assert job_statuses(q, "j", ("running",)) == ["created", "running"]
    assert q.execute("query-jobs") == [{"id": "j", "type": "create", "status": "running",
                                        "current-progress": 0, "total-progress": 1}]
    return q, release


def test_running_job_verbs(stalled_job):
    q, release = stalled_job
    for verb in ("complete", "finalize", "dismiss"):
        assert q.error("job-" + verb, id="j")["desc"] == \
            "Job 'j' in state 'running' cannot accept command verb '%s'" % verb
    assert q.error("job-resume", id="j")["desc"] == "Can't resume a job that was not paused"
    assert q.execute("job-pause", id="j") == {}
    assert q.error("job-pause", id="j")["desc"] == "Job is already paused"
    # a create job has no pause point after its start: it stays running
    assert q.execute("query-jobs")[0]["status"] == "running"
    assert q.execute("job-resume", id="j") == {}
    assert q.execute("job-pause", id="j") == {}
    release()
    # paused or not, the work ends and the job completes
    assert job_statuses(q, "j") == ["waiting", "pending", "concluded"]
    assert q.error("job-resume", id="j")["desc"] == \
        "Job 'j' in state 'concluded' cannot accept command verb 'resume'"
    q.execute("job-dismiss", id="j")


def test_running_job_cancel(stalled_job):
    q, release = stalled_job
    assert q.execute("job-pause", id="j") == {}
    assert q.execute("job-cancel", id="j") == {}
    assert q.execute("query-jobs")[0]["status"] == "running"
    release()
    assert job_statuses(q, "j") == ["aborting", "concluded"]
    assert q.execute("query-jobs") == [{"id": "j", "type": "create", "status": "concluded",
                                        "current-progress": 1, "total-progress": 1,
                                        "error": "Operation canceled"}]


def test_quit_waits_for_working_job(start_daemon, stalled_path, tmpdir_short):
    """quit cancels the job and waits for its work before exiting."""
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    path, release = stalled_path
    d = start_daemon("bexd")
    q = d.qmp()
    q.execute("blockdev-create", job_id="j", options={"driver": "file", "filename": path,
                                                      "size": MiB})
    assert job_statuses(q, "j", ("running",)) == ["created", "running"]
    q.execute("quit")
    assert d.alive()
    release()
    assert job_statuses(q, "j") == ["aborting", "concluded"]
    d.wait_exit()
