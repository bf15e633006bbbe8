"""Prometheus /metrics: the text format checked by promtool, and a real
Prometheus server (Debian's prometheus) scraping a bexd under load.

bexd only (qemu-storage-daemon has no metrics endpoint)."""
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.request

import nbd
import pytest

import needs
from conftest import run_daemon_expect_fail, tool_text
from nbdwire import free_tcp_port

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")


def scrape(port, path="/metrics"):
    with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=10) as r:
        return r.status, r.headers.get("Content-Type"), tool_text(r.read())


def parse(text):
    """{(name, frozenset(labels)): value} of a text exposition."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, value = line.rsplit(" ", 1)
        if "{" in name_labels:
            name, labels = name_labels[:-1].split("{", 1)
            lab = frozenset(tuple(kv.split("=", 1)) for kv in labels.split('",') if kv)
            lab = frozenset((k, v.strip('"')) for k, v in lab)
        else:
            name, lab = name_labels, frozenset()
        out[(name, lab)] = float(value)
    return out


def metric(m, name, **labels):
    return m[(name, frozenset(labels.items()))]


@pytest.fixture
def served(start_daemon, image, tmpdir_short):
    img = image(16 << 20)
    sock = os.path.join(tmpdir_short, "nbd.sock")
    port = free_tcp_port()
    d = start_daemon("bexd", "--blockdev", "driver=file,node-name=f0,filename=" + img,
                     "--blockdev", "driver=raw,node-name=r0,file=f0",
                     "--nbd-server", "addr.type=unix,addr.path=" + sock,
                     "--export", "type=nbd,id=e0,node-name=r0,name=disk,writable=on",
                     "--metrics", "addr.type=inet,addr.host=127.0.0.1,addr.port=%d" % port)
    return d, sock, port


class Load:
    """Writes and reads from one libnbd client in a thread, bounded in count
    and time, until stopped."""

    def __init__(self, sock, max_ops=200000, max_s=60):
        self.sock, self.max_ops, self.max_s = sock, max_ops, max_s
        self.stop_flag = False
        self.ops = 0
        self.t = threading.Thread(target=self.run)
        self.t.start()

    def run(self):
        h = nbd.NBD()
        h.connect_uri("nbd+unix:///disk?socket=" + self.sock)
        buf = b"m" * 4096
        t0 = time.monotonic()
        while not self.stop_flag and self.ops < self.max_ops and time.monotonic() - t0 < self.max_s:
            off = (self.ops % 4096) * 4096
            h.pwrite(buf, off)
            h.pread(4096, off)
            self.ops += 2
        h.shutdown()

    def stop(self):
        self.stop_flag = True
        self.t.join()


def test_exposition(served):
    d, sock, port = served
    h = nbd.NBD()
    h.connect_uri("nbd+unix:///disk?socket=" + sock)
    h.pwrite(b"x" * 8192, 0)
    h.pread(4096, 0)
    status, ctype, text = scrape(port)
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    m = parse(text)
    assert metric(m, "bexd_export_clients", export="e0", type="nbd", node="r0") == 1
    assert metric(m, "bexd_export_write_bytes_total", export="e0", type="nbd", node="r0") == 8192
    assert metric(m, "bexd_export_read_operations_total", export="e0", type="nbd",
                  node="r0") == 1
    for node, drv in (("r0", "raw"), ("f0", "file")):
        assert metric(m, "bexd_node_operations_total", node=node, driver=drv, op="write") == 1
        assert metric(m, "bexd_node_bytes_total", node=node, driver=drv, op="write") == 8192
        assert metric(m, "bexd_node_latency_seconds_count", node=node, driver=drv,
                      op="write") == 1
        assert metric(m, "bexd_node_latency_seconds_bucket", node=node, driver=drv, op="write",
                      le="+Inf") == 1
    assert metric(m, "bexd_nbd_connections") == 1
    assert metric(m, "bexd_nbd_connections_accepted_total") == 1
    h.shutdown()
    if PROMTOOL:
        r = subprocess.run([PROMTOOL, "check", "metrics"], input=text.encode(),
                           capture_output=True, timeout=60)
        assert r.returncode == 0, tool_text(r.stdout) + tool_text(r.stderr)
    # other paths and methods
    with pytest.raises(urllib.error.HTTPError) as e:
        scrape(port, "/")
    assert e.value.code == 404
    req = urllib.request.Request("http://127.0.0.1:%d/metrics" % port, data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 405


def test_handshake_failures_counted(served):
    d, sock, port = served
    import socket
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    s.recv(18)                       # the greeting; then hang up mid-handshake
    s.close()
    h = nbd.NBD()                    # a full connection after it: the first one is gone
    h.connect_uri("nbd+unix:///disk?socket=" + sock)
    h.shutdown()
    m = parse(scrape(port)[2])
    assert metric(m, "bexd_nbd_handshake_failures_total") == 1
    assert metric(m, "bexd_nbd_tls_failures_total") == 0
    assert metric(m, "bexd_nbd_connections_accepted_total") == 2


def test_metrics_option_errors(image):
    rc, err = run_daemon_expect_fail("bexd", ["--metrics", "addr.type=inet,addr.host=127.0.0.1"])
    assert rc == 1
    assert err.strip() == ("bexd: --metrics addr.type=inet,addr.host=127.0.0.1: "
                           "Parameter 'addr.port' is missing")


def test_prometheus_scrapes_loaded_daemon(served, tmpdir_short):
    needs.tool("prometheus", "prometheus")
    d, sock, port = served
    load = Load(sock)
    pport = free_tcp_port()
    cfg = os.path.join(tmpdir_short, "prometheus.yml")
    with open(cfg, "w") as f:
        f.write("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
                "scrape_configs:\n  - job_name: bexd\n    static_configs:\n"
                "      - targets: ['127.0.0.1:%d']\n" % port)
    prom = subprocess.Popen([PROMETHEUS, "--config.file=" + cfg,
                             "--storage.tsdb.path=" + os.path.join(tmpdir_short, "tsdb"),
                             "--web.listen-address=127.0.0.1:%d" % pport,
                             "--log.level=warn"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def query(q):
        url = "http://127.0.0.1:%d/api/v1/query?query=%s" % (pport, urllib.parse.quote(q))
        with urllib.request.urlopen(url, timeout=10) as r:
            res = json.loads(r.read())["data"]["result"]
        return [float(x["value"][1]) for x in res]

    try:
        # wait for two scrapes that saw the load: the written operations
        # counter grows between them (bounded wait; Prometheus needs a few
        # seconds to start)
        deadline = time.monotonic() + 90
        seen = []
        while time.monotonic() < deadline:
            try:
                v = query('bexd_node_operations_total{node="r0",op="write"}')
            except (OSError, ValueError, KeyError):
                v = []
            if v and (not seen or v[0] > seen[-1]):
                seen.append(v[0])
            if len(seen) >= 2 and seen[-1] > 0:
                break
            time.sleep(0.5)          # polling Prometheus' view, not synchronising bexd
        assert len(seen) >= 2, "Prometheus never saw bexd's counters grow"
        assert query('up{job="bexd"}') == [1.0]
        assert query('bexd_export_clients{export="e0"}') == [1.0]
        rate = query('rate(bexd_node_latency_seconds_count{node="r0",op="write"}[5s])')
        assert rate and rate[0] >= 0
        # every series Prometheus stored is one bexd exposes
        names = query('count({job="bexd",__name__=~"bexd_.*"})')
        assert names and names[0] > 50
    finally:
        load.stop()
        prom.terminate()
        try:
            prom.wait(timeout=30)
        except subprocess.TimeoutExpired:
            prom.kill()
            prom.wait()
        prom.stderr.close()
    assert load.ops > 0
