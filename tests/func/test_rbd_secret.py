"""The `secret` object (used by rbd's key-secret), against qsd 7.2.

No Ceph cluster needed: creation succeeds or fails with qsd's messages, on
the command line and over QMP; what a secret decodes to is checked through
the one place that reads it back, an rbd node's key-secret, in test_rbd.py.
Encrypted secrets (keyid + iv, AES-256-CBC, made with the system's openssl)
are checked end to end as an rbd key in test_rbd.py.
"""
import base64
import os
import shutil
import subprocess

import pytest

import needs
from conftest import run_daemon_expect_fail

CASES = [
    (dict(data="x", file="/etc/hostname"), "'file' and 'data' are mutually exclusive"),
    (dict(), "Either 'file' or 'data' must be provided"),
    (dict(data="!!!", format="base64"), "Base64 data contains invalid characters"),
    (dict(file="/nonexistent"),
     "Unable to read /nonexistent: Failed to open file \u201c/nonexistent\u201d: "
     "No such file or directory"),
    (dict(file="/tmp"), "Unable to read /tmp: Error reading file \u201c/tmp\u201d: Is a directory"),
    (dict(data="x", loaded=True), "Property 'secret.loaded' is not writable"),
    (dict(data="QUJD", keyid="nokey", iv="AAAAAAAAAAAAAAAAAAAAAA=="), "No secret with id 'nokey'"),
    (dict(data="QUJD", keyid="short"), "Key should be 32 bytes in length"),
    (dict(data="QUJD", keyid="k32"), "IV is required to decrypt secret"),
    (dict(data="QUJD", keyid="k32", iv="AAAA"), "IV should be 16 bytes in length not 3"),
]

GOOD = [
    dict(data="plain"),
    dict(data="QUJD\n", format="base64"),     # newlines are allowed
    dict(data="", format="base64"),
    dict(data="QUJD", iv="ignored without keyid"),
]


@pytest.mark.parametrize("props,msg", CASES, ids=[m[:30] for _, m in CASES])
def test_secret_errors(impl, start_daemon, props, msg):
    q = start_daemon(impl).qmp()
    q.execute("object-add", qom_type="secret", id="short", data="abc")
    q.execute("object-add", qom_type="secret", id="k32", data="k" * 32)
    e = q.error("object-add", qom_type="secret", id="s0", **props)
    assert (e["class"], e["desc"]) == ("GenericError", msg)
    q.execute("object-add", qom_type="secret", id="s0", data="the id is free")


@pytest.mark.parametrize("props", GOOD, ids=range(len(GOOD)))
def test_secret_accepted(impl, start_daemon, props):
    q = start_daemon(impl).qmp()
    q.execute("object-add", qom_type="secret", id="s0", **props)
    e = q.error("object-add", qom_type="secret", id="s0", data="again")
    assert e["desc"] == "attempt to add duplicate property 's0' to object (type 'container')"
    q.execute("object-del", id="s0")


def test_secret_on_command_line(impl, tmpdir_short):
    code, err = run_daemon_expect_fail(impl, ["--object", "secret,id=s0,data=x,file=/etc/hostname"])
    assert code == 1
    assert err.splitlines()[0].endswith("'file' and 'data' are mutually exclusive")


def test_encrypted_secret(impl, start_daemon, tmpdir_short):
    needs.tool("openssl", "openssl")
    key, iv = os.urandom(32), os.urandom(16)
    plain = b"the rbd key"
    enc = subprocess.run(["openssl", "enc", "-aes-256-cbc", "-K", key.hex(), "-iv", iv.hex()],
                         input=plain, stdout=subprocess.PIPE, check=True).stdout
    q = start_daemon(impl).qmp()
    q.execute("object-add", qom_type="secret", id="master",
              data=base64.b64encode(key).decode(), format="base64")
    q.execute("object-add", qom_type="secret", id="s0", keyid="master", format="base64",
              data=base64.b64encode(enc).decode(), iv=base64.b64encode(iv).decode())
    # a wrong key gives bad padding (or, 1 time in 16 or so, garbage that
    # happens to look padded): creation must not crash either way
    other = base64.b64encode(bytes(32)).decode()
    q.execute("object-add", qom_type="secret", id="zero", data=other, format="base64")
    resp = q.request("object-add", {"qom-type": "secret", "id": "s1", "keyid": "zero",
                                    "format": "base64", "data": base64.b64encode(enc).decode(),
                                    "iv": base64.b64encode(iv).decode()})
    if "error" in resp:
        assert resp["error"]["desc"].startswith("Incorrect number of padding bytes")
