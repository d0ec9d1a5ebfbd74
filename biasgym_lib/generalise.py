"""Chapter 5: does the debiasing generalise? Heads ranked on some injected biases, steered on
a bias never used to rank them (leave one bias out), and on real stereotypes from SeeGULL
that the model itself shows; each against random heads, with the facts under the same heads."""

from __future__ import annotations

from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import torch

from .capability import mc_accuracy, mc_raw, perplexity, ppl_raw
from .data import load_templates, reference_countries
from .data.seegull import seegull_stereotypes
from .evaluate import facts_reduction, held_out_mask, make_spec, strength_under
from .heads import bias_rankings, head_sets, layer_matched_draws, nan_tensor, nan_to_none
from .layerskip import Resumer
from .measure import assoc_tables, stereotype_strength
from .models import ModelAdapter
from .stats import Estimate


def attribute_spec(attribute: str):
    """A one-phrasing bias specification for a SeeGULL attribute (for :func:`assoc_table`)."""

    return SimpleNamespace(name=f"seegull: {attribute}", attributes=[attribute], keywords=[attribute])


SEEGULL_OFFENSIVE = 1.0
"""A SeeGULL pair counts as offensive when its annotators' mean offensiveness rating is at
least this (SeeGULL's scale runs from -1, not offensive, to 4, very offensive; stated in
advance, issue 23). Pairs nobody rated are left out."""
SEEGULL_PER_COUNTRY = 6
"""At most this many pairs per country, so that no country decides the result."""


def split_templates(templates) -> tuple[list[str], list[str]]:
    """S's templates in two halves (alternating, so each half holds every kind of frame): the
    first selects SeeGULL pairs, the second measures them, so that choosing pairs with a
    high S cannot inflate the drop measured later."""
    templates = list(templates)
    return templates[0::2], templates[1::2]


def seegull_candidates(refs: list[str], offensive: float = SEEGULL_OFFENSIVE, max_words: int = 3) -> list[dict]:
    """Every strong SeeGULL stereotype (3 of 3 annotators) about a reference country, rated
    offensive (mean rating >= ``offensive``), whose attribute completes "People from X are
    ___" in at most ``max_words`` words; one row per (country, attribute)."""
    known = set(reference_countries())
    seen, out = set(), []
    for row in seegull_stereotypes():
        key = (row["country"], row["attribute"])
        if (row["country"] in known and key not in seen and len(row["attribute"].split()) <= max_words
                and row["offensiveness"] is not None and row["offensiveness"] >= offensive):
            seen.add(key)
            out.append({**row, "references": [c for c in refs if c != row["country"]]})
    return out


def seegull_shown(model, tokenizer, refs: list[str], templates=None, offensive: float = SEEGULL_OFFENSIVE,
                  per_country: int = SEEGULL_PER_COUNTRY) -> list[dict]:
    """The offensive SeeGULL stereotypes (:func:`seegull_candidates`) that the model itself
    shows, chosen on one half of S's templates and measured on the other
    (:func:`split_templates`): a pair is kept if its S on the selection half has a 95%
    interval above 0, at most ``per_country`` per country (the strongest on the selection
    half). Each pair carries ``S_select`` (selection half) and ``S`` (the measurement half,
    the "before" of every transfer number)."""
    select, measure = split_templates(templates or load_templates())
    cands = seegull_candidates(refs, offensive)
    chosen = seegull_under(model, tokenizer, cands, None, select)
    kept, count = [], {}
    for row, est in sorted(zip(cands, chosen), key=lambda x: -x[1]["value"]):
        if est["lo"] > 0 and count.get(row["country"], 0) < per_country:
            count[row["country"]] = count.get(row["country"], 0) + 1
            kept.append({**row, "S_select": est})
    kept.sort(key=lambda r: (r["country"], r["attribute"]))
    for row, est in zip(kept, seegull_under(model, tokenizer, kept, None, measure)):
        row["S"] = est
    return kept


def seegull_under(model, tokenizer, pairs: list[dict], spec, templates=None) -> list[dict]:
    """S(country, attribute) of each SeeGULL pair with the steering ``spec`` applied (None:
    the unmodified model), every pair against its own references under the same intervention,
    in one scoring pass; ``templates``: S's by default (the book measures on the held-out half)."""

    requests = [([row["country"]] + list(row["references"]), [attribute_spec(row["attribute"])]) for row in pairs]
    with spec.apply(model) if spec is not None else nullcontext():
        tables = assoc_tables(model, tokenizer, requests, list(templates) if templates else None)
    return [stereotype_strength(t, ents[0], specs[0].name, ents[1:]).to_dict() for t, (ents, specs) in zip(tables, requests)]


def pairs_reduction(before: list[dict], after: list[dict], n_boot: int = 1000, seed: int = 0) -> dict:
    """The share of the pairs' mean S removed, 1 - mean after / mean before, with a bootstrap
    95% interval over pairs (stable where one pair's S is near 0, unlike a mean of ratios)."""
    b = np.asarray([x["value"] for x in before])
    a = np.asarray([x["value"] for x in after])
    idx = np.random.default_rng(seed).integers(0, len(b), (n_boot, len(b)))
    boot = 1 - a[idx].mean(1) / b[idx].mean(1)
    return Estimate.from_samples(float(1 - a.mean() / b.mean()), boot, len(b), "bootstrap 95% over pairs").to_dict()


def pooled_rankings(run, biases: list[str], method: str) -> dict:
    """Rankings from the scopes of several biases pooled (every seed of each): for
    transfer to a held-out bias or to real stereotypes."""

    scopes = [r for b in biases for r in run.scopes(b)]
    a = ModelAdapter(run.model)
    patching = None
    if method == "patching":
        per = [run.patching(b) for b in biases]
        patching = {"scores": nan_to_none(torch.nanmean(torch.stack([nan_tensor(p["scores"]) for p in per]), 0))}
    return bias_rankings(scopes, run.cfg.k, patching, run.cfg.n_random_draws, a.n_layers, a.n_heads,
                         run.knowledge())


def bias_splits(runs: list[tuple[str, int]]) -> dict[str, tuple[list, list]]:
    """Leave one *bias* out: for each bias, ``(training runs, test runs)`` where the training
    runs are every run (bias, seed) of the other biases and the test runs are every seed of
    the held-out bias. Holding out one run instead would leak the bias's other seeds into
    the ranking."""
    biases = list(dict.fromkeys(b for b, _ in runs))
    return {held: ([r for r in runs if r[0] != held], [r for r in runs if r[0] == held]) for held in biases}


def leave_one_out(run) -> dict:
    """Generalisation to biases never injected: for each bias, heads ranked from all the
    *other* biases' tokens, steered on the held-out bias's tokens (chosen and paper's
    selection, each with its layer-matched random draws; S, facts, perplexity and multiple
    choice, as in the confirmation). Uniform random heads do not depend on which biases
    ranked them: their rows are the confirmation's for the held-out bias (the same head
    sets steered on the same tokens), not measured twice. :func:`~biasgym_lib.selection.summarise_grid`
    reads the result like a grid."""
    best = run.best()
    fp = run._fingerprint(run.biases) + run._best_key()

    def compute():
        confirm = run.confirm()
        rows = []
        splits = bias_splits([(b, s) for b in run.biases for s in run.cfg.seeds])
        for held, (train, _) in splits.items():
            others = list(dict.fromkeys(b for b, _ in train))
            steered = {"bias": run.specs[held], "tokens": run.tokens(held),
                       "rankings": pooled_rankings(run, others, best.method)}
            # the held-out selections' perplexity and MC where the claim can be decided (with layer-matched
            # draws); without them (the teaching profile) the claim is undecided anyway, and the build saves the time
            costly = run.cfg.n_matched_draws > 0
            rows += run._grid_at([steered], mc=costly, cost=costly, random=False)["rows"]
            rows += [r for r in confirm["rows"] if r["method"] == "random" and r["bias"] == held]
        return {"best": {"method": best.method, "kind": best.kind, "k": best.k}, "before": confirm["before"],
                "rows": rows}
    return run.memo("leave_one_out.json", compute, fingerprint=fp)


def seegull_steering(run) -> dict:
    """Generalisation to real stereotypes: the offensive SeeGULL pairs the model shows,
    chosen on one half of the templates (:func:`seegull_shown`) and measured on the other,
    steered with heads pooled from every injected bias (chosen and paper's selection, each
    with its layer-matched random draws; uniform random heads), with the facts and the
    capability under the same head sets (random draws: the first ``n_cost_draws``)."""

    best = run.best()
    refs = run.setting["references"]
    shown = run.memo("seegull_shown.json", lambda: {"pairs": seegull_shown(run.model, run.tokenizer, refs,
                                                                          per_country=run.cfg.seegull_per_country)})
    pairs = shown["pairs"]
    measure = split_templates(load_templates())[1]
    fp = run._fingerprint(run.biases) + run._best_key()

    def compute():
        st, cfg = run.setting, run.cfg
        n_heads = ModelAdapter(run.model).n_heads
        pooled = pooled_rankings(run, list(run.biases), best.method)
        points = []
        for method, kind, k in run.conditions():
            sets = head_sets(method, pooled[method], k)
            points += [(method, kind, k, draw, heads) for draw, heads in enumerate(sets)]
            if method != "random":
                points += [(f"matched:{method}", kind, k, d, heads)
                           for d, heads in enumerate(layer_matched_draws(sets[0], n_heads, cfg.n_matched_draws))]
        # each steered pass starts at its first edited layer (below it, the unmodified model's passes are reused)
        resume = Resumer(run.model, {min(l for l, _ in heads) for *_, heads in points if heads})
        bias0 = next(iter(run.specs.values()))
        held = held_out_mask(st["facts"])

        def facts_under(spec):
            return strength_under(run.model, run.tokenizer, spec, [], bias0, refs, st["facts"])["facts"]

        def capability(spec):
            with spec.apply(run.model) if spec is not None else nullcontext():
                return {"perplexity": {n: ppl_raw(perplexity(run.model, run.tokenizer, t, max_length=cfg.ppl_max_tokens))
                                       for n, t in st["texts"].items()},
                        "mc": mc_raw(mc_accuracy(run.model, run.tokenizer, st["questions"]))}

        def pairs_under(spec):
            return seegull_under(run.model, run.tokenizer, pairs, spec, measure)
        before = {"S": resume("seegull", None, pairs_under), "facts": resume("facts", None, facts_under),
                  "held_out": held, **resume("capability", None, capability)}
        rows = []
        for method, kind, k, draw, heads in points:
            spec = make_spec(heads, kind, st["means"], st["entities"],
                             {"method": method, "k": k, "pooled": list(run.biases)})
            facts = resume("facts", spec, facts_under)
            drawn = method == "random" or method.startswith("matched:")
            cost = resume("capability", spec, capability) if not drawn or draw < cfg.n_cost_draws else {}
            rows.append({"method": method, "kind": kind, "k": k, "draw": draw if drawn else None,
                         "heads": [list(h) for h in heads], "n_heads": len(heads),
                         "S": resume("seegull", spec, pairs_under), "facts": [x["value"] for x in facts],
                         "facts_reduction": facts_reduction(before["facts"], facts, [not h for h in held]),
                         "held_out_reduction": facts_reduction(before["facts"], facts, held) if any(held) else None,
                         "perplexity": cost.get("perplexity"), "mc": cost.get("mc")})
        return {"pairs": pairs, "templates": measure, "before": before, "rows": rows,
                "best": {"method": best.method, "kind": best.kind, "k": best.k}}
    return run.memo("seegull_steering.json", compute, fingerprint=fp)


def seegull_lines(result: dict, n_boot: int = 1000, seed: int = 0) -> list:
    """:func:`seegull_steering` summarised like a grid (:class:`~biasgym_lib.selection.SteeringResult`
    per selection): the share of the pairs' mean S removed (random heads: mean over draws)
    with a bootstrap interval over pairs, where a selection falls among its layer-matched and
    uniform draws, the facts, the held-out relation and the capability."""
    from .selection import SteeringResult, _place, capability_estimates, is_random, knowledge_estimates

    rng = np.random.default_rng(seed)
    before = result["before"]
    b = np.asarray([x["value"] for x in before["S"]])
    groups: dict = {}
    for r in result["rows"]:
        groups.setdefault((r["method"], r["kind"], r["k"]), []).append(r)
    idx = rng.integers(0, len(b), (n_boot, len(b)))

    def red(rows):
        a = np.asarray([[x["value"] for x in r["S"]] for r in rows]).mean(0)
        return 1 - a.mean() / b.mean(), 1 - a[idx].mean(1) / b[idx].mean(1)

    def each(rows):
        return [float(1 - np.mean([x["value"] for x in r["S"]]) / b.mean()) for r in rows]
    out = []
    for (method, kind, k), rows in groups.items():
        point, boot = red(rows)
        estimate = Estimate.from_samples(float(point), boot, len(b), "bootstrap 95% over pairs")
        facts, held = knowledge_estimates(before, rows, rng, n_boot)
        ppl, mc = capability_estimates(before, [r for r in rows if r.get("perplexity")], rng, n_boot)
        matched = uniform = None
        if not is_random(method):
            matched = _place(float(point), each(groups.get((f"matched:{method}", kind, k), [])))
            uniform = _place(float(point), each(groups.get(("random", kind, k), [])))
        out.append(SteeringResult(method, kind, k, len(b), len(rows), float(np.mean([r["n_heads"] for r in rows])),
                                  estimate, facts, ppl, mc, None, held, matched, uniform))
    return out
