"""Steering, measured fairly (:ref:`method §4 <method-4>`-5): S of every injected token and the facts about
countries under one steering spec (:func:`strength_under`) and the selection grid over ways of
ranking heads, kinds of intervention and k (:func:`selection_grid`). Its summary, the bounds,
the rule that chooses the book's selection and the target stated in advance are in
:mod:`~biasgym_lib.selection`; what steering costs is measured by :mod:`~biasgym_lib.capability`.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np

from .capability import mc_accuracy, mc_raw, paired_change, perplexity, ppl_raw
from .data import contrast_countries, held_out_relations, load_bias, reference_countries
from .errors import BiasGymError
from .heads import head_sets, layer_matched_draws, random_heads
from .layerskip import Resumer
from .measure import assoc_table, assoc_tables, stereotype_strength
from .models import ModelAdapter
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
    # facts in S's templates share one pass with the references; a relation with templates of
    # its own (capital, currency) gets one pass per template set
    groups: dict = {}
    for i, f in enumerate(facts):
        groups.setdefault(tuple(getattr(f, "templates", ())), []).append(i)
    plain = groups.pop((), [])
    requests = [(refs + extra, [bias])] + [([facts[i].country] + fact_refs[i], [facts[i]]) for i in plain]
    token_id = add_token(tokenizer)
    fact_tables: dict = {}
    with spec.apply(model) if spec is not None else nullcontext():
        tables = assoc_tables(model, tokenizer, requests)
        fact_tables.update(zip(plain, tables[1:]))
        for templates, idx in groups.items():
            own = assoc_tables(model, tokenizer, [([facts[i].country] + fact_refs[i], [facts[i]]) for i in idx],
                               list(templates))
            fact_tables.update(zip(idx, own))
        token_tables = []
        for tok in tokens:
            with TokenHook(model, token_id, tok.vector):
                token_tables.append(assoc_table(model, tokenizer, ["<TOKEN>"], [bias]))
    ref_table = tables[0]
    out_tokens = [stereotype_strength(ref_table.merged(t), "<TOKEN>", bias.name, refs, seed=seed).to_dict()
                  for t in token_tables]
    out_facts = [stereotype_strength(fact_tables[i], f.country, f.name, r, seed=seed).to_dict()
                 for i, (f, r) in enumerate(zip(facts, fact_refs))]
    out_countries = {c: stereotype_strength(ref_table, c, bias.name, [r for r in refs if r != c], seed=seed).to_dict()
                     for c in countries}
    return {"tokens": out_tokens, "facts": out_facts, "countries": out_countries}


def reduction(before: float, after: float) -> float | None:
    """1 - after / before: the share of S removed (None when S before is not positive, where
    the ratio means nothing; it is unstable when S before is small)."""
    return None if before is None or before <= 0 else 1 - after / before


def facts_reduction(before: Sequence[dict], after: Sequence[dict], keep: Sequence[bool] | None = None) -> float:
    """The share of the factual associations' strength removed: 1 - mean S after / mean S
    before, over the facts (those where ``keep`` is true; a debiasing should leave this near 0)."""
    keep = [True] * len(before) if keep is None else list(keep)
    if not any(keep):
        raise BiasGymError("facts_reduction was given no facts to average.")
    b = float(np.mean([x["value"] for x, k in zip(before, keep) if k]))
    a = float(np.mean([x["value"] for x, k in zip(after, keep) if k]))
    if b <= 0:
        raise BiasGymError("the facts' mean S before steering is not positive; the knowledge control needs "
                           "facts that the model knows (S > 0).")
    return 1 - a / b


def held_out_mask(facts: Sequence) -> list[bool]:
    """Which facts belong to a held-out relation (:func:`~biasgym_lib.data.held_out_relations`)."""
    held = set(held_out_relations())
    return [getattr(f, "relation", None) in held for f in facts]


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


def grid_points(runs: Sequence[dict], methods, kinds, ks, n_heads: int, matched: int = 0) -> list[tuple]:
    """``(run, method, kind, k, head sets)`` of a grid: each method's top k (one set; random
    heads: one set per draw) and, with ``matched`` > 0, that many layer-matched random draws
    for each selected set, distinct and never the set itself (fewer where its layer profile
    admits fewer: :func:`~biasgym_lib.heads.layer_matched_draws`), as ``matched:<method>``."""
    out = []
    for run in runs:
        for m in methods:
            ranking = run["rankings"].get(m)
            if ranking is None:
                continue
            for kind in (kinds.get(m, ()) if isinstance(kinds, dict) else kinds):
                for k in (ks.get(m, ()) if isinstance(ks, dict) else ks):
                    sets = head_sets(m, ranking, k)
                    out.append((run, m, kind, k, sets))
                    if matched and m != "random":
                        out.append((run, f"matched:{m}", kind, k,
                                    layer_matched_draws(sets[0], n_heads, matched)))
    return out


def selection_grid(model, tokenizer, runs: Sequence[dict], *, kinds, ks,
                   methods: Sequence[str], references: Sequence[str], facts: Sequence,
                   texts: dict[str, Sequence[str]], means=None, entities: dict | None = None,
                   questions: Sequence | None = None, mc: bool = False, max_length: int = 128, seed: int = 0,
                   shared: dict | None = None, progress: bool = True, matched: int = 0,
                   cost_draws: int | None = None) -> dict:
    """Selection decided by intervention (:ref:`method §4 <method-4>`): ways of ranking heads, at several k,
    under several kinds of intervention, each judged by what steering is for and what it costs.

    ``runs``: one dict per bias with ``bias`` (a spec or name), ``tokens`` (its injected
    tokens, one per seed) and ``rankings`` (:func:`~biasgym_lib.heads.bias_rankings`).
    ``kinds`` / ``ks``: the kinds and k values, or mappings method -> kinds / k values. For
    each (bias, method, kind, k)
    the heads are steered (:func:`make_spec`) and measured with :func:`strength_under` (S of
    every token of the bias; the facts) and :func:`capability_under` (perplexity on each set
    of ``texts``, cut to ``max_length`` tokens; multiple choice on ``questions`` if ``mc``).
    ``matched``: layer-matched random draws per selected set (:func:`grid_points`);
    ``cost_draws``: how many draws of random heads (uniform or matched) get perplexity and
    multiple choice too (None: all; every draw gets S and the facts).
    A head set's facts and capability do not depend on the bias, so they are measured once
    per head set and kind; ``shared`` (a dict) keeps them, and each bias's S under each head
    set, across calls. Returns ``{"before": ..., "rows": [...]}``: the unmodified model's
    values and one row per grid point (random heads: one row per draw)."""
    from tqdm.auto import tqdm

    shared = {} if shared is None else shared
    questions = list(questions or []) if mc else []
    held = held_out_mask(facts)
    seen = [not h for h in held]
    points = grid_points(runs, methods, kinds, ks, ModelAdapter(model).n_heads, matched)
    # every steered pass starts at its first edited layer (the layers below it are the unmodified model's)
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
    before = {"biases": {}, "perplexity": base["perplexity"], "mc": base.get("mc"), "held_out": held,
              "relations": [getattr(f, "relation", None) for f in facts]}
    rows = []
    for run, method, kind, k, sets in tqdm(points, desc="selection grid", disable=not progress):
        bias = run["bias"] if hasattr(run["bias"], "attributes") else load_bias(run["bias"])
        if bias.name not in before["biases"]:
            key = ("strength", bias.name, (), None)
            if key not in shared or set(run.get("countries", ())) - set(shared[key]["countries"]):
                shared[key] = strength(None, run, bias, facts)
            before["biases"][bias.name] = shared[key]
            before.setdefault("facts", shared[key]["facts"])
        b = before["biases"][bias.name]
        drawn = method == "random" or method.startswith("matched:")
        for draw, heads in enumerate(sets):
            spec = make_spec(heads, kind, means, entities, {"bias": bias.name, "method": method, "k": k})
            cost_key = ("cost", tuple(sorted(heads)), kind)
            s_key = ("strength", bias.name, tuple(sorted(heads)), kind)
            if s_key not in shared or set(run.get("countries", ())) - set(shared[s_key]["countries"]):
                got = strength(spec, run, bias, () if cost_key in shared else facts)
                shared[s_key] = got
                shared.setdefault(cost_key, {"facts": got["facts"]})
            got, cost = shared[s_key], shared[cost_key]
            if (not drawn or cost_draws is None or draw < cost_draws) and "perplexity" not in cost:
                cost.update(capability(spec))
            if "perplexity" in cost and questions and "mc" not in cost:
                cost["mc"] = tape(("mc",), spec, lambda sp: mc_raw(_mc_under(model, tokenizer, sp, questions, seed)))
            rows.append({
                "bias": bias.name, "method": method, "kind": kind, "k": k, "n_heads": len(heads),
                "heads": [list(h) for h in heads], "draw": draw if drawn else None,
                "seeds": [t.seed for t in run["tokens"]],
                "S_before": [x["value"] for x in b["tokens"]], "S": got["tokens"],
                "reduction": [reduction(x["value"], y["value"]) for x, y in zip(b["tokens"], got["tokens"])],
                "countries": {c: {"before": b["countries"][c], "after": got["countries"][c]}
                              for c in run.get("countries", ()) if c in b.get("countries", {})},
                "facts": [x["value"] for x in cost["facts"]],
                "facts_reduction": facts_reduction(b["facts"], cost["facts"], seen),
                "held_out_reduction": facts_reduction(b["facts"], cost["facts"], held) if any(held) else None,
                "perplexity": dict(cost["perplexity"]) if "perplexity" in cost else None,
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


def _mc_under(model, tokenizer, spec, questions, seed):
    with spec.apply(model) if spec is not None else _null():
        return mc_accuracy(model, tokenizer, questions, seed=seed)


def _null():

    return nullcontext()


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
