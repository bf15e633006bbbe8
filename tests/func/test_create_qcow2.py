"""blockdev-create for qcow2, against qemu-storage-daemon 7.2.

For every combination of creation options that shapes the image (version,
cluster size, refcount width, lazy refcounts, extended L2, compression
type, backing file and format, external data file, data-file-raw,
preallocation off/metadata/falloc/full, sizes from 0 to 5 TiB, images whose
L1 table or preallocated data needs more refcount blocks or a refcount
table of more than one cluster), bexd
and qsd each create an image from an empty file node, and the two files
must be identical byte for byte (the data file's name, which contains the
directory, aside); `qemu-img check` finds bexd's clean and `qemu-img
info` reads the same for both.  The errors are qsd's words, in qsd's order.
"""
import json
import os
import subprocess

import pytest

from conftest import QSD

MiB = 1 << 20


def job_result(q, job_id):
    """Wait for the job to conclude; its query-jobs entry (then dismissed)."""
    while True:
        ev = q.wait_event("JOB_STATUS_CHANGE")
        if ev["data"]["id"] == job_id and ev["data"]["status"] == "concluded":
            break
    info = [j for j in q.execute("query-jobs") if j["id"] == job_id][0]
    q.execute("job-dismiss", id=job_id)
    return info


def create_qcow2(q, tmp, name, opts):
    """Make name.qcow2 (and name.data for a data file) in tmp; the job's entry."""
    path = os.path.join(tmp, name + ".qcow2")
    open(path, "w").close()
    q.execute("blockdev-add", driver="file", node_name="f-" + name, filename=path)
    o = dict(opts, driver="qcow2", file="f-" + name)
    if "data-file" in o:
        data = os.path.join(tmp, name + ".data")
        open(data, "w").close()
        q.execute("blockdev-add", driver="file", node_name="d-" + name, filename=data)
        o["data-file"] = "d-" + name
    q.execute("blockdev-create", job_id="c-" + name, options=o)
    return job_result(q, "c-" + name)


SHAPES = {
    "default": {"size": MiB},
    "empty": {"size": 0},
    "v2": {"size": MiB, "version": "v2"},
    "lazy": {"size": MiB, "lazy-refcounts": True},
    "refcount1": {"size": MiB, "refcount-bits": 1},
    "refcount64": {"size": MiB, "refcount-bits": 64},
    "cluster512": {"size": 64 * MiB, "cluster-size": 512},
    "cluster4k": {"size": MiB, "cluster-size": 4096},
    "cluster8k": {"size": MiB, "cluster-size": 8192},
    "cluster2m": {"size": 1 << 30, "cluster-size": 2 * MiB},
    "extl2": {"size": MiB, "extended-l2": True},
    "zstd": {"size": MiB, "compression-type": "zstd"},
    "zlib": {"size": MiB, "compression-type": "zlib"},
    "backing": {"size": MiB, "backing-file": "/images/base.img", "backing-fmt": "raw"},
    "backing-nofmt": {"size": MiB, "backing-file": "base.qcow2"},
    "backing-v2-c1k": {"size": MiB, "version": "v2", "cluster-size": 1024,
                       "backing-file": "b.qcow2", "backing-fmt": "qcow2"},
    "datafile": {"size": MiB, "data-file": "d"},
    "datafile-raw": {"size": MiB, "data-file": "d", "data-file-raw": True},
    "datafile-metadata": {"size": 3 * MiB, "data-file": "d", "preallocation": "metadata",
                          "cluster-size": 16384},
    "datafile-raw-extl2": {"size": 3 * MiB, "data-file": "d", "data-file-raw": True,
                           "extended-l2": True},
    "datafile-raw-many-l2": {"size": 1 << 30, "data-file": "d", "data-file-raw": True,
                             "cluster-size": 4096},
    "5tib": {"size": 5 << 40},
    "refblocks-grow": {"size": 1 << 30, "cluster-size": 512, "refcount-bits": 64},
    "reftable-grows": {"size": 10 << 30, "cluster-size": 512, "refcount-bits": 64},
    "reftable-grows-v2": {"size": 10 << 30, "cluster-size": 512, "version": "v2"},
    "metadata": {"size": 3 * MiB + 512, "preallocation": "metadata"},
    "metadata-extl2": {"size": 5 * MiB + 512, "preallocation": "metadata", "extended-l2": True,
                       "cluster-size": 16384},
    "metadata-c512": {"size": 2 * MiB, "cluster-size": 512, "preallocation": "metadata"},
    "metadata-c2m": {"size": 9 * MiB, "cluster-size": 2 * MiB, "preallocation": "metadata"},
    "metadata-rc1": {"size": 2 * MiB, "cluster-size": 4096, "refcount-bits": 1,
                     "preallocation": "metadata"},
    "metadata-reftable-grows": {"size": 8 * MiB, "cluster-size": 512, "refcount-bits": 64,
                                "preallocation": "metadata"},
    "metadata-backing-extl2": {"size": 2 * MiB, "backing-file": "b.qcow2",
                               "extended-l2": True, "preallocation": "metadata"},
    "metadata-empty": {"size": 0, "preallocation": "metadata"},
    "falloc": {"size": 3 * MiB, "preallocation": "falloc"},
    "falloc-c512": {"size": MiB + 512, "cluster-size": 512, "preallocation": "falloc"},
    "falloc-extl2": {"size": 3 * MiB, "preallocation": "falloc", "extended-l2": True},
    "falloc-reftable-grows": {"size": 8 * MiB, "cluster-size": 512, "refcount-bits": 64,
                              "preallocation": "falloc"},
    "falloc-empty": {"size": 0, "preallocation": "falloc"},
    "full": {"size": 3 * MiB + 512, "preallocation": "full"},
    "full-c4k-rc8": {"size": 5 * MiB, "cluster-size": 4096, "refcount-bits": 8,
                     "preallocation": "full"},
    "datafile-falloc": {"size": 3 * MiB, "data-file": "d", "preallocation": "falloc"},
    "datafile-full": {"size": MiB, "data-file": "d", "preallocation": "full"},
}


@pytest.mark.skipif(not QSD, reason="qemu-storage-daemon not installed")
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_same_image_as_qsd(start_daemon, tmpdir_short, name):
    files = {}
    for impl in ("bexd", "qsd"):
        tmp = os.path.join(tmpdir_short, impl.ljust(4, "_"))     # paths of one length
        os.mkdir(tmp)
        q = start_daemon(impl).qmp()
        info = create_qcow2(q, tmp, name, SHAPES[name])
        assert "error" not in info, (impl, info)
        files[impl] = tmp
    for ext in (".qcow2", ".data"):
        b, q_ = (os.path.join(files[i], name + ext) for i in ("bexd", "qsd"))
        if not os.path.exists(q_):
            continue
        with open(b, "rb") as f:
            bb = f.read().replace(files["bexd"].encode(), b"@DIR@")
        with open(q_, "rb") as f:
            qb = f.read().replace(files["qsd"].encode(), b"@DIR@")
        assert len(bb) == len(qb), ext
        assert bb == qb, ext
    img = os.path.join(files["bexd"], name + ".qcow2")
    spec = {"driver": "qcow2", "backing": None, "file": {"driver": "file", "filename": img}}
    r = subprocess.run(["qemu-img", "check", "--output=json", "json:" + json.dumps(spec)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace")
    assert r.returncode == 0, r.stdout + r.stderr
    check = json.loads(r.stdout)
    assert check.get("leaks", 0) == 0 and check.get("corruptions", 0) == 0


@pytest.mark.skipif(not QSD, reason="qemu-storage-daemon not installed")
def test_qemu_img_reads_it_as_qsds(start_daemon, tmpdir_short):
    infos = {}
    opts = {"size": 8 * MiB, "cluster-size": 16384, "lazy-refcounts": True,
            "compression-type": "zstd", "extended-l2": True, "refcount-bits": 8}
    for impl in ("bexd", "qsd"):
        tmp = os.path.join(tmpdir_short, impl)
        os.mkdir(tmp)
        q = start_daemon(impl).qmp()
        assert "error" not in create_qcow2(q, tmp, "i", opts)
        r = subprocess.run(["qemu-img", "info", "--output=json", os.path.join(tmp, "i.qcow2")],
                           stdout=subprocess.PIPE, check=True, text=True, errors="replace")
        infos[impl] = json.loads(r.stdout.replace(tmp, "@DIR@"))
    for i in infos.values():
        i.pop("actual-size", None)
    assert infos["bexd"] == infos["qsd"]
    assert infos["bexd"]["format-specific"]["data"]["compression-type"] == "zstd"


def test_writable_by_qemu_io(start_daemon, tmpdir_short):
    """What bexd makes, QEMU's own driver writes and reads back."""
    q = start_daemon("bexd").qmp()
    assert "error" not in create_qcow2(q, tmpdir_short, "w", {"size": 4 * MiB})
    img = os.path.join(tmpdir_short, "w.qcow2")
    q.execute("blockdev-del", node_name="f-w")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 64k", img],
                   check=True, stdout=subprocess.DEVNULL)
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x5a 1M 64k",
                        "-c", "read -P 0 0 1M", img], stdout=subprocess.PIPE,
                        text=True, errors="replace")
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout
    subprocess.run(["qemu-img", "check", "-f", "qcow2", img], check=True,
                   stdout=subprocess.DEVNULL)


@pytest.mark.parametrize("opts,error", [
    ({"size": 1000}, "Image size must be a multiple of 512 bytes"),
    ({"size": MiB, "version": "v2", "lazy-refcounts": True},
     "Lazy refcounts only supported with compatibility level 1.1 and above "
     "(use version=v3 or greater)"),
    ({"size": MiB, "version": "v2", "refcount-bits": 8},
     "Different refcount widths than 16 bits require compatibility level 1.1 or above "
     "(use version=v3 or greater)"),
    ({"size": MiB, "refcount-bits": 3},
     "Refcount width must be a power of two and may not exceed 64 bits"),
    ({"size": MiB, "refcount-bits": 128},
     "Refcount width must be a power of two and may not exceed 64 bits"),
    ({"size": MiB, "cluster-size": 1000}, "Cluster size must be a power of two between 512 and 2048k"),
    ({"size": MiB, "cluster-size": 256}, "Cluster size must be a power of two between 512 and 2048k"),
    ({"size": MiB, "cluster-size": 4 * MiB},
     "Cluster size must be a power of two between 512 and 2048k"),
    ({"size": MiB, "cluster-size": 4096, "extended-l2": True},
     "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"),
    ({"size": MiB, "version": "v2", "extended-l2": True},
     "Extended L2 entries are only supported with compatibility level 1.1 and above "
     "(use version=v3 or greater)"),
    ({"size": MiB, "backing-fmt": "raw"}, "Backing format cannot be used without backing file"),
    ({"size": MiB, "backing-file": "/x", "preallocation": "metadata"},
     "Backing file and preallocation can only be used at the same time if extended_l2 is on"),
    ({"size": MiB, "data-file-raw": True}, "data-file-raw requires data-file"),
    ({"size": MiB, "compression-type": "zstd", "version": "v2"},
     "Non-zlib compression type is only supported with compatibility level 1.1 and above "
     "(use version=v3 or greater)"),
    ({"size": MiB, "data-file": "nonexist"},
     "Cannot find device='nonexist' nor node-name='nonexist'"),
    ({"size": MiB, "version": "v2", "data-file": "nonexist"},
     "External data files are only supported with compatibility level 1.1 and above "
     "(use version=v3 or greater)"),
    ({"size": MiB, "file": "nonexist"}, "Cannot find device='nonexist' nor node-name='nonexist'"),
    ({"size": MiB, "file": {"driver": "file", "filename": "/nonexistent/x"}},
     "Could not open '/nonexistent/x': No such file or directory"),
    ({"size": MiB, "file": "ro"}, "Block node is read-only"),
    ({"size": MiB, "file": "null"}, "Image is not in qcow2 format"),
    ({"size": 1 << 60}, "Could not resize image: Failed to grow the L1 table: File too large"),
    ({"size": -512}, "Could not resize image: Image size cannot be negative"),
], ids=["unaligned", "lazy-v2", "refcount-v2", "refcount3", "refcount128", "cluster1000",
        "cluster256", "cluster4m", "extl2-small", "extl2-v2", "fmt-alone", "backing-prealloc",
        "raw-alone", "zstd-v2", "no-datafile", "datafile-v2", "no-file", "inline-file",
        "ro-file", "null-file", "l1-too-big", "negative"])
def test_create_qcow2_fails(impl, start_daemon, image, opts, error):
    img = image(0, name="x.qcow2")
    q = start_daemon(impl, "--blockdev", "driver=file,node-name=f,filename=" + img,
                     "--blockdev", "driver=file,node-name=ro,read-only=on,filename=" + img,
                     "--blockdev", "driver=null-co,node-name=null").qmp()
    o = dict({"driver": "qcow2", "file": "f"}, **opts)
    q.execute("blockdev-create", job_id="j", options=o)
    info = job_result(q, "j")
    assert info == {"id": "j", "type": "create", "status": "concluded", "current-progress": 1,
                    "total-progress": 1, "error": error}


def test_inline_file_node(impl, start_daemon, image):
    img = image(0, name="inline.qcow2")
    q = start_daemon(impl).qmp()
    q.execute("blockdev-create", job_id="j", options={
        "driver": "qcow2", "size": 2 * MiB, "file": {"driver": "file", "filename": img}})
    assert "error" not in job_result(q, "j")
    # the inline node was only for the job
    assert q.execute("query-named-block-nodes") == []
    r = subprocess.run(["qemu-img", "info", "--output=json", img], stdout=subprocess.PIPE,
                       check=True, text=True, errors="replace")
    assert json.loads(r.stdout)["virtual-size"] == 2 * MiB


@pytest.mark.parametrize("opts,error", [
    ({"encrypt": {"format": "luks", "key-secret": "s"}},
     "Encrypted qcow2 images (encrypt.format=luks) are not supported by bexd"),
], ids=["luks"])
def test_bexd_refuses_what_it_cannot_make(start_daemon, image, opts, error):
    img = image(0, name="x.qcow2")
    q = start_daemon("bexd", "--blockdev", "driver=file,node-name=f,filename=" + img).qmp()
    q.execute("blockdev-create", job_id="j", options=dict({"driver": "qcow2", "file": "f",
                                                          "size": MiB}, **opts))
    assert job_result(q, "j")["error"] == error
    assert os.stat(img).st_size == 0          # nothing was written
