"""NBD transmission phase at the byte level, hostile cases included.

The `served` export is 64 MiB, writable, with HEAD (4 KiB of pattern) at
offset 0 and a hole after it.  Error numbers are the protocol's (EINVAL 22,
EPERM 1, ...).  Expectations are qemu-storage-daemon 7.2's answers unless
noted; after every hostile case the daemon must still serve a new client.
"""
import struct

import pytest

from nbdwire import *  # noqa: F401,F403
from nbdwire import served, still_serving  # noqa: F401


@pytest.fixture(autouse=True)
def _alive_after(still_serving):
    # after every case, hostile or not, a second client still works
    yield


def test_read_simple(served):
    c = served.client()
    r = c.read(0, 4096)
    assert (r.simple, r.err, r.data) == (True, 0, HEAD)


def test_write_then_read_back_fua(served):
    c = served.client()
    data = pattern(8192, seed=9)
    assert c.write(1 << 20, data, flags=CMD_FLAG_FUA).err == 0
    assert c.read(1 << 20, 8192).data == data
    with open(served.img, "rb") as f:        # FUA: it is in the file now
        f.seek(1 << 20)
        assert f.read(8192) == data


def test_flush_trim_zero_cache(served):
    c = served.client()
    data = pattern(65536, seed=5)
    assert c.write(2 << 20, data).err == 0
    assert c.cmd(CMD_FLUSH).err == 0
    # TRIM promises nothing about the contents afterwards (qsd ignores it
    # unless discard=unmap)
    assert c.cmd(CMD_TRIM, 2 << 20, 4096).err == 0
    assert c.cmd(CMD_WRITE_ZEROES, (2 << 20) + 4096, 4096, flags=CMD_FLAG_NO_HOLE).err == 0
    assert c.cmd(CMD_WRITE_ZEROES, (2 << 20) + 8192, 4096, flags=CMD_FLAG_FAST_ZERO).err == 0
    assert c.cmd(CMD_CACHE, 2 << 20, 65536).err == 0
    assert c.read((2 << 20) + 4096, 65536 - 4096).data == bytes(8192) + data[12288:]


def test_bad_request_magic_disconnects(served):
    c = served.client()
    c.request(CMD_READ, 0, 512, magic=0x12345678)
    assert c.eof()
    served.assert_serving()


def test_unknown_command_einval_and_continue(served):
    c = served.client()
    assert c.cmd(77, 0, 0).err == EINVAL
    assert c.read(0, 16).data == HEAD[:16]


def test_unknown_command_structured_message(served):
    c = served.client(structured=True)
    r = c.cmd(77, 0, 0)
    assert (r.simple, r.err) == (False, EINVAL)
    assert c.read(0, 16).assemble(0, 16) == HEAD[:16]


def test_unknown_read_flag_einval(served):
    c = served.client()
    r = c.cmd(CMD_READ, 0, 512, flags=0x8000)
    assert (r.err, r.data) == (EINVAL, b"")       # no data after an error
    assert c.read(0, 16).data == HEAD[:16]


def test_unknown_write_flag_einval_payload_skipped(served):
    c = served.client(structured=True)
    r = c.write(0, b"xxxxx", flags=0x4000)
    assert r.err == EINVAL
    assert r.errmsg == "unsupported flags for command write (got 0x4000)"
    # the payload was consumed, not parsed as a request, nor written
    assert c.read(0, 16).assemble(0, 16) == HEAD[:16]


def test_df_without_structured_reply_einval(served):
    c = served.client()
    assert c.cmd(CMD_READ, 0, 512, flags=CMD_FLAG_DF).err == EINVAL
    assert c.read(0, 16).data == HEAD[:16]


def test_zero_length_read_write(served):
    c = served.client()
    r = c.cmd(CMD_READ, 0, 0)
    assert (r.err, r.data) == (0, b"")
    assert c.write(0, b"").err == 0
    assert c.cmd(CMD_TRIM, 0, 0).err == 0
    assert c.cmd(CMD_WRITE_ZEROES, 0, 0).err == 0
    assert c.read(0, 4096).data == HEAD


def test_read_larger_than_32m_einval(served):
    c = served.client()
    assert c.cmd(CMD_READ, 0, (32 << 20) + 1).err == EINVAL
    assert c.read(0, 16).data == HEAD[:16]


def test_read_larger_than_32m_structured_error(served):
    c = served.client(structured=True)
    r = c.cmd(CMD_READ, 0, 33 << 20)
    assert (r.err, r.errmsg) == (EINVAL, "len (34603008 ) is larger than max len (33554432)")
    assert [t for t, _, _ in r.chunks] == [REPLY_TYPE_ERROR]


def test_read_32m_exactly(served):
    c = served.client()
    r = c.read(0, 32 << 20)
    assert r.err == 0
    assert r.data[:4096] == HEAD and r.data[4096:] == bytes((32 << 20) - 4096)


def test_write_larger_than_32m_disconnects(served):
    # its payload cannot be skipped cheaply: qsd drops the connection
    c = served.client()
    c.request(CMD_WRITE, 0, (32 << 20) + 4096)
    assert c.eof()
    served.assert_serving()


@pytest.mark.parametrize("cmd", [CMD_READ, CMD_TRIM, CMD_WRITE_ZEROES, CMD_CACHE])
def test_request_past_end_einval(served, cmd):
    c = served.client()
    assert c.cmd(cmd, SIZE, 512).err == EINVAL
    assert c.cmd(cmd, SIZE - 512, 1024).err == EINVAL
    assert c.read(0, 16).data == HEAD[:16]


def test_read_past_end_structured_message(served):
    c = served.client(structured=True)
    r = c.cmd(CMD_READ, SIZE, 512)
    assert r.err == EINVAL
    assert r.errmsg == "operation past EOF; From: 67108864, Len: 512, Size: 67108864"


def test_write_past_end(served):
    # the NBD spec suggests ENOSPC; qsd 7.2 answers EINVAL, and consumes the
    # payload either way
    c = served.client()
    r = c.write(SIZE - 512, b"z" * 1024)
    assert r.err == EINVAL
    assert c.read(SIZE - 512, 512).data == bytes(512)


def test_write_payload_truncated_then_client_vanishes(served):
    c = served.client()
    c.request(CMD_WRITE, 0, 4096, data=b"a" * 100)
    c.close()
    served.assert_serving()            # and HEAD was not partly overwritten
    with open(served.img, "rb") as f:
        assert f.read(4096) == HEAD


def test_request_header_truncated_then_client_vanishes(served):
    c = served.client()
    c.send(struct.pack(">IHH", REQUEST_MAGIC, 0, CMD_READ))
    c.close()
    served.assert_serving()


def test_disc_closes(served):
    c = served.client()
    c.disc()
    assert c.eof()
    served.assert_serving()


def test_disc_after_pipelined_write_completes_it(impl, served):
    # requests sent before DISC are carried out before the server closes
    # (proto.md: it "MUST handle all outstanding requests")
    c = served.client()
    data = pattern(4096, seed=11)
    c.request(CMD_WRITE, 3 << 20, 4096, CMD_FLAG_FUA, data)
    c.disc()
    c.eof()
    d = served.client()
    got = d.read(3 << 20, 4096).data
    if impl == "qsd" and got != data:
        # qsd 7.2's client_close() shuts the socket down at DISC while the
        # write's coroutine still runs: the EOF can come before the write
        # lands (seen once under load in a fresh-root run)
        pytest.xfail("qemu-storage-daemon 7.2 closed at DISC before a pipelined write landed")
    assert got == data


def test_pipelined_requests_all_answered(served):
    c = served.client()
    data = {}
    cookies = {}
    for i in range(32):
        data[i] = pattern(4096, seed=20 + i)
        cookies[c.request(CMD_WRITE, (4 << 20) + i * 4096, 4096, 0, data[i])] = None
    for _ in range(32):
        r = c.reply()
        assert r.err == 0
        assert r.cookie in cookies and cookies[r.cookie] is None
        cookies[r.cookie] = r
    reads = {c.request(CMD_READ, (4 << 20) + i * 4096, 4096): i for i in range(32)}
    for _ in range(32):
        # simple replies carry the READ's data: read the header first to know
        # which request this is
        kind, err, cookie = c.reply_header()
        assert (kind, err) == ("simple", 0)
        i = reads.pop(cookie)
        assert c.recv_exact(4096) == data[i]
    assert reads == {}


def test_pipelined_structured_reads(served):
    c = served.client(structured=True)
    offs = {c.request(CMD_READ, i * 2048, 2048): i * 2048 for i in range(16)}
    for _ in range(16):
        r = c.reply()
        off = offs.pop(r.cookie)
        assert r.assemble(off, 2048) == (HEAD + bytes(65536))[off:off + 2048]
    assert offs == {}


def test_structured_read_of_hole_gives_offset_hole(served):
    c = served.client(structured=True)
    r = c.read(1 << 20, 65536)
    assert r.chunks == [(REPLY_TYPE_OFFSET_HOLE, REPLY_FLAG_DONE,
                         struct.pack(">QI", 1 << 20, 65536))]


def test_structured_read_mixed(served):
    c = served.client(structured=True)
    r = c.read(0, 8192)
    assert r.assemble(0, 8192) == HEAD + bytes(4096)
    assert r.holes == [(4096, 4096)]


def test_structured_read_df_single_chunk(served):
    c = served.client(structured=True)
    r = c.read(0, 8192, flags=CMD_FLAG_DF)
    assert [t for t, _, _ in r.chunks] == [REPLY_TYPE_OFFSET_DATA]
    assert r.assemble(0, 8192) == HEAD + bytes(4096)


def test_block_status_not_negotiated(served):
    c = served.client(structured=True)
    r = c.cmd(CMD_BLOCK_STATUS, 0, 512)
    assert (r.err, r.errmsg) == (EINVAL, "CMD_BLOCK_STATUS not negotiated")


def test_block_status_base_allocation(served):
    c = served.client(contexts=["base:allocation"])
    (ctx, name), = c.contexts.items()
    assert name == "base:allocation"
    r = c.cmd(CMD_BLOCK_STATUS, 0, 1 << 20)
    assert r.err == 0
    assert r.extents[ctx][0] == (4096, 0)
    assert r.extents[ctx][1][1] == STATE_HOLE | STATE_ZERO
    assert sum(ln for ln, _ in r.extents[ctx]) <= 1 << 20 or len(r.extents[ctx]) == 2


def test_block_status_req_one(served):
    c = served.client(contexts=["base:allocation"])
    r = c.cmd(CMD_BLOCK_STATUS, 0, SIZE, flags=CMD_FLAG_REQ_ONE)
    assert list(r.extents.values()) == [[(4096, 0)]]


def test_block_status_huge_length_bounded(served):
    # a length far past the end: qsd 7.2 refuses it; a server that clamps
    # instead must answer extents that stay within the export, in a chunk of
    # bounded size
    c = served.client(contexts=["base:allocation"])
    r = c.cmd(CMD_BLOCK_STATUS, 0, 0xFFFFFFFF)
    if r.err:
        assert r.err == EINVAL
    else:
        for ext in r.extents.values():
            assert 0 < sum(ln for ln, _ in ext) <= SIZE
    assert sum(len(p) for _, _, p in r.chunks) <= 1 << 20
    assert c.read(0, 16).assemble(0, 16) == HEAD[:16]


def test_block_status_fragmented_bounded(served):
    # 1024 alternating data/hole extents: the answer stays one reply and
    # describes the start correctly
    c = served.client(contexts=["base:allocation"])
    # in batches: a client that never reads replies fills its socket and
    # the server rightly stops reading requests
    for b in range(0, 1024, 64):
        for i in range(b, b + 64, 2):
            c.request(CMD_WRITE, (8 << 20) + i * 4096, 4096, 0, pattern(4096, seed=i))
        for i in range(b, b + 64, 2):
            assert c.reply().err == 0
    r = c.cmd(CMD_BLOCK_STATUS, 8 << 20, 4 << 20)
    assert r.err == 0
    (ext,) = r.extents.values()
    assert ext[0] == (4096, 0)
    assert ext[1][1] & STATE_ZERO
    assert sum(ln for ln, _ in ext) <= 4 << 20


def test_block_status_zero_length_einval(served):
    c = served.client(contexts=["base:allocation"])
    r = c.cmd(CMD_BLOCK_STATUS, 0, 0)
    assert (r.err, r.errmsg) == (EINVAL, "need non-zero length")


def test_read_only_export_refuses_writes(impl, start_daemon, image, tmpdir_short):
    # The NBD spec wants EPERM for writes to a read-only export; qsd 7.2
    # answers EINVAL ("Export is read-only").  bexd follows the spec (libnbd
    # reports EPERM to applications that bypass its own check).
    img = image(1 << 20, data=HEAD)
    sock = tmpdir_short + "/ro.sock"
    start_daemon(impl, "--blockdev", "driver=file,node-name=disk0,filename=%s" % img,
                 "--nbd-server", "addr.type=unix,addr.path=%s" % sock,
                 "--export", "type=nbd,id=exp0,node-name=disk0,name=disk0,writable=off")
    want = EINVAL if impl == "qsd" else EPERM
    c = Conn(sock).connect("disk0", structured=True)
    assert c.tflags & TF_READ_ONLY
    for r in (c.write(0, b"x" * 512), c.cmd(CMD_TRIM, 0, 512),
              c.cmd(CMD_WRITE_ZEROES, 0, 512)):
        assert (r.err, r.errmsg) == (want, "Export is read-only")
    assert c.cmd(CMD_FLUSH).err == 0
    assert c.read(0, 4096).assemble(0, 4096) == HEAD
    with open(img, "rb") as f:
        assert f.read(4096) == HEAD
