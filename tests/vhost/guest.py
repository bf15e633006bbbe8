#!/usr/bin/python3
"""Boot a tiny Linux guest whose only disk is a vhost-user-blk device.

The project's own front-end runner for the vhost-user-blk tests: QEMU
(qemu-system-x86_64, TCG) boots the host's Debian kernel through its PVH
entry point (the uncompressed vmlinux is extracted once: decompressing the
bzImage under TCG costs seconds) with an initramfs built here at test time
from busybox-static, the kernel's virtio modules and tests/vhost/init.
Guest RAM is a shared memfd (vhost-user needs fd-backed shared memory).
The guest reports "BEX: key=value" lines on the serial console.

    guest.py --socket SOCK [--workload info|rw|ro|bench] [--queues N]
             [--smp N] [--off BYTES] [--mb N] [--timeout S]

prints the report as JSON.  Library use: run_guest(socket, ...) -> dict.
"""
import argparse
import glob
import hashlib
import json
import lzma
import re
import os
import shutil
import subprocess
import sys
import tempfile
import time

# A TCG guest (no KVM) boots in ~10 s on an idle 2-core machine, and its
# CPU share falls with the load: a fresh-root run at load ~15 went past
# 90 s.  The bound catches a hung guest; the per-test limit is 600 s.
GUEST_TIMEOUT = 240

HERE = os.path.dirname(os.path.abspath(__file__))
QEMU = shutil.which("qemu-system-x86_64")
BUSYBOX = "/bin/busybox"
CACHE = os.environ.get("BEX_VHOST_CACHE", "/tmp/bexd-vhost-guest-%d" % os.getuid())


class GuestError(Exception):
    pass


def missing():
    """Why a guest cannot be booted here, or None."""
    if not QEMU:
        return "qemu-system-x86_64 not installed"
    if not os.path.exists(BUSYBOX):
        return "busybox-static not installed"
    if not shutil.which("cpio"):
        return "cpio not installed"
    if not kernel_version():
        return "no kernel with virtio modules in /boot (linux-image-amd64)"
    return None


def kernel_version():
    for f in sorted(glob.glob("/boot/vmlinuz-*"), reverse=True):
        kv = f[len("/boot/vmlinuz-"):]
        if os.path.isdir("/lib/modules/%s" % kv):
            return kv
    return None


def module_files(kv):
    out = subprocess.run(["modprobe", "-S", kv, "-a", "--show-depends", "virtio_pci", "virtio_blk"],
                         check=True, capture_output=True, text=True).stdout
    files = []
    for line in out.splitlines():
        w = line.split()
        if len(w) >= 2 and w[0] == "insmod" and w[1] not in files:
            files.append(w[1])
    return files


def read_module(path):
    data = open(path, "rb").read()
    if path.endswith(".xz"):
        return lzma.decompress(data)
    if path.endswith(".zst"):
        return subprocess.run(["zstd", "-dqc", path], check=True, capture_output=True).stdout
    if path.endswith(".gz"):
        import gzip
        return gzip.decompress(data)
    return data


def extract_vmlinux(vmlinuz, out):
    """The ELF vmlinux inside an xz-compressed bzImage (for PVH boot)."""
    data = open(vmlinuz, "rb").read()
    magic = b"\xfd7zXZ\x00"
    pos = data.find(magic)
    while pos >= 0:
        try:
            d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
            elf = d.decompress(data[pos:])
            if elf[:4] == b"\x7fELF":
                tmp = out + ".tmp%d" % os.getpid()
                open(tmp, "wb").write(elf)
                os.rename(tmp, out)
                return True
        except lzma.LZMAError:
            pass
        pos = data.find(magic, pos + 1)
    return False


def build():
    """(kernel, initramfs) paths, built once per kernel/init/busybox."""
    kv = kernel_version()
    mods = module_files(kv)
    init = open(os.path.join(HERE, "init"), "rb").read()
    h = hashlib.sha256(init + kv.encode() + open(BUSYBOX, "rb").read(4096) +
                       "\n".join(mods).encode()).hexdigest()[:16]
    os.makedirs(CACHE, exist_ok=True)
    initrd = os.path.join(CACHE, "initrd-%s-%s.cpio.gz" % (kv, h))
    kernel = "/boot/vmlinuz-%s" % kv
    pvh = False
    try:
        pvh = "CONFIG_PVH=y" in open("/boot/config-%s" % kv).read()
    except OSError:
        pass
    if pvh:
        vmlinux = os.path.join(CACHE, "vmlinux-%s" % kv)
        if os.path.exists(vmlinux) or extract_vmlinux(kernel, vmlinux):
            kernel = vmlinux
    if os.path.exists(initrd):
        return kernel, initrd
    stage = tempfile.mkdtemp(dir=CACHE)
    try:
        for d in ("bin", "dev", "proc", "sys", "tmp", "mods"):
            os.makedirs(os.path.join(stage, d))
        shutil.copy(BUSYBOX, os.path.join(stage, "bin/busybox"))
        applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True).stdout.split()
        for a in applets:
            if a != "busybox":
                os.symlink("busybox", os.path.join(stage, "bin", a))
        order = []
        for m in mods:
            name = os.path.basename(m).split(".ko")[0]
            open(os.path.join(stage, "mods", name + ".ko"), "wb").write(read_module(m))
            order.append(name)
        open(os.path.join(stage, "mods/order"), "w").write("\n".join(order) + "\n")
        shutil.copy(os.path.join(HERE, "init"), os.path.join(stage, "init"))
        os.chmod(os.path.join(stage, "init"), 0o755)
        files = subprocess.run("cd %s && find . -mindepth 1 | LC_ALL=C sort" % stage, shell=True,
                               check=True, capture_output=True, text=True).stdout
        cpio = subprocess.run(["cpio", "-o", "-H", "newc", "-R", "0:0", "--quiet"], cwd=stage,
                              input=files.encode(), check=True, capture_output=True).stdout
        import gzip
        tmp = initrd + ".tmp%d" % os.getpid()
        open(tmp, "wb").write(gzip.compress(cpio, 1))
        os.rename(tmp, initrd)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return kernel, initrd


def qemu_argv(socket, workload, queues, smp, off, mb, seed, mem_mb, extra_device_opts,
              console_chardev):
    # no_timer_check: on a loaded host a TCG guest is too slow for the
    # kernel's check that the IO-APIC timer ticks; it panicked ("IO-APIC +
    # timer doesn't work!") and the guest rebooted without a report.
    kernel, initrd = build()
    smp = smp or max(1, min(queues, 4))
    dev = "vhost-user-blk-pci,chardev=vub,num-queues=%d%s" % (queues, extra_device_opts)
    return [QEMU, "-nodefaults", "-no-user-config",
            "-machine", "pc,accel=tcg,memory-backend=mem", "-smp", str(smp), "-m", "%dM" % mem_mb,
            "-object", "memory-backend-memfd,id=mem,size=%dM,share=on" % mem_mb,
            "-kernel", kernel, "-initrd", initrd,
            "-append", "console=ttyS0 quiet panic=-1 no_timer_check "
            "bex.wl=%s bex.off=%d bex.mb=%d bex.seed=%d" % (workload, off, mb, seed),
            "-chardev", "socket,id=vub,path=%s" % socket, "-device", dev,
            "-chardev", console_chardev, "-serial", "chardev:con",
            "-display", "none", "-monitor", "none", "-no-reboot"]


def parse_report(text, rep):
    """Fold the guest's "BEX: ..." console lines into rep."""
    dmesg = []
    for line in text.replace("\r", "").splitlines():
        i = line.find("BEX: ")
        if i < 0:
            continue
        body = line[i + 5:]
        if body.startswith("RESULT "):
            rep["result"] = body[7:]
        elif body.startswith("dmesg: "):
            dmesg.append(body[7:])
        elif "=" in body:
            k, v = body.split("=", 1)
            rep[k] = v
    if dmesg:
        rep["dmesg"] = dmesg
    return rep


def run_guest(socket, workload="info", queues=1, smp=None, off=0, mb=1, seed=1,
              timeout=GUEST_TIMEOUT, mem_mb=256, extra_device_opts=""):
    """Boot the guest on `socket`; return its report as a dict (raises GuestError)."""
    why = missing()
    if why:
        raise GuestError(why)
    work = tempfile.mkdtemp(prefix="bexg")
    console = os.path.join(work, "console.log")
    argv = qemu_argv(socket, workload, queues, smp, off, mb, seed, mem_mb, extra_device_opts,
                     "file,id=con,path=%s" % console)
    t0 = time.monotonic()
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        qemu_out, rc = p.stdout + p.stderr, p.returncode
        timed_out = False
    except subprocess.TimeoutExpired as e:
        qemu_out = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
        rc, timed_out = None, True
    elapsed = time.monotonic() - t0
    text = open(console, errors="replace").read() if os.path.exists(console) else ""
    shutil.rmtree(work, ignore_errors=True)
    rep = {"qemu_rc": rc, "timed_out": timed_out, "seconds": round(elapsed, 2),
           "qemu_output": qemu_out.strip()[-2000:]}
    parse_report(text, rep)
    if "result" not in rep:
        rep["result"] = "FAIL no result (timeout)" if timed_out else "FAIL no result"
    return rep


class Guest:
    """A guest running in the background whose console the caller reads
    line by line (a socket QEMU connects to), to act at a point of the
    workload: wait_line("BEX: ready_for_resize"), then finish()."""

    def __init__(self, socket, workload, timeout=GUEST_TIMEOUT, **kw):
        import socket as sk
        why = missing()
        if why:
            raise GuestError(why)
        self.work = tempfile.mkdtemp(prefix="bexg")
        path = os.path.join(self.work, "con.sock")
        self.listener = sk.socket(sk.AF_UNIX, sk.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        self.listener.settimeout(timeout)
        self.deadline = time.monotonic() + timeout
        argv = qemu_argv(socket, workload, kw.get("queues", 1), kw.get("smp"), kw.get("off", 0),
                         kw.get("mb", 1), kw.get("seed", 1), kw.get("mem_mb", 256),
                         kw.get("extra_device_opts", ""), "socket,id=con,path=%s" % path)
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.conn = None
        self.text = ""

    def _read(self):
        if self.conn is None:
            self.conn, _ = self.listener.accept()
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise GuestError("guest timed out")
        self.conn.settimeout(left)
        data = self.conn.recv(65536)
        if not data:
            return False
        self.text += data.decode(errors="replace")
        return True

    def wait_line(self, needle):
        """Block until the console shows needle (GuestError if it ends first)."""
        while needle not in self.text:
            if not self._read():
                raise GuestError("console closed before %r: %s" % (needle, self.text[-2000:]))

    def finish(self):
        """Read the console to its end, wait for QEMU; the report."""
        try:
            # the whole result line, not the first bytes of it
            while not re.search(r"BEX: RESULT [^\r\n]*[\r\n]", self.text) and self._read():
                pass
        finally:
            try:
                out = self.proc.communicate(timeout=max(1, self.deadline - time.monotonic()))[0]
            except subprocess.TimeoutExpired:
                self.proc.kill()
                out = self.proc.communicate()[0]
            if self.conn:
                self.conn.close()
            self.listener.close()
            shutil.rmtree(self.work, ignore_errors=True)
        rep = {"qemu_rc": self.proc.returncode, "qemu_output": (out or b"").decode(errors="replace")[-2000:]}
        parse_report(self.text, rep)
        rep.setdefault("result", "FAIL no result")
        return rep

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--socket", required=True)
    ap.add_argument("--workload", default="info")
    ap.add_argument("--queues", type=int, default=1)
    ap.add_argument("--smp", type=int)
    ap.add_argument("--off", type=int, default=0)
    ap.add_argument("--mb", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=GUEST_TIMEOUT)
    a = ap.parse_args()
    try:
        rep = run_guest(a.socket, a.workload, a.queues, a.smp, a.off, a.mb, timeout=a.timeout)
    except GuestError as e:
        print(json.dumps({"result": "SKIP %s" % e}))
        return 77
    print(json.dumps(rep))
    return 0 if rep["result"] == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
