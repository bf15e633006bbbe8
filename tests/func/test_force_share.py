"""force-share=on: a read-only node that shares everything with other users,
so an image another process writes (a running guest's) can still be
opened and exported read-only, as `qemu-img info -U` does.

As in QEMU: the option needs a read-only node, an inline child inherits it
from its parent, and a parent shares everything with a child that has it
(so a qcow2 node over a force-share file node takes no "no other writer"
lock, but one over a plain file node does).  The image locks are real OFD
locks, and the writer is another daemon of the same kind.
"""
import os
import subprocess

import nbd
import pytest

LOCKED = 'Failed to get shared "write" lock'


@pytest.fixture
def image(tmpdir_short):
    path = os.path.join(tmpdir_short, "busy.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, "1M"], check=True)
    return path


@pytest.fixture
def writer(impl, start_daemon, tmpdir_short, image):
    """A daemon with the image open read-write and exported writable."""
    sock = os.path.join(tmpdir_short, "w.sock")
    start_daemon(impl, "--blockdev", "driver=file,node-name=wf,filename=%s" % image,
                 "--blockdev", "driver=qcow2,node-name=wq,file=wf",
                 "--nbd-server", "addr.type=unix,addr.path=%s" % sock,
                 "--export", "type=nbd,id=w,node-name=wq,name=w,writable=on")
    return "nbd+unix:///w?socket=%s" % sock


def err(m, cmd, **args):
    e = m.error(cmd, **args)
    return e["desc"]


def test_refusals_match_qemu(impl, start_daemon, writer, image):
    m = start_daemon(impl).qmp()
    inline = {"driver": "file", "filename": image}
    # without force-share the qcow2 node's file refuses the other writer
    assert err(m, "blockdev-add", driver="qcow2", node_name="a", read_only=True,
               file=inline) == LOCKED
    # force-share needs a read-only node, checked before the node's name
    assert err(m, "blockdev-add", driver="qcow2", node_name="#a", force_share=True,
               file=inline) == "force-share=on can only be used with read-only images"
    # an inline child inherits it; a read-write child of a read-only parent
    # must not have it
    assert err(m, "blockdev-add", driver="qcow2", node_name="a", read_only=True,
               force_share=True, file=dict(inline, **{"read-only": False})) == \
        "force-share=on can only be used with read-only images"
    # a child named by reference keeps its own setting
    m.execute("blockdev-add", driver="file", node_name="plain", read_only=True,
              filename=image)
    assert err(m, "blockdev-add", driver="qcow2", node_name="a", read_only=True,
               force_share=True, file="plain") == LOCKED


@pytest.mark.parametrize("how", ["inherited", "child"])
def test_export_an_image_in_use(impl, start_daemon, writer, image, tmpdir_short, how):
    """The writer's data, written and flushed, read through the other
    daemon's force-share export; the writer keeps writing."""
    sock = os.path.join(tmpdir_short, "r.sock")
    if how == "inherited":
        nodes = ["--blockdev", "driver=qcow2,node-name=r,read-only=on,force-share=on,"
                 "file.driver=file,file.filename=%s" % image]
    else:
        nodes = ["--blockdev", "driver=file,node-name=rf,read-only=on,force-share=on,"
                 "filename=%s" % image,
                 "--blockdev", "driver=qcow2,node-name=r,read-only=on,file=rf"]
    w = nbd.NBD()
    w.connect_uri(writer)
    w.pwrite(b"\xa5" * 65536, 0)
    w.flush()
    start_daemon(impl, *nodes, "--nbd-server", "addr.type=unix,addr.path=%s" % sock,
                 "--export", "type=nbd,id=r,node-name=r,name=r")
    r = nbd.NBD()
    r.connect_uri("nbd+unix:///r?socket=%s" % sock)
    assert r.is_read_only()
    assert r.pread(65536, 0) == b"\xa5" * 65536
    assert r.pread(65536, 65536) == b"\0" * 65536
    # the writer is not held back by the reader
    w.pwrite(b"\x5a" * 4096, 4096)
    w.flush()
    assert w.pread(8192, 0) == b"\xa5" * 4096 + b"\x5a" * 4096
    r.shutdown()
    w.shutdown()
