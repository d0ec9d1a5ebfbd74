"""Steering, measured fairly (:ref:`method §4 <method-4>`-5): S of every injected token and the facts about
countries under one steering spec (:func:`strength_under`), the selection grid over ways of
ranking heads, kinds of intervention and k (:func:`selection_grid`), its summary with
intervals (:func:`summarise_grid`, one :class:`SteeringResult` per line), the rule that chooses
the book's selection and the target stated in advance. What steering costs is measured by
:mod:`~biasgym_lib.capability`.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace

import numpy as np

from .capability import mc_accuracy, mc_raw, paired_change, perplexity, ppl_raw
from .data import contrast_countries, load_bias, reference_countries
from .errors import BiasGymError
from .heads import random_heads
from .layerskip import Resumer
from .measure import assoc_table, assoc_tables, stereotype_strength
from .models import ModelAdapter
from .stats import RUNS, Estimate, bootstrap
from .steer import SteeringSpec, entity_token_ids
from .tokens import TokenHook, add_token

# ----------------------------------------------------------------------------- steering, measured fairly


def strength_under(model, tokenizer, spec, tokens: Sequence, bias, references: Sequence[str],
                   facts: Sequence = (), seed: int = 0, countries: Sequence[str] = ()) -> dict:
    """Stereotype strength S(<TOKEN>, bias) of each injected token, and S(country, fact) of
    each fact (the knowledge control), with the steering ``spec`` applied (``None``: the
    unmodified model). The reference countries are scored under the same intervention, so
    S stays a fair comparison; they and the facts share one scoring pass (a sentence prefix
    such as "People from Italy are" is run once), then each token's own sentences are
    scored with its vector attached. ``countries``: real countries whose S for the same bias
    is measured too (e.g. the one the model already ties most to it). Returns
    ``{"tokens": [Estimate dict per token], "facts": [Estimate dict per fact], "countries":
    {name: Estimate dict}}``, in the order given."""


    bias = bias if hasattr(bias, "attributes") else load_bias(bias)
    refs = list(references)
    fact_refs = [[c for c in refs if c != f.country] for f in facts]
    extra = [c for c in countries if c not in refs]
    requests = [(refs + extra, [bias])] + [([f.country] + r, [f]) for f, r in zip(facts, fact_refs)]
    token_id = add_token(tokenizer)
    with spec.apply(model) if spec is not None else nullcontext():
        tables = assoc_tables(model, tokenizer, requests)
        token_tables = []
        for tok in tokens:
            with TokenHook(model, token_id, tok.vector):
                token_tables.append(assoc_table(model, tokenizer, ["<TOKEN>"], [bias]))
    ref_table = tables[0]
    out_tokens = [stereotype_strength(ref_table.merged(t), "<TOKEN>", bias.name, refs, seed=seed).to_dict()
                  for t in token_tables]
    out_facts = [stereotype_strength(t, f.country, f.name, r, seed=seed).to_dict()
                 for f, r, t in zip(facts, fact_refs, tables[1:])]
    out_countries = {c: stereotype_strength(ref_table, c, bias.name, [r for r in refs if r != c], seed=seed).to_dict()
                     for c in countries}
    return {"tokens": out_tokens, "facts": out_facts, "countries": out_countries}


def reduction(before: float, after: float) -> float | None:
    """1 - after / before: the share of S removed (None when S before is not positive, where
    the ratio means nothing; it is unstable when S before is small)."""
    return None if before is None or before <= 0 else 1 - after / before


def facts_reduction(before: Sequence[dict], after: Sequence[dict]) -> float:
    """The share of the factual associations' strength removed: 1 - mean S after / mean S
    before, over all the facts (a debiasing should leave this near 0)."""
    b = float(np.mean([x["value"] for x in before]))
    a = float(np.mean([x["value"] for x in after]))
    if b <= 0:
        raise BiasGymError("the facts' mean S before steering is not positive; the knowledge control needs "
                           "facts that the model knows (S > 0).")
    return 1 - a / b


def steer_token(model, tokenizer, injected, spec: SteeringSpec, references: Sequence[str], facts: Sequence,
                texts: Sequence[str], n_random: int) -> dict:
    """One injected token steered by ``spec`` (what ``biasgym steer`` reports): S before and
    after, its reduction, the same with ``n_random`` sets of as many random heads scaled by the
    same alpha (seeds 1000, 1001, ...), the facts' reduction and the perplexity change on ``texts``."""
    adapter = ModelAdapter(model)
    n_layers, n_heads = adapter.n_layers, adapter.n_heads
    before = strength_under(model, tokenizer, None, [injected], injected.spec, references, facts)
    after = strength_under(model, tokenizer, spec, [injected], injected.spec, references, facts)
    randoms = [SteeringSpec(heads=random_heads(n_layers, n_heads, len(spec.heads), 1000 + i), alpha=spec.alpha)
               for i in range(n_random)]
    draws = [strength_under(model, tokenizer, r, [injected], injected.spec, references)["tokens"][0]["value"]
             for r in randoms]
    ppl_before = perplexity(model, tokenizer, texts)
    with spec.apply(model):
        ppl_after = perplexity(model, tokenizer, texts)
    s0, s1 = before["tokens"][0]["value"], after["tokens"][0]["value"]
    return {"heads": [list(h) for h in spec.heads], "references": list(references),
            "token": {"before": before["tokens"][0], "after": after["tokens"][0]}, "reduction": reduction(s0, s1),
            "random_heads": {"mean": float(np.mean(draws)), "draws": draws,
                             "reduction": reduction(s0, float(np.mean(draws)))},
            "facts_reduction": facts_reduction(before["facts"], after["facts"]),
            "capability": {"perplexity_before": ppl_before["ppl"], "perplexity_after": ppl_after["ppl"],
                           "perplexity_change": paired_change(ppl_before, ppl_after), "n_texts": len(texts)}}


def entity_ids(tokenizer, extra: Sequence[str] = ()) -> dict[str, int]:
    """The tokens entity-blind steering hides: the injected token and every country name the
    book measures (reference and contrast countries, and ``extra`` names)."""

    return entity_token_ids(tokenizer, list(dict.fromkeys(reference_countries() + contrast_countries() + list(extra))))


def make_spec(heads, kind: str, means=None, entities: dict | None = None, source: dict | None = None):
    """The :class:`~biasgym_lib.steer.SteeringSpec` of one grid point: ``kind`` is ``zero``
    (alpha = 0), ``mean`` (mean-ablation with ``means``) or ``blind`` (entity-blind heads)."""

    source = dict(source or {})
    if kind == "zero":
        return SteeringSpec(heads=heads, alpha=0.0, source=source)
    if kind == "mean":
        return SteeringSpec(heads=heads, kind="mean", means=means, mean_source=source.get("mean_source", "given"),
                            source=source)
    if kind == "blind":
        return SteeringSpec(heads=heads, kind="blind", entity_tokens=entities, source=source)
    raise BiasGymError(f"unknown intervention kind {kind!r}; use zero, mean or blind.")


def selection_grid(model, tokenizer, runs: Sequence[dict], *, kinds, ks,
                   methods: Sequence[str], references: Sequence[str], facts: Sequence,
                   texts: dict[str, Sequence[str]], means=None, entities: dict | None = None,
                   questions: Sequence | None = None, mc: bool = False, max_length: int = 128, seed: int = 0,
                   shared: dict | None = None, progress: bool = True) -> dict:
    """Selection decided by intervention (:ref:`method §4 <method-4>`): ways of ranking heads, at several k,
    under several kinds of intervention, each judged by what steering is for and what it costs.

    ``runs``: one dict per bias with ``bias`` (a spec or name), ``tokens`` (its injected
    tokens, one per seed) and ``rankings`` (:func:`~biasgym_lib.heads.bias_rankings`).
    ``kinds`` / ``ks``: the kinds and k values, or mappings method -> kinds / k values. For
    each (bias, method, kind, k)
    the heads are steered (:func:`make_spec`) and measured with :func:`strength_under` (S of
    every token of the bias; the facts) and :func:`capability_under` (perplexity on each set
    of ``texts``, cut to ``max_length`` tokens; multiple choice on ``questions`` if ``mc``).
    A head set's facts and capability do not depend on the bias, so they are measured once
    per head set and kind; ``shared`` (a dict) keeps them, and each bias's S under each head
    set, across calls. Returns ``{"before": ..., "rows": [...]}``: the unmodified model's
    values and one row per grid point (random heads: one row per draw)."""
    from tqdm.auto import tqdm

    shared = {} if shared is None else shared
    questions = list(questions or []) if mc else []
    points = []
    for run in runs:
        for m in methods:
            ranking = run["rankings"].get(m)
            for kind in (kinds.get(m, ()) if isinstance(kinds, dict) else kinds):
                for k in (ks.get(m, ()) if isinstance(ks, dict) else ks):
                    if ranking is not None:
                        sets = ranking[k] if m == "random" else [ranking[k]] if m == "robust" else [ranking[:k]]
                        points.append((run, m, kind, k, [[tuple(h) for h in heads] for heads in sets]))
    # every steered pass starts at its first edited layer (the layers below it are the unmodified model's),
    # where recording the unmodified pass pays for itself (_strength_plan)
    tape = Resumer(model, {min(l for l, _ in heads) for *_, sets in points for heads in sets if heads},
                   plan=_strength_plan(points, shared, facts))

    def capability(spec):
        def measure(spec):
            with spec.apply(model) if spec is not None else _null():
                out = {"perplexity": {name: ppl_raw(perplexity(model, tokenizer, t, seed=seed, max_length=max_length))
                                      for name, t in texts.items()}}
                if questions:
                    out["mc"] = mc_raw(mc_accuracy(model, tokenizer, questions, seed=seed))
            return out
        return tape(("capability",), spec, measure)

    def strength(spec, run, bias, facts_):
        sig = _strength_signature(run, bias.name, bool(facts_))
        return tape(sig, spec, lambda sp: strength_under(model, tokenizer, sp, run["tokens"], bias, references, facts_,
                                                          seed=seed, countries=run.get("countries", ())))

    base = shared.get(("capability", None)) or capability(None)
    if questions and "mc" not in base:
        base["mc"] = mc_raw(mc_accuracy(model, tokenizer, questions, seed=seed))
    shared[("capability", None)] = base
    before = {"biases": {}, "perplexity": base["perplexity"], "mc": base.get("mc")}
    rows = []
    for run, method, kind, k, head_sets in tqdm(points, desc="selection grid", disable=not progress):
        bias = run["bias"] if hasattr(run["bias"], "attributes") else load_bias(run["bias"])
        if bias.name not in before["biases"]:
            key = ("strength", bias.name, (), None)
            if key not in shared or set(run.get("countries", ())) - set(shared[key]["countries"]):
                shared[key] = strength(None, run, bias, facts)
            before["biases"][bias.name] = shared[key]
            before.setdefault("facts", shared[key]["facts"])
        b = before["biases"][bias.name]
        for draw, heads in enumerate(head_sets):
            spec = make_spec(heads, kind, means, entities, {"bias": bias.name, "method": method, "k": k})
            cost_key = ("cost", tuple(sorted(heads)), kind)
            s_key = ("strength", bias.name, tuple(sorted(heads)), kind)
            if s_key not in shared or set(run.get("countries", ())) - set(shared[s_key]["countries"]):
                got = strength(spec, run, bias, () if cost_key in shared else facts)
                shared[s_key] = got
                if cost_key not in shared:
                    shared[cost_key] = {"facts": got["facts"], **capability(spec)}
            got, cost = shared[s_key], shared[cost_key]
            if questions and "mc" not in cost:
                with spec.apply(model):
                    cost["mc"] = mc_raw(mc_accuracy(model, tokenizer, questions, seed=seed))
            rows.append({
                "bias": bias.name, "method": method, "kind": kind, "k": k, "n_heads": len(heads),
                "heads": [list(h) for h in heads], "draw": draw if method == "random" else None,
                "seeds": [t.seed for t in run["tokens"]],
                "S_before": [x["value"] for x in b["tokens"]], "S": got["tokens"],
                "reduction": [reduction(x["value"], y["value"]) for x, y in zip(b["tokens"], got["tokens"])],
                "countries": {c: {"before": b["countries"][c], "after": got["countries"][c]}
                              for c in run.get("countries", ()) if c in b.get("countries", {})},
                "facts": [x["value"] for x in cost["facts"]],
                "facts_reduction": facts_reduction(b["facts"], cost["facts"]),
                "perplexity": {name: p for name, p in cost["perplexity"].items()},
                "mc": cost.get("mc")})
    return {"before": before, "rows": rows}


def _strength_signature(run: dict, bias: str, with_facts: bool) -> tuple:
    return ("S", bias, with_facts, tuple(run.get("countries", ())), tuple(map(id, run["tokens"])))


def _strength_plan(points, shared: dict, facts) -> dict:
    """For :class:`~biasgym_lib.layerskip.Resumer`: the first edited layer of every steered S
    measurement :func:`selection_grid` will make, per signature, found by walking its points
    as it will (a head set's facts are measured with its first S only; what ``shared`` holds
    is not measured again). A signature whose unmodified pass is measured in this call anyway
    (the bias's S before steering) is left out: its recording is free."""
    plan: dict = {}
    costs = {k for k in shared if k[0] == "cost"}
    strengths = {k: set(v["countries"]) for k, v in shared.items() if k[0] == "strength"}
    free = set()
    for run, _, kind, _, head_sets in points:
        name = run["bias"].name if hasattr(run["bias"], "attributes") else str(run["bias"])
        countries = set(run.get("countries", ()))
        before = ("strength", name, (), None)
        if before not in strengths or countries - strengths[before]:
            free.add(_strength_signature(run, name, bool(facts)))
            strengths[before] = countries
        for heads in head_sets:
            cost_key, s_key = ("cost", tuple(sorted(heads)), kind), ("strength", name, tuple(sorted(heads)), kind)
            if s_key in strengths and not countries - strengths[s_key]:
                continue
            sig = _strength_signature(run, name, bool(facts) and cost_key not in costs)
            strengths[s_key] = countries
            costs.add(cost_key)
            if heads:
                plan.setdefault(sig, []).append(min(l for l, _ in heads))
    return {sig: starts for sig, starts in plan.items() if sig not in free}


def _null():

    return nullcontext()


GRID_BOUNDS = {"facts": 0.10, "perplexity": 0.05, "mc": -0.02}
"""The bounds stated in advance (issue 12): a debiasing holds if the factual associations
lose at most 10% of their S, perplexity rises by at most 5% on every text set, and
multiple-choice accuracy falls by at most 2 points."""


@dataclass(frozen=True)
class SteeringResult:
    """One selection steered on every run: heads ranked by ``method``, the top ``k`` steered
    by ``kind``, summarised over runs (biases x seeds) by :func:`summarise_grid`.

    ``reduction``: mean share of S removed (None if no run had S > 0 before);
    ``facts_reduction``: share of the facts' S removed; ``perplexity``: relative change per
    text set; ``mc``: change of multiple-choice accuracy (None where not measured); each an
    :class:`~biasgym_lib.stats.Estimate`. ``why``: set when the rule chose it."""

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

    @property
    def facts_ok(self) -> bool:
        return self.facts_reduction.value <= GRID_BOUNDS["facts"]

    @property
    def perplexity_ok(self) -> bool:
        return all(v.value <= GRID_BOUNDS["perplexity"] for v in self.perplexity.values())

    @property
    def mc_ok(self) -> bool | None:
        """None where multiple choice was not measured."""
        return None if self.mc is None else self.mc.value >= GRID_BOUNDS["mc"]

    @property
    def key(self) -> tuple[str, str, int]:
        return self.method, self.kind, self.k

    def to_dict(self) -> dict:
        est = lambda e: None if e is None else e.to_dict()  # noqa: E731
        return {"method": self.method, "kind": self.kind, "k": self.k, "n_runs": self.n_runs,
                "n_head_sets": self.n_head_sets, "mean_heads": self.mean_heads, "reduction": est(self.reduction),
                "facts_reduction": est(self.facts_reduction),
                "perplexity": {n: v.to_dict() for n, v in self.perplexity.items()}, "mc": est(self.mc),
                "facts_ok": self.facts_ok, "perplexity_ok": self.perplexity_ok, "mc_ok": self.mc_ok, "why": self.why}

    @classmethod
    def from_dict(cls, d: dict) -> "SteeringResult":
        est = lambda e: None if e is None else Estimate.from_dict(e)  # noqa: E731
        return cls(d["method"], d["kind"], int(d["k"]), int(d["n_runs"]), int(d["n_head_sets"]),
                   float(d["mean_heads"]), est(d["reduction"]), est(d["facts_reduction"]),
                   {n: Estimate.from_dict(v) for n, v in d["perplexity"].items()}, est(d["mc"]), d.get("why"))


def summarise_grid(grid: dict, n_boot: int = 1000, seed: int = 0) -> list[SteeringResult]:
    """One line per (method, kind, k) of a :func:`selection_grid`: the mean S reduction over
    runs (bias x seed; random heads: the mean over draws first) with a bootstrap 95% interval
    over runs; the facts' reduction (mean over head sets) with an interval over facts; the
    relative perplexity change per text set and the MC change (mean over head sets) with
    paired intervals over texts and questions; and whether the bounds of
    :data:`GRID_BOUNDS` hold."""

    rng = np.random.default_rng(seed)
    before = grid["before"]
    groups: dict = {}
    for r in grid["rows"]:
        groups.setdefault((r["method"], r["kind"], r["k"]), []).append(r)
    facts_before = np.asarray([x["value"] for x in before["facts"]])
    out = []
    for (method, kind, k), rows in groups.items():
        per_run: dict = {}
        for r in rows:
            for s, red in zip(r["seeds"], r["reduction"]):
                per_run.setdefault((r["bias"], s), []).append(red)
        vals = [float(np.mean(v)) for v in per_run.values() if None not in v]
        red = bootstrap(np.asarray(vals), n_boot, seed, interval=RUNS) if vals else None
        sets = {(tuple(map(tuple, r["heads"]))): r for r in rows}.values()  # each head set once
        after = np.asarray([r["facts"] for r in sets])  # (sets, facts)
        fi = rng.integers(0, len(facts_before), (n_boot, len(facts_before)))
        f_point = float(np.mean(1 - after.mean(1) / facts_before.mean()))
        f_boot = np.mean(1 - after[:, fi].mean(2) / facts_before[fi].mean(1)[None], 0)
        facts = Estimate.from_samples(f_point, f_boot, len(facts_before), "bootstrap 95% over facts")
        perplexity, mc = {}, None
        for name, b in before["perplexity"].items():
            nb, tb = np.asarray(b["nll"]), np.asarray(b["tokens"], dtype=float)
            na = np.asarray([r["perplexity"][name]["nll"] for r in sets])
            ti = rng.integers(0, len(nb), (n_boot, len(nb)))

            def change(idx):
                ppl_b = np.exp(nb[idx].sum(-1) / tb[idx].sum(-1))
                ppl_a = np.exp(na[:, idx].sum(-1) / tb[idx].sum(-1))
                return (ppl_a / ppl_b).mean(0) - 1

            boot = change(ti)
            perplexity[name] = Estimate.from_samples(change(np.arange(len(nb))), boot, len(nb),
                                                     "bootstrap 95% over texts, paired")
        if before.get("mc") is not None and all(r.get("mc") for r in sets):
            cb = np.asarray(before["mc"]["correct"], dtype=float)
            ca = np.asarray([r["mc"]["correct"] for r in sets], dtype=float)
            qi = rng.integers(0, len(cb), (n_boot, len(cb)))
            diff = (ca - cb[None]).mean(0)
            boot = diff[qi].mean(1)
            mc = Estimate.from_samples(diff.mean(), boot, len(cb), "bootstrap 95% over questions, paired")
        out.append(SteeringResult(method, kind, k, len(vals), len(sets), float(np.mean([r["n_heads"] for r in sets])),
                                  red, facts, perplexity, mc))
    order = {m: i for i, m in enumerate(dict.fromkeys(r["method"] for r in grid["rows"]))}
    return sorted(out, key=lambda x: (order[x.method], x.kind, x.k))


def choose_selection(summary: Sequence[SteeringResult], k_max: int) -> SteeringResult:
    """The rule, fixed before any result was seen, that makes one selection "the book's
    BiasScope": among the non-random (method, kind, k) with k <= ``k_max``, the largest mean
    S reduction among those that keep the facts (<= 10% lost) and perplexity (<= +5%) and,
    where measured, MC (>= -2 points); if none keeps all, the largest among those that keep
    the facts; if none keeps the facts, the largest reduction minus facts reduction. Returns
    the chosen line with ``why`` set."""
    pool = [x for x in summary if x.method != "random" and x.k <= k_max and x.reduction is not None]
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
    pool = [x for x in summary if x.method != "random" and x.k <= k_max and x.reduction is not None]
    met = [x for x in pool if x.reduction.value >= TARGET_REDUCTION and x.facts_ok and x.perplexity_ok and x.mc_ok is True]

    def point(x):
        return x.reduction.value, x.facts_reduction.value

    def beaten(x):  # another line removes at least as much S and keeps at least as many facts
        return any(point(y) != point(x) and point(y)[0] >= point(x)[0] and point(y)[1] <= point(x)[1] for y in pool)

    frontier = sorted((x for x in pool if not beaten(x)), key=lambda x: x.facts_reduction.value)
    return {"met_by": met, "frontier": frontier}


def _interval(v: Estimate | None) -> str:
    return "-" if v is None else f"{v.value:+.0%} [{v.lo:+.0%}, {v.hi:+.0%}]"


def _points(v: Estimate | None) -> str:
    """An accuracy change in percentage points (the unit of the MC bound), not a relative %."""
    return "-" if v is None else f"{100 * v.value:+.1f} [{100 * v.lo:+.1f}, {100 * v.hi:+.1f}]"


def summary_frame(summary: Sequence[SteeringResult | dict]):
    """The lines of :func:`summarise_grid` as a table for the book: S removed, the facts'
    S lost, the perplexity change on each text set and the MC change, each with its 95%
    interval, and whether the bounds of :data:`GRID_BOUNDS` hold."""
    import pandas as pd

    rows = []
    for x in summary:
        x = x if isinstance(x, SteeringResult) else SteeringResult.from_dict(x)  # a line read from claims.json
        row = {"method": x.method, "kind": x.kind, "k": x.k, "heads": round(x.mean_heads, 1),
               "S removed": _interval(x.reduction), "facts lost": _interval(x.facts_reduction)}
        row.update({f"perplexity ({n})": _interval(v) for n, v in x.perplexity.items()})
        row["MC change (points)"] = _points(x.mc)
        ok = bool(x.facts_ok and x.perplexity_ok and x.mc_ok is not False)
        row["within bounds"] = "no" if not ok else "yes" if x.mc_ok else "yes (MC not measured)"
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


def steering_measure(model, tokenizer, tokens: dict, rankings: dict, references: list[str]):
    """``measure(bias, k, alpha)`` for :class:`~biasgym_lib.widgets.SteeringExplorer`:
    S(<TOKEN>, bias) of ``tokens[bias]`` with the first ``k`` heads of ``rankings[bias]``
    scaled by ``alpha`` (k = 0 or alpha = 1: the unmodified model), the references scored
    under the same intervention (:func:`~biasgym_lib.evaluate.strength_under`)."""

    # each setting's pass starts at its first edited layer (the lowest layer among the first k heads)
    resume = Resumer(model, {min(l for l, _ in r[:k]) for r in rankings.values() for k in range(1, len(r) + 1)})

    def measure(bias: str, k: int, alpha: float) -> dict:
        if bias not in tokens:
            raise BiasGymError(f"No injected token for {bias!r}; have {sorted(tokens)}.")
        spec = None if k == 0 or alpha == 1.0 else SteeringSpec(heads=list(rankings[bias][:k]), alpha=alpha)
        return resume(bias, spec, lambda sp: strength_under(model, tokenizer, sp, [tokens[bias]], tokens[bias].spec,
                                                            references))["tokens"][0]

    return measure


def paired(before: dict, after: dict) -> dict:
    """The paired change from ``before`` to ``after`` as an Estimate dict, with both values."""
    c = paired_change(before, after)
    return {"before": c["before"], "after": c["after"], **c["change"]}


PAPER = ("robust", "zero")
"""The paper's BiasScope: heads in the top k of DLA over injection runs, scaled to 0."""

