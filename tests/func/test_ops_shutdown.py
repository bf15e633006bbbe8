"""Graceful stop: SIGTERM under load loses no acknowledged write; a client
that cannot be finished is named in the log at the deadline.

bexd only: qemu-storage-daemon drops its clients on SIGTERM.
"""
import os
import signal
import subprocess
import time

import nbd
import pytest

from conftest import BEXD, tool_text
from nbdwire import CMD_READ, Conn

BLOCK = 4096


def block_data(i, gen):
    head = b"%08d:%08d:" % (i, gen)
    return head + bytes([(i + gen) & 0xFF]) * (BLOCK - len(head))


def start(img, sock, env=None):
    p = subprocess.Popen([BEXD, "--blockdev", "driver=file,node-name=disk,filename=" + img,
                          "--nbd-server", "addr.type=unix,addr.path=" + sock,
                          "--export", "type=nbd,id=e0,node-name=disk,writable=on"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    assert p.stderr.readline().startswith(b"bexd: info: ready")
    return p


def test_sigterm_under_load_keeps_acknowledged_writes(image, tmpdir_short):
    nblocks = 1024
    img = image(nblocks * BLOCK)
    sock = os.path.join(tmpdir_short, "nbd.sock")
    p = start(img, sock)
    try:
        handles = []
        for _ in range(4):
            h = nbd.NBD()
            h.connect_uri("nbd+unix:///disk?socket=" + sock)
            handles.append(h)
        acked = {}                       # block -> generation acknowledged last
        inflight = {}
        failed = 0
        gen = 0
        sent_term = False
        bufs = {}

        def done(h, i, g, err):
            nonlocal failed
            inflight[h].discard((i, g))
            if err.value == 0:
                acked[i] = max(acked.get(i, 0), g)
            else:
                failed += 1
                err.value = 0
            return 1

        for h in handles:
            inflight[h] = set()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            live = [h for h in handles if not h.aio_is_closed() and not h.aio_is_dead()]
            if not live:
                break
            for h in live:
                while len(inflight[h]) < 16 and not (sent_term and gen > 20000):
                    gen += 1
                    i = gen % nblocks
                    b = nbd.Buffer.from_bytearray(bytearray(block_data(i, gen)))
                    bufs[(i, gen)] = b
                    try:
                        h.aio_pwrite(b, i * BLOCK,
                                     completion=lambda err, h=h, i=i, g=gen: done(h, i, g, err))
                    except nbd.Error:
                        break
                    inflight[h].add((i, gen))
            if not sent_term and len(acked) >= nblocks // 2:
                p.send_signal(signal.SIGTERM)     # writes are in flight right now
                sent_term = True
            for h in live:
                try:
                    h.poll(0)
                except nbd.Error:
                    pass
            if sent_term and all(not inflight[h] for h in live):
                # everything answered: the server closes us after its replies
                for h in live:
                    try:
                        h.poll(1)
                    except nbd.Error:
                        pass
                if all(not inflight[h] for h in handles) and p.poll() is not None:
                    break
            if p.poll() is not None and all(not inflight[h] for h in handles):
                break
        assert p.wait(timeout=60) == 0
        err = tool_text(p.stderr.read())
        assert "shutting down (Terminated)" in err
        assert "left export 'e0' (server shutting down)" in err
        assert err.rstrip().endswith("bexd: info: stopped")
        # every acknowledged write is in the image (a later one may have
        # landed over it, never an older one)
        with open(img, "rb") as f:
            data = f.read()
        for i, g in acked.items():
            got = data[i * BLOCK:(i + 1) * BLOCK]
            head = got[:18]
            assert head[:9] == b"%08d:" % i, (i, head)
            assert int(head[9:17]) >= g, (i, g, head)
            assert got == block_data(i, int(head[9:17]))
        assert len(acked) >= nblocks // 2
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stderr.close()


def test_deadline_names_stuck_client(image, tmpdir_short):
    """A client that does not read its replies cannot be finished: at the
    deadline the log says who and how much, then bexd exits 1."""
    img = image(4 << 20)
    sock = os.path.join(tmpdir_short, "nbd.sock")
    env = dict(os.environ, BEXD_STOP_TIMEOUT="1")
    p = start(img, sock, env)
    try:
        c = Conn(sock)
        c.connect("disk")
        c.sock.setsockopt(__import__("socket").SOL_SOCKET,
                          __import__("socket").SO_RCVBUF, 4096)
        for _ in range(64):          # 64 MiB of replies nobody reads
            c.request(CMD_READ, 0, 1 << 20)
        # the connection is attached and its requests queued once the QMP-less
        # log line shows it; then stop
        line = tool_text(p.stderr.readline())
        assert "attached to export 'e0'" in line, line
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 1
        err = tool_text(p.stderr.read())
        assert "shutdown did not finish within 1 s; exiting anyway" in err
        assert "of export 'e0' still has" in err and "requests in flight" in err
        assert "export 'e0' (nbd, node 'disk') not removed yet: 1 clients" in err
        c.close()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stderr.close()
