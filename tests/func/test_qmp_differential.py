"""Random QMP commands, the same ones sent to bexd and qemu-storage-daemon.

The commands are drawn from qsd's own schema (query-qmp-schema): any
command bexd implements, with arguments built from the command's argument
type, mostly well-formed, with names that exist in the session (so many
commands get past their argument checks) and now and then a missing
member, an unknown member or a value of the wrong kind.  Both daemons
start from the same state: a file node, a raw and a qcow2 node, a bitmap,
an NBD server with an export.

For each command both must answer alike: success or failure, and on
failure the same error class and message.  bexd must not die.  After a
difference in success or failure the states may part, so both daemons are
started afresh.  The seeds are fixed, so a run is repeatable; a random run
of your own: BEXD_QMP_DIFF_SEED=N (and BEXD_QMP_DIFF_COUNT) in the
environment.

What is left out, and why:
- commands bexd does not have (test_qmp_commands.py checks they are
  CommandNotFound), and commands that start jobs or end the session,
  whose later answers depend on timing (jobs) or end the run (quit);
- rbd nodes, which look for a Ceph cluster (test_rbd.py has one), and
  nbd nodes, which dial servers (test_nbd_client.py runs them);
- values bexd's schema does not list (drivers, object and chardev types
  bexd does not implement: "Parameter 'driver' does not accept value
  'vmdk'"), since qsd then reports an error of the driver's own;
- where bexd does more than qsd 7.2 on purpose: persistent bitmaps on
  raw images (docs/bitmaps.md), authz-pam and authz-listfile objects
  (qsd's Debian build has no PAM; its authz-listfile type name is
  authz-list-file), a secret file of more than 1 MiB (bexd refuses it),
  an exported bitmap named without its node found on a
  format node's file, image locks that differ because bexd's writable
  exports do not share "write" (README), and commands that crash qsd 7.2
  (block-dirty-bitmap-merge of an empty list, blockdev-reopen of an empty
  list: bexd answers them).
"""
import json
import os
import random
import subprocess

import pytest

from conftest import QSD

pytestmark = pytest.mark.skipif(not QSD, reason="qemu-storage-daemon not installed")

SEEDS = [int(os.environ["BEXD_QMP_DIFF_SEED"])] if "BEXD_QMP_DIFF_SEED" in os.environ \
    else [1, 2, 3, 4]
COUNT = int(os.environ.get("BEXD_QMP_DIFF_COUNT", "250"))

# started jobs run on by time; quit ends the session
SKIP_COMMANDS = {"quit", "qmp_capabilities", "blockdev-create", "blockdev-backup",
                 "block-stream", "block-commit", "blockdev-mirror", "drive-mirror", "drive-backup",
                 "transaction"}

NAMES = ["f0", "r0", "q0", "fq", "e0", "b0", "n0", "nope", "#bad"]
# Any other string may end up a path (a chardev's log file, a mount point,
# a socket), and a daemonized daemon's relative paths are below /: every
# one is absolute, in the session's directory, or cannot be created.
STRINGS = ["@TMP@/img", "@TMP@/q.qcow2", "@TMP@/new", "@TMP@/raw", "@TMP@/" + "x" * 40,
           "@TMP@/#bad", "", "/nonexistent/x"]
NAME_KEYS = ("node", "device", "name", "id", "target", "bitmap")
PATH_KEYS = ("file", "path", "dir", "mountpoint")
INTS = [0, 1, -1, 512, 4096, 65536, 1 << 20, 1 << 30, 2 ** 63 - 1, -2 ** 63, 7]

SETUP = [
    ("blockdev-add", {"driver": "file", "node-name": "f0", "filename": "@TMP@/img"}),
    ("blockdev-add", {"driver": "raw", "node-name": "r0", "file": "f0"}),
    ("blockdev-add", {"driver": "file", "node-name": "fq", "filename": "@TMP@/q.qcow2"}),
    ("blockdev-add", {"driver": "qcow2", "node-name": "q0", "file": "fq"}),
    ("block-dirty-bitmap-add", {"node": "q0", "name": "b0"}),
    ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "@TMP@/nbd.sock"}}}),
    ("block-export-add", {"type": "nbd", "id": "e0", "node-name": "r0", "writable": True}),
]


class Generator:
    def __init__(self, schema, seed):
        self.types = {t["name"]: t for t in schema}
        self.rnd = random.Random(seed)

    def value(self, tname, key="", depth=0):
        r = self.rnd
        t = self.types[tname]
        mt = t["meta-type"]
        if mt == "builtin":
            j = t["json-type"]
            if j == "string":
                if any(k in key for k in NAME_KEYS) and not any(k in key for k in PATH_KEYS):
                    return r.choice(NAMES)
                return r.choice(STRINGS)
            if j == "int":
                return r.choice(INTS)
            if j == "number":
                return r.choice([0, 1.5, -1])
            if j == "boolean":
                return r.choice([True, False])
            if j == "value":
                return r.choice([1, "s", {"a": 1}, [], None])
            return None
        if mt == "enum":
            return r.choice(t["values"])
        if mt == "array":
            if depth > 4:
                return []
            return [self.value(t["element-type"], key, depth + 1) for _ in range(r.choice([0, 1, 1, 2]))]
        if mt == "alternate":
            return self.value(r.choice(t["members"])["type"], key, depth)
        if mt != "object" or depth > 5:
            return {}
        o = {}
        for m in t["members"]:
            optional = "default" in m
            if (optional and r.random() < 0.7) or (not optional and r.random() < 0.03):
                continue
            o[m["name"]] = self.value(m["type"], m["name"], depth + 1)
        for v in t.get("variants", []):
            if v["case"] == o.get(t["tag"]):
                more = self.value(v["type"], key, depth + 1)
                if isinstance(more, dict):
                    o.update(more)
        if r.random() < 0.03:
            o["bogus-member"] = 1
        o.pop("abstract", None)       # both daemons share one abstract socket namespace
        return o

    def command(self, names):
        while True:
            name = self.rnd.choice(names)
            t = self.types[name]
            args = self.value(t["arg-type"]) if "arg-type" in t else None
            # rbd nodes look for a Ceph cluster (DNS, timeouts): test_rbd.py's;
            # nbd nodes dial servers (DNS, and qsd 7.2 hangs on its own):
            # test_nbd_client.py's
            text = json.dumps(args)
            if '"rbd"' not in text and '"driver": "nbd"' not in text:
                return name, args


def outcome(resp):
    if resp is None:
        return ("died",)
    if "return" in resp:
        return ("ok",)
    return ("error", resp["error"]["class"], resp["error"]["desc"])


def bexd_does_more(cmd, b, q):
    """qsd 7.2 refuses what bexd does on purpose (see the docstring); bexd
    may still refuse the arguments for reasons of its own."""
    if q[0] != "error":
        return False
    if q[2] in ("invalid object type: authz-pam", "invalid object type: authz-listfile"):
        return True
    if b[0] == "error" and b[2].startswith("Failed to get ") and q[2].startswith("Failed to get "):
        return True     # a writable export does not share "write" (README): another lock
    if cmd == "object-add" and b[0] == "error" and b[2].endswith("file is larger than 1048576 bytes"):
        return True     # a secret's file is read up to 1 MiB (docs/tls.md)
    if cmd in ("block-export-add", "nbd-server-add") and q[2].startswith("Bitmap '") \
            and q[2].endswith("' is not found"):
        return True     # bexd also looks below a format node (docs/bitmaps.md)
    return b == ("ok",) and cmd == "block-dirty-bitmap-add" and \
        q[2].startswith("Can't store persistent bitmaps")


class Pair:
    """A bexd and a qsd started in the same state."""

    def __init__(self, start_daemon, root, n):
        self.start_daemon = start_daemon
        self.root = root
        self.n = n
        self.sides = {}
        self.history = []           # the commands both did since they started
        for impl in ("bexd", "qsd"):
            tmp = os.path.join(root, "%s%d" % (impl[0], n))   # same length for both
            os.mkdir(tmp)
            with open(os.path.join(tmp, "img"), "wb") as f:
                f.truncate(16 << 20)
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2",
                            os.path.join(tmp, "q.qcow2"), "16M"], check=True)
            d = start_daemon(impl)
            q = d.qmp()
            for cmd, args in SETUP:
                resp = q.request(cmd, json.loads(json.dumps(args).replace("@TMP@", tmp)))
                assert "return" in resp, (impl, cmd, resp)
            self.sides[impl] = (d, q, tmp)

    def stop(self):
        for d, q, tmp in self.sides.values():
            d.stop()

    def send(self, impl, cmd, args):
        d, q, tmp = self.sides[impl]
        if args is not None:
            args = json.loads(json.dumps(args).replace("@TMP@", tmp))
        try:
            resp = q.request(cmd, args)
        except (OSError, ValueError):
            return None
        q.events.clear()
        return json.loads(json.dumps(resp).replace(tmp, "@TMP@"))

    def qsd_died(self):
        self.sides["qsd"][0].expect_exit()
        unmount_below(self.sides["qsd"][2])     # its FUSE exports' mounts are stale


def unmount_below(root):
    """Lazily unmount the FUSE mounts below root (a crashed qsd's)."""
    with open("/proc/self/mounts") as f:
        points = [line.split()[1] for line in f if line.split()[2].startswith("fuse")]
    for p in points:
        p = p.encode().decode("unicode_escape")     # /proc escapes spaces as \040
        if p.startswith(root + "/"):
            subprocess.run(["fusermount3", "-u", "-z", p], stderr=subprocess.DEVNULL)


def schema_of_qsd(start_daemon):
    return start_daemon("qsd").qmp().execute("query-qmp-schema")


@pytest.mark.parametrize("seed", SEEDS)
def test_random_commands_answer_alike(start_daemon, tmpdir_short, seed):
    schema = schema_of_qsd(start_daemon)
    bexd_cmds = {c["name"] for c in start_daemon("bexd").qmp().execute("query-commands")}
    names = sorted(e["name"] for e in schema if e["meta-type"] == "command"
                   and e["name"] in bexd_cmds and e["name"] not in SKIP_COMMANDS)
    gen = Generator(schema, seed)
    differences = []
    pairs = 0
    pair = Pair(start_daemon, tmpdir_short, pairs)
    try:
        for i in range(COUNT):
            cmd, args = gen.command(names)
            b = outcome(pair.send("bexd", cmd, args))
            q = outcome(pair.send("qsd", cmd, args))
            line = "#%d %s %s\n    bexd: %s\n    qsd:  %s" % (i, cmd, json.dumps(args), b, q)
            if b == q == ("ok",):
                pair.history.append("#%d %s %s" % (i, cmd, json.dumps(args)))
            assert b != ("died",), "bexd died\n" + line
            if q == ("died",):
                pair.qsd_died()          # a qsd 7.2 bug: bexd answered
            elif b != q and not (b[0] == "error" and "does not accept value" in b[2]) \
                    and not bexd_does_more(cmd, b, q):
                differences.append(line + "\n    after these, which both did:\n      " +
                                   "\n      ".join(pair.history))
            # the states may part: start both afresh (qsd 7.2 drops a
            # chardev whose chardev-change fails; bexd keeps it)
            if b[0] != q[0] or (cmd == "chardev-change" and q[0] == "error"):
                pair.stop()
                pairs += 1
                pair = Pair(start_daemon, tmpdir_short, pairs)
    finally:
        pair.stop()                      # bexd must exit 0 (and clean under ASan)
        unmount_below(tmpdir_short)
    assert not differences, "%d of %d answers differ:\n%s" % (
        len(differences), COUNT, "\n".join(differences))
