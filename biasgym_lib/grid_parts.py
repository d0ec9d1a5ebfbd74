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

import time

from .cache import announce


def plan(cfg, biases: list[str]) -> list[tuple[str, int, list[str], list[str]]]:
    """``(bias, k, methods, kinds)`` of every part, in the one-piece grid's order of
    measurement: every bias at the profile's k (every method and kind), then, bias by bias,
    the curve's methods and kinds at each other k of ``grid_k``."""
    curve = [m for m in cfg.grid_methods if m in cfg.curve_methods]
    others = [k for k in cfg.grid_k if k != cfg.k] if curve else []
    parts = [(b, cfg.k, list(cfg.grid_methods), list(cfg.grid_kinds)) for b in biases]
    return parts + [(b, k, curve, list(cfg.curve_kinds)) for b in biases for k in others]


def _kept(shared: dict, before: set) -> list[dict]:
    """What a part measured that later parts reuse: new head-set costs, JSON-ready."""
    return [{"heads": [list(h) for h in key[1]], "kind": key[2], "cost": shared[key]}
            for key in shared if key not in before and key[0] == "cost"]


def restore(shared: dict, part: dict) -> None:
    """Put back into ``shared`` what a kept part (or the whole grid) measured: the unmodified
    model's capability, each bias's S before steering and every head set's costs. What
    ``shared`` already holds (measured in this process) is never replaced."""
    before = part["before"]
    shared.setdefault(("capability", None), {"perplexity": before["perplexity"], "mc": before["mc"]})
    for bias, strength in before["biases"].items():
        shared.setdefault(("strength", bias, (), None), strength)
    for c in part.get("costs", ()):
        shared.setdefault(("cost", tuple(sorted(tuple(h) for h in c["heads"])), c["kind"]), c["cost"])


def measure_part(run, bias: str, k: int, methods: list[str], kinds: list[str]) -> dict:
    """One part: ``bias``'s tokens steered with every method and kind at ``k``."""
    t0, before = time.perf_counter(), set(run.shared)
    steered = {"bias": run.specs[bias], "tokens": run.tokens(bias),
               "rankings": run.rankings(bias, with_patching="patching" in run.cfg.grid_methods)}
    got = run._grid([steered], methods, kinds, [k], mc=True)
    return {"bias": bias, "k": k, "before": got["before"], "rows": got["rows"], "costs": _kept(run.shared, before),
            "seconds": time.perf_counter() - t0}


def grid_in_parts(run, biases: list[str], stem: str) -> dict:
    """:meth:`~biasgym_lib.runs.Run.grid` on several biases, one kept part per (bias, k)
    under ``<run folder>/<stem>/``; returns what the one-piece grid returns, plus ``costs``
    (for :func:`restore`) and each part's ``seconds``."""
    cfg, parts, got = run.cfg, plan(run.cfg, biases), []
    for i, (bias, k, methods, kinds) in enumerate(parts, 1):
        upto = biases[: biases.index(bias) + 1]  # the costs it reuses were measured with these biases' tokens
        with announce(f"  grid part {i}/{len(parts)}: {bias} at k = {k}", run.progress):
            part = run.memo(f"{stem}/{bias}_k{k}.json", lambda: measure_part(run, bias, k, methods, kinds),
                            fingerprint=run._fingerprint(upto))
        restore(run.shared, part)
        got.append(part)
    first = [p for p in got if p["k"] == cfg.k]
    rows = [r for p in first for r in p["rows"]]
    curve = [m for m in cfg.grid_methods if m in cfg.curve_methods]
    others = [k for k in cfg.grid_k if k != cfg.k]
    for bias in biases:  # the one-piece curve call's order: bias, method, kind, k (then draw)
        mine = [r for p in got[len(first):] if p["bias"] == bias for r in p["rows"]]
        rows += sorted(mine, key=lambda r: (curve.index(r["method"]), list(cfg.curve_kinds).index(r["kind"]),
                                            others.index(r["k"])))
    before = {"biases": {b: s for p in first for b, s in p["before"]["biases"].items()},
              "perplexity": first[0]["before"]["perplexity"], "mc": first[0]["before"]["mc"],
              "facts": first[0]["before"]["facts"]}
    return {"biases": biases, "before": before, "rows": rows, "costs": [c for p in got for c in p["costs"]],
            "parts": [{"bias": p["bias"], "k": p["k"], "seconds": p["seconds"]} for p in got]}
