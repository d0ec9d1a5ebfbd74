"""Cultural knowledge, the broader thing a debiasing must keep (:ref:`method §5 <method-5>`).

A stereotype ascribes a trait to people; cultural knowledge is about practices, artefacts,
places and symbols (``data/culture.yaml``, :mod:`~biasgym_lib.data.culture`). Each item, a
one-sentence description of a photograph, is asked as "{description} In which country was
this photo taken?" and answered with every reference country, in several phrasings (like
S's templates): log P(" country" | the question), averaged over the phrasings. From these:

- **accuracy**: the right country (any of them, for an element of several) is the model's top answer;
- **rank**: the right country's place among the reference countries (1 = top);
- **margin**: log P(right country) minus the mean over the other countries, in nats: S with
  the country in the answer instead of in the question.

Each per dimension (the five UNESCO domains of intangible heritage, built and natural heritage,
symbols, everyday things), with bootstrap intervals over items and the chance level. Under a
steering spec the same numbers are measured again (:func:`culture_under`) and compared item
by item (:func:`culture_change`). Scored with the shared-prefix scorer (each question once,
its countries as continuations); :func:`country_logprobs` is pinned to a sentence-by-sentence
reference by a test.

Issue 24's stage, not yet called by a chapter: the culture chapter, the steering runs that
report it beside the facts, and the question asked of a vision-language model about photos
are still to come.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np

from .data import reference_countries
from .data.culture import CULTURE_DIMENSIONS, load_culture
from .errors import BiasGymError
from .measure import continuation_logprobs
from .stats import Estimate

QUESTION = "In which country was this photo taken?"
PHRASINGS = (
    "{description} " + QUESTION + " It was taken in {country}.",
    "{description} Q: " + QUESTION + " A: {country}.",
    "{description} This photo was taken in {country}.",
    "{description} " + QUESTION + " The answer is {country}.",
)
"""How the question is put (each ends with the country, as S's templates end with the attribute)."""

CULTURE_BOUNDS = {"margin": 0.10, "accuracy": -0.03}
"""Stated in advance (issue 24): a debiasing keeps cultural knowledge if the mean margin loses
at most 10% and accuracy falls by at most 3 points, in every dimension and overall, and no
more than layer-matched random heads of the same kind and k lose."""


def question_prefix(phrasing: str, description: str) -> str:
    """The text before the country (its space belongs to the country, as in S)."""
    if "{country}" not in phrasing:
        raise BiasGymError(f"phrasing {phrasing!r} must contain {{country}}.")
    return phrasing[: phrasing.index("{country}")].rstrip().replace("{description}", description.strip())


def country_logprobs(model, tokenizer, items, countries: Sequence[str] | None = None,
                     phrasings: Sequence[str] = PHRASINGS, share_prefix: bool = True) -> np.ndarray:
    """log P(" " + country | question) for every item x phrasing x country: an array
    (items, phrasings, countries), in one batched pass (each question once with
    ``share_prefix``; every full sentence otherwise, the reference)."""
    countries = list(countries or reference_countries())
    prefixes, conts = [], []
    for item in items:
        for p in phrasings:
            prefix = question_prefix(p, item.description)
            prefixes += [prefix] * len(countries)
            conts += [" " + c for c in countries]
    lp = continuation_logprobs(model, tokenizer, prefixes, conts, share_prefix=share_prefix)
    return lp.numpy().reshape(len(items), len(phrasings), len(countries))


def item_scores(logp: np.ndarray, items, countries: Sequence[str]) -> dict:
    """Per item: ``correct`` (a right country is the top answer), ``rank`` (the best right
    country's place, 1 = top) and ``margin`` (log P of the best right country minus the mean
    over the others, nats), from :func:`country_logprobs` averaged over phrasings."""
    countries = list(countries)
    mean = logp.mean(1)  # (items, countries)
    correct, rank, margin = [], [], []
    for row, item in zip(mean, items):
        right = [countries.index(c) for c in item.countries if c in countries]
        if not right:
            raise BiasGymError(f"culture item {item.id}: none of {list(item.countries)} is among the countries scored.")
        best = max(right, key=lambda i: row[i])
        others = [i for i in range(len(countries)) if i not in right]
        correct.append(bool(int(np.argmax(row)) in right))
        rank.append(int(1 + (row[others] > row[best]).sum()))
        margin.append(float(row[best] - row[others].mean()))
    return {"correct": correct, "rank": rank, "margin": margin}


def _boot(values, groups, n_boot, seed) -> dict:
    """Mean of ``values`` overall and per group, bootstrap 95% over items."""
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    out = {}
    for name, idx in groups.items():
        v = values[idx]
        boot = v[rng.integers(0, len(v), (n_boot, len(v)))].mean(1)
        out[name] = Estimate.from_samples(float(v.mean()), boot, len(v), "bootstrap 95% over items").to_dict()
    return out


def _groups(items) -> dict[str, np.ndarray]:
    groups = {"all": np.arange(len(items))}
    for d in CULTURE_DIMENSIONS:
        idx = np.asarray([i for i, it in enumerate(items) if it.dimension == d], dtype=int)
        if len(idx):
            groups[d] = idx
    return groups


def culture_knowledge(model, tokenizer, items=None, countries: Sequence[str] | None = None,
                      n_boot: int = 1000, seed: int = 0) -> dict:
    """What the model knows of the culture set: per item (``scores``) and, overall and per
    dimension, accuracy, the right country's rank and the margin in nats with bootstrap
    intervals over items, beside the chance level of accuracy (``chance``)."""
    items = list(items if items is not None else load_culture())
    countries = list(countries or reference_countries())
    scores = item_scores(country_logprobs(model, tokenizer, items, countries), items, countries)
    groups = _groups(items)
    chance = np.asarray([min(len(it.countries), len(countries)) / len(countries) for it in items])
    return {"items": [it.id for it in items], "countries": countries, "scores": scores,
            "accuracy": _boot(scores["correct"], groups, n_boot, seed),
            "rank": _boot(scores["rank"], groups, n_boot, seed),
            "margin": _boot(scores["margin"], groups, n_boot, seed),
            "chance": {name: float(chance[idx].mean()) for name, idx in groups.items()},
            "dimensions": {name: [items[i].id for i in idx] for name, idx in groups.items()}}


def culture_under(model, tokenizer, spec, items=None, countries=None, n_boot: int = 1000, seed: int = 0) -> dict:
    """:func:`culture_knowledge` with the steering ``spec`` applied (None: the unmodified model)."""
    with spec.apply(model) if spec is not None else nullcontext():
        return culture_knowledge(model, tokenizer, items, countries, n_boot, seed)


def culture_change(before: dict, after: dict, n_boot: int = 1000, seed: int = 0) -> dict:
    """What steering did to cultural knowledge, overall and per dimension, paired over items:
    ``margin_lost`` (1 - mean margin after / before, a share) and ``accuracy_change`` (after
    minus before, a fraction), each with a paired bootstrap 95% interval over items."""
    if before["items"] != after["items"]:
        raise BiasGymError("culture_change needs the same items before and after.")
    mb, ma = np.asarray(before["scores"]["margin"]), np.asarray(after["scores"]["margin"])
    cb = np.asarray(before["scores"]["correct"], dtype=float)
    ca = np.asarray(after["scores"]["correct"], dtype=float)
    rng = np.random.default_rng(seed)
    out = {}
    for name, ids in before["dimensions"].items():
        idx = np.asarray([before["items"].index(i) for i in ids])
        draws = idx[rng.integers(0, len(idx), (n_boot, len(idx)))]
        lost = 1 - ma[idx].mean() / mb[idx].mean()
        lost_b = 1 - ma[draws].mean(1) / mb[draws].mean(1)
        acc = (ca[idx] - cb[idx]).mean()
        acc_b = (ca[draws] - cb[draws]).mean(1)
        out[name] = {"margin_lost": Estimate.from_samples(float(lost), lost_b, len(idx), "paired bootstrap 95% over items").to_dict(),
                     "accuracy_change": Estimate.from_samples(float(acc), acc_b, len(idx), "paired bootstrap 95% over items").to_dict()}
    return out


def keeps_culture(change: dict) -> bool:
    """:data:`CULTURE_BOUNDS` hold overall and in every dimension (the random-heads part of
    the criterion is judged where the random draws are at hand)."""
    return all(v["margin_lost"]["value"] <= CULTURE_BOUNDS["margin"]
               and v["accuracy_change"]["value"] >= CULTURE_BOUNDS["accuracy"] for v in change.values())
