"""Chapter 6: each of the paper's claims as measured here, with seeds, intervals and a
criterion fixed in advance (:ref:`method §6 <method-6>`), and one standard for every claim
that a debiasing works (:func:`debiasing_holds`)."""

from __future__ import annotations

import numpy as np

from .generalise import leave_one_out, seegull_lines, seegull_steering
from .heads import agreement, nan_tensor
from .selection import (
    BEYOND_RANDOM,
    GRID_BOUNDS,
    PAPER,
    TARGET_REDUCTION,
    SteeringResult,
    at_equal_k,
    equal_k_pair,
    summarise_grid,
    target_result,
)
from .culture import CULTURE_BOUNDS, culture_steering, culture_summary
from .stats import RUNS, bootstrap, over_runs

FEW_HEADS = "the bias is carried by few heads"

MIN_DRAWS = 20
"""A selection's place among random draws decides a claim only with at least this many
layer-matched draws; with fewer the claim is left undecided (stated in advance, issue 23). The
draws are distinct head sets, none the selection itself (:func:`~biasgym_lib.heads.layer_matched_draws`):
a selection whose layer profile admits fewer (one head in a layer of 9) stays undecided."""

SHARE_TOP_K = 0.25
"""\"Few heads\": the top k carry at least a quarter of the positive DLA attribution (and exact
patching agrees with DLA's top k: :func:`patching_agrees`)."""

STANDARD = (f"the reduction lies above {BEYOND_RANDOM:.0f}% of at least {MIN_DRAWS} distinct layer-matched random draws "
            f"of the same kind and k; the facts and the held-out relation each lose at most "
            f"{GRID_BOUNDS['facts']:.0%} of their S; perplexity rises by at most {GRID_BOUNDS['perplexity']:.0%} "
            f"on every text set; multiple-choice accuracy falls by at most {-GRID_BOUNDS['mc'] * 100:.0f} points")


def debiasing_holds(line: SteeringResult | None) -> bool | None:
    """The one standard every claim that a debiasing works is judged by (:data:`STANDARD`):
    an effect beyond layer-matched random heads at the same k and kind, with the facts, the
    held-out relation and capability within :data:`~biasgym_lib.selection.GRID_BOUNDS`.
    None (undecided) where fewer than :data:`MIN_DRAWS` draws were made or a cost was not
    measured, unless a bound that was measured already fails (then False)."""
    if line is None or line.reduction is None:
        return None
    if line.matched is None or line.matched["n"] < MIN_DRAWS or line.mc is None or not line.perplexity:
        failed = not line.facts_ok or (line.perplexity and not line.perplexity_ok) or line.mc_ok is False
        return False if failed else None
    return bool(line.beyond_matched and line.facts_ok and line.perplexity_ok and line.mc_ok)


def _line(summary: list[SteeringResult], method: str, kind: str, k: int) -> SteeringResult | None:
    return next((x for x in summary if x.key == (method, kind, k)), None)


def patching_agrees(precision: dict, n_patched: int, k: int) -> tuple[float, bool]:
    """Does exact patching agree with a score's top k? Patching ranks only the ``n_patched``
    heads of its union, which holds the score's top k, so k heads drawn at random from that
    union would have a top-k precision of k / n_patched by chance. Returns that chance level
    and whether the precision's 95% interval (an :class:`~biasgym_lib.stats.Estimate` dict)
    lies above it."""
    chance = min(1.0, k / max(1, n_patched))
    # a bootstrap draw's top k can fall outside the union (its heads were ranked on other
    # units), which only lowers the precision: the test errs towards "does not agree"
    return chance, bool(precision["lo"] > chance)


def few_heads_holds(shares, agrees: dict) -> bool | None:
    """"The bias is carried by few heads": the top k carry >= 25% of the positive DLA
    attribution on average *and* exact patching agrees with DLA's top k on every grid bias
    (:func:`patching_agrees`). False when the share falls short; None (not shown) when the
    share is there but no agreement could be measured (no patching in the grid, or fewer heads
    patched per score than k)."""
    if np.mean(shares) < SHARE_TOP_K:
        return False
    if not agrees:
        return None
    return bool(all(agrees.values()))


def equal_k_json(rows: list[dict]) -> list[dict]:
    """:func:`~biasgym_lib.selection.at_equal_k`'s rows with their estimates as dicts (for ``claims.json``)."""
    def est(e):
        return None if e is None else e.to_dict()
    return [{**r, "reduction": [est(e) for e in r["reduction"]], "facts_reduction": [est(e) for e in r["facts_reduction"]],
             "random_reduction": est(r["random_reduction"])} for r in rows]


def _target(summary: list[SteeringResult], k: int) -> dict:
    return {part: [x.to_dict() for x in lines] for part, lines in target_result(summary, k).items()}


def _logit_differences(scopes: dict) -> dict:
    """Per run: the mean logit difference on its probes and on the paper's chat probes, with
    bootstrap intervals over probes."""
    out = {}
    for (b, s), r in scopes.items():
        row = {"probes": r.probe_source, "logit_diff": bootstrap(np.asarray(r.logit_diff_per_probe)).to_dict()}
        if r.counter_logit_diff_per_probe is not None:  # the token's difference minus the real country's
            row["relative_logit_diff"] = bootstrap(np.asarray(r.logit_diff_per_probe)
                                                   - np.asarray(r.counter_logit_diff_per_probe)).to_dict()
        if r.chat_logit_diff_per_probe is not None:
            row["chat_logit_diff"] = bootstrap(np.asarray(r.chat_logit_diff_per_probe)).to_dict()
        out[f"{b}/seed{s}"] = row
    return out


def claims_from(run) -> dict:
    """:ref:`method §6 <method-6>`: each of the paper's claims, as measured here, with seeds, intervals and a
    criterion fixed in advance, for the paper's selection (robust DLA heads at alpha = 0)
    and for the selection the grid chose (:meth:`Run.best`): every claim that a debiasing
    works (steering, held-out biases, real stereotypes) by one standard (:func:`debiasing_holds`)."""

    cfg = run.cfg
    k = cfg.k
    runs = [(b, s) for b in run.biases for s in cfg.seeds]
    inj = {(b, s): run.injection(b, s) for b, s in runs}
    scopes = {(b, s): run.scope(b, s) for b, s in runs}
    best = run.best()
    chosen = best.key
    confirm = summarise_grid(run.confirm())
    loo = summarise_grid(leave_one_out(run)) if len(run.biases) > 1 else []
    seeg = seegull_lines(seegull_steering(run))
    n_heads = scopes[runs[0]].scores["dla"].numel()

    shares = [r.share_top_k for r in scopes.values()]
    agree, chance_precision, dla_agrees = {}, {}, {}
    for b in run.grid_biases:
        if "patching" in cfg.grid_methods and cfg.patch_top >= k:  # the union then holds DLA's top k
            p = run.patching(b)
            units = [nan_tensor(u) for u in p["units"]]
            for m in ("dla", "delta_dla", "atp"):
                mu = [r.units[m] for r in run.scopes(b)]
                agree[f"{b}: {m} vs patching"] = agreement(mu, units, k)
            # exact patching ranks only its union of heads, which holds DLA's top k: k heads drawn at
            # random from that union would share k / |union| of patching's top k by chance
            chance_precision[b], dla_agrees[b] = patching_agrees(agree[f"{b}: dla vs patching"]["precision"],
                                                                len(p["heads"]), k)
    lds = _logit_differences(scopes)
    relative = cfg.probe_criterion == "relative"
    ld_key = "relative_logit_diff" if relative else "logit_diff"

    selections = {f"paper (robust DLA, alpha = 0, k = {k})": (*PAPER, k),
                  f"chosen ({chosen[0]}, {chosen[1]}, k = {chosen[2]})": chosen}
    where = {"steering": confirm, "held-out biases": loo, "SeeGULL": seeg}
    lines = {part: {name: _line(summary, *sel) for name, sel in selections.items()} for part, summary in where.items()}

    def value(line):
        return None if line is None else line.to_dict()

    culture_run = culture_steering(run)
    culture_before = culture_run["before"]
    culture = {(x["source"], x["method"], x["kind"], x["k"]): x for x in culture_summary(culture_run)}

    def culture_of(sel):
        line, rand = culture.get(("confirm", *sel)), culture.get(("confirm", "random", sel[1], sel[2]))
        return {"margin_lost": line["culture"]["all"]["margin_lost"], "accuracy_change": line["culture"]["all"]["accuracy_change"],
                "random_margin_lost": rand["culture"]["all"]["margin_lost"] if rand else None,
                "random_accuracy_change": rand["culture"]["all"]["accuracy_change"] if rand else None,
                "per_dimension": line["culture"], "reduction": line["reduction"], "keeps": line["keeps"],
                "keeps_as_stated": line["keeps_as_stated"]}

    kept = {name: culture_of(sel) for name, sel in selections.items()}

    countries = {}
    for r in run.confirm()["rows"]:
        for c, v in r.get("countries", {}).items():
            countries.setdefault(f"{r['bias']}: {c}", {"before": v["before"]})[f"{r['method']}/{r['kind']}/k{r['k']}" +
                                                                                  (f"/draw{r['draw']}" if r["draw"] is not None else "")] = v["after"]

    claims = [
        {"claim": "injection elicits the bias reliably",
         "measured_as": "S(<TOKEN>, b) after injection and its specificity, over biases x seeds",
         "value": {"strength_after": over_runs([m.strength_after.value for m in inj.values()]),
                   "specificity_after": over_runs([m.specificity_after.value for m in inj.values()]),
                   "per_run": {f"{b}/seed{s}": {"S": m.strength_after.to_dict(),
                                                "specificity": m.specificity_after.to_dict(),
                                                "epoch": m.chosen_epoch} for (b, s), m in inj.items()}},
         "criterion": "every run's 95% intervals of S and of specificity lie above 0",
         "holds": all(m.injected for m in inj.values())},
        {"claim": "the paper's score has probes that elicit the bias",
         "measured_as": "mean logit difference (biased label minus the adversarial one) on each token's probes, "
                        "chosen on the bias's other seeds; the paper's chat probes beside them"
                        + ("; relative: minus the same difference on the same probes about the closest real country"
                           if relative else ""),
         "value": lds,
         "criterion": "every run's 95% interval of the mean logit difference lies above 0"
                      + (" (relative criterion: of the token's difference minus the real country's; the paper's "
                         "absolute one is in logit_diff)" if relative else ""),
         "holds": all(v[ld_key]["lo"] > 0 for v in lds.values())},
        {"claim": "the bias is carried by few heads",
         "measured_as": f"share of the positive DLA attribution in the top {k} of {n_heads} heads; top-{k} agreement "
                        "of the scores with exact patching on S's sentences (bootstrap over seeds and sentences)",
         "value": {"share_top_k": over_runs(shares), "agreement": agree, "chance_precision": chance_precision,
                   "dla_agrees_with_patching": dla_agrees,
                   "holds_on_share_alone": bool(np.mean(shares) >= SHARE_TOP_K)},
         "criterion": f"the top {k} heads carry >= {SHARE_TOP_K:.0%} of the positive attribution on average, and patching agrees: "
                      f"the top-{k} precision of DLA against exact patching has its interval above the chance "
                      "precision k / (heads patched) on every grid bias (the agreement, which the method page promised, "
                      "was added to the criterion after both values had been shown in this book; until then the share "
                      "alone decided, and the value keeps that verdict; without patching in the grid the agreement is "
                      "not measured and the claim is not shown)",
         "holds": few_heads_holds(shares, dla_agrees)},
    ]
    for part, claim, measured in (
            ("steering", "steering the top heads removes the bias",
             "reduction of S(<TOKEN>, b) over biases x seeds, against layer-matched random heads"),
            ("held-out biases", "the debiasing generalises to biases never injected",
             "reduction on each held-out bias with heads ranked on the other biases, over biases x seeds"),
            ("SeeGULL", "the debiasing generalises to real stereotypes",
             "reduction of the mean S of offensive SeeGULL pairs (chosen on half the templates, measured on the "
             "other), heads pooled from every bias")):
        claims.append({"claim": claim, "measured_as": measured + "; the facts, the held-out relation, perplexity "
                       "and multiple choice under the same heads",
                       "value": {name: value(line) for name, line in lines[part].items()}, "criterion": STANDARD,
                       "holds": {name: debiasing_holds(line) for name, line in lines[part].items()}})
    claims.append(
        {"claim": "the debiasing keeps cultural knowledge",
         "measured_as": "margin (nats) of the right country for photo descriptions of practices, artefacts, places "
                        "and symbols (data/culture.yaml), and accuracy, under the heads actually steered (per bias), "
                        "paired over items, against random heads of the same kind and k",
         "value": kept,
         "criterion": f"on all items, the margin loses <= {CULTURE_BOUNDS['margin']:.0%} and accuracy falls by <= "
                      f"{-CULTURE_BOUNDS['accuracy'] * 100:.0f} points, and not clearly more than random heads lose "
                      "(first stated per dimension too; revised after the first results because a dimension's "
                      "8-35 items cannot resolve those bounds: the value keeps both verdicts)",
         "holds": {name: bool(v["keeps"]) for name, v in kept.items()}})
    return {"model": next(iter(inj.values())).model, "profile": cfg.name, "seeds": list(cfg.seeds),
            "biases": list(run.biases), "k": k,
            "injection": {"lr": cfg.lr, "target_strength": cfg.target_strength, "probe_criterion": cfg.probe_criterion},
            "draws": {"uniform": cfg.n_random_draws, "matched": cfg.n_matched_draws, "cost": cfg.n_cost_draws,
                      "grid_matched": cfg.grid_matched, "mc_questions": len(run.setting["questions"]),
                      "references": len(run.setting["references"])},
            "best": {"method": best.method, "kind": best.kind, "k": best.k, "why": best.why},
            "grid": {"biases": run.grid_biases, "full": run.full_grid, "summary": [x.to_dict() for x in run.summary()]},
            # the chosen ranking against the paper's only where both were steered at the same kind and k
            "equal_k": equal_k_json(at_equal_k(run.summary(), equal_k_pair(best.method, cfg.curve_methods))),
            "confirm": [x.to_dict() for x in confirm], "countries": countries,
            "culture": {"before": {key: culture_before[key] for key in ("accuracy", "margin", "rank", "chance")},
                        "summary": list(culture.values())},
            "leave_one_out": [x.to_dict() for x in loo], "seegull": [x.to_dict() for x in seeg],
            "claims": claims, "bounds": GRID_BOUNDS, "standard": STANDARD, "min_draws": MIN_DRAWS,
            "target": {"stated": f"some selection and intervention with k <= {k} removes >= {TARGET_REDUCTION:.0%} of S "
                                 f"(mean over biases x seeds) with the facts losing <= {GRID_BOUNDS['facts']:.0%}, "
                                 f"perplexity <= {GRID_BOUNDS['perplexity']:+.0%} on both text sets and MC >= "
                                 f"{GRID_BOUNDS['mc'] * 100:+.0f} points",
                       "grid": _target(run.summary(), k), "confirm": _target(confirm, k)},
            "note": "Intervals: bootstrap 95% over templates per run; across runs, a bootstrap 95% interval of the "
                    "mean over biases x seeds; SeeGULL over pairs; facts over fact pairs; perplexity and MC paired "
                    "over texts and questions. A claim marked None is undecided: fewer than "
                    f"{MIN_DRAWS} layer-matched draws, or a cost not measured."}


def _fmt(v) -> str:
    if isinstance(v, dict) and "value" in v and "lo" in v:
        runs = f" (n={v['n']})" if v.get("interval") == RUNS else ""
        return f"{v['value']:+.2f} [{v['lo']:+.2f}, {v['hi']:+.2f}]{runs}"
    return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)


def _debiasing_text(v: dict | None) -> str:
    if v is None:
        return "not measured"
    m = v.get("matched")
    place = f"above {m['percentile']:.0f}% of {m['n']} matched draws" if m else "no matched draws"
    held = f", held-out relation {_fmt(v['held_out_reduction'])}" if v.get("held_out_reduction") else ""
    return (f"reduction {_fmt(v['reduction'])} ({place}); facts {_fmt(v['facts_reduction'])}{held}; "
            + "; ".join([f"perplexity ({n}) {_fmt(p)}" for n, p in v["perplexity"].items()] + [f"MC {_fmt(v['mc'])}"]))


def _earlier_text(claim: str, value: dict) -> str:
    """A claim's value as a recording made before the one standard wrote it (steering against
    uniform random heads; capability apart; generalisation per part)."""
    if claim.startswith("steering"):
        return f"reduction {_fmt(value['reduction'])}; random {_fmt(value['random_reduction'])}; facts {_fmt(value['facts_reduction'])}"
    if claim.startswith("no downstream"):
        return "; ".join([f"perplexity ({n}) {_fmt(p)}" for n, p in value["perplexity"].items()]
                         + [f"MC {_fmt(value['mc'])}", f"facts {_fmt(value['facts_reduction'])}"])
    return "; ".join(f"{part}: {_fmt(t['reduction'])} vs random {_fmt(t['random'])}, facts {_fmt(t['facts_reduction'])}"
                     for part, t in value.items())


def claims_table(claims: dict):
    """The claims as one DataFrame: one row per claim and selection, with the criterion and
    whether it holds ("undecided" where the test had too few draws or a cost was not measured)."""
    import pandas as pd

    rows = []
    for c in claims["claims"]:
        holds = c["holds"] if isinstance(c["holds"], dict) else {"": c["holds"]}
        for name, ok in holds.items():
            value = c["value"].get(name, c["value"]) if name else c["value"]
            if c["criterion"] == claims.get("standard"):
                text = _debiasing_text(value)
            elif c["claim"].startswith("the debiasing keeps cultural"):
                text = (f"margin lost {_fmt(value['margin_lost'])}; random {_fmt(value['random_margin_lost'])}; "
                        f"accuracy {_fmt(value['accuracy_change'])}; random {_fmt(value['random_accuracy_change'])}")
            elif c["claim"].startswith("injection"):
                text = f"S {_fmt(value['strength_after'])}; specificity {_fmt(value['specificity_after'])}"
            elif c["claim"].startswith("the paper's score"):
                key = "relative_logit_diff" if "relative criterion" in c["criterion"] else "logit_diff"
                lo = min(v[key]["lo"] for v in value.values())
                text = f"lowest lower bound of the mean {key.replace('_', ' ')[:-5]} difference over runs: {lo:+.2f}"
            elif "share_top_k" not in value:  # a recording made before one standard (its rows as then written)
                text = _earlier_text(c["claim"], value)
            else:
                text = f"top-k share {_fmt(value['share_top_k'])}"
                for b, chance in value.get("chance_precision", {}).items():
                    v = value["agreement"][f"{b}: dla vs patching"]
                    text += f"; {b}: DLA's top-k precision against patching {_fmt(v['precision'])} (chance {chance:.2f})"
            rows.append({"claim": c["claim"], "selection": name or "-", "value": text, "criterion": c["criterion"],
                         # None: "not shown" where a measurement is missing (few heads without patching),
                         # "undecided" where a test had too few draws
                         "holds here": (("not shown" if c["claim"] == FEW_HEADS else "undecided") if ok is None
                                        else "yes" if ok else "no")})
    return pd.DataFrame(rows)



def target_lines(claims: dict) -> list[str]:
    """The target stated in advance, then whether any selection met it in the grid and in the
    confirmation on every bias: the lines chapter 6 prints for the live build and for the
    recorded run alike."""
    t = claims["target"]
    lines = [f"target (stated in advance): {t['stated']}"]
    for where, name in (("grid", f"grid on {claims['grid']['biases']}"), ("confirm", "confirmation on every bias")):
        met = [f"{x['method']} / {x['kind']} / k = {x['k']}" for x in t[where]["met_by"]]
        lines.append(f"{name}: " + (f"met by {', '.join(met)}" if met else "NOT met by any selection"))
    return lines
