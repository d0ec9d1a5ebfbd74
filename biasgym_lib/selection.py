"""The selection grid, summarised (:ref:`method §4 <method-4>`-5): one :class:`SteeringResult` per way
of ranking heads, intervention and k, with intervals (:func:`summarise_grid`); the bounds
stated in advance (:data:`GRID_BOUNDS`), the rule that chooses the book's selection
(:func:`choose_selection`), the target and its frontier (:func:`target_result`), and the
tables the chapters show; and two rankings compared only where the grid steered both with the
same kind and k, with a tie rule read off their intervals (issue 23: chapters 4 and 6 lead with
it). The measurements themselves are :mod:`~biasgym_lib.evaluate`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from .errors import BiasGymError
from .stats import RUNS, Estimate, bootstrap

PAPER = ("robust", "zero")
"""The paper's BiasScope: heads in the top k of DLA over injection runs, scaled to 0."""


GRID_BOUNDS = {"facts": 0.10, "perplexity": 0.05, "mc": -0.02}
"""The bounds stated in advance (issue 12): a debiasing holds if the factual associations
lose at most 10% of their S, perplexity rises by at most 5% on every text set, and
multiple-choice accuracy falls by at most 2 points."""


def is_random(method: str) -> bool:
    """Random heads, drawn uniformly (``random``) or layer-matched to a selection (``matched:<method>``)."""
    return method == "random" or method.startswith("matched:")


@dataclass(frozen=True)
class SteeringResult:
    """One selection steered on every run: heads ranked by ``method``, the top ``k`` steered
    by ``kind``, summarised over runs (biases x seeds) by :func:`summarise_grid`.

    ``reduction``: mean share of S removed (None if no run had S > 0 before);
    ``facts_reduction``: share of the facts' S removed; ``held_out_reduction``: the same for
    the held-out relation (None where there is none); ``perplexity``: relative change per
    text set; ``mc``: change of multiple-choice accuracy (None where not measured); each an
    :class:`~biasgym_lib.stats.Estimate`. ``matched`` and ``uniform``: where the selection's
    reduction falls among random draws of the same kind and k, layer-matched and uniform
    (``{"n", "mean", "p95", "percentile"}``, None where not drawn). ``why``: set when the
    rule chose it."""

    method: str
    kind: str
    k: int
    n_runs: int
    n_head_sets: int
    mean_heads: float
    reduction: Estimate | None
    facts_reduction: Estimate
    perplexity: dict[str, Estimate]
    mc: Estimate | None
    why: str | None = None
    held_out_reduction: Estimate | None = None
    matched: dict | None = None
    uniform: dict | None = None

    @property
    def facts_ok(self) -> bool:
        """The facts and the held-out relation each lose at most the bound."""
        held = self.held_out_reduction
        return self.facts_reduction.value <= GRID_BOUNDS["facts"] and (held is None or held.value <= GRID_BOUNDS["facts"])

    @property
    def perplexity_ok(self) -> bool:
        return all(v.value <= GRID_BOUNDS["perplexity"] for v in self.perplexity.values())

    @property
    def mc_ok(self) -> bool | None:
        """None where multiple choice was not measured."""
        return None if self.mc is None else self.mc.value >= GRID_BOUNDS["mc"]

    @property
    def beyond_matched(self) -> bool | None:
        """The reduction is above 95% of the layer-matched random draws (None: not drawn)."""
        return None if self.matched is None else self.matched["percentile"] >= BEYOND_RANDOM

    @property
    def key(self) -> tuple[str, str, int]:
        return self.method, self.kind, self.k

    def to_dict(self) -> dict:
        est = lambda e: None if e is None else e.to_dict()  # noqa: E731
        return {"method": self.method, "kind": self.kind, "k": self.k, "n_runs": self.n_runs,
                "n_head_sets": self.n_head_sets, "mean_heads": self.mean_heads, "reduction": est(self.reduction),
                "facts_reduction": est(self.facts_reduction), "held_out_reduction": est(self.held_out_reduction),
                "perplexity": {n: v.to_dict() for n, v in self.perplexity.items()}, "mc": est(self.mc),
                "matched": self.matched, "uniform": self.uniform, "beyond_matched": self.beyond_matched,
                "facts_ok": self.facts_ok, "perplexity_ok": self.perplexity_ok, "mc_ok": self.mc_ok, "why": self.why}

    @classmethod
    def from_dict(cls, d: dict) -> "SteeringResult":
        est = lambda e: None if e is None else Estimate.from_dict(e)  # noqa: E731
        return cls(d["method"], d["kind"], int(d["k"]), int(d["n_runs"]), int(d["n_head_sets"]),
                   float(d["mean_heads"]), est(d["reduction"]), est(d["facts_reduction"]),
                   {n: Estimate.from_dict(v) for n, v in d["perplexity"].items()}, est(d["mc"]), d.get("why"),
                   est(d.get("held_out_reduction")), d.get("matched"), d.get("uniform"))


BEYOND_RANDOM = 95.0
"""A selection's effect counts as beyond random heads when its reduction is above this
percentile of the random draws of the same kind and k (stated in advance, issue 23)."""


def _run_means(rows: Sequence[dict]) -> dict:
    """Mean reduction per run (bias, seed) over the rows (random heads: over draws)."""
    per_run: dict = {}
    for r in rows:
        for s, red in zip(r["seeds"], r["reduction"]):
            per_run.setdefault((r["bias"], s), []).append(red)
    return {key: float(np.mean(v)) for key, v in per_run.items() if None not in v}


def _draw_means(rows: Sequence[dict], runs) -> list[float]:
    """Each draw's mean reduction over ``runs`` (the runs the selection was measured on)."""
    per_draw: dict = {}
    for r in rows:
        for s, red in zip(r["seeds"], r["reduction"]):
            if (r["bias"], s) in runs and red is not None:
                per_draw.setdefault(r["draw"], []).append(red)
    return [float(np.mean(v)) for v in per_draw.values()]


def _place(value: float, draws: list[float]) -> dict | None:
    from .heads import percentile

    if not draws:
        return None
    return {"n": len(draws), "mean": float(np.mean(draws)), "p95": float(np.percentile(draws, 95)),
            "percentile": percentile(value, draws)}


def _facts_estimate(before: np.ndarray, after: np.ndarray, rng, n_boot: int) -> Estimate:
    """1 - mean after / mean before over facts (mean over head sets), bootstrap over facts."""
    fi = rng.integers(0, len(before), (n_boot, len(before)))
    point = float(np.mean(1 - after.mean(1) / before.mean()))
    boot = np.mean(1 - after[:, fi].mean(2) / before[fi].mean(1)[None], 0)
    return Estimate.from_samples(point, boot, len(before), "bootstrap 95% over facts")


def capability_estimates(before: dict, costed: Sequence[dict], rng, n_boot: int) -> tuple[dict, Estimate | None]:
    """The relative perplexity change per text set and the MC change, each the mean over the
    ``costed`` head sets (rows with ``perplexity`` and ``mc`` raw results), with paired
    bootstrap intervals over texts and questions; ``({}, None)`` where nothing was measured."""
    perplexity, mc = {}, None
    for name, b in (before["perplexity"].items() if costed else ()):
        nb, tb = np.asarray(b["nll"]), np.asarray(b["tokens"], dtype=float)
        na = np.asarray([r["perplexity"][name]["nll"] for r in costed])
        ti = rng.integers(0, len(nb), (n_boot, len(nb)))

        def change(idx):
            ppl_b = np.exp(nb[idx].sum(-1) / tb[idx].sum(-1))
            ppl_a = np.exp(na[:, idx].sum(-1) / tb[idx].sum(-1))
            return (ppl_a / ppl_b).mean(0) - 1

        perplexity[name] = Estimate.from_samples(change(np.arange(len(nb))), change(ti), len(nb),
                                                 "bootstrap 95% over texts, paired")
    if before.get("mc") is not None and costed and all(r.get("mc") for r in costed):
        cb = np.asarray(before["mc"]["correct"], dtype=float)
        ca = np.asarray([r["mc"]["correct"] for r in costed], dtype=float)
        qi = rng.integers(0, len(cb), (n_boot, len(cb)))
        diff = (ca - cb[None]).mean(0)
        mc = Estimate.from_samples(diff.mean(), diff[qi].mean(1), len(cb), "bootstrap 95% over questions, paired")
    return perplexity, mc


def knowledge_estimates(before: dict, sets: Sequence[dict], rng, n_boot: int) -> tuple[Estimate, Estimate | None]:
    """The facts' reduction and the held-out relation's (None if there is none), each the
    mean over the head sets, with bootstrap intervals over facts."""
    facts_before = np.asarray([x["value"] for x in before["facts"]])
    held = np.asarray(before.get("held_out") or [False] * len(facts_before), dtype=bool)
    after = np.asarray([r["facts"] for r in sets])  # (sets, facts)
    facts = _facts_estimate(facts_before[~held], after[:, ~held], rng, n_boot)
    return facts, (_facts_estimate(facts_before[held], after[:, held], rng, n_boot) if held.any() else None)


def summarise_grid(grid: dict, n_boot: int = 1000, seed: int = 0) -> list[SteeringResult]:
    """One line per (method, kind, k) of a :func:`selection_grid`: the mean S reduction over
    runs (bias x seed; random heads: the mean over draws first) with a bootstrap 95% interval
    over runs; the facts' reduction and the held-out relation's (mean over head sets) with
    intervals over facts; the relative perplexity change per text set and the MC change (mean
    over the head sets where they were measured) with paired intervals over texts and
    questions; where the reduction falls among the random draws of the same kind and k
    (layer-matched and uniform); and whether the bounds of :data:`GRID_BOUNDS` hold."""

    rng = np.random.default_rng(seed)
    before = grid["before"]
    groups: dict = {}
    for r in grid["rows"]:
        groups.setdefault((r["method"], r["kind"], r["k"]), []).append(r)
    out = []
    for (method, kind, k), rows in groups.items():
        means = _run_means(rows)
        vals = list(means.values())
        red = bootstrap(np.asarray(vals), n_boot, seed, interval=RUNS) if vals else None
        sets = list({(tuple(map(tuple, r["heads"]))): r for r in rows}.values())  # each head set once
        facts, held_out = knowledge_estimates(before, sets, rng, n_boot)
        perplexity, mc = capability_estimates(before, [r for r in sets if r.get("perplexity")], rng, n_boot)
        matched = uniform = None
        if not is_random(method) and red is not None:
            matched = _place(red.value, _draw_means(groups.get((f"matched:{method}", kind, k), []), means))
            uniform = _place(red.value, _draw_means(groups.get(("random", kind, k), []), means))
        out.append(SteeringResult(method, kind, k, len(vals), len(sets), float(np.mean([r["n_heads"] for r in sets])),
                                  red, facts, perplexity, mc, None, held_out, matched, uniform))
    order = {m: i for i, m in enumerate(dict.fromkeys(r["method"] for r in grid["rows"]))}
    return sorted(out, key=lambda x: (order[x.method], x.kind, x.k))


def choose_selection(summary: Sequence[SteeringResult], k_max: int) -> SteeringResult:
    """The rule, fixed before any result was seen, that makes one selection "the book's
    BiasScope": among the non-random (method, kind, k) with k <= ``k_max``, the largest mean
    S reduction among those that keep the facts (<= 10% lost) and perplexity (<= +5%) and,
    where measured, MC (>= -2 points); if none keeps all, the largest among those that keep
    the facts; if none keeps the facts, the largest reduction minus facts reduction. Returns
    the chosen line with ``why`` set."""
    pool = [x for x in summary if not is_random(x.method) and x.k <= k_max and x.reduction is not None]
    if not pool:
        raise BiasGymError("no grid point to choose from: run the selection grid first.")
    tiers = [("keeps the facts, perplexity and multiple choice within the bounds",
              [x for x in pool if x.facts_ok and x.perplexity_ok and x.mc_ok is not False]),
             ("keeps the facts but not every capability bound", [x for x in pool if x.facts_ok])]
    for why, cands in tiers:
        if cands:
            best = max(cands, key=lambda x: x.reduction.value)
            if best.mc_ok is None and why.startswith("keeps the facts, perplexity"):
                why = ("keeps the facts and perplexity within the bounds (multiple choice not measured at this k: "
                       "the confirmation measures it)")
            return replace(best, why=why)
    best = max(pool, key=lambda x: x.reduction.value - x.facts_reduction.value)
    return replace(best, why="nothing keeps the facts: the largest reduction beyond the facts' reduction")


TARGET_REDUCTION = 0.5
"""The target stated in advance (issue 12): some selection and intervention with k <= the
profile's k removes at least half of S (mean over biases x seeds) within every bound of
:data:`GRID_BOUNDS`, multiple choice measured."""


def target_result(summary: Sequence[SteeringResult], k_max: int) -> dict:
    """Whether any non-random line of a grid summary with k <= ``k_max`` meets the target
    (:data:`TARGET_REDUCTION` of S removed, facts, perplexity and measured MC within
    :data:`GRID_BOUNDS`), and the frontier: the lines that no other line beats on both S
    removed and the facts kept (sorted by the facts' loss). Returns ``{"met_by": [...],
    "frontier": [...]}`` (summary lines)."""
    pool = [x for x in summary if not is_random(x.method) and x.k <= k_max and x.reduction is not None]
    met = [x for x in pool if x.reduction.value >= TARGET_REDUCTION and x.facts_ok and x.perplexity_ok and x.mc_ok is True]

    def point(x):
        return x.reduction.value, x.facts_reduction.value

    def beaten(x):  # another line removes at least as much S and keeps at least as many facts
        return any(point(y) != point(x) and point(y)[0] >= point(x)[0] and point(y)[1] <= point(x)[1] for y in pool)

    frontier = sorted((x for x in pool if not beaten(x)), key=lambda x: x.facts_reduction.value)
    return {"met_by": met, "frontier": frontier}


def compare(a: Estimate | None, b: Estimate | None, names: tuple[str, str], word: str = "higher") -> str:
    """Which of two estimates is larger, judged by their 95% intervals: "tie" when the
    intervals overlap (the data do not separate them, which is not the same as showing them
    equal), else "<name of the larger> <word>": a difference inside the noise is never read as
    a win. With few units (three seeds) a percentile interval is little more than their range."""
    if a is None or b is None:
        return "not measured"
    if a.lo > b.hi:
        return f"{names[0]} {word}"
    if b.lo > a.hi:
        return f"{names[1]} {word}"
    return "tie"


def equal_k_pair(best_method: str, curve_methods: Sequence[str]) -> tuple[str, str]:
    """The two rankings the book compares at equal k: the rule's choice against the paper's
    (:data:`PAPER`); where the rule chose the paper's ranking itself, the other ranking steered
    at every k of the curve against it (nothing would be compared otherwise)."""
    if best_method != PAPER[0]:
        return best_method, PAPER[0]
    rival = next((m for m in curve_methods if m != PAPER[0] and not is_random(m)), None)
    if rival is None:
        raise BiasGymError(f"nothing to compare the paper's ranking with at equal k: add a ranking other than "
                           f"{PAPER[0]!r} to curve_methods in profiles.yaml.")
    return rival, PAPER[0]


def at_equal_k(summary: Sequence[SteeringResult | dict], methods: tuple[str, str]) -> list[dict]:
    """Two ways of ranking heads compared only where both were steered with the same kind
    and k (issue 23: a comparison across different k says more about k than about the
    ranking). For each such (kind, k): each method's S removed and facts lost, with their
    intervals and the number of heads actually steered (the robust set can hold fewer than
    k), random heads at the same kind and k where the grid measured them, and
    :func:`compare`'s verdict on each (tie when the intervals overlap; "unequal heads" added
    where the two sets hold different numbers of heads). Nothing to compare when both names
    are the same ranking (the rule chose the paper's)."""
    lines = [x if isinstance(x, SteeringResult) else SteeringResult.from_dict(x) for x in summary]
    by_key = {x.key: x for x in lines}
    a_name, b_name = methods
    out = []
    if a_name == b_name:
        return out
    for kind, k in sorted({(x.kind, x.k) for x in lines}):
        a, b = by_key.get((a_name, kind, k)), by_key.get((b_name, kind, k))
        if a is None or b is None:
            continue
        rand = by_key.get(("random", kind, k))
        out.append({"kind": kind, "k": k, "methods": [a_name, b_name], "heads": [a.mean_heads, b.mean_heads],
                    "reduction": [a.reduction, b.reduction], "facts_reduction": [a.facts_reduction, b.facts_reduction],
                    "random_reduction": rand.reduction if rand else None,
                    "S": compare(a.reduction, b.reduction, methods)
                    + ("" if a.mean_heads == b.mean_heads else f" (unequal heads: {a.mean_heads:g} / {b.mean_heads:g})"),
                    # the one that loses clearly more of the facts' S, the *other* keeps more
                    "facts": compare(a.facts_reduction, b.facts_reduction, (b_name, a_name), "keeps more")})
    return out


def equal_k_frame(rows: Sequence[dict]):
    """:func:`at_equal_k`'s comparisons as a table: one row per (kind, k)."""
    import pandas as pd

    table = []
    for r in rows:
        a, b = r["methods"]
        table.append({"kind": r["kind"], "k": r["k"], f"heads ({a} / {b})": f"{r['heads'][0]:.0f} / {r['heads'][1]:.0f}",
                      f"S removed, {a}": _interval(r["reduction"][0]), f"S removed, {b}": _interval(r["reduction"][1]),
                      "random heads": _interval(r["random_reduction"]) if r["random_reduction"] else "not measured",
                      "S: verdict": r["S"], f"facts lost, {a}": _interval(r["facts_reduction"][0]),
                      f"facts lost, {b}": _interval(r["facts_reduction"][1]), "facts: verdict": r["facts"]})
    return pd.DataFrame(table)


def equal_k_text(rows: Sequence[dict]) -> str:
    """:func:`at_equal_k`'s comparisons in one line of prose for the book's summaries."""
    def pct(e):  # a share that rounds to 0 is "0%", never "-0%"
        return "not measured" if e is None else f"{e.value:.0%}".replace("-0%", "0%")

    parts = []
    for r in rows:
        a, b = r["reduction"]
        fa, fb = r["facts_reduction"]
        parts.append(f"k = {r['k']} ({r['kind']}): S removed {pct(a)} vs {pct(b)}, {r['S']}; "
                     f"facts lost {pct(fa)} vs {pct(fb)}, {r['facts']}")
    return "; ".join(parts) if parts else "no k at which both were steered"


def _interval(v: Estimate | None) -> str:
    return "-" if v is None else f"{v.value:+.0%} [{v.lo:+.0%}, {v.hi:+.0%}]"


def _points(v: Estimate | None) -> str:
    """An accuracy change in percentage points (the unit of the MC bound), not a relative %."""
    return "-" if v is None else f"{100 * v.value:+.1f} [{100 * v.lo:+.1f}, {100 * v.hi:+.1f}]"


def summary_frame(summary: Sequence[SteeringResult | dict]):
    """The lines of :func:`summarise_grid` as a table for the book: S removed, the facts'
    S lost (and the held-out relation's, where measured), the reduction's percentile among its
    layer-matched random draws (where drawn), the perplexity change on each text set and the
    MC change, each with its 95% interval, and whether the bounds of :data:`GRID_BOUNDS` hold."""
    import pandas as pd

    rows = []
    for x in summary:
        x = x if isinstance(x, SteeringResult) else SteeringResult.from_dict(x)  # a line read from claims.json
        row = {"method": x.method, "kind": x.kind, "k": x.k, "heads": round(x.mean_heads, 1),
               "S removed": _interval(x.reduction), "facts lost": _interval(x.facts_reduction)}
        if x.held_out_reduction is not None:
            row["held-out relation lost"] = _interval(x.held_out_reduction)
        if x.matched is not None:  # where the reduction falls among its layer-matched random draws
            row["percentile among matched draws"] = f"{x.matched['percentile']:.0f} of {x.matched['n']}"
        row.update({f"perplexity ({n})": _interval(v) for n, v in x.perplexity.items()})
        row["MC change (points)"] = _points(x.mc)
        ok = bool(x.facts_ok and x.perplexity_ok and x.mc_ok is not False)
        row["within bounds"] = ("no" if not ok else "facts yes (capability not measured)" if not x.perplexity
                                else "yes" if x.mc_ok else "yes (MC not measured)")
        rows.append(row)
    return pd.DataFrame(rows)


def per_bias_frame(grid: dict):
    """Mean S removed per bias (over its seeds; random heads: over draws too) for every
    (method, kind) of a grid at one k: rows are biases, columns "method / kind"."""
    import pandas as pd

    cells: dict = {}
    for r in grid["rows"]:
        vals = [v for v in r["reduction"] if v is not None]
        if vals:
            cells.setdefault((r["bias"], f"{r['method']} / {r['kind']} / k={r['k']}"), []).append(float(np.mean(vals)))
    table = pd.Series({key: float(np.mean(v)) for key, v in cells.items()}).unstack()
    return table


def equal_k_tally(rows: Sequence[dict]) -> str:
    """:func:`at_equal_k`'s verdicts counted, for a summary where one line per (kind, k) is too
    long: at how many (kind, k) each ranking removed clearly more of S, and kept clearly more of
    the facts, and at how many they tied (intervals overlapping)."""
    if not rows:
        return "no k at which both were steered"
    a, b = rows[0]["methods"]

    def count(key: str, word: str) -> str:
        verdicts = [r[key].split(" (")[0] for r in rows]
        return (f"{a} {verdicts.count(f'{a} {word}')}, {b} {verdicts.count(f'{b} {word}')}, "
                f"tie {verdicts.count('tie')}")
    return (f"over {len(rows)} pairs of kind and k, S removed clearly more: {count('S', 'higher')}; "
            f"facts kept clearly more: {count('facts', 'keeps more')}")
