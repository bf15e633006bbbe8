"""The command line, as qemu-storage-daemon 7.2 takes it.

A bad option makes the daemon exit 1 with exactly one line on stderr,
"PROGRAM: LOCATION: MESSAGE" in qsd's words (the program name is the only
difference and is normalised).  Good options in keyval and JSON form are
applied in order through the same operations QMP uses.
"""
import json
import os
import re
import signal
import subprocess

import pytest

from conftest import IMPLS, run_daemon_expect_fail, tool_text

# getopt's own messages carry argv[0] as invoked (qsd); bexd always says "bexd"
PREFIX = re.compile(r"^(\S*/)?(bexd|qemu-storage-daemon): ")

BAD = [
    (["--blockdev", "driver=file"], "--blockdev driver=file: Parameter 'filename' is missing"),
    (["--blockdev", "driver=file,filename=/x"],
     "--blockdev driver=file,filename=/x: 'node-name' must be specified for the root node"),
    (["--blockdev", "driver=null-co,node-name=n,read-only=maybe"],
     "--blockdev driver=null-co,node-name=n,read-only=maybe: Parameter 'read-only' expects 'on' or 'off'"),
    (["--blockdev", "driver"], "--blockdev driver: Parameter 'driver' does not accept value 'driver'"),
    (["--blockdev", "driver=null-co,a"], "--blockdev driver=null-co,a: Expected '=' after parameter 'a'"),
    (["--blockdev", "driver=null-co,a.b=1,a=2"],
     "--blockdev driver=null-co,a.b=1,a=2: Parameters 'a.*' used inconsistently"),
    (["--blockdev", "driver=null-co,a.1=1"], "--blockdev driver=null-co,a.1=1: Parameter 'a.0' missing"),
    (["--blockdev", "driver=null-co,x_y=1"], "--blockdev driver=null-co,x_y=1: Parameter 'x_y' is unexpected"),
    (["--blockdev", "driver=null-co,1=1"], "--blockdev driver=null-co,1=1: Invalid parameter '1'"),
    (["--blockdev", ",driver=null-co"], "--blockdev ,driver=null-co: Invalid parameter ''"),
    (["--blockdev", "driver=null-co,,x=1"],
     "--blockdev driver=null-co,,x=1: Parameter 'driver' does not accept value 'null-co,x=1'"),
    (["--blockdev", "driver=null-co,node-name=n,size=1Q"],
     "--blockdev driver=null-co,node-name=n,size=1Q: Parameter 'size' expects integer"),
    (["--blockdev", "driver=null-co,node-name=n,cache.direct.x=1"],
     "--blockdev driver=null-co,node-name=n,cache.direct.x=1: Parameters 'cache.direct.*' are unexpected"),
    (["--blockdev", "driver=null-co,node-name=n,cache=1"],
     "--blockdev driver=null-co,node-name=n,cache=1: Invalid parameter type for 'cache', expected: object"),
    (["--blockdev", "driver=null-co,node-name=n,help"],
     "--blockdev driver=null-co,node-name=n,help: Help is not available for this option"),
    (["--blockdev", "driver=raw,node-name=r,file.driver=file"],
     "--blockdev driver=raw,node-name=r,file.driver=file: Parameter 'file.filename' is missing"),
    (["--blockdev", "driver=raw,node-name=r,file.driver=xx"],
     "--blockdev driver=raw,node-name=r,file.driver=xx: Parameter 'driver' does not accept value 'xx'"),
    (["--blockdev", '{"driver":"file","x":1}'],
     '--blockdev {"driver":"file","x":1}: Parameter \'filename\' is missing'),
    (["--blockdev", '{"driver":"file"'], '--blockdev {"driver":"file": JSON parse error, premature EOI'),
    (["--blockdev", "{}x"], "--blockdev {}x: Expecting at most one JSON value"),
    (["--blockdev", '{"driver":"null-co","node-name":"n","size":"1"}'],
     '--blockdev {"driver":"null-co","node-name":"n","size":"1"}: '
     "Invalid parameter type for 'size', expected: integer"),
    (["--export", "type=nbd"], "--export type=nbd: Parameter 'id' is missing"),
    (["--export", "nbd,id=e,node-name=n"], "--export nbd,id=e,node-name=n: Cannot find device='' nor node-name='n'"),
    (["--object", "iothread"], "--object iothread: Parameter 'id' is missing"),
    (["--object", "authz-list,id=a,rules.0.policy=deny"],
     "--object authz-list,id=a,rules.0.policy=deny: Parameter 'rules.0.match' is missing"),
    (["--object", "authz-list,id=a,rules.0.match=x,rules.0.policy=y"],
     "--object authz-list,id=a,rules.0.match=x,rules.0.policy=y: Parameter 'policy' does not accept value 'y'"),
    (["--nbd-server", "addr.type=unix"], "--nbd-server addr.type=unix: Parameter 'addr.path' is missing"),
    (["--nbd-server", "addr.type=unix,addr.path=/nonexistent/x"],
     "--nbd-server addr.type=unix,addr.path=/nonexistent/x: "
     "Failed to bind socket to /nonexistent/x: No such file or directory"),
    (["--nbd-server", "addr.type=inet,addr.host=x,addr.port=1,addr.to=70000"],
     "--nbd-server addr.type=inet,addr.host=x,addr.port=1,addr.to=70000: Parameter 'to' expects uint16_t"),
    (["--nbd-server", "addr.type=inet,addr.host=x,addr.port=1,max-connections=-1"],
     "--nbd-server addr.type=inet,addr.host=x,addr.port=1,max-connections=-1: "
     "Parameter 'max-connections' expects uint32_t"),
    (["--nbd-server", "addr.type=inet,addr.host=127.0.0.1,addr.port=xyzzy"],
     "--nbd-server addr.type=inet,addr.host=127.0.0.1,addr.port=xyzzy: "
     "address resolution failed for 127.0.0.1:xyzzy: Servname not supported for ai_socktype"),
    (["--nbd-server", "addr.type=fd,addr.str=x"],
     "--nbd-server addr.type=fd,addr.str=x: Unable to parse FD number x"),
    (["--nbd-server", "addr.type=fd,addr.str=99"],
     "--nbd-server addr.type=fd,addr.str=99: File descriptor '99' is not a socket"),
    (["--chardev", "socket"], "--chardev socket: chardev: no id specified"),
    (["--chardev", "id=m"], '--chardev id=m: chardev: "m" missing backend'),
    (["--chardev", "socket,id=1x,path=/tmp/x,server=on,wait=off"],
     "--chardev socket,id=1x,path=/tmp/x,server=on,wait=off: Parameter 'id' expects an identifier"),
    (["--chardev", "foo,id=c"], "--chardev foo,id=c: 'foo' is not a valid char driver name"),
    (["--chardev", "socket,id=c,path=/nonexistent/s,server=on,wait=off"],
     "--chardev socket,id=c,path=/nonexistent/s,server=on,wait=off: "
     "Failed to bind socket to /nonexistent/s: No such file or directory"),
    (["--chardev", "socket,id=c,host=127.0.0.1,port=1,server=on,wait=off,bogus=1"],
     "--chardev socket,id=c,host=127.0.0.1,port=1,server=on,wait=off,bogus=1: Invalid parameter 'bogus'"),
    (["--chardev", "socket,id=m,host=localhost,server=on,wait=off"],
     "--chardev socket,id=m,host=localhost,server=on,wait=off: chardev: socket: no port given"),
    (["--chardev", "socket,id=m,path=/tmp/x,server=maybe"],
     "--chardev socket,id=m,path=/tmp/x,server=maybe: Parameter 'server' expects 'on' or 'off'"),
    (["--monitor", "foo"], '--monitor foo: chardev "foo" not found'),
    (["--monitor", "chardev=x,pretty=x"], "--monitor chardev=x,pretty=x: Parameter 'pretty' expects 'on' or 'off'"),
    (["--bogus"], "unrecognized option '--bogus'"),
    (["--pidfile"], "option '--pidfile' requires an argument"),
    (["--daemonize=1"], "option '--daemonize' doesn't allow an argument"),
    (["-Q"], "invalid option -- 'Q'"),
    (["x"], "x: Unexpected argument"),
]


@pytest.mark.parametrize("args,msg", BAD, ids=[" ".join(a) for a, m in BAD])
def test_bad_option(impl, args, msg):
    rc, err = run_daemon_expect_fail(impl, args)
    assert rc == 1
    lines = err.splitlines()
    # qsd adds a hint line to a few messages; bexd prints the message alone
    if impl == "qsd" and lines[1:] == ["Identifiers consist of letters, digits, "
                                       "'-', '.', '_', starting with a letter."]:
        lines = lines[:1]
    assert len(lines) == 1, err
    assert PREFIX.match(lines[0]), lines[0]
    assert PREFIX.sub("", lines[0]) == msg


def test_bad_option_after_good_ones(impl, tmpdir_short):
    """Options apply in order: the error names the one that failed."""
    sock = os.path.join(tmpdir_short, "m.sock")
    rc, err = run_daemon_expect_fail(impl, [
        "--chardev", "socket,id=m,path=%s,server=on,wait=off" % sock, "--monitor", "m",
        "--monitor", "m"])
    assert rc == 1
    assert PREFIX.sub("", err.strip()) == "--monitor m: Device 'm' is in use"


def test_monitor_readline_refused(impl, tmpdir_short):
    sock = os.path.join(tmpdir_short, "m.sock")
    rc, err = run_daemon_expect_fail(impl, [
        "--chardev", "socket,id=m,path=%s,server=on,wait=off" % sock,
        "--monitor", "m,mode=readline"])
    assert rc == 1
    assert PREFIX.sub("", err.strip()) == "--monitor m,mode=readline: Only QMP is supported"


def test_help(impl):
    r = subprocess.run([IMPLS[impl], "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert r.returncode == 0 and r.stderr == b""
    out = tool_text(r.stdout)
    assert re.match(r"Usage: (bexd|qemu-storage-daemon) \[options\]\n", out)
    for opt in ("-h, --help", "-V, --version", "--blockdev", "--chardev", "--daemonize",
                "--export", "--monitor", "--nbd-server", "--object", "--pidfile", "-T, --trace"):
        assert opt in out
    r2 = subprocess.run([IMPLS[impl], "-h"], stdout=subprocess.PIPE)
    assert r2.returncode == 0 and r2.stdout == r.stdout


def test_version(impl):
    for opt in ("-V", "--version"):
        r = subprocess.run([IMPLS[impl], opt], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert r.returncode == 0 and r.stderr == b""
        first = tool_text(r.stdout).splitlines()[0]
        assert re.match(r"(bexd|qemu-storage-daemon) version \d+\.\d+\.\d+", first), first


@pytest.mark.parametrize("type,props", [
    ("iothread", ["aio-max-batch=<int>", "poll-grow=<int>", "poll-max-ns=<int>",
                  "poll-shrink=<int>", "thread-pool-max=<int>", "thread-pool-min=<int>"]),
    ("secret", ["data=<string>", "file=<string>", "format=<QCryptoSecretFormat>",
                "iv=<string>", "keyid=<string>"]),
    ("authz-list", ["policy=<QAuthZListPolicy>", "rules=<QAuthZListRule>"]),
    ("tls-creds-x509", ["dir=<string>", "endpoint=<QCryptoTLSCredsEndpoint>",
                        "passwordid=<string>", "priority=<string>", "sanity-check=<bool>",
                        "verify-peer=<bool>"]),
])
def test_object_type_help(impl, type, props):
    r = subprocess.run([IMPLS[impl], "--object", type + ",help"], stdout=subprocess.PIPE)
    assert r.returncode == 0
    assert tool_text(r.stdout) == "%s options:\n" % type + "".join("  %s\n" % p for p in props)


def test_object_help(impl):
    r = subprocess.run([IMPLS[impl], "--object", "help"], stdout=subprocess.PIPE)
    assert r.returncode == 0
    out = tool_text(r.stdout)
    assert out.startswith("List of user creatable objects:\n")
    for t in ("iothread", "secret", "authz-simple", "tls-creds-x509"):
        assert "  %s\n" % t in out


def test_keyval_and_json_forms(impl, start_daemon, tmpdir_short, image):
    img = image(1 << 20)
    nbd_sock = os.path.join(tmpdir_short, "nbd.sock")
    d = start_daemon(
        impl,
        "--object", "iothread,id=io0,poll-max-ns=0",
        "--object", '{"qom-type":"iothread","id":"io1"}',
        "--blockdev", "file,node-name=f0,filename=%s,cache.direct=off" % img,
        "--blockdev", json.dumps({"driver": "raw", "node-name": "r0", "file": "f0"}),
        "--blockdev", "driver=null-co,node-name=z0,size=4096,read-zeroes=on",
        "--nbd-server", json.dumps({"addr": {"type": "unix", "path": nbd_sock}}),
        "--export", "nbd,id=e0,node-name=r0,writable=on,name=disk",
        "--export", json.dumps({"type": "nbd", "id": "e1", "node-name": "z0"}),
    )
    m = d.qmp()
    nodes = {n["node-name"]: n for n in m.execute("query-named-block-nodes")}
    assert {"f0", "r0", "z0"} <= set(nodes)
    assert nodes["z0"]["image"]["virtual-size"] == 4096
    exports = sorted(e["id"] for e in m.execute("query-block-exports"))
    assert exports == ["e0", "e1"]
    assert os.path.exists(nbd_sock)


def test_pidfile_written_and_removed_on_sigterm(impl, start_daemon):
    d = start_daemon(impl)
    with open(d.pidfile) as f:
        pid = int(f.read())
    assert pid == d.pid and d.alive()
    os.kill(pid, signal.SIGTERM)
    d.wait_exit()
    assert not os.path.exists(d.pidfile)
    assert not os.path.exists(d.qmp_path)      # the monitor socket is removed too
    d.pid = None


def test_trace_accepted(impl, tmpdir_short):
    """-T/--trace is accepted (bexd ignores it); the next bad option still
    reports its own error."""
    rc, err = run_daemon_expect_fail(impl, ["--trace", "nbd_*", "--blockdev", "driver=file"])
    assert rc == 1
    assert PREFIX.sub("", err.strip()) == "--blockdev driver=file: Parameter 'filename' is missing"


def _wait_exit(p, what, bound=60):
    try:
        return p.wait(timeout=bound)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        pytest.fail("%s did not return within %d s (it did not daemonize)" % (what, bound))


@pytest.mark.parametrize("spelling", ["--daemonize", "--daemon", "--daem"])
def test_daemonize_as_getopt_spells_it(impl, tmpdir_short, spelling):
    """getopt_long takes any unambiguous prefix of a long option, and the pass
    that decides to fork must read argv as the pass that applies it does:
    `--daemon` daemonizes in qsd (its pre-init pass is the same getopt walk).
    bexd used to scan argv for the literal "--daemonize", so `--daemon` set
    the option but never forked (seen while writing fuzz-cli's check that
    both passes agree)."""
    from conftest import adopting, stop_daemonized
    pidfile = os.path.join(tmpdir_short, "pid")
    with adopting():
        p = subprocess.Popen([IMPLS[impl], spelling, "--pidfile", pidfile,
                              "--blockdev", "null-co,node-name=n"], stderr=subprocess.PIPE)
        rc = _wait_exit(p, "%s %s" % (impl, spelling))
    err = p.stderr.read()
    p.stderr.close()
    assert rc == 0, err
    with open(pidfile) as f:
        pid = int(f.read())
    assert pid != p.pid              # the child serves; the parent has returned
    stop_daemonized(impl, pid)


@pytest.mark.parametrize("args,rc", [(["--daemonize", "-h"], 0), (["--daemonize", "-V"], 0),
                                     (["--daemonize", "--object", "help"], 1)])
def test_help_with_daemonize(impl, args, rc):
    """-h and -V are printed in the foreground with status 0, as qsd's pre-init
    pass does (bexd forked first, the child printed, and the parent, never told
    "ready", exited 1).  `--object help` comes in qsd's second pass, after the
    fork: printed by the child, status 1 from the parent; bexd the same."""
    r = subprocess.run([IMPLS[impl]] + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=60)
    assert r.returncode == rc, r.stderr
    assert r.stdout


def test_options_end_at_double_dash(impl, tmpdir_short):
    """Nothing after "--" is an option: `-- --daemonize` does not fork (qsd
    7.2 ignores what follows "--", and so does bexd).  bexd's pre-pass used to
    see the --daemonize there and fork anyway."""
    import socket
    from conftest import stop_process
    path = os.path.join(tmpdir_short, "nbd.sock")
    lsock = socket.socket(socket.AF_UNIX)
    lsock.bind(path)
    lsock.listen(4)
    fd = lsock.fileno()
    pidfile = os.path.join(tmpdir_short, "pid")
    p = subprocess.Popen([IMPLS[impl], "--nbd-server", "addr.type=fd,addr.str=%d" % fd,
                          "--pidfile", pidfile, "--", "--daemonize"],
                         pass_fds=[fd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lsock.close()
    try:
        # the greeting comes from the main loop, which runs after the
        # command line is applied and the pidfile written
        c = socket.socket(socket.AF_UNIX)
        c.settimeout(60)
        c.connect(path)
        assert c.recv(8) == b"NBDMAGIC"
        c.close()
        assert p.poll() is None
        with open(pidfile) as f:
            assert int(f.read()) == p.pid   # the process we started serves: no fork
    finally:
        if p.poll() is not None and os.path.exists(pidfile):
            with open(pidfile) as f:      # it forked after all: end the child
                child = int(f.read() or 0)
            if child and child != p.pid:
                os.kill(child, signal.SIGKILL)
        if impl == "bexd":
            stop_process(p)
        else:
            p.terminate()
            p.wait()
            p.stderr.close()
