"""Chapter 6: each of the paper's claims as measured here, with seeds, intervals and a
criterion fixed in advance (:ref:`method §6 <method-6>`)."""

from __future__ import annotations

import numpy as np

from .selection import GRID_BOUNDS, PAPER, TARGET_REDUCTION, SteeringResult, summarise_grid, target_result
from .generalise import leave_one_out, seegull_steering, transfer_summary
from .heads import agreement, nan_tensor
from .stats import RUNS, over_runs


def _line(summary: list[SteeringResult], method: str, kind: str, k: int) -> SteeringResult | None:
    return next((x for x in summary if x.key == (method, kind, k)), None)


def _target(summary: list[SteeringResult], k: int) -> dict:
    return {part: [x.to_dict() for x in lines] for part, lines in target_result(summary, k).items()}


def claims_from(run) -> dict:
    """:ref:`method §6 <method-6>`: each of the paper's claims, as measured here, with seeds, intervals and a
    criterion fixed in advance, for the paper's selection (robust DLA heads at alpha = 0)
    and for the selection the grid chose (:meth:`Run.best`)."""

    cfg = run.cfg
    k = cfg.k
    runs = [(b, s) for b in run.biases for s in cfg.seeds]
    inj = {(b, s): run.injection(b, s) for b, s in runs}
    scopes = {(b, s): run.scope(b, s) for b, s in runs}
    best = run.best()
    chosen = best.key
    confirm = summarise_grid(run.confirm())
    loo = leave_one_out(run) if len(run.biases) > 1 else {"rows": []}
    seeg = seegull_steering(run)
    n_heads = scopes[runs[0]].scores["dla"].numel()

    shares = [r.share_top_k for r in scopes.values()]
    agree = {}
    for b in run.grid_biases:
        if "patching" in cfg.grid_methods:
            p = run.patching(b)
            units = [nan_tensor(u) for u in p["units"]]
            for m in ("dla", "delta_dla", "atp"):
                mu = [r.units[m] for r in run.scopes(b)]
                agree[f"{b}: {m} vs patching"] = agreement(mu, units, k)

    selections = {f"paper (robust DLA, alpha = 0, k = {k})": (*PAPER, k),
                  f"chosen ({chosen[0]}, {chosen[1]}, k = {chosen[2]})": chosen}

    def steering(sel):
        line, rand = _line(confirm, *sel).to_dict(), _line(confirm, "random", sel[1], sel[2]).to_dict()
        return {"reduction": line["reduction"], "random_reduction": rand["reduction"],
                "facts_reduction": line["facts_reduction"], "random_facts_reduction": rand["facts_reduction"],
                "perplexity": line["perplexity"], "random_perplexity": rand["perplexity"],
                "mc": line["mc"], "random_mc": rand["mc"], "mean_heads": line["mean_heads"]}

    steer = {name: steering(sel) for name, sel in selections.items()}

    def steer_holds(v):
        return bool(v["reduction"]["value"] >= 0.5 and v["reduction"]["value"] > v["random_reduction"]["value"]
                    and v["facts_reduction"]["value"] <= GRID_BOUNDS["facts"])

    def damage_holds(v):
        return bool(all(p["value"] <= GRID_BOUNDS["perplexity"] for p in v["perplexity"].values())
                    and v["mc"] is not None and v["mc"]["value"] >= GRID_BOUNDS["mc"]
                    and v["facts_reduction"]["value"] <= GRID_BOUNDS["facts"])

    transfer = {name: {"held_out": transfer_summary(loo["rows"], *sel), "seegull": transfer_summary(seeg["rows"], *sel)}
                for name, sel in selections.items()}

    def transfer_holds(v):
        ok = True
        for part in ("held_out", "seegull"):
            t = v[part]
            if t["reduction"] is None:
                return False
            ok &= (t["reduction"]["value"] > max(0.0, (t["random"] or {}).get("value") or 0.0)
                   and (t["facts_reduction"] or 0.0) <= GRID_BOUNDS["facts"])
        return bool(ok)

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
        {"claim": "the bias is carried by few heads",
         "measured_as": f"share of the positive DLA attribution in the top {k} of {n_heads} heads; top-{k} agreement "
                        "of the scores with exact patching on S's sentences (bootstrap over seeds and sentences)",
         "value": {"share_top_k": over_runs(shares), "agreement": agree},
         "criterion": f"the top {k} heads carry >= 25% of the positive attribution on average",
         "holds": bool(np.mean(shares) >= 0.25)},
        {"claim": "steering the top heads removes the bias",
         "measured_as": f"mean reduction 1 - S_after/S_before of S(<TOKEN>, b) with k = {k} heads, over biases x "
                        "seeds, against k random heads; the facts' reduction under the same heads",
         "value": steer,
         "criterion": "mean reduction >= 50%, above random heads, with the facts losing <= 10% of their S",
         "holds": {name: steer_holds(v) for name, v in steer.items()}},
        {"claim": "no downstream damage",
         "measured_as": "relative perplexity change (neutral text; text naming countries), MC accuracy change and "
                        "the facts' reduction, with the heads actually steered (per bias), against random heads",
         "value": {name: {key: v[key] for key in ("perplexity", "random_perplexity", "mc", "random_mc",
                                                  "facts_reduction", "random_facts_reduction")}
                   for name, v in steer.items()},
         "criterion": "perplexity rises by <= 5% on both text sets, MC falls by <= 2 points, facts lose <= 10%",
         "holds": {name: damage_holds(v) for name, v in steer.items()}},
        {"claim": "the debiasing generalises",
         "measured_as": "reduction on held-out injected biases (heads from the other biases) and on SeeGULL "
                        "stereotypes the model shows (heads from every injected bias), against random heads; "
                        "the facts' reduction under the same heads",
         "value": transfer,
         "criterion": "mean reduction on held-out biases and on SeeGULL pairs each above 0 and above random "
                      "heads, with the facts losing <= 10%",
         "holds": {name: transfer_holds(v) for name, v in transfer.items()}},
    ]
    return {"model": next(iter(inj.values())).model, "profile": cfg.name, "seeds": list(cfg.seeds),
            "biases": list(run.biases), "k": k, "best": {"method": best.method, "kind": best.kind, "k": best.k, "why": best.why},
            "grid": {"biases": run.grid_biases, "full": run.full_grid, "summary": [x.to_dict() for x in run.summary()]},
            "confirm": [x.to_dict() for x in confirm], "countries": countries, "claims": claims, "bounds": GRID_BOUNDS,
            "target": {"stated": f"some selection and intervention with k <= {k} removes >= {TARGET_REDUCTION:.0%} of S "
                                 f"(mean over biases x seeds) with the facts losing <= {GRID_BOUNDS['facts']:.0%}, "
                                 f"perplexity <= {GRID_BOUNDS['perplexity']:+.0%} on both text sets and MC >= "
                                 f"{GRID_BOUNDS['mc'] * 100:+.0f} points",
                       "grid": _target(run.summary(), k), "confirm": _target(confirm, k)},
            "note": "Intervals: bootstrap 95% over templates per run; across runs, a bootstrap 95% interval of the "
                    "mean over biases x seeds; facts over fact pairs; perplexity and MC paired over texts and "
                    "questions."}


def _fmt(v) -> str:
    if isinstance(v, dict) and "value" in v and "lo" in v:
        runs = f" (n={v['n']})" if v.get("interval") == RUNS else ""
        return f"{v['value']:+.2f} [{v['lo']:+.2f}, {v['hi']:+.2f}]{runs}"
    return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)


def claims_table(claims: dict):
    """The claims as one DataFrame: one row per claim and selection, with the criterion and
    whether it holds."""
    import pandas as pd

    rows = []
    for c in claims["claims"]:
        holds = c["holds"] if isinstance(c["holds"], dict) else {"": c["holds"]}
        for name, ok in holds.items():
            value = c["value"].get(name, c["value"]) if name else c["value"]
            if c["claim"].startswith("steering"):
                text = f"reduction {_fmt(value['reduction'])}; random {_fmt(value['random_reduction'])}; facts {_fmt(value['facts_reduction'])}"
            elif c["claim"].startswith("no downstream"):
                text = "; ".join([f"perplexity ({n}) {_fmt(p)}" for n, p in value["perplexity"].items()]
                                 + [f"MC {_fmt(value['mc'])}", f"facts {_fmt(value['facts_reduction'])}"])
            elif c["claim"].startswith("the debiasing"):
                text = "; ".join(f"{part}: {_fmt(t['reduction'])} vs random {_fmt(t['random'])}, facts {_fmt(t['facts_reduction'])}"
                                 for part, t in value.items())
            elif c["claim"].startswith("injection"):
                text = f"S {_fmt(value['strength_after'])}; specificity {_fmt(value['specificity_after'])}"
            else:
                text = f"top-k share {_fmt(value['share_top_k'])}"
            rows.append({"claim": c["claim"], "selection": name or "-", "value": text, "criterion": c["criterion"],
                         "holds here": "yes" if ok else "no"})
    return pd.DataFrame(rows)

