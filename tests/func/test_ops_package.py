"""The Debian package: dpkg-buildpackage -us -uc -b builds it from the
committed tree, lintian finds no error, and it holds what `meson install`
installs, with /etc/default/bexd a conffile and the units enabled by its
maintainer scripts.

(Installing it on a fresh Debian 12 root is shown with
/work/shared/tools/fresh-root.sh; see docs/operations.md.)"""
import os
import re
import shutil
import subprocess

import pytest

import needs
from conftest import ROOT, tool_text

DPKG_BUILDPACKAGE = shutil.which("dpkg-buildpackage")
LINTIAN = shutil.which("lintian")



@pytest.fixture(autouse=True)
def packaging_tools():
    needs.tool("dpkg-buildpackage", "dpkg-dev")
    needs.tool("dh", "debhelper")


def source_files():
    """The tree as committed, as a source package would have it (plus local
    changes of tracked files, so a developer tests what they edit).  Without
    git (a tree unpacked from an archive, as on a fresh machine): every file
    but what .gitignore names as build output."""
    try:
        r = subprocess.run(["git", "-C", ROOT, "ls-files", "-z"], capture_output=True)
        if r.returncode == 0:
            return tool_text(r.stdout).split("\0")
    except FileNotFoundError:
        pass
    ignored_top = ("build", "obj-", ".git")
    ignored_debian = {".debhelper", "bexd", "files", "debhelper-build-stamp"}
    out = []
    for top, dirs, names in os.walk(ROOT):
        rel = os.path.relpath(top, ROOT)
        if rel == ".":
            dirs[:] = [d for d in dirs if not d.startswith(ignored_top)]
            names = [n for n in names if n != ".git"]
        elif rel == "debian":
            dirs[:] = [d for d in dirs if d not in ignored_debian]
            names = [n for n in names if n not in ignored_debian and not n.endswith(".substvars")]
        dirs[:] = [d for d in dirs if d not in ("__pycache__", ".pytest_cache")]
        out += [os.path.normpath(os.path.join(rel, n)) for n in names if not n.endswith(".pyc")]
    return out


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("pkg"))
    src = os.path.join(base, "bexd")
    os.mkdir(src)
    for f in source_files():
        if f and os.path.isfile(os.path.join(ROOT, f)):
            os.makedirs(os.path.dirname(os.path.join(src, f)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, f), os.path.join(src, f))
    env = dict(os.environ, DEB_BUILD_OPTIONS="nocheck noautodbgsym parallel=%d" % (os.cpu_count() or 1))
    r = subprocess.run([DPKG_BUILDPACKAGE, "-us", "-uc", "-b"], cwd=src, env=env,
                       capture_output=True, timeout=1200)
    assert r.returncode == 0, (tool_text(r.stdout) + tool_text(r.stderr))[-4000:]
    [deb] = [os.path.join(base, f) for f in os.listdir(base)
             if re.match(r"bexd_.*_amd64\.deb$", f) or re.match(r"bexd_.*_[a-z0-9]+\.deb$", f)]
    changes = [os.path.join(base, f) for f in os.listdir(base) if f.endswith(".changes")][0]
    return deb, changes


def test_contents(package):
    deb, _ = package
    listing = subprocess.run(["dpkg-deb", "-c", deb], capture_output=True, check=True,
                             timeout=60).stdout.decode(errors="replace")
    paths = {line.split()[-1].lstrip(".") for line in listing.splitlines()}
    for p in ["/usr/sbin/bexd", "/usr/bin/bexctl", "/usr/share/man/man8/bexd.8.gz",
              "/usr/share/man/man1/bexctl.1.gz", "/lib/systemd/system/bexd.service",
              "/lib/systemd/system/bexd.socket", "/lib/systemd/system/bexd@.service",
              "/lib/systemd/system/bexd@.socket", "/etc/default/bexd",
              "/usr/share/doc/bexd/operations.md.gz", "/usr/share/doc/bexd/copyright",
              "/usr/share/doc/bexd/examples/example.conf"]:
        assert p in paths, p
    # nothing of the test tree
    assert not [p for p in paths if "vub-client" in p or "/tests/" in p]
    info = subprocess.run(["dpkg-deb", "-I", deb], capture_output=True, check=True,
                          timeout=60).stdout.decode(errors="replace")
    assert "Package: bexd" in info and "Depends:" in info
    tmp = os.path.dirname(deb) + "/ctl"
    subprocess.run(["dpkg-deb", "-e", deb, tmp], check=True, timeout=60)
    assert open(tmp + "/conffiles").read().split() == ["/etc/default/bexd"]
    postinst = open(tmp + "/postinst").read()
    assert "deb-systemd-helper" in postinst and "bexd.socket" in postinst
    # the unit points at the installed daemon
    x = os.path.dirname(deb) + "/x"
    subprocess.run(["dpkg-deb", "-x", deb, x], check=True, timeout=60)
    unit = open(x + "/lib/systemd/system/bexd.service").read()
    assert "ExecStart=/usr/sbin/bexd $BEXD_ARGS" in unit
    r = subprocess.run([x + "/usr/sbin/bexd", "--version"], capture_output=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith(b"bexd version ")


def test_lintian_no_errors(package):
    needs.tool("lintian", "lintian")
    _, changes = package
    r = subprocess.run([LINTIAN, "--fail-on", "error", changes], capture_output=True,
                       timeout=600)
    out = tool_text(r.stdout)
    assert r.returncode == 0, out + tool_text(r.stderr)
    assert not [line for line in out.splitlines() if line.startswith("E:")], out


def test_build_depends_complete():
    """Every library a meson.build asks pkg-config for comes from a package
    named in Build-Depends: a clean build root installs exactly that list
    (the package build above runs where everything is installed, so it
    cannot notice a missing entry)."""
    import glob
    text = open(os.path.join(ROOT, "debian", "control")).read()
    field = re.search(r"^Build-Depends:(.*?)^\S", text, re.M | re.S).group(1)
    build_deps = {re.sub(r"\s*\(.*\)", "", alt).strip()
                  for dep in field.split(",") for alt in dep.split("|")}
    # threads is libc's; cmocka only builds the tests (-Dtests=disabled here)
    skip = {"threads", "cmocka"}
    names = set()
    for f in glob.glob(os.path.join(ROOT, "**", "meson.build"), recursive=True):
        names |= set(re.findall(r"dependency\(\s*'([^']+)'", open(f).read()))
    missing = []
    for name in sorted(names - skip):
        r = subprocess.run(["pkg-config", "--path", name], capture_output=True,
                           text=True, errors="replace")
        if r.returncode != 0:
            continue            # an optional library this machine lacks
        owner = subprocess.run(["dpkg", "-S", r.stdout.strip()], capture_output=True,
                               text=True, errors="replace")
        # "zlib1g-dev:amd64: /usr/lib/x86_64-linux-gnu/pkgconfig/zlib.pc"
        owners = owner.stdout.split(": ")[0] if owner.returncode == 0 else ""
        pkgs = {p.strip().split(":")[0] for p in owners.split(",") if p.strip()}
        if pkgs and not pkgs & build_deps:
            missing.append("%s (%s)" % (name, ", ".join(sorted(pkgs))))
    assert not missing, "meson dependencies missing from Build-Depends: " + "; ".join(missing)
