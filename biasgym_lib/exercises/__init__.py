"""Checks for the chapters' exercises: a clear pass / not-yet message, never a traceback.

Two kinds of exercise:

- *build* exercises (one per chapter 1-5, in ``exercises.ch1`` ... ``exercises.ch5``): the
  reader writes a function, tensor in and tensor out, and ``check_<name>(fn, ...)`` runs it
  on fresh inputs against the library's own implementation. When the answer differs, the
  check recognises the usual mistakes and says which one it looks like.
- *reading* exercises: :func:`check` compares a number or a name with the value the library
  computed, so the exercise stays correct whatever the profile or model.

The reference solutions are in :mod:`biasgym_lib.solutions`, never in the notebooks; the
tests run every check on every solution and on one plausible wrong answer per exercise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch


def _close(a, b, tol: float) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=tol, abs_tol=tol)
    except (TypeError, ValueError):
        return False


class Checked:
    """What :func:`check` returns: true when the answer passed. A notebook shows nothing for
    it (the one line :func:`check` printed is the whole output), so a check as a cell's last
    line adds no stray ``False``; ``assert check(...)`` still works."""

    def __init__(self, passed: bool, message: str = ""):
        self.passed = bool(passed)
        self.message = message  # the line that was printed

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
        return _say(False, f"{name}: not answered yet. Replace None with your answer and run the cells again.")
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
        return _say(True, f"{name}: passed")
    return _say(False, f"{name}: not yet. Your answer: {answer!r}." + (f" Hint: {hint}" if hint else ""))


def _say(passed: bool, message: str) -> Checked:
    print(message)
    return Checked(passed, message)


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


# ----------------------------------------------------------------------------- build exercises


class NotAttempted(Exception):
    """The reader's function still raises ``NotImplementedError`` (or returns ``None``)."""


class TheirError(Exception):
    """The reader's function raised: reported as a hint, not as a traceback."""


def call(fn: Callable, *args):
    """Run the reader's function; a stub becomes :class:`NotAttempted`, any other exception
    :class:`TheirError`, so that only the reader's code, never the check's, is blamed."""
    try:
        out = fn(*args)
    except NotImplementedError as exc:
        raise NotAttempted from exc
    except Exception as exc:
        raise TheirError(f"{type(exc).__name__}: {exc}") from exc
    if out is None:
        raise NotAttempted
    return out


def judge(name: str, trial: Callable[[int], str | None], seeds: Iterable[int] = (0, 1, 2),
          on_error: str = "") -> Checked:
    """Run ``trial(seed)`` for each seed: it builds fresh inputs, calls the reader's function
    with :func:`call` and returns ``None`` when the answer equals the library's, or a hint.
    Prints one line: passed, not attempted, or not yet with the hint."""
    seeds = list(seeds)
    for seed in seeds:
        try:
            problem = trial(seed)
        except NotAttempted:
            return _say(False, f"{name}: not attempted (the function still raises NotImplementedError). "
                               "Write it, then run this cell again.")
        except TheirError as exc:
            return _say(False, f"{name}: not yet. Your function raised {exc}." + (f" Hint: {on_error}" if on_error else ""))
        if problem:
            return _say(False, f"{name}: not yet (input {seed}). {problem}")
    return _say(True, f"{name}: passed on {len(seeds)} fresh inputs, equal to the library's implementation")


def as_tensor(x, what: str = "your function") -> torch.Tensor:
    """The reader's result as a float64 tensor, or :class:`TheirError` saying what it was."""
    if isinstance(x, torch.Tensor):
        return x.detach().double().cpu()
    try:
        return torch.as_tensor(x, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TheirError(f"{what} returned {type(x).__name__}, not a tensor or a number") from exc


def close(got: torch.Tensor, want, atol: float = 1e-4, rtol: float = 1e-4) -> bool:
    want = torch.as_tensor(want, dtype=torch.float64)
    return got.shape == want.shape and bool(torch.allclose(got, want, atol=atol, rtol=rtol))


def diagnose(got: torch.Tensor, want, mistakes: dict[str, object], fallback: str, **tol) -> str | None:
    """``None`` if ``got`` equals ``want``; else the hint of the first known mistake whose
    value ``got`` equals; else ``fallback``."""
    if close(got, want, **tol):
        return None
    want = torch.as_tensor(want, dtype=torch.float64)
    if got.shape != want.shape:
        return f"your result has shape {tuple(got.shape)}, the expected one has shape {tuple(want.shape)}."
    for hint, value in mistakes.items():
        if close(got, value, **tol):
            return hint
    return fallback


def exercise_model(seed: int = 0):
    """A tiny random Llama-family model for the checks when no model is given. Its norms get
    random gains (a fresh model's are all 1, which would hide a forgotten norm weight)."""
    from ..models import tiny_model

    model = tiny_model("llama", seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return model.eval()


from . import ch0, ch1, ch2, ch3, ch4, ch5, ch6, ch7  # noqa: E402  (the chapters' checks use the helpers above)

__all__ = ["Checked", "check", "judge", "call", "ch0", "ch1", "ch2", "ch3", "ch4", "ch5", "ch6"]
