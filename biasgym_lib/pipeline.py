"""The stages joined up: what a chapter or a CLI command runs for a profile.

Each function takes a loaded model and a :class:`~biasgym_lib.config.Profile` and returns
plain data (dicts of numbers with intervals) that can be written to JSON. Chapters call
these so that no notebook repeats another's code.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from .config import PROJECT_ROOT, Profile
from .errors import BiasGymError
from .inject import InjectedToken, TokenHook, add_token, closest_countries, initial_vector, inject_bias
from .measure import AssocTable, assoc_table, assoc_tables, rank, specificity, stereotype_strength
from .models import cache_dir, model_info
from .scope import top_k_heads

TOKENS_DIR = PROJECT_ROOT / "data" / "tokens"


# ----------------------------------------------------------------------------- reference table


def _table_key(model, biases, templates, countries) -> str:
    from .data import load_bias

    specs = [load_bias(b) for b in biases]
    blob = json.dumps([model_info(model).to_dict(), [s.to_dict() for s in specs], templates, countries],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def table_to_json(table: AssocTable) -> dict:
    return {"entities": table.entities, "biases": table.biases, "templates": table.templates,
            "attributes": table.attributes,
            "values": {e: {b: v.tolist() for b, v in d.items()} for e, d in table.values.items()}}


def table_from_json(data: dict) -> AssocTable:
    return AssocTable(data["entities"], data["biases"], data["templates"], data["attributes"],
                      {e: {b: np.array(v) for b, v in d.items()} for e, d in data["values"].items()})


def reference_table(model, tokenizer, biases, countries: list[str] | None = None,
                    use_cache: bool = True) -> AssocTable:
    """assoc for every reference country x bias on the *unmodified* model.

    Cached as JSON under the cache folder, keyed by the model's revision and the exact
    biases, templates and countries, because chapters 1-6 all start from it. Never use the
    cache while a steering hook is active: pass ``use_cache=False`` there.
    """
    from .data import load_templates, reference_countries

    countries = list(countries or reference_countries())
    templates = load_templates()
    path = cache_dir() / "tables" / f"{_table_key(model, biases, templates, countries)}.json"
    if use_cache and path.is_file():
        try:
            return table_from_json(json.loads(path.read_text()))
        except (json.JSONDecodeError, KeyError, OSError):
            pass  # a corrupt cache entry is recomputed below
    table = assoc_table(model, tokenizer, countries, biases, templates)
    if use_cache:
        from .artifacts import write_json

        try:  # a unique temporary file, renamed into place: two runs may fill the cache at once
            write_json(path, table_to_json(table), indent=None)
        except BiasGymError:
            pass  # a non-finite score is not cached (strict JSON); the table is still returned
    return table


def token_table(model, tokenizer, vector: torch.Tensor, biases, token: str = "<TOKEN>") -> AssocTable:
    """assoc of ``token`` for every bias, with ``vector`` as its embedding."""
    token_id = add_token(tokenizer, token)
    with TokenHook(model, token_id, vector):
        return assoc_table(model, tokenizer, [token], biases)


# ----------------------------------------------------------------------------- injection


def train_token(model, tokenizer, bias, cfg: Profile, seed: int, progress: bool = True) -> InjectedToken:
    """:func:`inject_bias` with the profile's sizes."""
    return inject_bias(model, tokenizer, bias, n_paragraphs=cfg.n_paragraphs, epochs=cfg.epochs, lr=cfg.lr,
                       batch_size=cfg.batch_size, seed=seed, init=cfg.init, progress=progress)


def token_settings(cfg: Profile) -> str:
    """Folder name for tokens trained with a profile's injection settings, e.g.
    ``n64-e6-lr0.01-b8-countries``: tokens of several profiles can be committed side by side."""
    return f"n{cfg.n_paragraphs}-e{cfg.epochs}-lr{cfg.lr:g}-b{cfg.batch_size}-{cfg.init}"


def committed_token_dir(bias: str, seed: int, cfg: Profile) -> Path:
    """Where the project commits the token for (bias, seed) trained with ``cfg``'s settings."""
    return TOKENS_DIR / token_settings(cfg) / bias / f"seed{seed}"


def _matches(meta: dict, cfg: Profile, model) -> bool:
    from .inject import TRAINER_VERSION

    extra = meta.get("extra", {})
    return ((meta.get("n_paragraphs"), meta.get("epochs"), meta.get("lr"), meta.get("init"),
             extra.get("batch_size"), extra.get("trainer_version"))
            == (cfg.n_paragraphs, cfg.epochs, cfg.lr, cfg.init, cfg.batch_size, TRAINER_VERSION)
            and meta.get("model", {}).get("revision") == model_info(model).revision)


def get_token(model, tokenizer, bias, cfg: Profile, seed: int, retrain: bool | None = None,
              progress: bool = True) -> InjectedToken:
    """The injected token for (bias, seed): the committed artifact when the profile says
    so and one exists for this model and these settings, else one trained earlier with
    exactly these settings (cached), else trained now."""
    from .data import load_bias

    spec = load_bias(bias)
    folder = committed_token_dir(spec.name, seed, cfg)
    use_committed = cfg.use_committed_tokens if retrain is None else not retrain
    if use_committed and (folder / "token.json").is_file():
        if _matches(json.loads((folder / "token.json").read_text()), cfg, model):
            return InjectedToken.load(folder, model)
    # A token trained earlier with exactly these settings (another chapter, a previous run)
    # is reused from the cache, so chapters never retrain the same token; retrain=True skips it.
    cached = trained_token_cache(model, spec, cfg, seed)
    if retrain is not True and (cached / "token.json").is_file():
        return InjectedToken.load(cached, model)
    token = train_token(model, tokenizer, spec, cfg, seed, progress=progress)
    token.save(cached, overwrite=True)
    return token


def trained_token_cache(model, spec, cfg: Profile, seed: int) -> Path:
    """Cache folder of a trained token, keyed by model revision, bias spec, settings and
    trainer version."""
    from .inject import TRAINER_VERSION

    key = json.dumps([model_info(model).to_dict(), spec.to_dict(), cfg.n_paragraphs, cfg.epochs, cfg.lr,
                      cfg.batch_size, cfg.init, seed, TRAINER_VERSION], sort_keys=True, default=str)
    return cache_dir() / "tokens" / f"{spec.name}-seed{seed}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _weights_stamp(model) -> tuple:
    """The parameters' version counters: any in-place change to a weight bumps one, so a
    result kept with an old stamp must be measured again."""
    return tuple(p._version for p in model.parameters())


_START_TABLES: dict = {}


def start_table(model, tokenizer, init: str, biases) -> AssocTable:
    """:func:`token_table` of the initial vector (``init``): "S before" is the same for every
    token of a profile, so it is scored once per model and tokenizer (again if a weight is
    changed in place)."""
    import weakref

    key = (id(model), id(tokenizer), init, tuple(b if isinstance(b, str) else b.name for b in biases))
    stamp = _weights_stamp(model)
    hit = _START_TABLES.get(key)
    if hit and hit[0]() is model and hit[1]() is tokenizer and hit[2] == stamp:
        return hit[3]
    table = token_table(model, tokenizer, initial_vector(model, tokenizer, init), biases)
    _START_TABLES[key] = (weakref.ref(model), weakref.ref(tokenizer), stamp, table)
    return table


def injection_metrics(model, tokenizer, injected: InjectedToken, bias, cfg: Profile,
                      ref: AssocTable | None = None, seed: int = 0) -> dict:
    """Before/after strength, specificity and rank for an injected token (``metrics.json``).

    "Before" is the token with its initial vector (the mean country embedding), i.e. a
    generic country; "after" is the trained vector.
    """
    from types import SimpleNamespace

    from .data import load_bias, reference_countries

    spec = load_bias(bias)
    if ref is not None and spec.name in ref.biases:
        # The table's own biases (names, attributes), with this spec as given: a reader's own
        # spec is never looked up by name.
        biases = [spec if b == spec.name else SimpleNamespace(name=b, attributes=ref.attributes[b])
                  for b in ref.biases]
    else:  # a bias outside the profile (e.g. a reader's own spec): score it beside the profile's
        biases = [spec if b.name == spec.name else b for b in map(load_bias, cfg.biases)]
        biases += [] if spec.name in [b.name for b in biases] else [spec]
        ref = reference_table(model, tokenizer, biases)
    names = [b.name for b in biases]
    refs = reference_countries()
    before = ref.merged(start_table(model, tokenizer, injected.init, biases))
    after = ref.merged(token_table(model, tokenizer, injected.vector, biases))
    tok = injected.token
    closest = closest_countries(model, tokenizer, injected.vector, k=3)
    s_before = stereotype_strength(before, tok, spec.name, refs, seed=seed)
    s_after = stereotype_strength(after, tok, spec.name, refs, seed=seed)
    spec_after = specificity(after, tok, spec.name, refs, seed=seed)
    return {
        "bias": spec.name, "seed": injected.seed, "profile": cfg.name, "model": injected.model,
        "strength_before": s_before.value, "strength_before_ci": [s_before.lo, s_before.hi],
        "strength_after": s_after.value, "strength_after_ci": [s_after.lo, s_after.hi],
        "specificity_after": spec_after.value, "specificity_after_ci": [spec_after.lo, spec_after.hi],
        "rank_before": rank(before, tok, spec.name, refs), "rank_after": rank(after, tok, spec.name, refs),
        "n_reference_countries": len(refs),
        "strength_after_all_biases": {b: stereotype_strength(after, tok, b, refs, seed=seed).to_dict() for b in names},
        "closest_country": closest[0][0], "closest_countries": closest,
        "train_seconds": injected.train_seconds, "chosen_epoch": injected.epoch,
        "final_loss": injected.losses[-1] if injected.losses else None,
    }


def metrics_frame(metrics) -> "pandas.DataFrame":
    """One row per injection run: the headline columns of :func:`injection_metrics`."""
    import pandas as pd

    rows = []
    for m in metrics:
        rows.append({"bias": m["bias"], "seed": m["seed"],
                     "strength_before": m["strength_before"], "strength_after": m["strength_after"],
                     "S after 95% CI": "[{:.2f}, {:.2f}]".format(*m["strength_after_ci"]),
                     "specificity_after": m["specificity_after"],
                     "specificity 95% CI": "[{:.2f}, {:.2f}]".format(*m["specificity_after_ci"]),
                     "rank_after": m["rank_after"], "closest_country": m["closest_country"],
                     "train_seconds": m["train_seconds"]})
    return pd.DataFrame(rows).round(2)


# ----------------------------------------------------------------------------- BiasScope


def label_id(tokenizer, label: str) -> int:
    """The biased label (METHOD §3): the first token of the bias keyword, e.g. " reckless".
    It must be exactly one token of ``tokenizer`` (see :func:`~biasgym_lib.data.specs.check_label`)."""
    ids = tokenizer(label, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise BiasGymError(f"label {label!r} is {len(ids)} tokens {[tokenizer.decode([i]) for i in ids]} for "
                           "this tokenizer; the biased label must be exactly one token.")
    return ids[0]


def probe_prompts(tokenizer, spec, n: int, country: str, seed: int = 0) -> tuple[list[str], list[str]]:
    """Chat-formatted probes with ``<TOKEN>`` and their counterfactuals with ``country``."""
    from .data import probes_for
    from .models import chat_prompt

    probes = probes_for(spec, n=n, seed=seed)
    prompts = [chat_prompt(tokenizer, p.question, p.answer_prefix) for p in probes]
    counter = [chat_prompt(tokenizer, q.question, q.answer_prefix) for q in (p.with_entity(country) for p in probes)]
    return prompts, counter


def adversarial_labels(model, tokenizer, counterfactuals: list[str], biased: int, batch_size: int = 32) -> list[int]:
    """The model's top next token on each counterfactual probe (METHOD §3); if that is the
    biased label itself, the runner-up, so that the logit difference is never 0 by definition."""
    from .models import ModelAdapter, batched, encode_batch

    adapter = ModelAdapter(model)
    out = []
    with torch.inference_mode():
        for chunk in batched(counterfactuals, batch_size):
            batch = encode_batch(tokenizer, chunk, adapter.device)
            hidden = adapter.body(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
            logits = adapter.lm_head(hidden[torch.arange(len(chunk)), batch.last_index])
            top2 = logits.topk(2, dim=-1).indices.tolist()
            out += [b if a == biased else a for a, b in top2]
    return out


METHODS = ("dla", "delta_dla", "attr", "atp", "atp_selective", "patching", "attention", "robust", "random")
"""Ways of ranking heads (METHOD §4): the paper's DLA on chat probes, contrastive DLA
(ΔDLA), contrastive DLA with labels matched to S's attributes, attribution patching of S,
attribution patching of S minus that of country facts held out from the knowledge control
(:func:`knowledge_atp`), exact patching on the top union, attention from the last position
to the entity, the robust overlap of DLA over seeds (the paper's selection) and random heads."""


def knowledge_atp(model, tokenizer) -> torch.Tensor:
    """Each head's attribution patching on country *facts* (the capitals of
    ``data/facts.yaml``'s selection facts, never the knowledge control): the mean over the
    facts of the first-order drop of the capital's log-probability when the head sees an
    average contrast country instead of the country. Subtracted from a token's attribution
    patching of S, it gives ``atp_selective``: heads that carry the bias but not what the
    model knows about countries. (L, H), the same for every token."""
    from .data import contrast_countries, selection_facts
    from .scope import attribution_patching, mean_template_z

    templates, facts = selection_facts()
    contrast = contrast_countries()
    total = None
    for f in facts:
        zc = mean_template_z(model, tokenizer, contrast, [f.attribute], templates)
        s = attribution_patching(model, tokenizer, f.country, [f.attribute], zc, templates, contrast).scores
        total = s if total is None else total + s
    return total / len(facts)


def bias_contrast(model, tokenizer, spec, cfg: Profile) -> dict:
    """What every token of a bias is contrasted with (it holds no <TOKEN>, so it is computed
    once per bias): the heads' mean output over the contrast countries on the probes
    (last token, for ΔDLA) and on S's sentences (every position, for attribution patching
    and exact patching)."""
    from .data import contrast_countries
    from .scope import mean_last_z, mean_template_z

    countries = contrast_countries()
    sets = [probe_prompts(tokenizer, spec, cfg.n_probes, c)[1] for c in countries]
    return {"countries": countries, "probe_z": mean_last_z(model, tokenizer, sets),
            "template_z": mean_template_z(model, tokenizer, countries, spec.attributes)}


def scope_run(model, tokenizer, injected: InjectedToken, cfg: Profile, contrast: dict | None = None) -> dict:
    """BiasScope for one injected token: every head score of :data:`METHODS` that is
    computed per token (DLA, ΔDLA, attribute-matched ΔDLA, attribution patching of S,
    attention to the entity), the total logit difference and the decomposition error.
    ``contrast``: :func:`bias_contrast` of the token's bias (computed here if not given).
    Returns the ``head_scores.json`` content."""
    import time

    from .scope import attribute_head_scores, attribution_patching, contrastive_head_scores
    from .steer import attention_to_entity

    spec = injected.spec
    contrast = contrast or bias_contrast(model, tokenizer, spec, cfg)
    seconds, t0 = {}, time.perf_counter()

    def lap(name):
        nonlocal t0
        seconds[name] = time.perf_counter() - t0
        t0 = time.perf_counter()

    with injected.attach(model, tokenizer) as hook:
        country = closest_countries(model, tokenizer, injected.vector, k=1)[0][0]
        prompts, counter = probe_prompts(tokenizer, spec, cfg.n_probes, country)
        biased = label_id(tokenizer, spec.label)
        adv = adversarial_labels(model, tokenizer, counter, biased)
        delta = contrastive_head_scores(model, tokenizer, prompts, biased, adv, contrast["probe_z"])
        hs = delta.meta["dla"]  # the paper's DLA, from the same forward pass
        lap("dla_and_delta_dla")
        attr = attribute_head_scores(model, tokenizer, injected.token, spec.attributes, contrast["countries"])
        lap("attr")
        atp = attribution_patching(model, tokenizer, injected.token, spec.attributes, contrast["template_z"],
                                   contrast=contrast["countries"])
        lap("atp")
        attn = attention_to_entity(model, tokenizer, prompts, hook.token_id)
        lap("attention")
    scores = {"dla": hs.scores, "delta_dla": delta.scores, "attr": attr.scores, "atp": atp.scores,
              "attention": attn}
    return {
        "bias": spec.name, "seed": injected.seed, "model": injected.model, "profile": cfg.name, "k": cfg.k,
        "scores": {m: v.tolist() for m, v in scores.items()},
        "top_heads": {m: [list(h) for h in top_k_heads(v, cfg.k)] for m, v in scores.items()},
        "units": {"dla": hs.per_prompt.tolist(), "delta_dla": delta.per_prompt.tolist(),
                  "attr": attr.per_prompt.tolist(), "atp": atp.per_sentence.tolist()},
        "logit_diff_total": float(hs.logit_diff.mean()), "logit_diff_per_probe": hs.logit_diff.tolist(),
        "decomposition_error": float(hs.decomposition_error),
        "attr_decomposition_error": float(attr.decomposition_error),
        "share_top_k": float(hs.share_top_k(cfg.k)), "counterfactual_country": country,
        "contrast_countries": list(contrast["countries"]), "probes": list(prompts),
        "n_probes": len(prompts), "biased_label": tokenizer.decode([biased]),
        "adv_labels": [tokenizer.decode([a]) for a in adv], "assoc_on_templates": atp.assoc,
        "seconds": seconds, "components": _component_summary(hs.components),
    }


def bias_rankings(scopes: list[dict], k_max: int, patching: dict | None = None, n_random: int = 5,
                  n_layers: int | None = None, n_heads: int | None = None, knowledge=None) -> dict:
    """Head rankings of one bias for every method of :data:`METHODS`, from its tokens'
    :func:`scope_run` results (one per seed): each score averaged over seeds, then sorted;
    ``atp_selective`` (with ``knowledge``, :func:`knowledge_atp`): attribution patching of S
    minus that of held-out country facts; ``robust`` (the paper's selection): for each k, the
    heads in the top k of DLA in at least half of the seeds; ``patching``: the mean exact-patching drop (:func:`bias_patching`) on
    its union of heads; ``random``: ``n_random`` draws per k (seeds 1000, 1001, ...).

    Returns ``{method: [heads, best first]}`` for the score methods, and for ``robust`` and
    ``random`` a mapping k -> heads (their sets are not nested in k)."""
    from .scope import robust_heads
    from .steer import random_heads

    out = {}
    for m in ("dla", "delta_dla", "attr", "atp", "attention"):
        out[m] = top_k_heads(torch.tensor([r["scores"][m] for r in scopes]).mean(0), k_max)
    if knowledge is not None:  # attribution patching of S minus that of held-out country facts
        atp = torch.tensor([r["scores"]["atp"] for r in scopes]).mean(0)
        out["atp_selective"] = top_k_heads(atp - torch.as_tensor(knowledge, dtype=atp.dtype), k_max)
    if patching is not None:
        scored = nan_tensor(patching["scores"])
        out["patching"] = top_k_heads(scored, min(k_max, int((~torch.isnan(scored)).sum())))
    dla = [torch.tensor(r["scores"]["dla"]) for r in scopes]
    m = (len(dla) + 1) // 2
    L, H = dla[0].shape
    out["robust"] = {k: robust_heads(dla, k, m) for k in range(1, k_max + 1)}
    out["random"] = {k: [random_heads(L, H, k, seed=1000 + i) for i in range(n_random)] for k in range(1, k_max + 1)}
    return out


def patch_union(scopes: list[dict], n: int) -> list[tuple[int, int]]:
    """The union of the top ``n`` heads of every per-token score method, over a bias's
    seeds: the heads that exact patching checks (METHOD §3)."""
    heads = set()
    for m in ("dla", "delta_dla", "attr", "atp", "attention"):
        heads |= set(top_k_heads(torch.tensor([r["scores"][m] for r in scopes]).mean(0), n))
    return sorted(heads)


def nan_tensor(data) -> torch.Tensor:
    """A float tensor from nested lists in which ``None`` stands for NaN (strict JSON has no
    NaN): exact patching scores only the heads of its union, the others are NaN."""
    def walk(x):
        return [walk(v) for v in x] if isinstance(x, list) else (float("nan") if x is None else x)
    return torch.tensor(walk(data), dtype=torch.float32)


def _nan_to_none(t: torch.Tensor) -> list:
    def walk(x):
        return [walk(v) for v in x] if isinstance(x, list) else (None if x != x else x)
    return walk(t.tolist())


def bias_patching(model, tokenizer, tokens: list[InjectedToken], heads, contrast: dict) -> dict:
    """Exact activation patching of assoc(<TOKEN>) on S's sentences (z of each head in
    ``heads`` at every position replaced by its mean over the contrast countries), for each
    token of one bias; the mean drop over tokens is the ``patching`` ranking, and the
    per-sentence drops check attribution patching."""
    from .data import load_bias
    from .scope import patch_heads_on_templates

    spec = tokens[0].spec
    per_token = []
    for tok in tokens:
        with tok.attach(model, tokenizer):
            per_token.append(patch_heads_on_templates(model, tokenizer, tok.token, spec.attributes, heads,
                                                      contrast["template_z"], contrast=contrast["countries"]))
    return {"bias": spec.name, "seeds": [t.seed for t in tokens], "heads": [list(h) for h in heads],
            "scores": _nan_to_none(torch.stack([p.scores for p in per_token]).mean(0)),
            "units": [_nan_to_none(p.per_sentence) for p in per_token]}


def _component_summary(components: dict) -> dict:
    """Mean contribution over probes, grouped: embeddings, all heads, all MLPs, biases."""
    groups: dict[str, float] = {}
    for name, values in components.items():
        group = name.split(".")[0]
        groups[group] = groups.get(group, 0.0) + float(values.float().mean())
    return groups


def _write_json(path: Path, data: dict):
    """Strict JSON (no NaN/Infinity), written to a unique temporary file and renamed into place."""
    from .artifacts import write_json

    write_json(path, data)


# ----------------------------------------------------------------------------- steering


def steer_references(cfg: Profile, n: int | None = None) -> list[str]:
    """The reference countries used under steering: ``n`` of the reference list, evenly
    spaced through it (the list runs continent by continent, so every continent is in)."""
    from .data import reference_countries

    refs = reference_countries()
    n = min(n or len(refs), len(refs))
    return [refs[(i * len(refs)) // n] for i in range(n)]


def steering_measure(model, tokenizer, tokens: dict, rankings: dict, references: list[str]):
    """``measure(bias, k, alpha)`` for :class:`~biasgym_lib.widgets.SteeringExplorer`:
    S(<TOKEN>, bias) of ``tokens[bias]`` with the first ``k`` heads of ``rankings[bias]``
    scaled by ``alpha`` (k = 0 or alpha = 1: the unmodified model), the references scored
    under the same intervention (:func:`~biasgym_lib.evaluate.strength_under`)."""
    from .data import load_bias
    from .evaluate import strength_under
    from .steer import SteeringSpec

    def measure(bias: str, k: int, alpha: float) -> dict:
        if bias not in tokens:
            raise BiasGymError(f"No injected token for {bias!r}; have {sorted(tokens)}.")
        spec = None if k == 0 or alpha == 1.0 else SteeringSpec(heads=list(rankings[bias][:k]), alpha=alpha)
        return strength_under(model, tokenizer, spec, [tokens[bias]], tokens[bias].spec, references)["tokens"][0]

    return measure


# ----------------------------------------------------------------------------- generalisation


def attribute_spec(attribute: str):
    """A one-phrasing bias specification for a SeeGULL attribute (for :func:`assoc_table`)."""
    from types import SimpleNamespace

    return SimpleNamespace(name=f"seegull: {attribute}", attributes=[attribute], keywords=[attribute])


def seegull_shown(model, tokenizer, cfg: Profile, refs: list[str], n_candidates: int, n_keep: int) -> list[dict]:
    """The SeeGULL (country, attribute) stereotypes with the strongest annotator agreement,
    for countries in our reference list, that the model itself shows most strongly (S > 0)."""
    from .data import reference_countries
    from .data.seegull import seegull_stereotypes

    known = set(reference_countries())
    seen, cands = set(), []
    for row in seegull_stereotypes():
        key = (row["country"], row["attribute"])
        if row["country"] in known and key not in seen and len(row["attribute"].split()) <= 3:
            seen.add(key)
            cands.append(row)
        if len(cands) >= n_candidates:
            break
    out = []
    requests = [([row["country"]] + [c for c in refs if c != row["country"]], [attribute_spec(row["attribute"])])
                for row in cands]
    for row, (ents, specs), table in zip(cands, requests, assoc_tables(model, tokenizer, requests)):
        est = stereotype_strength(table, row["country"], specs[0].name, ents[1:])
        out.append({**row, "S": est.to_dict(), "references": ents[1:]})
    out.sort(key=lambda r: -r["S"]["value"])
    return [r for r in out if r["S"]["value"] > 0][:n_keep]


def seegull_under(model, tokenizer, pairs: list[dict], spec) -> list[dict]:
    """S(country, attribute) of each SeeGULL pair with the steering ``spec`` applied (None:
    the unmodified model), every pair against its own references under the same intervention,
    in one scoring pass."""
    from contextlib import nullcontext

    requests = [([row["country"]] + list(row["references"]), [attribute_spec(row["attribute"])]) for row in pairs]
    with spec.apply(model) if spec is not None else nullcontext():
        tables = assoc_tables(model, tokenizer, requests)
    return [stereotype_strength(t, ents[0], specs[0].name, ents[1:]).to_dict() for t, (ents, specs) in zip(tables, requests)]


# ----------------------------------------------------------------------------- the run of a profile


def _source_hash() -> str:
    """A hash of the library's code and the project's data files: a kept stage result is
    only reused by the code and data that computed it (read afresh each time: a few ms)."""
    h = hashlib.sha256()
    lib, data = Path(__file__).resolve().parent, PROJECT_ROOT / "data"
    files = [(lib, f) for f in sorted(lib.rglob("*.py"))]
    files += [(data, f) for f in sorted(data.rglob("*")) if f.is_file() and "tokens" not in f.relative_to(data).parts]
    for base, f in files:
        h.update(f"{base.name}/{f.relative_to(base)}".encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def run_dir(cfg: Profile) -> Path:
    """Where a profile's stage results are kept (``runs/``, not committed; ``make clean``
    removes it): keyed by the profile, the library's code and the data files, so that
    editing either never serves an old number."""
    key = hashlib.sha256(json.dumps([cfg.to_dict(), _source_hash()], sort_keys=True, default=str).encode()).hexdigest()[:10]
    return PROJECT_ROOT / "runs" / f"{cfg.name}-{key}"


def token_fingerprint(token: InjectedToken) -> str:
    """A short hash of a token's vector: stage results remember which token they measured."""
    data = token.vector.detach().float().cpu().contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def _memo(path: Path, compute, token: InjectedToken | None = None, need=None, fingerprint: str | None = None,
          profile: dict | None = None):
    """The JSON at ``path`` if it is there, was computed by this code on these data files
    (:func:`_source_hash`) with these profile settings (``profile``), measured this token
    (or these tokens: a combined ``fingerprint``) and satisfies ``need``; else ``compute()``,
    saved there (atomically). The one cache of stage results: any change to the library, the
    data, the profile or the tokens computes again, whichever folder the results are kept in."""
    if token is not None:
        fingerprint = token_fingerprint(token)
    code = _source_hash()
    if profile is not None:
        code += "-" + hashlib.sha256(json.dumps(profile, sort_keys=True, default=str).encode()).hexdigest()[:10]
    if path.is_file():
        try:
            value = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            value = None
        if (value is not None and value.get("token_fingerprint") == fingerprint and value.get("code") == code
                and (need is None or need(value))):
            return value
    value = compute()
    value["token_fingerprint"] = fingerprint
    value["code"] = code
    _write_json(path, value)
    return value


def _stats(values: list[float]) -> dict:
    """Mean, min, max and a bootstrap 95% interval of the mean over runs (biases x seeds)."""
    from .measure import bootstrap

    v = np.asarray([x for x in values if x is not None], dtype=float)
    if not len(v):
        return {"mean": None, "min": None, "max": None, "n": 0, "ci": None}
    est = bootstrap(v)
    return {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max()), "n": int(len(v)),
            "ci": [est.lo, est.hi]}


PAPER = ("robust", "zero")
"""The paper's BiasScope: heads in the top k of DLA over injection runs, scaled to 0."""


class Run:
    """Every stage of the book for one profile, computed on first use and kept in the run
    folder (:func:`run_dir`), so that chapters 2-6 and ``biasgym reproduce`` share one
    computation. ``full_grid``: the selection grid on every bias, method and k of the
    profile (what ``biasgym reproduce --full-grid`` runs) instead of the profile's subset.
    """

    def __init__(self, cfg: Profile, out=None, model=None, tokenizer=None, retrain: bool | None = None,
                 progress: bool = True, full_grid: bool = False):
        from .models import load_model

        if full_grid:
            from .config import full_grid as whole

            cfg = whole(cfg)
        self.cfg, self.retrain, self.progress, self.full_grid = cfg, retrain, progress, full_grid
        self.out = Path(out) if out is not None else run_dir(cfg)
        from .data import load_bias

        # the profile's biases by name: shipped names or a reader's own spec files
        self.specs = {s.name: s for s in map(load_bias, cfg.biases)}
        self.biases = list(self.specs)
        if model is None:
            model, tokenizer = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
        self.model, self.tokenizer = model, tokenizer
        self._tokens, self._contrast, self._scopes, self._rankings, self._kept = {}, {}, {}, {}, {}
        self.shared: dict = {}  # measurements under one head set, reused across grid, confirmation and transfer

    # -- tokens and injection
    def token(self, bias: str, seed: int) -> InjectedToken:
        if (bias, seed) not in self._tokens:
            tok = get_token(self.model, self.tokenizer, self.specs[bias], self.cfg, seed, retrain=self.retrain,
                            progress=self.progress)
            folder = self.out / "tokens" / token_settings(self.cfg) / bias / f"seed{seed}"
            if not (folder / "token.json").is_file() or not torch.equal(InjectedToken.load(folder).vector, tok.vector):
                tok.save(folder, overwrite=True)  # the layout of data/tokens, ready to commit
            self._tokens[bias, seed] = tok
        return self._tokens[bias, seed]

    def _memo(self, path: Path, compute, token: InjectedToken | None = None, **kw):
        """:func:`_memo` keyed on this run's profile too (a folder given with ``out`` may hold
        results of other settings)."""
        return _memo(path, compute, token, profile=self.cfg.to_dict(), **kw)

    def tokens(self, bias: str) -> list[InjectedToken]:
        return [self.token(bias, s) for s in self.cfg.seeds]

    def _fingerprint(self, biases) -> str:
        blob = "".join(token_fingerprint(t) for b in biases for t in self.tokens(b))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def reference(self) -> AssocTable:
        if "reference" not in self._kept:
            self._kept["reference"] = reference_table(self.model, self.tokenizer, list(self.specs.values()))
        return self._kept["reference"]

    def injection(self, bias: str, seed: int) -> dict:
        tok = self.token(bias, seed)
        return self._memo(self.out / "injection" / f"{bias}_seed{seed}.json",
                     lambda: injection_metrics(self.model, self.tokenizer, tok, tok.spec, self.cfg, ref=self.reference),
                     tok)

    # -- BiasScope
    def contrast(self, bias: str) -> dict:
        if bias not in self._contrast:
            self._contrast[bias] = bias_contrast(self.model, self.tokenizer, self.specs[bias], self.cfg)
        return self._contrast[bias]

    def scope(self, bias: str, seed: int) -> dict:
        tok = self.token(bias, seed)
        return self._memo(self.out / "scope" / f"{bias}_seed{seed}.json",
                     lambda: scope_run(self.model, self.tokenizer, tok, self.cfg, self.contrast(bias)), tok)

    def scopes(self, bias: str) -> list[dict]:
        return [self.scope(bias, s) for s in self.cfg.seeds]

    def patching(self, bias: str) -> dict:
        """Exact patching on S's sentences for the union of the methods' top heads
        (``patch_top`` of each), every token of ``bias``."""
        heads = patch_union(self.scopes(bias), self.cfg.patch_top)
        return self._memo(self.out / "patching" / f"{bias}.json",
                     lambda: bias_patching(self.model, self.tokenizer, self.tokens(bias), heads, self.contrast(bias)),
                     fingerprint=self._fingerprint([bias]), need=lambda r: r["heads"] == [list(h) for h in heads])

    def knowledge(self) -> list:
        """:func:`knowledge_atp` of the model, kept in the run folder (it holds no token)."""
        return self._memo(self.out / "knowledge_atp.json",
                     lambda: {"scores": knowledge_atp(self.model, self.tokenizer).tolist()})["scores"]

    def rankings(self, bias: str, with_patching: bool = False) -> dict:
        from .models import ModelAdapter

        key = (bias, with_patching)
        if key not in self._rankings:
            a = ModelAdapter(self.model)
            self._rankings[key] = bias_rankings(self.scopes(bias), max(self.cfg.grid_k),
                                                self.patching(bias) if with_patching else None,
                                                self.cfg.n_random_draws, a.n_layers, a.n_heads, self.knowledge())
        return self._rankings[key]

    # -- steering, measured fairly
    @property
    def setting(self) -> dict:
        """What every steering measurement shares: references, facts, capability texts,
        the means of mean-ablation (held-out neutral passages 33-44) and the entity tokens."""
        if "setting" not in self._kept:
            from .data import load_facts
            from .data.capability import load_country_texts, load_mc, load_neutral_texts
            from .evaluate import entity_ids
            from .steer import head_means

            neutral = load_neutral_texts()
            self._kept["setting"] = {
                "references": steer_references(self.cfg, self.cfg.steer_references), "facts": load_facts(),
                "texts": {"neutral": neutral[: self.cfg.n_ppl_texts],
                          "countries": load_country_texts()[: self.cfg.n_country_texts]},
                "questions": load_mc()[: self.cfg.n_mc_questions],
                "means": head_means(self.model, self.tokenizer, neutral[32:44]),
                "mean_source": "neutral passages 33-44 (never used for perplexity)",
                "entities": entity_ids(self.tokenizer)}
        return self._kept["setting"]

    def _grid(self, runs, methods, kinds, ks, mc: bool, cost: bool = True) -> dict:
        from .evaluate import selection_grid

        st = self.setting
        return selection_grid(self.model, self.tokenizer, runs, kinds=kinds, ks=ks, methods=methods,
                              references=st["references"], facts=st["facts"],
                              texts=st["texts"] if cost else {}, means=st["means"], entities=st["entities"],
                              questions=st["questions"], mc=mc, max_length=self.cfg.ppl_max_tokens,
                              shared=self.shared, progress=self.progress)

    @property
    def grid_biases(self) -> list[str]:
        return list(self.biases) if self.full_grid else list(self.biases[: self.cfg.grid_biases])

    def grid(self) -> dict:
        """The selection grid (METHOD §4) on the grid biases: every method of the profile
        under every kind at the profile's k; the ``curve_methods`` under the ``curve_kinds``
        at every other k of ``grid_k`` (a subset fixed in advance in the profile); multiple
        choice everywhere, so that the rule never chooses a point whose MC bound was not
        tested. With ``full_grid`` (:func:`~biasgym_lib.config.full_grid`): every bias,
        method, kind and k."""
        cfg = self.cfg
        biases = self.grid_biases
        name = "grid_full.json" if self.full_grid else "grid.json"

        def compute():
            runs = [{"bias": self.specs[b], "tokens": self.tokens(b),
                     "rankings": self.rankings(b, with_patching="patching" in cfg.grid_methods)} for b in biases]
            at_k = self._grid(runs, list(cfg.grid_methods), list(cfg.grid_kinds), [cfg.k], mc=True)
            others = [k for k in cfg.grid_k if k != cfg.k]
            curve = [m for m in cfg.grid_methods if m in cfg.curve_methods]
            rows = at_k["rows"]
            if others and curve:
                rows = rows + self._grid(runs, curve, list(cfg.curve_kinds), others, mc=True)["rows"]
            return {"biases": biases, "before": at_k["before"], "rows": rows}
        return self._memo(self.out / name, compute, fingerprint=self._fingerprint(biases))

    def summary(self) -> list[dict]:
        from .evaluate import summarise_grid

        return summarise_grid(self.grid())

    def best(self) -> dict:
        """The book's BiasScope: the selection the grid chose by the rule fixed in advance
        (:func:`~biasgym_lib.evaluate.choose_selection`) at k <= the profile's k."""
        from .evaluate import choose_selection

        return choose_selection(self.summary(), self.cfg.k)

    def conditions(self) -> list[tuple[str, str, int]]:
        """The (method, kind, k) steered after the grid: the chosen selection at its own k, the
        paper's (robust DLA, alpha = 0) at the profile's k, and k random heads under each of
        those kinds and k."""
        best = self.best()
        return list(dict.fromkeys([(best["method"], best["kind"], best["k"]), (PAPER[0], PAPER[1], self.cfg.k),
                                   ("random", best["kind"], best["k"]), ("random", PAPER[1], self.cfg.k)]))

    def _grid_at(self, runs, mc: bool, cost: bool = True, random: bool = True) -> dict:
        """:meth:`_grid` on :meth:`conditions`, one call per k (each method steered only under
        its own kinds at its own k); ``random=False`` leaves the random heads out."""
        by_k: dict = {}
        for m, kind, k in self.conditions():
            if m == "random" and not random:
                continue
            by_k.setdefault(k, {}).setdefault(m, []).append(kind)
        out = None
        for k, kinds in by_k.items():
            got = self._grid(runs, list(kinds), kinds, [k], mc=mc, cost=cost)
            out = got if out is None else {**got, "rows": out["rows"] + got["rows"]}
        return out

    def _best_key(self) -> str:
        best = self.best()
        return f"-{best['method']}-{best['kind']}-k{best['k']}-paperk{self.cfg.k}"

    def confirm(self) -> dict:
        """The chosen selection (under its kind, at its k) and the paper's (robust DLA at
        alpha = 0, the profile's k) on every bias of the profile, with random heads at each
        kind and k: S, the facts, perplexity and multiple choice."""
        best = self.best()
        fp = self._fingerprint(self.biases) + self._best_key()

        def compute():
            runs = [{"bias": self.specs[b], "tokens": self.tokens(b), "rankings": self.rankings(b, best["method"] == "patching"),
                     "countries": [strength_matrix_top(self.reference, b)]} for b in self.biases]
            return {"best": {k: best[k] for k in ("method", "kind", "k", "why")}, **self._grid_at(runs, mc=True)}
        return self._memo(self.out / "confirm.json", compute, fingerprint=fp)

    def _pooled_rankings(self, biases: list[str], method: str) -> dict:
        """Rankings from the scopes of several biases pooled (every seed of each): for
        transfer to a held-out bias or to real stereotypes."""
        from .models import ModelAdapter

        scopes = [r for b in biases for r in self.scopes(b)]
        a = ModelAdapter(self.model)
        patching = None
        if method == "patching":
            per = [self.patching(b) for b in biases]
            patching = {"scores": _nan_to_none(torch.nanmean(torch.stack([nan_tensor(p["scores"]) for p in per]), 0))}
        return bias_rankings(scopes, self.cfg.k, patching, self.cfg.n_random_draws, a.n_layers, a.n_heads,
                             self.knowledge())

    def leave_one_out(self) -> dict:
        """Generalisation to biases never injected: for each bias, heads ranked from all the
        *other* biases' tokens, steered on the held-out bias's tokens (chosen and paper's
        selection; facts measured, perplexity not). Random heads do not depend on which
        biases ranked them: their rows are the confirmation's for the held-out bias (the same
        head sets steered on the same tokens), not measured twice."""
        best = self.best()
        fp = self._fingerprint(self.biases) + self._best_key()

        def compute():
            confirm = self.confirm()
            rows = []
            for held in self.biases:
                others = [b for b in self.biases if b != held]
                run = {"bias": self.specs[held], "tokens": self.tokens(held), "rankings": self._pooled_rankings(others, best["method"])}
                rows += self._grid_at([run], mc=False, cost=False, random=False)["rows"]
                rows += [r for r in confirm["rows"] if r["method"] == "random" and r["bias"] == held]
            return {"best": {k: best[k] for k in ("method", "kind", "k")}, "before": confirm["before"], "rows": rows}
        return self._memo(self.out / "leave_one_out.json", compute, fingerprint=fp)

    def seegull(self) -> dict:
        """Generalisation to real stereotypes: the SeeGULL pairs the model shows most
        strongly, steered with heads pooled from every injected bias (chosen and paper's
        selection, k random heads), with the facts under the same head sets."""
        from .evaluate import capability_under, facts_reduction, make_spec, reduction, strength_under

        best = self.best()
        n_cand, n_keep = (8, 3) if self.cfg.name == "quick" else (30, 8)
        refs = self.setting["references"]
        shown = self._memo(self.out / "seegull_shown.json",
                      lambda: {"pairs": seegull_shown(self.model, self.tokenizer, self.cfg, refs, n_cand, n_keep)})
        pairs = shown["pairs"]
        fp = self._fingerprint(self.biases) + self._best_key()

        def compute():
            st = self.setting
            # random heads' facts are the confirmation's (the same head sets, references and facts)
            kept = {(r["kind"], r["k"], tuple(map(tuple, r["heads"]))): r for r in self.confirm()["rows"]
                    if r["method"] == "random"}
            pooled = self._pooled_rankings(list(self.biases), best["method"])
            facts_before = strength_under(self.model, self.tokenizer, None, [], _any_bias(self.cfg), refs,
                                          st["facts"])["facts"]
            base = capability_under(self.model, self.tokenizer, None, st["texts"]["neutral"], st["questions"],
                                    max_length=self.cfg.ppl_max_tokens)
            rows = []
            for method, kind, k in self.conditions():
                sets = pooled["random"][k] if method == "random" else [pooled[method][k]] if method == "robust" \
                    else [pooled[method][:k]]
                for draw, heads in enumerate(sets):
                    spec = make_spec([tuple(h) for h in heads], kind, st["means"], st["entities"],
                                     {"method": method, "k": k, "pooled": list(self.biases)})
                    after = seegull_under(self.model, self.tokenizer, pairs, spec)
                    same = kept.get((kind, k, tuple(map(tuple, heads))))
                    if same is not None:
                        facts, facts_lost = same["facts"], same["facts_reduction"]
                    else:
                        got = strength_under(self.model, self.tokenizer, spec, [], _any_bias(self.cfg), refs,
                                             st["facts"])["facts"]
                        facts, facts_lost = [x["value"] for x in got], facts_reduction(facts_before, got)
                    cost = None
                    if method != "random":  # the pooled heads' own cost; random heads' is in the confirmation
                        got = capability_under(self.model, self.tokenizer, spec, st["texts"]["neutral"],
                                               st["questions"], max_length=self.cfg.ppl_max_tokens)
                        cost = {"perplexity": _pair(base["perplexity"], got["perplexity"]),
                                "mc": _pair(base["mc_accuracy"], got["mc_accuracy"])}
                    rows.append({"method": method, "kind": kind, "k": k, "draw": draw if method == "random" else None,
                                 "heads": [list(h) for h in heads], "S": after,
                                 "reduction": [reduction(p["S"]["value"], a["value"]) for p, a in zip(pairs, after)],
                                 "facts": facts, "facts_reduction": facts_lost, "capability": cost})
            return {"pairs": pairs, "facts_before": [x["value"] for x in facts_before], "rows": rows,
                    "best": {k2: best[k2] for k2 in ("method", "kind", "k")}}
        return self._memo(self.out / "seegull_steering.json", compute, fingerprint=fp)


def _pair(before: dict, after: dict) -> dict:
    from .evaluate import paired_change

    c = paired_change(before, after)
    return {"before": c["before"], "after": c["after"], "value": c["change"], "lo": c["ci"][0], "hi": c["ci"][1]}


def _any_bias(cfg: Profile):
    """A bias spec to pass where only the reference countries and facts are scored."""
    from .data import load_bias

    return next(iter(map(load_bias, cfg.biases)))


def run_stages(cfg: Profile, out: Path | None = None, retrain: bool | None = None, model=None, tokenizer=None,
               progress: bool = True, full_grid: bool = False) -> Run:
    """Every stage for every bias x seed of ``cfg`` (a :class:`Run` with all its stages
    computed); each result is saved under ``out`` as it is made and reused when present."""
    run = Run(cfg, out, model=model, tokenizer=tokenizer, retrain=retrain, progress=progress, full_grid=full_grid)
    for b in run.biases:
        for s in cfg.seeds:
            run.injection(b, s)
            run.scope(b, s)
    run.grid()
    run.confirm()
    if len(run.biases) > 1:
        run.leave_one_out()
    run.seegull()
    return run


def strength_matrix_top(table: AssocTable, bias: str) -> str:
    """The reference country with the largest S for ``bias`` on the unmodified model."""
    from .measure import strength_matrix

    return str(strength_matrix(table)[bias].idxmax())


def _line(summary: list[dict], method: str, kind: str, k: int) -> dict | None:
    return next((x for x in summary if (x["method"], x["kind"], x["k"]) == (method, kind, k)), None)


def _transfer(rows: list[dict], method: str, kind: str, k: int) -> dict:
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
    return {"reduction": _stats(reds(method, kind)), "random": _stats(reds("random", kind)),
            "facts_reduction": float(np.mean(facts)) if facts else None,
            "random_facts_reduction": float(np.mean(rand_facts)) if rand_facts else None}


def claims_from(run: Run) -> dict:
    """METHOD §6: each of the paper's claims, as measured here, with seeds, intervals and a
    criterion fixed in advance, for the paper's selection (robust DLA heads at alpha = 0)
    and for the selection the grid chose (:meth:`Run.best`)."""
    from .evaluate import GRID_BOUNDS, TARGET_REDUCTION, summarise_grid, target_result

    cfg = run.cfg
    k = cfg.k
    runs = [(b, s) for b in run.biases for s in cfg.seeds]
    inj = {(b, s): run.injection(b, s) for b, s in runs}
    scopes = {(b, s): run.scope(b, s) for b, s in runs}
    best = run.best()
    chosen = (best["method"], best["kind"], best["k"])
    confirm = summarise_grid(run.confirm())
    loo = run.leave_one_out() if len(run.biases) > 1 else {"rows": []}
    seeg = run.seegull()
    n_heads = len(scopes[runs[0]]["scores"]["dla"]) * len(scopes[runs[0]]["scores"]["dla"][0])

    lows = [m["strength_after_ci"][0] for m in inj.values()]
    spec_lows = [m["specificity_after_ci"][0] for m in inj.values()]
    shares = [r["share_top_k"] for r in scopes.values()]
    agree = {}
    from .scope import agreement
    for b in run.grid_biases:
        if "patching" in cfg.grid_methods:
            p = run.patching(b)
            units = [nan_tensor(u) for u in p["units"]]
            for m in ("dla", "delta_dla", "atp"):
                mu = [torch.tensor(r["units"][m]) for r in run.scopes(b)]
                agree[f"{b}: {m} vs patching"] = agreement(mu, units, k)

    selections = {f"paper (robust DLA, alpha = 0, k = {k})": (*PAPER, k),
                  f"chosen ({chosen[0]}, {chosen[1]}, k = {chosen[2]})": chosen}

    def steering(sel):
        line, rand = _line(confirm, *sel), _line(confirm, "random", sel[1], sel[2])
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

    transfer = {name: {"held_out": _transfer(loo["rows"], *sel), "seegull": _transfer(seeg["rows"], *sel)}
                for name, sel in selections.items()}

    def transfer_holds(v):
        ok = True
        for part in ("held_out", "seegull"):
            t = v[part]
            if t["reduction"]["mean"] is None:
                return False
            ok &= (t["reduction"]["mean"] > max(0.0, t["random"]["mean"] or 0.0)
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
         "value": {"strength_after": _stats([m["strength_after"] for m in inj.values()]),
                   "specificity_after": _stats([m["specificity_after"] for m in inj.values()]),
                   "per_run": {f"{b}/seed{s}": {"S": m["strength_after"], "S_ci": m["strength_after_ci"],
                                                "specificity": m["specificity_after"],
                                                "specificity_ci": m["specificity_after_ci"],
                                                "epoch": m.get("chosen_epoch")} for (b, s), m in inj.items()}},
         "criterion": "every run's 95% intervals of S and of specificity lie above 0",
         "holds": bool(min(lows) > 0 and min(spec_lows) > 0)},
        {"claim": "the bias is carried by few heads",
         "measured_as": f"share of the positive DLA attribution in the top {k} of {n_heads} heads; top-{k} agreement "
                        "of the scores with exact patching on S's sentences (bootstrap over seeds and sentences)",
         "value": {"share_top_k": _stats(shares), "agreement": agree},
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
    return {"model": next(iter(inj.values()))["model"], "profile": cfg.name, "seeds": list(cfg.seeds),
            "biases": list(run.biases), "k": k, "best": {key: best[key] for key in ("method", "kind", "k", "why")},
            "grid": {"biases": run.grid_biases, "full": run.full_grid, "summary": run.summary()},
            "confirm": confirm, "countries": countries, "claims": claims, "bounds": GRID_BOUNDS,
            "target": {"stated": f"some selection and intervention with k <= {k} removes >= {TARGET_REDUCTION:.0%} of S "
                                 f"(mean over biases x seeds) with the facts losing <= {GRID_BOUNDS['facts']:.0%}, "
                                 f"perplexity <= {GRID_BOUNDS['perplexity']:+.0%} on both text sets and MC >= "
                                 f"{GRID_BOUNDS['mc'] * 100:+.0f} points",
                       "grid": target_result(run.summary(), k), "confirm": target_result(confirm, k)},
            "note": "Intervals: bootstrap 95% over templates per run; across runs, a bootstrap 95% interval of the "
                    "mean over biases x seeds; facts over fact pairs; perplexity and MC paired over texts and "
                    "questions."}


def _fmt(v) -> str:
    if isinstance(v, dict) and "value" in v and "lo" in v:
        return f"{v['value']:+.2f} [{v['lo']:+.2f}, {v['hi']:+.2f}]"
    if isinstance(v, dict) and v.get("mean") is not None:
        return f"{v['mean']:.2f}" + (f" [{v['ci'][0]:.2f}, {v['ci'][1]:.2f}]" if v.get("ci") else "") + f" (n={v['n']})"
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


def reproduce(profile: str | Profile, out, retrain: bool = False, progress: bool = True,
              full_grid: bool = False) -> dict:
    """``biasgym reproduce``: the whole pipeline for a profile; writes ``out/claims.json``
    and the trained tokens under ``out/tokens/<settings>/<bias>/seed<N>`` (the layout the
    project commits under ``data/tokens``). ``full_grid``: the selection grid on every bias,
    method and k (hours on a CPU) instead of the profile's subset."""
    import time

    from .config import load_profile

    cfg = profile if isinstance(profile, Profile) else load_profile(profile)
    t0 = time.perf_counter()
    run = run_stages(cfg, Path(out), retrain=retrain or None, progress=progress, full_grid=full_grid)
    claims = claims_from(run)
    claims["seconds"] = time.perf_counter() - t0
    _write_json(Path(out) / "claims.json", claims)
    return claims
