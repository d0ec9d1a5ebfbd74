"""Issue 21: nothing in a test run waits without a bound. (The book build's own bounds, per
cell, start-up and IOPub, are tested in test_book_build.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest


def test_every_test_has_a_time_limit(request, tmp_path):
    """pytest-timeout is installed and configured: a stuck test fails within its limit and
    the run goes on (here with a 3 s limit instead of the project's)."""
    assert request.config.pluginmanager.hasplugin("timeout")
    assert int(request.config.getini("timeout")) == 600
    (tmp_path / "test_stuck.py").write_text("import time\n\ndef test_stuck():\n    time.sleep(600)\n\n"
                                            "def test_after():\n    pass\n")
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "timeout=3",
                          "test_stuck.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert time.perf_counter() - t0 < 120
    assert run.returncode == 1, run.stdout[-2000:]
    assert "Timeout (>3.0s)" in run.stdout and "1 failed, 1 passed" in run.stdout, run.stdout[-2000:]


def test_tests_that_build_the_book_get_the_book_limit():
    import conftest

    class Item:
        def __init__(self, fixtures, marker=None):
            self.fixturenames, self.markers = fixtures, [marker] if marker else []

        def get_closest_marker(self, name):
            return next((m for m in self.markers if m.name == name), None)

        def add_marker(self, mark):
            self.markers.append(mark.mark)

    book, plain, own = Item(("built_book", "tmp_path")), Item(("tmp_path",)), \
        Item(("built_book",), pytest.mark.timeout(5).mark)
    conftest.pytest_collection_modifyitems(None, [book, plain, own])
    assert [m.args for m in book.markers] == [(conftest.BOOK_TIMEOUT,)] and conftest.BOOK_TIMEOUT >= 3600
    assert plain.markers == [] and [m.args for m in own.markers] == [(5,)]


def test_kernels_wait_passively_only_where_other_processes_keep_the_cpus_busy():
    """bookbuild measures the CPU other processes use over a second before the chapters run;
    from half a CPU on, the kernels get OMP_WAIT_POLICY=PASSIVE (no number changes; spinning
    threads beside a busy process made a cell of chapter 4 pass its 30-minute timeout)."""
    from biasgym_lib.tools.cpuload import cpu_snapshot, kernel_wait_policy, other_load

    assert other_load((100, 1000, 10), (250, 1200, 60), 2) == 1.0  # 150 busy jiffies, 50 of them ours
    assert other_load((100, 1000, 10), (120, 1200, 60), 2) == 0.0  # never below zero
    assert other_load((100, 1000, 10), (100, 1000, 10), 2) == 0.0  # no time passed
    assert kernel_wait_policy(1.0, {}) == "PASSIVE" and kernel_wait_policy(0.2, {}) is None
    assert kernel_wait_policy(1.0, {"OMP_WAIT_POLICY": "ACTIVE"}) is None  # the user's choice is kept
    busy, total, _ = cpu_snapshot()
    assert 0 < busy <= total
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        first = cpu_snapshot()
        time.sleep(1.0)
        assert other_load(first, cpu_snapshot(), os.cpu_count() or 1) >= 0.5
    finally:
        hog.kill()
        hog.wait()
