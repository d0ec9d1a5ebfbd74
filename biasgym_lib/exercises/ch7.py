"""Chapter 7's exercises: the culture margin, and reading what the model knows.

``culture_margin(logp, right)`` gets one item's log-probabilities, a tensor (phrasings,
countries), and the right countries' indices; it returns the margin in nats: averaged over
the phrasings, the best right country minus the mean over the countries that are not right.
The library's version is :func:`biasgym_lib.culture.item_scores`.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import torch

from ..culture import item_scores
from . import Checked, TheirError, as_tensor, call, check, diagnose, judge

NAME = "Exercise 1 (culture_margin)"


def _library(logp: torch.Tensor, right: list[int]) -> float:
    names = [f"c{i}" for i in range(logp.shape[1])]
    item = SimpleNamespace(id="x", countries=tuple(names[i] for i in right))
    return item_scores(logp.numpy()[None], [item], names)["margin"][0]


def check_culture_margin(fn) -> Checked:
    """Run ``fn`` on random log-probabilities (one or two right countries) and compare with
    :func:`biasgym_lib.culture.item_scores`; the usual mistakes get their own hint."""

    def trial(seed: int) -> str | None:
        g = torch.Generator().manual_seed(6000 + seed)
        n_phr, n_c = 2 + seed, 6 + 2 * seed
        logp = torch.log_softmax(2.0 * torch.randn(n_phr, n_c, generator=g, dtype=torch.float64), -1)
        right = sorted(random.Random(seed).sample(range(n_c), 1 if seed == 0 else 2))
        got = call(fn, logp.clone(), list(right))
        try:
            got = as_tensor(got, "culture_margin").reshape(())
        except RuntimeError as exc:
            raise TheirError("culture_margin must return one number (a 0-d tensor or a float)") from exc
        mean = logp.mean(0)
        others = [i for i in range(n_c) if i not in right]
        best = max(right, key=lambda i: float(mean[i]))
        mistakes = {
            "average over the phrasings first: the margin uses every phrasing, not the first one.":
                max(float(logp[0, i]) for i in right) - float(logp[0, [i for i in range(n_c) if i not in right]].mean()),
            "the mean is over the countries that are not right: leave the right ones out of it.":
                float(mean[best] - mean.mean()) if len(right) == 1 else float(mean[best] - mean[[i for i in range(n_c) if i != best]].mean()),
            "take the best right country, not the mean of the right ones.":
                float(mean[right].mean() - mean[others].mean()),
            "subtract the mean over the other countries, not their maximum.":
                float(mean[best] - mean[others].max()),
            "work with log-probabilities: the margin is a difference in nats, not of probabilities.":
                float(mean[best].exp() - mean[others].exp().mean()),
        }
        return diagnose(got, _library(logp, right), mistakes,
                        "compare with the definition: mean over phrasings, best right country minus the mean "
                        "over the others.")
    return judge(NAME, trial, on_error="logp is a tensor (phrasings, countries), right a list of indices; "
                                       "return one number.")


def check_best_dimension(answer, before: dict) -> Checked:
    dims = {d: v["value"] for d, v in before["margin"].items() if d != "all"}
    return check("Exercise 2", answer, max(dims, key=dims.get),
                 hint='the "margin, nats" column; "all" is every item together, not a dimension')


def check_paper_against_random(answer, lines: list[dict], k: int) -> Checked:
    by = {(x["source"], x["method"], x["kind"], x["k"]): x for x in lines}
    paper, rand = by[("confirm", "robust", "zero", k)], by[("confirm", "random", "zero", k)]
    want = 100 * (paper["culture"]["all"]["margin_lost"]["value"] - rand["culture"]["all"]["margin_lost"]["value"])
    near = isinstance(answer, (int, float)) and not isinstance(answer, bool) and abs(answer - want) <= 0.11
    return check("Exercise 3", answer, answer if near else want,  # the table's rounding: within 0.11 points
                 hint=f'the rows "robust / zero / k = {k}" and "random / zero / k = {k}" steered in confirm; '
                      "points are percent, e.g. 0.035 is 3.5")
