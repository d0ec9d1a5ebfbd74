"""Chapter 5: does the debiasing generalise? Heads ranked on some injected biases, steered on
a bias never used to rank them (leave one bias out), and on real stereotypes from SeeGULL
that the model itself shows; each against random heads, with the facts under the same heads."""

from __future__ import annotations

from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import torch

from .capability import capability_under
from .data import load_templates, reference_countries
from .data.seegull import seegull_stereotypes
from .evaluate import facts_reduction, make_spec, paired, reduction, strength_under
from .heads import bias_rankings, head_sets, nan_tensor, nan_to_none
from .layerskip import Resumer
from .measure import assoc_tables, stereotype_strength
from .models import ModelAdapter
from .stats import Estimate, over_runs


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


def transfer_summary(rows: list[dict], method: str, kind: str, k: int) -> dict:
    """Mean reduction (bootstrap over runs) and facts reduction of one selection in a
    transfer table (leave-one-out or SeeGULL), with random heads under the same kind and k."""
    def reds(m, kd):
        per: dict = {}
        for r in rows:
            if (r["method"], r["kind"], r["k"]) != (m, kd, k):
                continue
            units = (zip(r["seeds"], r["reduction"]) if "seeds" in r
                     else enumerate(r["reduction"]))
            for u, v in units:
                per.setdefault((r.get("bias"), u), []).append(v)
        return [float(np.mean(v)) for v in per.values() if None not in v]

    facts = [r["facts_reduction"] for r in rows if (r["method"], r["kind"], r["k"]) == (method, kind, k)]
    rand_facts = [r["facts_reduction"] for r in rows if (r["method"], r["kind"], r["k"]) == ("random", kind, k)]
    return {"reduction": over_runs(reds(method, kind)), "random": over_runs(reds("random", kind)),
            "facts_reduction": float(np.mean(facts)) if facts else None,
            "random_facts_reduction": float(np.mean(rand_facts)) if rand_facts else None}


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
    selection; facts measured, perplexity not). Random heads do not depend on which
    biases ranked them: their rows are the confirmation's for the held-out bias (the same
    head sets steered on the same tokens), not measured twice."""
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
            rows += run._grid_at([steered], mc=False, cost=False, random=False)["rows"]
            rows += [r for r in confirm["rows"] if r["method"] == "random" and r["bias"] == held]
        return {"best": {"method": best.method, "kind": best.kind, "k": best.k}, "before": confirm["before"],
                "rows": rows}
    return run.memo("leave_one_out.json", compute, fingerprint=fp)


def seegull_steering(run) -> dict:
    """Generalisation to real stereotypes: the SeeGULL pairs the model shows most
    strongly, steered with heads pooled from every injected bias (chosen and paper's
    selection, k random heads), with the facts under the same head sets."""

    best = run.best()
    n_cand, n_keep = (8, 3) if run.cfg.name == "quick" else (30, 8)
    refs = run.setting["references"]
    shown = run.memo("seegull_shown.json",
                  lambda: {"pairs": seegull_shown(run.model, run.tokenizer, run.cfg, refs, n_cand, n_keep)})
    pairs = shown["pairs"]
    fp = run._fingerprint(run.biases) + run._best_key()

    def compute():
        st = run.setting
        # random heads' facts are the confirmation's (the same head sets, references and facts)
        kept = {(r["kind"], r["k"], tuple(map(tuple, r["heads"]))): r for r in run.confirm()["rows"]
                if r["method"] == "random"}
        pooled = pooled_rankings(run, list(run.biases), best.method)
        points = []
        for method, kind, k in run.conditions():
            points += [(method, kind, k, draw, heads) for draw, heads in enumerate(head_sets(method, pooled[method], k))]
        # each steered pass starts at its first edited layer (below it, the unmodified model's passes are reused)
        resume = Resumer(run.model, {min(l for l, _ in heads) for *_, heads in points if heads})
        bias0 = next(iter(run.specs.values()))

        def facts_under(spec):
            return strength_under(run.model, run.tokenizer, spec, [], bias0, refs, st["facts"])["facts"]

        def capability(spec):
            return capability_under(run.model, run.tokenizer, spec, st["texts"]["neutral"], st["questions"],
                                    max_length=run.cfg.ppl_max_tokens)
        facts_before, base = resume("facts", None, facts_under), resume("capability", None, capability)
        rows = []
        for method, kind, k, draw, heads in points:
            spec = make_spec(heads, kind, st["means"], st["entities"],
                             {"method": method, "k": k, "pooled": list(run.biases)})
            after = resume("seegull", spec, lambda sp: seegull_under(run.model, run.tokenizer, pairs, sp))
            same = kept.get((kind, k, tuple(heads)))
            if same is not None:
                facts, facts_lost = same["facts"], same["facts_reduction"]
            else:
                got = resume("facts", spec, facts_under)
                facts, facts_lost = [x["value"] for x in got], facts_reduction(facts_before, got)
            cost = None
            if method != "random":  # the pooled heads' own cost; random heads' is in the confirmation
                got = resume("capability", spec, capability)
                cost = {"perplexity": paired(base["perplexity"], got["perplexity"]),
                        "mc": paired(base["mc_accuracy"], got["mc_accuracy"])}
            rows.append({"method": method, "kind": kind, "k": k, "draw": draw if method == "random" else None,
                         "heads": [list(h) for h in heads], "S": after,
                         "reduction": [reduction(p["S"]["value"], a["value"]) for p, a in zip(pairs, after)],
                         "facts": facts, "facts_reduction": facts_lost, "capability": cost})
        return {"pairs": pairs, "facts_before": [x["value"] for x in facts_before], "rows": rows,
                "best": {"method": best.method, "kind": best.kind, "k": best.k}}
    return run.memo("seegull_steering.json", compute, fingerprint=fp)
