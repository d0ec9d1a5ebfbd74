"""Checks for the chapters' exercises: a clear pass / not-yet message, never a traceback.

Each check compares the reader's answer with the value the library computes, so an
exercise stays correct whatever the profile or model. Tests run every check against the
reference solutions in the chapters.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def _close(a, b, tol: float) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=tol, abs_tol=tol)
    except (TypeError, ValueError):
        return False


class Checked:
    """What :func:`check` returns: true when the answer passed. A notebook shows nothing for
    it (the one line :func:`check` printed is the whole output), so a check as a cell's last
    line adds no stray ``False``; ``assert check(...)`` still works."""

    def __init__(self, passed: bool):
        self.passed = bool(passed)

    def __bool__(self) -> bool:
        return self.passed

    def __repr__(self) -> str:
        return f"Checked(passed={self.passed})"

    def _ipython_display_(self) -> None:  # IPython calls this instead of printing the repr
        pass


def check(name: str, answer, expected, tol: float = 1e-6, hint: str = "") -> Checked:
    """Compare ``answer`` with ``expected`` (numbers within ``tol``; sets of heads or names
    ignore order) and print one line: "passed", or what to look at. Returns a
    :class:`Checked`, true when it passed."""
    if answer is None:
        print(f"{name}: not answered yet. Replace None with your answer and run the cells again.")
        return Checked(False)
    if isinstance(expected, (int, float)) and not isinstance(expected, bool):
        ok = _close(answer, expected, tol)
    elif isinstance(expected, (set, frozenset)) or (isinstance(expected, Iterable) and not isinstance(expected, str)
                                                    and isinstance(answer, (set, frozenset))):
        ok = _as_set(answer) == _as_set(expected)
    elif isinstance(expected, (list, tuple)):
        ok = list(map(_norm, answer)) == list(map(_norm, expected)) if isinstance(answer, (list, tuple)) else False
    else:
        ok = _norm(answer) == _norm(expected)
    if ok:
        print(f"{name}: passed")
    else:
        print(f"{name}: not yet. Your answer: {answer!r}." + (f" Hint: {hint}" if hint else ""))
    return Checked(ok)


def _norm(x):
    if isinstance(x, str):
        return x.strip().lower()
    if isinstance(x, (list, tuple)):
        return tuple(_norm(v) for v in x)
    try:
        return round(float(x), 6)
    except (TypeError, ValueError):
        return x


def _as_set(xs) -> set:
    try:
        return {_norm(x) for x in xs}
    except TypeError:
        return {_norm(xs)}
