"""What `meson install` puts on a machine: programs, man pages that cover
every option, systemd units that systemd-analyze accepts, configuration
examples.  (The Debian package installs the same files: test_ops_package.py.)"""
import os
import re
import shutil
import subprocess

import pytest

import needs
from conftest import BUILD, tool_text

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
UNITS = ["bexd.service", "bexd.socket", "bexd@.service", "bexd@.socket"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    dest = str(tmp_path_factory.mktemp("destdir"))
    r = subprocess.run(["meson", "install", "-C", BUILD, "--no-rebuild", "--destdir", dest],
                       capture_output=True, timeout=300)
    assert r.returncode == 0, tool_text(r.stdout) + tool_text(r.stderr)
    files = set()
    for root, _, names in os.walk(dest):
        for n in names:
            files.add(os.path.relpath(os.path.join(root, n), dest))
    return dest, files


def find(files, suffix):
    [f] = [f for f in files if f.endswith(suffix)]
    return f


def test_files(installed):
    dest, files = installed
    for suffix in ["sbin/bexd", "bin/bexctl", "man8/bexd.8", "man1/bexctl.1",
                   "etc/default/bexd", "share/doc/bexd/operations.md",
                   "share/doc/bexd/examples/example.conf"] + ["systemd/system/" + u for u in UNITS]:
        find(files, suffix)
    assert os.access(os.path.join(dest, find(files, "sbin/bexd")), os.X_OK)


def man_text(dest, files, page):
    r = subprocess.run(["man", "-l", os.path.join(dest, find(files, page))],
                       capture_output=True, timeout=60, env=dict(os.environ, MANWIDTH="100"))
    assert r.returncode == 0, tool_text(r.stderr)
    return tool_text(r.stdout)


def test_bexd_manual_covers_every_option(installed):
    dest, files = installed
    text = man_text(dest, files, "man8/bexd.8")
    bexd = os.path.join(dest, find(files, "sbin/bexd"))
    help_text = tool_text(subprocess.run([bexd, "--help"], capture_output=True, timeout=60).stdout)
    options = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", help_text))
    assert len(options) >= 10
    for opt in options:
        assert opt in text, "bexd(8) does not mention %s" % opt
    objs = subprocess.run([bexd, "--object", "help"], capture_output=True,
                          timeout=60).stdout.decode(errors="replace").splitlines()[1:]
    objs = [o.strip() for o in objs if o.strip()]
    for o in objs:
        assert o in text, "bexd(8) does not mention object %s" % o
    for word in ["nbd", "vhost-user-blk", "fuse", "file", "host_device", "raw", "null-co",
                 "rbd", "SIGTERM", "SIGHUP", "LISTEN_FDNAMES", "NOTIFY_SOCKET",
                 "BEXD_STOP_TIMEOUT", "__org.bexd_query-export-clients", "EXAMPLES"]:
        assert word in text, word


def test_bexctl_manual(installed):
    dest, files = installed
    text = man_text(dest, files, "man1/bexctl.1")
    for word in ["--socket", "--json", "--pretty", "--events", "top", "exports", "clients",
                 "EXIT STATUS"]:
        assert word in text, word


def test_units_verify(installed, tmp_path):
    needs.tool("systemd-analyze", "systemd")
    dest, files = installed
    bexd = os.path.join(dest, find(files, "sbin/bexd"))
    for u in UNITS:
        src = open(os.path.join(dest, find(files, "systemd/system/" + u))).read()
        # the installed path exists only inside DESTDIR here
        src = re.sub(r"^ExecStart=\S+", "ExecStart=" + bexd, src, flags=re.M)
        (tmp_path / u).write_text(src)
    r = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no",
                        str(tmp_path / "bexd.socket"), str(tmp_path / "bexd.service"),
                        str(tmp_path / "bexd@demo.service"), str(tmp_path / "bexd@demo.socket")],
                       capture_output=True, timeout=120)
    assert r.returncode == 0 and not r.stderr.strip(), tool_text(r.stderr)
    service = (tmp_path / "bexd.service").read_text()
    for line in ["Type=notify", "WatchdogSec=", "ExecReload=/bin/kill -HUP $MAINPID",
                 "NoNewPrivileges=yes", "ProtectSystem=full", "SystemCallFilter=@system-service"]:
        assert line in service
    # a unit that systemd would reject makes the check fail
    (tmp_path / "bad.service").write_text(service.replace("Type=notify", "Type=notifyy"))
    r = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", str(tmp_path / "bad.service")],
                       capture_output=True, timeout=120)
    assert b"notifyy" in r.stderr


def test_default_arguments_start_a_socket_activated_daemon(installed, tmp_path):
    """The shipped /etc/default/bexd works as is, with the NBD socket passed
    as bexd.socket passes it (paths moved into a temporary directory)."""
    dest, files = installed
    sa = needs.tool("systemd-socket-activate", "systemd")
    args = open(os.path.join(dest, find(files, "etc/default/bexd"))).read()
    m = re.search(r'^BEXD_ARGS="([^"]*)"', args, re.M)
    argv = m.group(1).replace("/run/bexd", str(tmp_path)).split()
    nbd_sock = str(tmp_path / "nbd.sock")
    p = subprocess.Popen([sa, "-l", nbd_sock, "--fdname=nbd",
                          os.path.join(dest, find(files, "sbin/bexd"))] + argv,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert b"Listening on" in p.stderr.readline()
        r = subprocess.run(["nbdinfo", "--list", "nbd+unix://?socket=" + nbd_sock],
                           capture_output=True, timeout=60)
        assert r.returncode == 0, tool_text(r.stderr)     # no exports yet, but serving
        from conftest import QMP
        q = QMP(str(tmp_path / "qmp.sock"))
        assert q.execute("query-block-exports") == []
        q.close()
    finally:
        p.terminate()
        p.wait(timeout=30)
        p.stderr.close()
