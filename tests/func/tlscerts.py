"""TLS credentials made at test time with GnuTLS's certtool and psktool.

make_credentials(dir) builds, once per test module:

  ca/          the CA that signs everything below (ca-cert.pem, ca-key.pem)
  server/      QEMU's server layout: ca-cert.pem, server-cert.pem, server-key.pem
  client/      a client signed by the CA (QEMU layout client-cert.pem/-key.pem;
               libnbd reads the same names from a directory)
  rogue/       a client signed by another CA ("wrong CA")
  expired/     a client signed by the CA whose validity ended in 2002
  mismatch/    a server directory whose key does not belong to its cert
  psk/         keys.psk with user "alice" (server side: every user)
  psk-alice/   keys.psk with alice's key only (QEMU client layout)
  psk-wrong/   keys.psk: user alice with another key

Distinguished names are fixed so that authz tests can name them.
"""
import os
import shutil
import subprocess

CLIENT_DN = "O=bexd test,CN=client"
ROGUE_DN = "O=rogue,CN=client"
EXPIRED_DN = "O=bexd test,CN=expired"
SERVER_DN = "O=bexd test,CN=localhost"

CERTTOOL = shutil.which("certtool")
PSKTOOL = shutil.which("psktool")


def available():
    return CERTTOOL is not None and PSKTOOL is not None


def _run(*argv):
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _template(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _dn_lines(dn):
    out = []
    for part in dn.split(","):
        k, v = part.split("=", 1)
        out.append({"O": 'organization = "%s"', "CN": 'cn = "%s"'}[k] % v)
    return out


def _key(path):
    # ECDSA keys: fast to generate, so a module's set costs well under a second
    _run(CERTTOOL, "--generate-privkey", "--key-type=ecdsa", "--outfile", path)


def _ca(d, name):
    os.makedirs(d, exist_ok=True)
    key, cert, tmpl = (os.path.join(d, n) for n in ("ca-key.pem", "ca-cert.pem", "ca.info"))
    _key(key)
    _template(tmpl, ['cn = "%s"' % name, "ca", "cert_signing_key", "expiration_days = 30"])
    _run(CERTTOOL, "--generate-self-signed", "--load-privkey", key, "--template", tmpl,
         "--outfile", cert)
    return key, cert


def _leaf(d, prefix, ca, dn, server, expired=False):
    os.makedirs(d, exist_ok=True)
    key = os.path.join(d, prefix + "-key.pem")
    cert = os.path.join(d, prefix + "-cert.pem")
    tmpl = os.path.join(d, prefix + ".info")
    lines = _dn_lines(dn) + ["signing_key", "encryption_key"]
    if server:
        lines += ["tls_www_server", 'dns_name = "localhost"', 'ip_address = "127.0.0.1"']
    else:
        lines += ["tls_www_client"]
    if expired:
        lines += ['activation_date = "2001-01-01 00:00:00 UTC"',
                  'expiration_date = "2002-01-01 00:00:00 UTC"']
    else:
        lines += ["expiration_days = 30"]
    _template(tmpl, lines)
    _key(key)
    _run(CERTTOOL, "--generate-certificate", "--load-privkey", key,
         "--load-ca-certificate", ca[1], "--load-ca-privkey", ca[0],
         "--template", tmpl, "--outfile", cert)
    shutil.copy(ca[1], os.path.join(d, "ca-cert.pem"))
    return key, cert


def _psk(d, user, copy_from=None):
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "keys.psk")
    if copy_from:
        shutil.copy(copy_from, path)
    else:
        _run(PSKTOOL, "-u", user, "-p", path)
    return path


class Credentials:
    def __init__(self, base):
        self.base = base
        ca = _ca(os.path.join(base, "ca"), "bexd test CA")
        rogue_ca = _ca(os.path.join(base, "rogue-ca"), "rogue CA")
        self.server = os.path.join(base, "server")
        self.client = os.path.join(base, "client")
        self.rogue = os.path.join(base, "rogue")
        self.expired = os.path.join(base, "expired")
        self.mismatch = os.path.join(base, "mismatch")
        _leaf(self.server, "server", ca, SERVER_DN, server=True)
        _leaf(self.client, "client", ca, CLIENT_DN, server=False)
        _leaf(self.rogue, "client", rogue_ca, ROGUE_DN, server=False)
        _leaf(self.expired, "client", ca, EXPIRED_DN, server=False, expired=True)
        # a server directory whose key belongs to another certificate
        _leaf(self.mismatch, "server", ca, SERVER_DN, server=True)
        shutil.copy(os.path.join(self.client, "client-key.pem"),
                    os.path.join(self.mismatch, "server-key.pem"))
        self.psk = os.path.join(base, "psk")
        self.psk_alice = os.path.join(base, "psk-alice")
        self.psk_wrong = os.path.join(base, "psk-wrong")
        _psk(self.psk, "alice")
        _psk(self.psk_alice, "alice", copy_from=os.path.join(self.psk, "keys.psk"))
        _psk(self.psk_wrong, "alice")
        with open(os.path.join(self.psk, "keys.psk"), "a") as f:
            f.write("bob:%s\n" % ("0123456789abcdef" * 4))

    def psk_file(self, which="psk-alice"):
        return os.path.join(self.base, which, "keys.psk")


def make_credentials(base):
    return Credentials(base)
