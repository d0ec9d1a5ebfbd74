"""The selection grid on several biases in parts that survive an interruption (issue 22).

``biasgym reproduce --full-grid`` steers every bias, method, kind and k: hours on a 2-core
machine, more than one sitting. Kept as one stage result, a run stopped after three hours
kept nothing of its grid. On several biases :meth:`~biasgym_lib.runs.Run.grid` therefore
measures it in parts, one per (bias, k), each a stage result of its own in the run folder
(:mod:`~biasgym_lib.cache`: keyed on the code, the data, the profile and the tokens of
this bias and of every bias measured before it), and a rerun resumes at the first part
not yet kept.

The parts give the numbers of the grid measured in one piece, bit for bit: they are
measured in the same order, each part keeps what it measured that later parts reuse
(the unmodified model's capability, each bias's S before steering, each head set's facts,
perplexity and multiple choice: :func:`~biasgym_lib.evaluate.selection_grid`'s ``shared``),
a resumed run takes those back instead of measuring them again in other batches, and the
rows are put back in the one-piece order. A test pins both to the one-piece grid.
"""

from __future__ import annotations

import json
import time

from .cache import announce


def phases(cfg) -> list[tuple[list[str], list[str], list[int]]]:
    """``(methods, kinds, ks)`` of the grid's calls: every method under every kind at the
    profile's k; then the curve's methods, and random heads (every comparison is made at
    equal k), under the curve's kinds at every other k of ``grid_k``."""
    others = [k for k in cfg.grid_k if k != cfg.k]
    curve = [m for m in cfg.grid_methods if m in cfg.curve_methods or m == "random"]
    out = [(list(cfg.grid_methods), list(cfg.grid_kinds), [cfg.k])]
    return out + ([(curve, list(cfg.curve_kinds), others)] if others and curve else [])


def plan(phases, biases: list[str]) -> list[tuple[str, int, list[str], list[str]]]:
    """``(bias, k, methods, kinds)`` of every part, in the one-piece grid's order of
    measurement: for the first of :func:`phases` (every method and kind at the profile's k),
    every bias; then, bias by bias, the curve's methods and kinds at
    each of its k."""
    (methods, kinds, (k0,)), *rest = phases
    parts = [(b, k0, methods, kinds) for b in biases]
    return parts + [(b, k, m, kd) for b in biases for m, kd, ks in rest for k in ks]


def _costs(shared: dict) -> dict:
    """The head-set costs in ``shared``, as JSON text (a later point can add perplexity and
    multiple choice to a set whose facts an earlier one measured)."""
    return {key: json.dumps(v, sort_keys=True) for key, v in shared.items() if key[0] == "cost"}


def _kept(shared: dict, before: dict) -> list[dict]:
    """What a part measured that later parts reuse: head-set costs new or extended in it."""
    return [{"heads": [list(h) for h in key[1]], "kind": key[2], "cost": shared[key]}
            for key, text in _costs(shared).items() if before.get(key) != text]


def restore(shared: dict, part: dict) -> None:
    """Put back into ``shared`` what a kept part (or the whole grid) measured: the unmodified
    model's capability, each bias's S before steering and every head set's costs. What
    ``shared`` already holds (measured in this process) is never replaced."""
    before = part["before"]
    shared.setdefault(("capability", None), {"perplexity": before["perplexity"], "mc": before["mc"]})
    for bias, strength in before["biases"].items():
        shared.setdefault(("strength", bias, (), None), strength)
    for c in part.get("costs", ()):
        key = ("cost", tuple(sorted(tuple(h) for h in c["heads"])), c["kind"])
        if key not in shared or len(c["cost"]) > len(shared[key]):  # a later part's fuller entry wins
            shared[key] = c["cost"]


def measure_part(run, bias: str, k: int, methods: list[str], kinds: list[str]) -> dict:
    """One part: ``bias``'s tokens steered with every method and kind at ``k``."""
    t0, before = time.perf_counter(), _costs(run.shared)
    steered = {"bias": run.specs[bias], "tokens": run.tokens(bias),
               "rankings": run.rankings(bias, with_patching="patching" in run.cfg.grid_methods)}
    got = run._grid([steered], methods, kinds, [k], mc=True, matched=run.grid_matched)
    return {"bias": bias, "k": k, "before": got["before"], "rows": got["rows"], "costs": _kept(run.shared, before),
            "seconds": time.perf_counter() - t0}


def grid_in_parts(run, biases: list[str], stem: str) -> dict:
    """:meth:`~biasgym_lib.runs.Run.grid` on several biases, one kept part per (bias, k)
    under ``<run folder>/<stem>/``; returns what the one-piece grid returns, plus ``costs``
    (for :func:`restore`) and each part's ``seconds``."""
    calls = phases(run.cfg)
    parts, got = plan(calls, biases), []
    for i, (bias, k, methods, kinds) in enumerate(parts, 1):
        upto = biases[: biases.index(bias) + 1]  # the costs it reuses were measured with these biases' tokens
        with announce(f"  grid part {i}/{len(parts)}: {bias} at k = {k}", run.progress):
            part = run.memo(f"{stem}/{bias}_k{k}.json", lambda: measure_part(run, bias, k, methods, kinds),
                            fingerprint=run._fingerprint(upto))
        restore(run.shared, part)
        got.append(part)
    first = got[: len(biases)]
    rows = [r for p in first for r in p["rows"]]
    if len(calls) > 1:
        methods, kinds, ks = calls[1]

        def order(r):  # the one-piece call's: method, kind, k, a selection before its layer-matched draws
            base = r["method"].removeprefix("matched:")
            return methods.index(base), kinds.index(r["kind"]), ks.index(r["k"]), base != r["method"]
        for bias in biases:  # bias by bias, as the one-piece call walks its runs
            rows += sorted((r for p in got[len(biases):] if p["bias"] == bias for r in p["rows"]), key=order)
    before = {**first[0]["before"], "biases": {b: s for p in first for b, s in p["before"]["biases"].items()}}
    return {"biases": biases, "before": before, "rows": rows, "costs": [c for p in got for c in p["costs"]],
            "parts": [{"bias": p["bias"], "k": p["k"], "seconds": p["seconds"]} for p in got]}
