"""What an injection does beyond its own bias (chapter 2, issue 23): which other biases it
raises or lowers against the starting vector, and how much of its specificity is the others
falling rather than the bias rising."""

from __future__ import annotations

import numpy as np

from .data import reference_countries
from .measure import AssocTable, stereotype_strength
from .stats import Estimate
from .tokens import DEFAULT_TOKEN


def side_effects(results, before: dict[str, Estimate]) -> list[dict]:
    """What an injection does to the *other* biases (issue 23): for each injected bias (its
    runs over seeds, :class:`InjectionResult`) and each other bias c of the profile, S(<TOKEN>, c)
    with the initial vector (``before``: c -> :class:`~biasgym_lib.stats.Estimate`, the same for
    every token) and after injection, per seed. ``effect`` is "raised" when on every seed the
    95% interval after lies above the interval before, "lowered" when it lies below on every
    seed, else "no clear change". Specificity (S of the bias minus the mean S of the others)
    grows when the others fall, so this says how much of it is the bias and how much the rest."""
    by_bias: dict = {}
    for m in results:
        by_bias.setdefault(m.bias, []).append(m)
    rows = []
    for bias, runs in by_bias.items():
        for other in runs[0].strength_after_all_biases:
            if other == bias or other not in before:
                continue
            b, afters = before[other], [m.strength_after_all_biases[other] for m in runs]
            effect = ("raised" if all(a.lo > b.hi for a in afters) else
                      "lowered" if all(a.hi < b.lo for a in afters) else "no clear change")
            after = float(np.mean([a.value for a in afters]))
            rows.append({"injected": bias, "other bias": other, "S before": b.value,
                         "S after (mean over seeds)": after, "change": after - b.value,
                         "seeds": [m.seed for m in runs], "effect": effect})
    return rows


def specificity_split(results, before: dict[str, Estimate]) -> dict:
    """Specificity after injection (S of the bias minus the mean S of the other biases) split
    exactly into the injected bias rising above where the others *started* and the others
    falling: ``S_b - mean S_c = (S_b - mean S_c,before) + (mean S_c,before - mean S_c)``, per run
    and averaged over runs (``before``: :func:`start_strengths`). Only the profile's biases
    present in ``before`` count as "the others"."""
    per_run = []
    for m in results:
        others = [c for c in m.strength_after_all_biases if c != m.bias and c in before]
        if not others:
            continue
        start = float(np.mean([before[c].value for c in others]))
        after = float(np.mean([m.strength_after_all_biases[c].value for c in others]))
        total = m.strength_after_all_biases[m.bias].value - after
        per_run.append({"bias": m.bias, "seed": m.seed, "specificity": total,
                        "bias_rising": m.strength_after_all_biases[m.bias].value - start, "others_falling": start - after})
    mean = {key: float(np.mean([r[key] for r in per_run])) if per_run else None
            for key in ("specificity", "bias_rising", "others_falling")}
    return {**mean, "runs": per_run}


def start_strengths(reference: AssocTable, start: AssocTable, biases, token: str = DEFAULT_TOKEN,
                    seed: int = 0) -> dict[str, Estimate]:
    """S(<TOKEN>, b) with the initial vector for every bias b (``start``: its
    :func:`token_table`; ``reference``: the reference countries' table): where every injection
    starts from."""
    table, refs = reference.merged(start), reference_countries()
    return {b: stereotype_strength(table, token, b, refs, seed=seed) for b in biases}


def side_effects_frame(rows: list[dict]):
    """:func:`side_effects` as a table: injected biases as rows, the other biases as columns,
    each cell the change of S in nats (mean over seeds) and its effect."""
    import pandas as pd

    if not rows:
        return pd.DataFrame()
    cells = pd.DataFrame([{"injected": r["injected"], "other bias": r["other bias"],
                           "cell": f"{r['change']:+.2f} ({r['effect']})"} for r in rows])
    return cells.pivot(index="injected", columns="other bias", values="cell")
