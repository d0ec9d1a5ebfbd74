"""Chapter 5's build exercise: the leave-one-bias-out split.

``held_out_splits(runs)`` gets the injection runs as ``(bias, seed)`` pairs and returns, for
every bias, ``(training runs, test runs)``: the heads are ranked from the training runs and
steered on the test runs. The library's version is
:func:`biasgym_lib.generalise.bias_splits`.
"""

from __future__ import annotations

import random

from ..generalise import bias_splits
from . import Checked, TheirError, call, check, judge

NAME = "Exercise 1 (held_out_splits)"


def _norm(splits) -> dict:
    try:
        return {b: (frozenset(map(tuple, tr)), frozenset(map(tuple, te))) for b, (tr, te) in dict(splits).items()}
    except (TypeError, ValueError) as exc:
        raise TheirError("the result is not a dict {bias: (training runs, test runs)} of (bias, seed) pairs") from exc


def check_held_out_splits(fn) -> Checked:
    """Run ``fn`` on random sets of biases and seeds and compare with
    :func:`biasgym_lib.generalise.bias_splits` (order inside each list does not matter)."""

    def trial(seed: int) -> str | None:
        rng = random.Random(5000 + seed)
        biases = rng.sample(["driving", "food", "sleep", "blue_skin", "punctual", "music", "math"], 3 + seed)
        seeds = sorted(rng.sample(range(10), 2 + seed % 2))
        runs = [(b, s) for b in biases for s in seeds]
        rng.shuffle(runs)
        want = _norm(bias_splits(runs))
        got = _norm(call(fn, list(runs)))
        if set(got) != set(want):
            return f"one entry per bias: expected the keys {sorted(want)}, got {sorted(got)}."
        for b, (train, test) in got.items():
            if any(r[0] == b for r in train):
                return (f"a training run of held-out {b!r} has {b!r} itself (another seed of it): its heads were "
                        "found with the bias's own token, so the test is not held out. Hold out the bias, not "
                        "one run.")
            if test != want[b][1]:
                return f"the test runs of {b!r} are every seed of {b!r}: {sorted(want[b][1])}."
            if train != want[b][0]:
                return f"train on every run of every other bias: for {b!r} that is {len(want[b][0])} runs."
        return None
    return judge(NAME, trial, on_error="runs is a list of (bias, seed) tuples; return {bias: (train, test)}.")


def check_fair_comparison(answer, held, k: int) -> Checked:
    """Exercise 2: the paper's heads against random heads of the same kind and k, on held-out biases."""
    col = held["S removed (mean over seeds)"]
    return check("Exercise 2", answer, float(col["paper"].mean() - col[f"random / zero / k = {k}"].mean()), tol=1e-6,
                 hint='two columns of held["S removed (mean over seeds)"]')
