"""bexctl's human views: tables for the query commands, and `top` in a real
terminal (tmux), refreshed every second while a client writes."""
import os
import re
import shutil
import subprocess
import threading
import time

import nbd
import pytest

import needs
from conftest import BEXCTL, tool_text

TMUX = shutil.which("tmux")


def ctl(sock, *args):
    r = subprocess.run([BEXCTL, "-s", sock] + list(args), capture_output=True, timeout=60)
    return r.returncode, tool_text(r.stdout), tool_text(r.stderr)


@pytest.fixture
def served(start_daemon, image, tmpdir_short):
    img = image(16 << 20)
    sock = os.path.join(tmpdir_short, "nbd.sock")
    d = start_daemon("bexd", "--blockdev", "driver=file,node-name=f0,filename=" + img,
                     "--nbd-server", "addr.type=unix,addr.path=" + sock,
                     "--export", "type=nbd,id=e0,node-name=f0,name=disk,writable=on")
    return d, sock


def test_tables(served):
    d, sock = served
    h = nbd.NBD()
    h.connect_uri("nbd+unix:///disk?socket=" + sock)
    h.pwrite(b"t" * 4096, 0)
    rc, out, err = ctl(d.qmp_path, "exports")
    assert rc == 0
    assert out.splitlines() == ["ID  TYPE  NODE  SHUTTING-DOWN", "e0  nbd   f0    no"]
    rc, out, _ = ctl(d.qmp_path, "clients")
    lines = out.splitlines()
    assert lines[0].split() == ["EXPORT", "TRANSPORT", "PEER", "TLS-IDENTITY", "SINCE",
                                "INFLIGHT", "RD-OPS", "RD-BYTES", "WR-OPS", "WR-BYTES", "FAILED"]
    cells = lines[1].split()
    assert cells[:4] == ["e0", "unix", "unix:pid=%d" % os.getpid(), "-"]
    assert cells[-3:] == ["1", "4096", "0"]
    rc, out, _ = ctl(d.qmp_path, "stats")
    assert out.splitlines()[0].split()[:3] == ["NODE", "RD-OPS", "RD-BYTES"]
    assert re.search(r"^f0\s+0\s+0\s+1\s+4096\s", out, re.M), out
    # --json: the same command as one line of JSON; other commands as before
    rc, out, _ = ctl(d.qmp_path, "--json", "query-block-exports")
    assert out == '[{"id":"e0","type":"nbd","node-name":"f0","shutting-down":false}]\n'
    rc, out, _ = ctl(d.qmp_path, "--pretty", "exports")
    assert out.startswith("[\n  {\n")
    h.shutdown()


def test_top_batch(served):
    """Without a terminal, top -n N prints N snapshots."""
    d, sock = served
    rc, out, err = ctl(d.qmp_path, "top", "-n", "2")
    assert rc == 0, err
    frames = [f for f in out.split("bexctl top - ") if f]
    assert len(frames) == 2
    for f in frames:
        assert "1 exports, 0 clients" in f
        assert re.search(r"^e0\s+0\s+0\s+0\.0\s+0\.0\s+0\.000\s+0\.000\s+nbd on f0, 0 clients",
                         f, re.M), f


def test_top_in_tmux(served, tmpdir_short):
    needs.tool("tmux", "tmux")
    d, sock = served
    stop = threading.Event()
    ops = [0]

    def load():
        h = nbd.NBD()
        h.connect_uri("nbd+unix:///disk?socket=" + sock)
        t0 = time.monotonic()
        while not stop.is_set() and time.monotonic() - t0 < 60:
            h.pwrite(b"w" * 65536, (ops[0] % 64) * 65536)
            ops[0] += 1
        h.shutdown()

    t = threading.Thread(target=load)
    t.start()
    session = "bexctl-top-%d" % os.getpid()
    sock_opt = ["-S", os.path.join(tmpdir_short, "tmux.sock")]
    subprocess.run([TMUX] + sock_opt + ["new-session", "-d", "-s", session, "-x", "150",
                                        "-y", "30", BEXCTL, "-s", d.qmp_path, "top"],
                   check=True, timeout=30)
    screen = ""
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            screen = subprocess.run([TMUX] + sock_opt + ["capture-pane", "-p", "-t", session],
                                    capture_output=True, timeout=30).stdout.decode(errors="replace")
            m = re.search(r"^e0\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)",
                          screen, re.M)
            # a frame with a rate: writes per second and MiB/s above zero
            if m and int(m.group(2)) > 0 and float(m.group(4)) > 0:
                break
            time.sleep(0.2)          # polling the screen, which redraws every second
        else:
            pytest.fail("top never showed the writes:\n" + screen)
        assert screen.startswith("bexctl top - ")
        assert "1 exports, 1 clients" in screen and "q quits" in screen
        assert re.search(r"^\s+unix:pid=%d\s" % os.getpid(), screen, re.M), screen
        assert "EXPORT / CLIENT" in screen and "w_await" in screen
        subprocess.run([TMUX] + sock_opt + ["send-keys", "-t", session, "q"], timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r = subprocess.run([TMUX] + sock_opt + ["has-session", "-t", session],
                               capture_output=True, timeout=30)
            if r.returncode != 0:
                break                # 'q' ended bexctl, and with it the session
            time.sleep(0.1)
        else:
            pytest.fail("bexctl top did not quit on 'q'")
    finally:
        stop.set()
        t.join()
        subprocess.run([TMUX] + sock_opt + ["kill-server"], capture_output=True, timeout=30)
    assert ops[0] > 0
