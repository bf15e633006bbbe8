"""A small raw-socket NBD client for protocol-level tests.

Theory of operation: the tests want to send exactly the bytes they choose,
including malformed ones, and look at exactly the bytes the server answers,
so this module does no more than pack and unpack the structures of the NBD
protocol (doc/proto.md of the NBD project) with `struct`.  `Conn` wraps one
socket: `greeting()` reads the newstyle greeting, `opt()`/`opt_reply()` do
option haggling, `go()`/`export_name()` enter transmission, `request()` and
`reply()` do the transmission phase (simple and structured replies).

Every read has a timeout, so a server that stalls makes a test fail rather
than hang; `eof()` tells whether the server closed the connection.

It also holds the helpers the NBD tests share (this directory's conftest.py
belongs to someone else): `serve()` starts a daemon exporting an image on a
UNIX socket, `assert_serving()` proves a fresh client still gets data.
"""
import os
import socket
import struct

import pytest

NBDMAGIC = 0x4E42444D41474943          # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054          # "IHAVEOPT"
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# handshake flags (server) / client flags
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# options
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

# option replies
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR = 1 << 31
REP_ERR_UNSUP = REP_ERR | 1
REP_ERR_POLICY = REP_ERR | 2
REP_ERR_INVALID = REP_ERR | 3
REP_ERR_PLATFORM = REP_ERR | 4
REP_ERR_TLS_REQD = REP_ERR | 5
REP_ERR_UNKNOWN = REP_ERR | 6
REP_ERR_SHUTDOWN = REP_ERR | 7
REP_ERR_BLOCK_SIZE_REQD = REP_ERR | 8
REP_ERR_TOO_BIG = REP_ERR | 9

# info types
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# transmission flags
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_ROTATIONAL = 1 << 4
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8
TF_SEND_RESIZE = 1 << 9
TF_SEND_CACHE = 1 << 10
TF_SEND_FAST_ZERO = 1 << 11

# commands
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

# command flags
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# structured reply
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) | 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) | 2

# errno values on the wire (fixed by the protocol, not the host)
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

# base:allocation flags
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1


class Closed(Exception):
    """The server closed the connection (EOF or reset)."""


class Conn:
    def __init__(self, path=None, addr=None, timeout=10):
        if path is not None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(path)
        else:
            self.sock = socket.create_connection(addr, timeout=timeout)
        self.hflags = None
        self.size = None
        self.tflags = None
        self.structured = False
        self._cookie = 0

    # -- raw bytes --------------------------------------------------------
    def send(self, data):
        try:
            self.sock.sendall(data)
        except (ConnectionResetError, BrokenPipeError) as e:
            raise Closed(str(e))

    def recv_exact(self, n):
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            except (ConnectionResetError, BrokenPipeError) as e:
                raise Closed(str(e))
            if not chunk:
                raise Closed("EOF after %d of %d bytes" % (len(buf), n))
            buf += chunk
        return bytes(buf)

    def eof(self):
        """True when the server has closed the connection (reads EOF).

        Anything the server still had to say is discarded.  Times out (and
        so fails the test) if the server neither talks nor closes."""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    # -- handshake --------------------------------------------------------
    def greeting(self):
        magic, opt, flags = struct.unpack(">QQH", self.recv_exact(18))
        assert magic == NBDMAGIC, hex(magic)
        assert opt == IHAVEOPT, hex(opt)
        self.hflags = flags
        return flags

    def client_flags(self, flags=FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
        self.send(struct.pack(">I", flags))
        self.cflags = flags

    def start(self, flags=FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
        """Greeting + client flags: ready for options."""
        self.greeting()
        self.client_flags(flags)
        return self

    def opt(self, option, data=b"", length=None, magic=IHAVEOPT):
        if length is None:
            length = len(data)
        self.send(struct.pack(">QII", magic, option, length) + data)

    def opt_reply(self, max_len=1 << 20):
        """-> (option, reply type, data)."""
        magic, option, rtype, length = struct.unpack(">QIII", self.recv_exact(20))
        assert magic == OPT_REPLY_MAGIC, hex(magic)
        assert length <= max_len, "reply length %d" % length
        return option, rtype, self.recv_exact(length)

    def opt_replies(self):
        """All replies to one option, up to and including ACK or an error."""
        out = []
        while True:
            r = self.opt_reply()
            out.append(r)
            if r[1] == REP_ACK or r[1] & REP_ERR:
                return out

    def structured_reply(self):
        self.opt(OPT_STRUCTURED_REPLY)
        opt, rtype, data = self.opt_reply()
        assert (opt, rtype, data) == (OPT_STRUCTURED_REPLY, REP_ACK, b"")
        self.structured = True

    def meta_context(self, option, name, queries):
        self.opt(option, meta_context_data(name, queries))
        return self.opt_replies()

    def go(self, name="", infos=(), option=OPT_GO):
        """OPT_GO (or OPT_INFO); returns the list of replies.

        On success records the size and transmission flags."""
        self.opt(option, info_data(name, infos))
        replies = self.opt_replies()
        for _, rtype, data in replies:
            if rtype == REP_INFO and struct.unpack(">H", data[:2])[0] == INFO_EXPORT:
                _, self.size, self.tflags = struct.unpack(">HQH", data)
        return replies

    def export_name(self, name):
        """Old-fashioned NBD_OPT_EXPORT_NAME: no reply header, no error."""
        self.opt(OPT_EXPORT_NAME, name.encode())
        self.size, self.tflags = struct.unpack(">QH", self.recv_exact(10))
        if not (self.cflags & FLAG_C_NO_ZEROES):
            assert self.recv_exact(124) == bytes(124)

    def connect(self, name="", structured=False, contexts=()):
        """Full handshake to transmission with OPT_GO; asserts success."""
        self.start()
        if structured or contexts:
            self.structured_reply()
        if contexts:
            reps = self.meta_context(OPT_SET_META_CONTEXT, name, contexts)
            assert reps[-1][1] == REP_ACK, reps
            self.contexts = {struct.unpack(">I", d[:4])[0]: d[4:].decode()
                             for _, t, d in reps if t == REP_META_CONTEXT}
        reps = self.go(name)
        assert reps[-1][1] == REP_ACK, reps
        return self

    # -- transmission -----------------------------------------------------
    def next_cookie(self):
        self._cookie += 1
        return 0x1122334400000000 + self._cookie

    def request(self, cmd, offset=0, length=0, flags=0, data=b"", cookie=None,
                magic=REQUEST_MAGIC):
        if cookie is None:
            cookie = self.next_cookie()
        self.send(struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length) + data)
        return cookie

    def reply_header(self):
        """-> ("simple", error, cookie) or ("chunk", flags, type, cookie, length)."""
        magic, = struct.unpack(">I", self.recv_exact(4))
        if magic == SIMPLE_REPLY_MAGIC:
            err, cookie = struct.unpack(">IQ", self.recv_exact(12))
            return ("simple", err, cookie)
        assert magic == STRUCTURED_REPLY_MAGIC, hex(magic)
        flags, rtype, cookie, length = struct.unpack(">HHQI", self.recv_exact(16))
        return ("chunk", flags, rtype, cookie, length)

    def reply(self, read_len=0, max_chunk=64 << 20):
        """One complete reply: -> Reply.

        read_len is how many data bytes follow a successful simple reply
        (the length of the READ it answers); structured replies carry their
        own lengths and are collected until the DONE flag."""
        h = self.reply_header()
        if h[0] == "simple":
            _, err, cookie = h
            data = self.recv_exact(read_len) if err == 0 and read_len else b""
            return Reply(cookie, err, data=data, simple=True)
        r = Reply(h[3], 0, simple=False)
        while True:
            _, flags, rtype, cookie, length = h
            assert cookie == r.cookie, "chunks of two replies interleaved"
            assert length <= max_chunk, "chunk of %d bytes" % length
            r.add_chunk(rtype, flags, self.recv_exact(length))
            if flags & REPLY_FLAG_DONE:
                return r
            h = self.reply_header()
            assert h[0] == "chunk", "simple reply in the middle of a structured one"

    def read(self, offset, length, flags=0):
        c = self.request(CMD_READ, offset, length, flags)
        r = self.reply(read_len=length)
        assert r.cookie == c
        return r

    def write(self, offset, data, flags=0):
        c = self.request(CMD_WRITE, offset, len(data), flags, data)
        r = self.reply()
        assert r.cookie == c
        return r

    def cmd(self, cmd, offset=0, length=0, flags=0):
        c = self.request(cmd, offset, length, flags)
        r = self.reply()
        assert r.cookie == c
        return r

    def disc(self):
        self.request(CMD_DISC)


class Reply:
    """A simple or structured reply, flattened.

    data: the bytes read (simple) or a bytearray assembled from OFFSET_DATA
    chunks relative to `base` (structured); chunks: [(type, flags, payload)];
    holes: [(offset, length)]; extents: {context id: [(length, flags)]};
    err: the error number (0 on success); errmsg: structured error text."""

    def __init__(self, cookie, err, data=b"", simple=True):
        self.cookie = cookie
        self.err = err
        self.data = data
        self.simple = simple
        self.chunks = []
        self.holes = []
        self.pieces = []
        self.extents = {}
        self.errmsg = None
        self.err_offset = None

    def add_chunk(self, rtype, flags, payload):
        self.chunks.append((rtype, flags, payload))
        if rtype == REPLY_TYPE_OFFSET_DATA:
            off, = struct.unpack(">Q", payload[:8])
            self.pieces.append((off, payload[8:]))
        elif rtype == REPLY_TYPE_OFFSET_HOLE:
            self.holes.append(struct.unpack(">QI", payload))
        elif rtype == REPLY_TYPE_BLOCK_STATUS:
            ctx, = struct.unpack(">I", payload[:4])
            ext = [struct.unpack(">II", payload[i:i + 8]) for i in range(4, len(payload), 8)]
            self.extents.setdefault(ctx, []).extend(ext)
        elif rtype & (1 << 15):
            self.err, mlen = struct.unpack(">IH", payload[:6])
            self.errmsg = payload[6:6 + mlen].decode(errors="replace")
            if rtype == REPLY_TYPE_ERROR_OFFSET:
                self.err_offset, = struct.unpack(">Q", payload[6 + mlen:6 + mlen + 8])

    def assemble(self, offset, length):
        """The bytes a structured READ of [offset, offset+length) returned."""
        buf = bytearray(length)
        covered = 0
        for off, data in self.pieces:
            buf[off - offset:off - offset + len(data)] = data
            covered += len(data)
        for off, ln in self.holes:
            covered += ln
        assert covered == length, "chunks cover %d of %d bytes" % (covered, length)
        return bytes(buf)


def info_data(name, infos=()):
    n = name.encode() if isinstance(name, str) else name
    return struct.pack(">I", len(n)) + n + struct.pack(">H", len(infos)) + \
        b"".join(struct.pack(">H", i) for i in infos)


def meta_context_data(name, queries):
    n = name.encode() if isinstance(name, str) else name
    out = struct.pack(">I", len(n)) + n + struct.pack(">I", len(queries))
    for q in queries:
        qb = q.encode() if isinstance(q, str) else q
        out += struct.pack(">I", len(qb)) + qb
    return out


def parse_infos(replies):
    """{info type: payload after the type} from the REP_INFO replies."""
    out = {}
    for _, rtype, data in replies:
        if rtype == REP_INFO:
            out[struct.unpack(">H", data[:2])[0]] = data[2:]
    return out


# -- shared test helpers -----------------------------------------------------

def serve(start_daemon, impl, img, sock, name="disk0", extra_export="",
          node_opts="", server_opts="", args=()):
    """Start `impl` exporting `img` as `name` (writable) on UNIX socket `sock`."""
    return start_daemon(
        impl,
        "--blockdev", "driver=file,node-name=disk0,filename=%s%s" % (img, node_opts),
        "--nbd-server", "addr.type=unix,addr.path=%s%s" % (sock, server_opts),
        "--export", "type=nbd,id=exp0,node-name=disk0,name=%s,writable=on%s" % (name, extra_export),
        *args)


def assert_serving(daemon, sock, name="disk0", expect=None):
    """The daemon is alive and a fresh client can read the first sector."""
    assert daemon.alive(), "%s died" % daemon.impl
    c = Conn(sock).connect(name)
    try:
        r = c.read(0, 512)
        assert r.err == 0
        if expect is not None:
            assert r.data == expect[:512]
    finally:
        c.disc()
        c.close()


def pattern(length, seed=1):
    """Deterministic non-zero bytes (not compressible into holes)."""
    block = bytes(((i * 31 + seed * 7) % 251) + 1 for i in range(4096))
    return (block * (length // 4096 + 1))[:length]


def free_tcp_port(family=socket.AF_INET, host="127.0.0.1"):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.bind((host, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def sparse_image(path, size, data_at=()):
    """A sparse raw image with `pattern` data at the given (offset, length)s."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, ln in data_at:
            f.seek(off)
            f.write(pattern(ln, seed=off % 97))
    return path


class Served:
    """A daemon exporting a 64 MiB image as "disk0": data at [0, 4096)
    (`HEAD`), the rest a hole."""

    def __init__(self, daemon, sock, img):
        self.daemon = daemon
        self.sock = sock
        self.img = img

    def conn(self, **kw):
        return Conn(self.sock, **kw)

    def client(self, name="disk0", **kw):
        return Conn(self.sock).connect(name, **kw)

    def assert_serving(self):
        assert_serving(self.daemon, self.sock, expect=HEAD)


HEAD = pattern(4096, seed=3)
SIZE = 64 << 20


@pytest.fixture
def served(impl, start_daemon, image, tmpdir_short):
    img = image(SIZE, data=HEAD)
    sock = os.path.join(tmpdir_short, "nbd.sock")
    return Served(serve(start_daemon, impl, img, sock, extra_export=",description=the disk"),
                  sock, img)


@pytest.fixture
def still_serving(request):
    """Use with autouse in a test module: after each test that used
    `served`, the daemon must be alive and serve a fresh client."""
    # take `served` now, so that it is torn down after this check
    s = request.getfixturevalue("served") if "served" in request.fixturenames else None
    yield
    if s is not None:
        s.assert_serving()
