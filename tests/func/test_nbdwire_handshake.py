"""NBD handshake (option haggling) at the byte level, hostile cases included.

Each test speaks raw NBD through nbdwire.Conn against the `served` export
(64 MiB "disk0", description "the disk") and, after anything hostile,
checks that the daemon is still alive and serves a second client.
The expectations are qemu-storage-daemon 7.2's answers unless noted.
"""
import struct

import pytest

from nbdwire import *  # noqa: F401,F403  (constants, Conn, `served` fixture)
from nbdwire import served, still_serving  # noqa: F401  (fixtures)


@pytest.fixture(autouse=True)
def _alive_after(still_serving):
    # after every case, hostile or not, a second client still works
    yield


def test_greeting_bytes(served):
    c = served.conn()
    raw = c.recv_exact(18)
    assert raw[:8] == b"NBDMAGIC"
    assert raw[8:16] == b"IHAVEOPT"
    assert struct.unpack(">H", raw[16:])[0] == FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES


def test_unknown_client_flags_close(served):
    c = served.conn()
    c.greeting()
    c.client_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES | (1 << 5))
    assert c.eof()
    served.assert_serving()


def test_bad_option_magic_closes(served):
    c = served.conn().start()
    c.opt(OPT_LIST, magic=0x1234567890ABCDEF)
    assert c.eof()
    served.assert_serving()


def test_unknown_option_unsup_and_continue(served):
    c = served.conn().start()
    c.opt(99, b"xyz")
    reps = c.opt_replies()
    assert [(o, t) for o, t, _ in reps] == [(99, REP_ERR_UNSUP)]
    assert reps[0][2] == b"Unsupported option 99 (<unknown>)"
    assert c.go("disk0")[-1][:2] == (OPT_GO, REP_ACK)
    assert c.read(0, 16).data == HEAD[:16]


def test_peek_export_unsupported(served):
    c = served.conn().start()
    c.opt(OPT_PEEK_EXPORT)
    assert [r[1] for r in c.opt_replies()] == [REP_ERR_UNSUP]


def test_starttls_without_tls_is_policy(served):
    c = served.conn().start()
    c.opt(OPT_STARTTLS)
    assert c.opt_replies() == [(OPT_STARTTLS, REP_ERR_POLICY, b"TLS not configured")]
    assert c.go("disk0")[-1][1] == REP_ACK


def test_list(served):
    c = served.conn().start()
    c.opt(OPT_LIST)
    reps = c.opt_replies()
    desc = b"the disk"
    assert reps == [(OPT_LIST, REP_SERVER, struct.pack(">I", 5) + b"disk0" + desc),
                    (OPT_LIST, REP_ACK, b"")]


def test_list_with_payload_is_invalid(served):
    c = served.conn().start()
    c.opt(OPT_LIST, b"abc")
    assert c.opt_replies() == [(OPT_LIST, REP_ERR_INVALID, b"option 'list' has unexpected length")]
    c.opt(OPT_LIST)
    assert c.opt_replies()[-1][1] == REP_ACK


@pytest.mark.parametrize("option", [OPT_GO, OPT_INFO])
def test_unknown_export(served, option):
    c = served.conn().start()
    reps = c.go("nope", option=option)
    assert reps == [(option, REP_ERR_UNKNOWN, b"export 'nope' not present")]
    # the connection goes on: the right name works afterwards
    assert c.go("disk0")[-1][1] == REP_ACK


def test_info_with_requests(served):
    c = served.conn().start()
    reps = c.go("disk0", [INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE], option=OPT_INFO)
    assert reps[-1] == (OPT_INFO, REP_ACK, b"")
    infos = parse_infos(reps)
    assert infos[INFO_NAME] == b"disk0"
    assert infos[INFO_DESCRIPTION] == b"the disk"
    # minimum 1, preferred 4096, maximum 32 MiB
    assert struct.unpack(">III", infos[INFO_BLOCK_SIZE]) == (1, 4096, 32 << 20)
    size, flags = struct.unpack(">QH", infos[INFO_EXPORT])
    assert size == SIZE
    assert flags & TF_HAS_FLAGS and not flags & TF_READ_ONLY
    # INFO stays in option haggling: GO still possible
    assert c.go("disk0")[-1][1] == REP_ACK
    assert c.read(0, 8).data == HEAD[:8]


def test_info_without_requests(served):
    # qsd sends EXPORT, BLOCK_SIZE and, when the export has one, DESCRIPTION
    # unasked; NAME only when asked
    c = served.conn().start()
    reps = c.go("disk0", [], option=OPT_INFO)
    assert sorted(parse_infos(reps)) == [INFO_EXPORT, INFO_DESCRIPTION, INFO_BLOCK_SIZE]


def test_info_unknown_request_ignored(served):
    c = served.conn().start()
    reps = c.go("disk0", [77], option=OPT_INFO)
    assert reps[-1][1] == REP_ACK
    assert 77 not in parse_infos(reps)


def test_go_inconsistent_lengths(served):
    c = served.conn().start()
    # claims 5 info requests but carries one
    c.opt(OPT_GO, info_data("disk0")[:-2] + struct.pack(">HH", 5, INFO_NAME))
    assert c.opt_replies() == [(OPT_GO, REP_ERR_INVALID, b"Inconsistent lengths in option go")]
    assert c.go("disk0")[-1][1] == REP_ACK


@pytest.mark.parametrize("data", [
    b"\0\0",                                                  # shorter than a name length
    struct.pack(">I", 100) + b"disk0" + b"\0\0",              # name longer than the option
    struct.pack(">I", 5) + b"disk0",                          # no info count
], ids=["short", "name-overruns", "no-info-count"])
def test_go_malformed_lengths(served, data):
    c = served.conn().start()
    c.opt(OPT_GO, data)
    assert c.opt_replies() == [(OPT_GO, REP_ERR_INVALID, b"Inconsistent lengths in option go")]
    assert c.go("disk0")[-1][1] == REP_ACK


def test_set_meta_context_malformed_lengths(served):
    c = served.conn().start()
    c.structured_reply()
    # one query claiming 100 bytes, carrying 15
    c.opt(OPT_SET_META_CONTEXT, struct.pack(">I", 5) + b"disk0" + struct.pack(">II", 1, 100) +
          b"base:allocation")
    assert c.opt_replies() == [(OPT_SET_META_CONTEXT, REP_ERR_INVALID,
                                b"Inconsistent lengths in option set meta context")]
    assert c.go("disk0")[-1][1] == REP_ACK


def test_set_meta_context_long_query_ignored(served):
    c = served.conn().start()
    c.structured_reply()
    assert c.meta_context(OPT_SET_META_CONTEXT, "disk0", ["x" * 5000]) == \
        [(OPT_SET_META_CONTEXT, REP_ACK, b"")]


def test_set_meta_context_duplicate_query_once(served):
    c = served.conn().start()
    c.structured_reply()
    reps = c.meta_context(OPT_SET_META_CONTEXT, "disk0", ["base:allocation"] * 3)
    assert [(t, d[4:]) for _, t, d in reps] == [(REP_META_CONTEXT, b"base:allocation"),
                                                 (REP_ACK, b"")]


def test_option_length_too_large(served):
    # qsd drops the connection on an option it will not buffer; a server may
    # also answer ERR_TOO_BIG and go on: either way, it must not try to
    # read 2 GiB first, and it keeps serving.
    c = served.conn().start()
    c.opt(OPT_LIST, length=0x7FFFFFFF)
    try:
        reps = c.opt_replies()
    except Closed:
        reps = None
    if reps is not None:
        assert reps[-1][1] in (REP_ERR_TOO_BIG, REP_ERR_INVALID)
    served.assert_serving()


def test_export_name_too_long(served):
    c = served.conn().start()
    c.opt(OPT_GO, info_data("x" * 5000))
    assert c.opt_replies() == [(OPT_GO, REP_ERR_INVALID, b"Invalid name length: 5000")]
    assert c.go("disk0")[-1][1] == REP_ACK


def test_many_options(served):
    # a long run of options on one connection is answered one by one (or, if
    # the server sets a limit, ends in a close): never a crash or a stall
    c = served.conn().start()
    answered = 0
    try:
        for _ in range(20):
            for _ in range(100):
                c.opt(99)
            for _ in range(100):
                assert c.opt_reply()[1] == REP_ERR_UNSUP
                answered += 1
    except Closed:
        pass
    assert answered >= 1000
    served.assert_serving()


def test_structured_reply_twice(served):
    c = served.conn().start()
    c.structured_reply()
    c.opt(OPT_STRUCTURED_REPLY)
    assert c.opt_replies() == [(OPT_STRUCTURED_REPLY, REP_ERR_INVALID,
                                b"structured reply already negotiated")]


def test_structured_reply_with_payload(served):
    c = served.conn().start()
    c.opt(OPT_STRUCTURED_REPLY, b"x")
    assert c.opt_replies()[-1][1] == REP_ERR_INVALID
    served.assert_serving()


def test_set_meta_context_before_structured_reply(served):
    c = served.conn().start()
    reps = c.meta_context(OPT_SET_META_CONTEXT, "disk0", ["base:allocation"])
    assert reps == [(OPT_SET_META_CONTEXT, REP_ERR_INVALID,
                     b"request option 'set meta context' when structured reply is not negotiated")]


def test_set_meta_context_filters_unknown(served):
    c = served.conn().start()
    c.structured_reply()
    reps = c.meta_context(OPT_SET_META_CONTEXT, "disk0",
                          ["foo:bar", "base:allocation", "qemu:dirty-bitmap:nope", "qemu:"])
    # only the one that exists is selected; qsd numbers it 0
    assert [(t, d[4:]) for _, t, d in reps] == [(REP_META_CONTEXT, b"base:allocation"),
                                                 (REP_ACK, b"")]


def test_set_meta_context_unknown_export(served):
    c = served.conn().start()
    c.structured_reply()
    reps = c.meta_context(OPT_SET_META_CONTEXT, "nope", ["base:allocation"])
    assert reps == [(OPT_SET_META_CONTEXT, REP_ERR_UNKNOWN, b"export 'nope' not present")]


def test_list_meta_context_all(served):
    c = served.conn().start()
    c.structured_reply()
    reps = c.meta_context(OPT_LIST_META_CONTEXT, "disk0", [])
    assert [(t, d[4:]) for _, t, d in reps] == [(REP_META_CONTEXT, b"base:allocation"),
                                                 (REP_ACK, b"")]


def test_list_meta_context_qemu_empty(served):
    # no allocation-depth, no bitmaps: "qemu:" matches nothing
    c = served.conn().start()
    c.structured_reply()
    assert c.meta_context(OPT_LIST_META_CONTEXT, "disk0", ["qemu:"]) == \
        [(OPT_LIST_META_CONTEXT, REP_ACK, b"")]


def test_list_meta_context_qemu_allocation_depth(impl, start_daemon, image, tmpdir_short):
    img = image(1 << 20)
    sock = tmpdir_short + "/nbd.sock"
    serve(start_daemon, impl, img, sock, extra_export=",allocation-depth=on")
    c = Conn(sock).start()
    c.structured_reply()
    reps = c.meta_context(OPT_LIST_META_CONTEXT, "disk0", ["qemu:"])
    assert [(t, d[4:]) for _, t, d in reps] == [(REP_META_CONTEXT, b"qemu:allocation-depth"),
                                                 (REP_ACK, b"")]
    reps = c.meta_context(OPT_SET_META_CONTEXT, "disk0",
                          ["base:allocation", "qemu:allocation-depth"])
    ids = {d[4:]: struct.unpack(">I", d[:4])[0] for _, t, d in reps if t == REP_META_CONTEXT}
    assert sorted(ids) == [b"base:allocation", b"qemu:allocation-depth"]
    assert len(set(ids.values())) == 2


def test_export_name_missing_closes(served):
    c = served.conn().start()
    c.opt(OPT_EXPORT_NAME, b"nope")
    assert c.eof()
    served.assert_serving()


def test_export_name_no_zeroes(served):
    c = served.conn().start()
    c.export_name("disk0")
    assert (c.size, c.tflags & TF_READ_ONLY) == (SIZE, 0)
    assert c.read(0, 32).data == HEAD[:32]


def test_export_name_unfixed_newstyle_pads_zeroes(served):
    c = served.conn().start(flags=0)
    c.export_name("disk0")          # checks the 124 zero bytes
    assert c.size == SIZE
    assert c.read(0, 32).data == HEAD[:32]


def test_abort_is_acked(served):
    c = served.conn().start()
    c.opt(OPT_ABORT)
    assert c.opt_replies() == [(OPT_ABORT, REP_ACK, b"")]
    assert c.eof()
    served.assert_serving()


@pytest.mark.parametrize("cut", [3, 17, 18 + 2, 18 + 4 + 7, 18 + 4 + 16 + 3])
def test_truncated_handshake_then_close(served, cut):
    # the client vanishes at various points of the handshake
    c = served.conn()
    c.recv_exact(min(cut, 18))
    if cut > 18:
        rest = struct.pack(">I", FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) + \
            struct.pack(">QII", IHAVEOPT, OPT_GO, 40) + b"\0" * 8
        c.send(rest[:cut - 18])
    c.close()
    served.assert_serving()


def test_idle_handshake_does_not_block_others(served):
    # one client sits in the handshake; another is served meanwhile
    idle = served.conn()
    idle.greeting()
    served.assert_serving()
    idle.close()
