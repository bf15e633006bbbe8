"""Real NBD clients against the export: nbdinfo, libnbd (as nbdsh uses it),
qemu-img, qemu-io, nbdcopy, fio.

Each test exports a small image (`exp` fixture: 16 MiB "disk0", description
"the disk", HEAD at offset 0, 1 MiB of DATA at 4 MiB, holes elsewhere) and
checks what a client sees, byte for byte.  libnbd is driven in-process from
the system python (python3-libnbd), the same library nbdsh wraps.
"""
import hashlib
import json
import os
import signal
import socket
import subprocess

import pytest

import needs

from conftest import tool_json, tool_text
from nbdwire import HEAD, Conn, free_tcp_port, pattern, serve
from pagecache import unsynced_pages

import nbd  # noqa: E402 (python3-libnbd, which scripts/deps.sh installs)

SIZE = 16 << 20
DATA_OFF = 4 << 20
DATA = pattern(1 << 20, seed=42)
ENV = dict(os.environ, PATH="/usr/bin:" + os.environ.get("PATH", ""))


def run(*argv, check=True, timeout=60):
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=timeout, env=ENV)
    if check and r.returncode != 0:
        raise AssertionError("%s -> %d: %s" % (argv, r.returncode, tool_text(r.stderr)))
    return r


def make_image(path):
    with open(path, "wb") as f:
        f.truncate(SIZE)
        f.write(HEAD)
        f.seek(DATA_OFF)
        f.write(DATA)
    return path


def expected_image():
    buf = bytearray(SIZE)
    buf[:len(HEAD)] = HEAD
    buf[DATA_OFF:DATA_OFF + len(DATA)] = DATA
    return bytes(buf)


class Export:
    def __init__(self, daemon, sock, img, name="disk0"):
        self.daemon, self.sock, self.img, self.name = daemon, sock, img, name
        self.uri = "nbd+unix:///%s?socket=%s" % (name, sock)

    def handle(self, name=None, contexts=(), strict=True):
        h = nbd.NBD()
        h.set_export_name(self.name if name is None else name)
        for ctx in contexts:
            h.add_meta_context(ctx)
        if not strict:
            h.set_strict_mode(0)
        h.connect_unix(self.sock)
        return h


def start_export(start_daemon, impl, tmpdir, extra_export=",description=the disk",
                 args=()):
    img = make_image(os.path.join(tmpdir, "disk.img"))
    sock = os.path.join(tmpdir, "nbd.sock")
    d = serve(start_daemon, impl, img, sock, extra_export=extra_export, args=args)
    return Export(d, sock, img)


@pytest.fixture
def exp(impl, start_daemon, tmpdir_short):
    return start_export(start_daemon, impl, tmpdir_short)


def sha256_file(path, length=None):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(length) if length else f.read())
    return h.hexdigest()


# -- nbdinfo -----------------------------------------------------------------

def test_nbdinfo_list_json(exp):
    out = tool_json(run("nbdinfo", "--list", "--json",
                         "nbd+unix:///?socket=" + exp.sock).stdout)
    assert out["protocol"] == "newstyle-fixed"
    assert out["TLS"] is False and out["structured"] is True
    (e,) = out["exports"]
    assert e["export-name"] == "disk0"
    assert e["description"] == "the disk"
    assert e["export-size"] == SIZE
    assert e["contexts"] == ["base:allocation"]
    assert (e["block_size_minimum"], e["block_size_preferred"],
            e["block_size_maximum"]) == (1, 4096, 32 << 20)


def test_nbdinfo_list_text_two_exports(impl, start_daemon, tmpdir_short):
    exp = start_export(start_daemon, impl, tmpdir_short, args=(
        "--export", "type=nbd,id=exp1,node-name=disk0,name=second,description=another one"))
    out = tool_text(run("nbdinfo", "--list", "nbd+unix:///?socket=" + exp.sock).stdout)
    assert 'export="disk0":\n\tdescription: the disk\n' in out
    assert 'export="second":\n\tdescription: another one\n' in out


def test_nbdinfo_size(exp):
    assert run("nbdinfo", "--size", exp.uri).stdout == b"%d\n" % SIZE


def test_nbdinfo_map(exp):
    out = run("nbdinfo", "--map", "--json", exp.uri).stdout
    m = [(e["offset"], e["length"], e["type"]) for e in tool_json(out)]
    # data at HEAD and DATA, holes reading as zero elsewhere
    assert m == [(0, 4096, 0), (4096, DATA_OFF - 4096, 3),
                 (DATA_OFF, len(DATA), 0),
                 (DATA_OFF + len(DATA), SIZE - DATA_OFF - len(DATA), 3)]


def test_nbdinfo_map_text(exp):
    out = tool_text(run("nbdinfo", "--map", exp.uri).stdout).split("\n")
    assert out[0].split() == ["0", "4096", "0", "data"]
    assert out[1].split() == ["4096", str(DATA_OFF - 4096), "3", "hole,zero"]


def test_nbdinfo_map_allocation_depth(impl, start_daemon, tmpdir_short):
    exp = start_export(start_daemon, impl, tmpdir_short, extra_export=",allocation-depth=on")
    out = run("nbdinfo", "--map=qemu:allocation-depth", "--json", exp.uri).stdout
    # a raw file on its own: everything is allocated locally (depth 1)
    assert [(e["offset"], e["length"], e["type"], e["description"])
            for e in tool_json(out)] == [(0, SIZE, 1, "local")]
    info = tool_json(run("nbdinfo", "--json", exp.uri).stdout)
    assert info["exports"][0]["contexts"] == ["base:allocation", "qemu:allocation-depth"]


@pytest.mark.parametrize("what", ["write", "flush", "trim", "zero", "fua",
                                  "multi-conn", "cache", "df", "fast-zero"])
def test_nbdinfo_can(exp, what):
    assert run("nbdinfo", "--can", what, exp.uri, check=False).returncode == 0


def test_nbdinfo_is_read_only(exp):
    assert run("nbdinfo", "--is", "read-only", exp.uri, check=False).returncode == 2


def test_nbdinfo_read_only_export(impl, start_daemon, tmpdir_short):
    exp = start_export(start_daemon, impl, tmpdir_short, args=(
        "--export", "type=nbd,id=exp1,node-name=disk0,name=ro,writable=off"))
    uri = "nbd+unix:///ro?socket=" + exp.sock
    assert run("nbdinfo", "--is", "read-only", uri, check=False).returncode == 0
    for what in ("write", "trim", "zero", "fast-zero"):
        assert run("nbdinfo", "--can", what, uri, check=False).returncode == 2, what
    for what in ("flush", "fua", "cache", "multi-conn"):
        assert run("nbdinfo", "--can", what, uri, check=False).returncode == 0, what


def test_nbdinfo_json(exp):
    (e,) = tool_json(run("nbdinfo", "--json", exp.uri).stdout)["exports"]
    assert e["export-name"] == "disk0"
    assert e["is_read_only"] is False and e["is_rotational"] is False
    for k in ("can_cache", "can_df", "can_fast_zero", "can_flush", "can_fua",
              "can_multi_conn", "can_trim", "can_zero"):
        assert e[k] is True, k


def test_nbdinfo_unknown_export_fails(exp):
    r = run("nbdinfo", "nbd+unix:///nope?socket=" + exp.sock, check=False)
    assert r.returncode == 1
    # libnbd maps ERR_UNKNOWN to ENOENT
    assert b"server replied with error to opt_go request: " \
        b"No such file or directory for export: nope" in r.stderr


# -- libnbd (nbdsh) ----------------------------------------------------------

def test_nbdsh_script(exp):
    script = ("h.set_export_name('disk0'); h.connect_unix(%r); "
              "print(h.get_size()); print(h.pread(8, 0).hex())" % exp.sock)
    out = tool_text(run("nbdsh", "-c", script).stdout).split()
    assert out == [str(SIZE), HEAD[:8].hex()]


def test_libnbd_connect_uri(exp):
    h = nbd.NBD()
    h.connect_uri(exp.uri)
    assert h.get_export_name() == "disk0"
    assert h.pread(len(DATA), DATA_OFF) == DATA
    h.shutdown()


def test_libnbd_pwrite_fua_pread(exp):
    h = exp.handle()
    data = pattern(65536, seed=7)
    h.pwrite(data, 8 << 20, nbd.CMD_FLAG_FUA)
    assert h.pread(65536, 8 << 20) == data
    h.shutdown()
    with open(exp.img, "rb") as f:
        f.seek(8 << 20)
        assert f.read(65536) == data


def test_libnbd_zero_trim_cache_flush(exp):
    h = exp.handle()
    h.zero(4096, DATA_OFF, nbd.CMD_FLAG_NO_HOLE)
    h.zero(4096, DATA_OFF + 4096, nbd.CMD_FLAG_FAST_ZERO)
    h.zero(4096, DATA_OFF + 8192)
    h.trim(65536, 10 << 20)
    h.cache(65536, DATA_OFF)
    h.flush()
    assert h.pread(16384, DATA_OFF) == bytes(12288) + DATA[12288:16384]
    h.shutdown()


def block_status(h, length, offset, flags=0):
    got = {}

    def cb(ctx, off, entries, err):
        got[ctx] = list(zip(entries[0::2], entries[1::2]))
        return 0
    h.block_status(length, offset, cb, flags)
    return got


def test_libnbd_block_status(exp):
    h = exp.handle(contexts=["base:allocation"])
    assert h.can_meta_context("base:allocation")
    got = block_status(h, SIZE, 0)
    ext = got["base:allocation"]
    assert ext[0] == (4096, 0)
    assert ext[1] == (DATA_OFF - 4096, nbd.STATE_HOLE | nbd.STATE_ZERO)


def test_libnbd_block_status_req_one(exp):
    h = exp.handle(contexts=["base:allocation"])
    got = block_status(h, SIZE - DATA_OFF, DATA_OFF, nbd.CMD_FLAG_REQ_ONE)
    assert got == {"base:allocation": [(len(DATA), 0)]}


def test_libnbd_block_status_two_contexts(impl, start_daemon, tmpdir_short):
    exp = start_export(start_daemon, impl, tmpdir_short, extra_export=",allocation-depth=on")
    h = exp.handle(contexts=["base:allocation", "qemu:allocation-depth"])
    got = block_status(h, 1 << 20, 0)
    assert sorted(got) == ["base:allocation", "qemu:allocation-depth"]
    assert got["base:allocation"][0] == (4096, 0)
    assert got["qemu:allocation-depth"] == [(1 << 20, 1)]


def test_libnbd_unknown_context_not_negotiated(exp):
    h = exp.handle(contexts=["foo:bar"])
    assert not h.can_meta_context("foo:bar")


def test_libnbd_pread_structured(exp):
    h = exp.handle()
    chunks = []

    def cb(buf, off, status, err):
        chunks.append((off, status, bytes(buf)))
        return 0
    buf = h.pread_structured(8192, DATA_OFF - 4096, cb)
    assert buf == bytes(4096) + DATA[:4096]
    kinds = {status for _, status, _ in chunks}
    assert kinds <= {nbd.READ_DATA, nbd.READ_HOLE}
    covered = sum(len(b) for _, _, b in chunks)
    assert covered == 8192


def test_libnbd_beyond_end_einval(exp):
    h = exp.handle(strict=False)
    with pytest.raises(nbd.Error) as e:
        h.pread(512, SIZE)
    assert e.value.errno == "EINVAL"
    with pytest.raises(nbd.Error) as e:
        h.pwrite(b"x" * 512, SIZE - 256)
    assert e.value.errno == "EINVAL"
    assert h.pread(4, 0) == HEAD[:4]      # the connection goes on


def test_libnbd_read_only_export(impl, start_daemon, tmpdir_short):
    exp = start_export(start_daemon, impl, tmpdir_short, args=(
        "--export", "type=nbd,id=exp1,node-name=disk0,name=ro,writable=off"))
    h = exp.handle(name="ro")
    assert h.is_read_only()
    with pytest.raises(nbd.Error) as e:      # refused by libnbd itself
        h.pwrite(b"x" * 512, 0)
    assert e.value.errno == "EPERM"
    h2 = exp.handle(name="ro", strict=False)
    with pytest.raises(nbd.Error) as e:      # refused by the server
        h2.pwrite(b"x" * 512, 0)
    # spec: EPERM; qsd 7.2 answers EINVAL (see test_nbdwire_transmission)
    assert e.value.errno == ("EINVAL" if impl == "qsd" else "EPERM")
    with open(exp.img, "rb") as f:
        assert f.read(4096) == HEAD


def test_many_simultaneous_connections(exp):
    handles = [exp.handle() for _ in range(32)]
    for i, h in enumerate(handles):
        h.pwrite(pattern(4096, seed=i), (8 << 20) + i * 4096)
    for i, h in enumerate(handles):
        assert h.pread(4096, (8 << 20) + ((i + 1) % 32) * 4096) == \
            pattern(4096, seed=(i + 1) % 32)
    for h in handles:
        h.shutdown()


def test_multi_conn_flush_makes_writes_visible(exp):
    a, b = exp.handle(), exp.handle()
    assert a.can_multi_conn() and b.can_multi_conn()
    data = pattern(4096, seed=99)
    a.pwrite(data, 12 << 20)
    b.flush()
    assert b.pread(4096, 12 << 20) == data


def test_flushed_data_survives_kill9(exp):
    """What a FLUSH or a FUA write acknowledged is on the disk, not only in
    the page cache (which outlives a daemon killed with SIGKILL, so reading
    the file afterwards alone proves nothing): its pages are neither dirty
    nor under writeback when the reply arrives.  A write that was not
    flushed is not claimed durable; it only shows that the check can see
    dirty pages at all."""
    h = exp.handle()
    a, b, c = (pattern(1 << 20, seed=s) for s in (5, 6, 7))
    A, B, C = 8 << 20, 10 << 20, 12 << 20
    # a plain write is in the page cache, not yet on the disk (unless the
    # kernel wrote it back on its own in between: then try again)
    for attempt in range(5):
        h.pwrite(a, A)
        if unsynced_pages(exp.img, A, 1 << 20):
            break
    else:
        pytest.fail("the kernel wrote every unflushed write back at once: nothing to observe")
    h.flush()
    assert unsynced_pages(exp.img, A, 1 << 20) == 0, "FLUSH answered before fdatasync"
    h.pwrite(b, B, nbd.CMD_FLAG_FUA)
    if exp.daemon.impl == "bexd":
        # qemu-storage-daemon 7.2 answers this FUA write with its pages still
        # dirty: on a file node without native FUA its emulated flush finds
        # nothing written since the last flush (the write it follows is not
        # counted yet) and skips fdatasync.  bexd makes FUA durable.
        assert unsynced_pages(exp.img, B, 1 << 20) == 0, \
            "FUA write answered before it was durable"
    h.pwrite(c, C)            # never flushed: nothing is claimed about it
    exp.daemon.stop(sig=signal.SIGKILL)
    with open(exp.img, "rb") as f:
        f.seek(A)
        assert f.read(1 << 20) == a
        f.seek(B)
        assert f.read(1 << 20) == b


# -- TCP -----------------------------------------------------------------------

def tcp_export(start_daemon, impl, tmpdir, host):
    img = make_image(os.path.join(tmpdir, "disk.img"))
    port = free_tcp_port(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    d = start_daemon(impl, "--blockdev", "driver=file,node-name=disk0,filename=" + img,
                     "--nbd-server", "addr.type=inet,addr.host=%s,addr.port=%d" % (host, port),
                     "--export", "type=nbd,id=exp0,node-name=disk0,name=disk0,writable=on")
    return d, img, port


def test_tcp_ephemeral_port(impl, start_daemon, tmpdir_short):
    d, img, port = tcp_export(start_daemon, impl, tmpdir_short, "127.0.0.1")
    h = nbd.NBD()
    h.connect_uri("nbd://127.0.0.1:%d/disk0" % port)
    assert h.pread(4096, 0) == HEAD
    c = Conn(addr=("127.0.0.1", port)).connect("disk0")
    assert c.read(DATA_OFF, 64).data == DATA[:64]


@pytest.mark.skipif(not needs.ipv6_loopback(), reason="no IPv6 loopback here")
def test_tcp_ipv6(impl, start_daemon, tmpdir_short):
    d, img, port = tcp_export(start_daemon, impl, tmpdir_short, "::1")
    h = nbd.NBD()
    h.connect_uri("nbd://[::1]:%d/disk0" % port)
    assert h.pread(4096, 0) == HEAD


def test_qemu_img_over_tcp(impl, start_daemon, tmpdir_short):
    d, img, port = tcp_export(start_daemon, impl, tmpdir_short, "127.0.0.1")
    info = json.loads(run("qemu-img", "info", "--output=json",
                          "nbd://127.0.0.1:%d/disk0" % port).stdout)
    assert info["virtual-size"] == SIZE


# -- qemu-img / qemu-io -------------------------------------------------------------

def test_qemu_img_info(exp):
    info = json.loads(run("qemu-img", "info", "--output=json", exp.uri).stdout)
    assert info["virtual-size"] == SIZE
    assert info["format"] == "raw"


def test_qemu_img_map(exp):
    out = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", exp.uri).stdout)
    m = [(e["start"], e["length"], e["data"], e["zero"]) for e in out]
    assert m == [(0, 4096, True, False), (4096, DATA_OFF - 4096, False, True),
                 (DATA_OFF, len(DATA), True, False),
                 (DATA_OFF + len(DATA), SIZE - DATA_OFF - len(DATA), False, True)]


def test_qemu_img_convert_from_and_compare(exp, tmpdir_short):
    out = os.path.join(tmpdir_short, "copy.img")
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", exp.uri, out)
    with open(out, "rb") as f:
        assert f.read() == expected_image()
    r = run("qemu-img", "compare", "-f", "raw", "-F", "raw", out, exp.uri)
    assert r.stdout == b"Images are identical.\n"


def test_qemu_img_convert_to_and_compare_differs(exp, tmpdir_short):
    src = os.path.join(tmpdir_short, "src.img")
    with open(src, "wb") as f:
        f.write(pattern(SIZE, seed=77))
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, exp.uri)
    assert sha256_file(exp.img) == sha256_file(src)
    with open(src, "r+b") as f:
        f.seek(123392)
        f.write(b"\xff")
    r = run("qemu-img", "compare", "-f", "raw", "-F", "raw", src, exp.uri, check=False)
    assert r.returncode == 1
    assert r.stdout.startswith(b"Content mismatch at offset 123392!\n")


def test_qemu_io_write_read_pattern(exp):
    run("qemu-io", "-f", "raw", exp.uri, "-c", "write -P 0xab 1M 64k",
        "-c", "aio_write -P 0xcd 2M 64k", "-c", "aio_flush")
    r = run("qemu-io", "-f", "raw", exp.uri, "-c", "read -P 0xab 1M 64k",
            "-c", "read -P 0xcd 2M 64k")
    assert b"read 65536/65536 bytes at offset 1048576" in r.stdout
    assert b"Pattern verification failed" not in r.stdout
    bad = run("qemu-io", "-f", "raw", exp.uri, "-c", "read -P 0xab 2M 4k", check=False)
    assert b"Pattern verification failed at offset 2097152" in bad.stdout
    with open(exp.img, "rb") as f:
        f.seek(1 << 20)
        assert f.read(65536) == b"\xab" * 65536


# -- nbdcopy / fio ----------------------------------------------------------------

def test_nbdcopy_both_directions(exp, tmpdir_short):
    out = os.path.join(tmpdir_short, "out.img")
    run("nbdcopy", exp.uri, out)
    with open(out, "rb") as f:
        assert f.read() == expected_image()
    src = os.path.join(tmpdir_short, "src.img")
    with open(src, "wb") as f:
        f.write(pattern(SIZE, seed=13))
    run("nbdcopy", "--flush", src, exp.uri)
    assert sha256_file(exp.img) == sha256_file(src)
    run("nbdcopy", exp.uri, out)
    assert run("cmp", src, out).returncode == 0


def test_nbdcopy_sparse_target_zeroes(exp, tmpdir_short):
    # a sparse source turns into zero requests; the target reads back zeros
    src = os.path.join(tmpdir_short, "zero.img")
    with open(src, "wb") as f:
        f.truncate(SIZE)
    run("nbdcopy", src, exp.uri)
    h = exp.handle()
    assert h.pread(len(DATA), DATA_OFF) == bytes(len(DATA))


def test_fio_verify(exp):
    r = run("fio", "--name=v", "--ioengine=nbd", "--uri=" + exp.uri, "--rw=randwrite",
            "--bs=4k", "--iodepth=8", "--size=8M", "--offset=8M", "--verify=crc32c",
            "--do_verify=1", "--verify_state_save=0", "--runtime=5",
            "--output-format=json", timeout=120)
    job = tool_json(r.stdout[r.stdout.index(b"{"):])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 8 << 20
    assert job["read"]["io_bytes"] == 8 << 20    # the verify pass
