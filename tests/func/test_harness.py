"""The harness itself (issue #18): a bexd that dies during a test, exits
with a bad status, aborts or hangs on SIGTERM fails the test that started
it, with the status and bexd's stderr; a test that ends bexd on purpose
says so and passes; a hang fails one test, not the run; the summary tells
bexd's tests from the reference's.

Each case runs an inner pytest session (pytester, in a subprocess) with
this directory's conftest.py and checks its verdicts.
"""
import os
import signal

import pytest

import conftest

pytest_plugins = ["pytester"]

HERE = os.path.dirname(os.path.abspath(__file__))

HEADER = '''
import os
import signal
import threading

import pytest
'''


@pytest.fixture
def inner(pytester, monkeypatch):
    """inner(body, *args) -> RunResult of the test module `body`."""
    with open(os.path.join(HERE, "conftest.py")) as f:
        pytester.makeconftest(f.read())
    monkeypatch.setenv("BEXD", conftest.BEXD)
    monkeypatch.setenv("BEXD_SOURCE_ROOT", conftest.ROOT)
    # the inner daemons crash on purpose: their sanitizer reports go to
    # their own stderr files, not to the outer run's log_path (which
    # scripts/test.sh counts as bexd's failures)
    for var in ("ASAN_OPTIONS", "UBSAN_OPTIONS"):
        opts = [o for o in os.environ.get(var, "").split(":")
                if o and not o.startswith("log_path=")]
        monkeypatch.setenv(var, ":".join(opts))

    def run(body, *args, bound=None):
        # bound: a short stop bound for the cases that hang on purpose
        if bound:
            monkeypatch.setenv("BEXD_TEST_STOP_BOUND", str(bound))
        pytester.makepyfile(test_inner=HEADER + body)
        return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA", *args,
                                             timeout=300)
    return run


def test_daemon_killed_during_test_fails_it(inner):
    r = inner('''
def test_x(start_daemon):
    d = start_daemon("bexd")
    d.qmp().execute("query-version")
    os.kill(d.pid, signal.SIGKILL)      # as if it had crashed
    d.wait_exit()
''')
    r.assert_outcomes(failed=1)
    r.stdout.fnmatch_lines(["*bexd exit: killed by SIGKILL (expected exit status 0)*"])


def test_daemon_dead_without_a_word_fails_the_test(inner):
    r = inner('''
def test_x(start_daemon):
    d = start_daemon("bexd")
    os.kill(d.pid, signal.SIGSEGV)
    pid = os.pidfd_open(d.pid)
    import select
    p = select.poll()
    p.register(pid, select.POLLIN)
    assert p.poll(30000)
''')
    r.assert_outcomes(failed=1)
    r.stdout.fnmatch_lines(["*bexd died during the test: *"])


def test_abort_fails_the_test(inner):
    # under ASan (handle_abort=1) an abort is an error exit with a stack;
    # in a plain build it is death by SIGABRT: a failure either way
    r = inner('''
def test_x(start_daemon):
    d = start_daemon("bexd")
    os.kill(d.pid, signal.SIGABRT)
    d.wait_exit()
''')
    r.assert_outcomes(failed=1)
    r.stdout.re_match_lines([r".*bexd exit: (killed by SIGABRT|exit status 1) "
                             r"\(expected exit status 0\).*"])


def test_hang_on_sigterm_fails_the_test(inner):
    r = inner('''
def test_x(start_daemon):
    d = start_daemon("bexd")
    os.kill(d.pid, signal.SIGSTOP)      # SIGTERM cannot end it now
''', bound=3)
    r.assert_outcomes(passed=1, errors=1)
    r.stdout.fnmatch_lines(["*bexd did not exit within 3 s of SIGTERM (killed)*"])


def test_wrong_exit_status_fails_the_test(inner):
    r = inner('''
def test_x(start_daemon):
    d = start_daemon("bexd")
    d.expect_exit(1)
    d.qmp().execute("quit")              # exits 0, the test said 1
    d.wait_exit()
''')
    r.assert_outcomes(failed=1)
    r.stdout.fnmatch_lines(["*bexd exit: exit status 0 (expected exit status 1)*"])


def test_stderr_tail_is_in_the_report(inner):
    r = inner('''
def test_x(start_daemon):
    d = start_daemon("bexd", "--blockdev", "driver=null-co,node-name=n0")
    d.qmp().execute("blockdev-del", node_name="n0")
    os.kill(d.pid, signal.SIGKILL)
    d.wait_exit()
''')
    r.assert_outcomes(failed=1)
    r.stdout.fnmatch_lines(["*--- stderr (tail):*"])


def test_ends_on_purpose_pass(inner):
    r = inner('''
def test_stop_sigkill(start_daemon):
    start_daemon("bexd").stop(signal.SIGKILL)

def test_expect_kill(start_daemon):
    d = start_daemon("bexd")
    d.expect_exit(-signal.SIGKILL)
    os.kill(d.pid, signal.SIGKILL)

def test_expect_any(start_daemon):
    d = start_daemon("bexd")
    d.expect_exit()
    os.kill(d.pid, signal.SIGABRT)

def test_quit(start_daemon):
    d = start_daemon("bexd")
    d.qmp().execute("quit")

def test_quit_waited(start_daemon):
    d = start_daemon("bexd")
    d.qmp().execute("quit")
    assert d.wait_exit() == 0

def test_sigterm_midway(start_daemon):
    d = start_daemon("bexd")
    d.stop()
    d.stop()

def test_sigint(start_daemon):
    start_daemon("bexd").stop(signal.SIGINT)
''')
    r.assert_outcomes(passed=7)


def test_stop_midway_reports_at_once(inner):
    r = inner('''
def test_x(start_daemon):
    d = start_daemon("bexd")
    os.kill(d.pid, signal.SIGSTOP)
    d.stop()
    raise AssertionError("not reached")
''', bound=3)
    r.assert_outcomes(failed=1)
    r.stdout.fnmatch_lines(["*bexd did not exit within 3 s*"])
    r.stdout.no_fnmatch_line("*not reached*")


def test_time_limit_fails_one_test(inner):
    r = inner('''
@pytest.mark.timeout(2)
def test_hangs(start_daemon):
    start_daemon("bexd")
    threading.Event().wait(60)

def test_next():
    pass
''')
    r.assert_outcomes(failed=1, passed=1)
    r.stdout.fnmatch_lines(["*TestTimeout: test phase ran past its time limit*"])


def test_summary_splits_bexd_and_reference(inner):
    if not conftest.QSD:
        pytest.skip("qemu-storage-daemon not installed")
    r = inner('''
def test_both(impl, start_daemon):
    start_daemon(impl)

def test_bexd_skip():
    pytest.skip("x")

def test_bexd_fail():
    assert False
''')
    r.assert_outcomes(passed=2, skipped=1, failed=1)
    r.stdout.fnmatch_lines(["bexd: 1 passed, 1 failed, 1 skipped; "
                            "reference: 1 passed, 0 failed, 0 skipped"])


def test_reference_only_held_to_alive(inner):
    if not conftest.QSD:
        pytest.skip("qemu-storage-daemon not installed")
    r = inner('''
def test_dies(start_daemon):
    d = start_daemon("qsd")
    os.kill(d.pid, signal.SIGKILL)
    d.wait_exit()
    assert not d.alive()

def test_killed_ok(start_daemon):
    d = start_daemon("qsd")
    d.qmp().execute("quit")
''')
    r.assert_outcomes(passed=2)


def test_failure_named_the_moment_it_fails(inner):
    # -q names failures only in its final summary; this run is killed before
    # it gets there and still says which tests failed, in which phase, why.
    r = inner('''
def test_fails():
    assert 1 + 1 == 3, "arithmetic"


@pytest.fixture
def broken_teardown():
    yield
    raise RuntimeError("teardown broke")


def test_teardown_error(broken_teardown):
    pass


def test_xfail_is_no_failure():
    pytest.xfail("expected")


def test_run_stopped_here():
    os.kill(os.getpid(), signal.SIGKILL)
''', "-q")
    out = r.stdout.str()
    assert r.ret == -signal.SIGKILL, out
    r.stdout.fnmatch_lines([
        "FAILED test_inner.py::test_fails (call): AssertionError: arithmetic",
        "ERROR test_inner.py::test_teardown_error (teardown): RuntimeError: teardown broke",
    ])
    assert "test_xfail_is_no_failure" not in out
    assert " passed" not in out and "short test summary" not in out   # no summary: stopped
