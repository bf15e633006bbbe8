"""What a test needs, and which absences fail it rather than skip it.

A skip says "this machine cannot run this check", so it is kept for two
things only: a missing reference daemon (qemu-storage-daemon, or a module of
it) and a host that lacks a kernel feature (/dev/fuse, IPv6, O_DIRECT on a
file system, FUSE over io_uring).  Everything else is a failure (issue #18):

- bexd's own build: bexctl, vub-client, librbd support.  A build that lacks
  them did not build what the project ships, and a skip would hide it.
- programs scripts/deps.sh installs (certtool, fio, tmux, Ceph, qemu-system,
  ...): without them the machine is not set up for the suite; the failure
  says which package to install instead of the suite quietly checking less.
"""
import os
import shutil
import socket

import pytest


def tool(name, package):
    """The path of `name`, a program of the Debian package `package` that
    scripts/deps.sh installs; fails the test when it is missing."""
    path = shutil.which(name) or shutil.which(name, path="/usr/bin:/usr/sbin:/sbin")
    if not path:
        pytest.fail("%s is not installed (Debian package %s; run scripts/deps.sh)"
                    % (name, package), pytrace=False)
    return path


def built(path, what):
    """A program the project's build makes (bexctl, vub-client); fails the
    test when the build did not make it."""
    if not os.path.exists(path):
        pytest.fail("%s was not built (%s): build it with scripts/build.sh" % (what, path),
                    pytrace=False)
    return path


def ipv6_loopback():
    """Whether this host has IPv6 on ::1 (a kernel feature: its absence skips)."""
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.bind(("::1", 0))
        s.close()
        return True
    except OSError:
        return False


def o_direct_works(path):
    """Whether the file system under path takes O_DIRECT (tmpfs does not:
    a kernel feature, so its absence skips)."""
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
        return True
    except OSError:
        return False
