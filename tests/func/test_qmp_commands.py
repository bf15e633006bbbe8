"""query-commands and query-qmp-schema describe exactly what a daemon runs.

The invariant holds whatever commands the team adds: every command listed
is in the schema and runs (answers something other than CommandNotFound),
and every command of qemu-storage-daemon 7.2 that bexd does not list is
refused with QEMU's CommandNotFound, as any unknown name is.
"""
import pytest

from conftest import QSD

# qemu-storage-daemon 7.2's query-commands (checked against the installed
# one when it is there).
QSD_72_COMMANDS = sorted("""
block-commit block-dirty-bitmap-add block-dirty-bitmap-clear
block-dirty-bitmap-disable block-dirty-bitmap-enable block-dirty-bitmap-merge
block-dirty-bitmap-remove block-export-add block-export-del block-job-cancel
block-job-complete block-job-dismiss block-job-finalize block-job-pause
block-job-resume block-job-set-speed block-set-write-threshold block-stream
block_resize blockdev-add blockdev-backup blockdev-create blockdev-del
blockdev-mirror blockdev-reopen blockdev-snapshot
blockdev-snapshot-delete-internal-sync blockdev-snapshot-internal-sync
blockdev-snapshot-sync change-backing-file chardev-add chardev-change
chardev-remove chardev-send-break drive-backup drive-mirror job-cancel
job-complete job-dismiss job-finalize job-pause job-resume nbd-server-add
nbd-server-remove nbd-server-start nbd-server-stop object-add object-del
qmp_capabilities qom-get qom-list qom-list-properties qom-list-types qom-set
query-block query-block-exports query-block-jobs query-blockstats
query-chardev query-chardev-backends query-commands query-jobs
query-named-block-nodes query-qmp-schema query-version quit ringbuf-read
ringbuf-write transaction x-blockdev-amend x-blockdev-change
x-blockdev-set-iothread x-debug-block-dirty-bitmap-sha256
x-debug-query-block-graph""".split())


@pytest.fixture
def monitor(impl, start_daemon):
    return start_daemon(impl).qmp()


def listed(m):
    return sorted(c["name"] for c in m.execute("query-commands"))


def test_commands_are_the_schema_commands(monitor):
    names = listed(monitor)
    schema = sorted(e["name"] for e in monitor.execute("query-qmp-schema")
                    if e["meta-type"] == "command")
    assert names == schema
    assert len(set(names)) == len(names)


def test_every_listed_command_runs(monitor):
    # "quit" would end the session: it is run last, and must answer {}
    for name in listed(monitor):
        if name in ("quit", "qmp_capabilities"):
            continue
        r = monitor.request(name, {"x-no-such-argument": 1})
        assert r.get("error", {}).get("class") != "CommandNotFound", (name, r)
    assert monitor.request("quit") == {"return": {}}


def test_qsd_command_list(start_daemon):
    if not QSD:
        pytest.skip("qemu-storage-daemon not installed")
    # the reference list above is qsd's own
    assert listed(start_daemon("qsd").qmp()) == QSD_72_COMMANDS


def test_missing_commands_not_found(start_daemon):
    monitor = start_daemon("bexd").qmp()
    have = set(listed(monitor))
    missing = [c for c in QSD_72_COMMANDS if c not in have] + ["no-such-command", "query-cpus"]
    for name in missing:
        r = monitor.request(name, {"any": 1}, id=name)
        assert r == {"id": name, "error": {"class": "CommandNotFound",
                                           "desc": "The command %s has not been found" % name}}


def test_unknown_command(monitor):
    r = monitor.request("bexd-nope")
    assert r["error"] == {"class": "CommandNotFound",
                          "desc": "The command bexd-nope has not been found"}
