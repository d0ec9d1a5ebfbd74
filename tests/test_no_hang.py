"""Issue 21: nothing in a test run waits without a bound. (The book build's own bounds, per
cell, start-up and IOPub, are tested in test_book_build.py.)"""

from __future__ import annotations

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
