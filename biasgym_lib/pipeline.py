"""The stages joined up: what a chapter or a CLI command runs for a profile.

Each function takes a loaded model and a :class:`~biasgym_lib.config.Profile` and returns
plain data (dicts of numbers with intervals) that can be written to JSON. Chapters call
these so that no notebook repeats another's code.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from .config import PROJECT_ROOT, Profile
from .errors import BiasGymError
from .inject import InjectedToken, TokenHook, add_token, closest_countries, initial_vector, inject_bias
from .measure import AssocTable, assoc_table, assoc_tables, rank, specificity, stereotype_strength
from .models import cache_dir, model_info

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


def scope_run(model, tokenizer, injected: InjectedToken, cfg: Profile, patching: bool = True,
              n_patch_probes: int | None = None) -> dict:
    """BiasScope for one injected token: head scores (direct logit attribution) on the
    profile's probes, the total logit difference, the decomposition error and, with
    ``patching``, activation patching from the closest-country counterfactuals and the
    Spearman correlation of the two rankings. Returns the ``head_scores.json`` content."""
    import time

    from .scope import head_scores, patch_heads, spearman

    spec = injected.spec
    t0 = time.perf_counter()
    with injected.attach(model, tokenizer):
        country = closest_countries(model, tokenizer, injected.vector, k=1)[0][0]
        prompts, counter = probe_prompts(tokenizer, spec, cfg.n_probes, country)
        biased = label_id(tokenizer, spec.label)
        adv = adversarial_labels(model, tokenizer, counter, biased)
        hs = head_scores(model, tokenizer, prompts, biased, adv)
        score_seconds = time.perf_counter() - t0
        result = {
            "bias": spec.name, "seed": injected.seed, "model": injected.model, "profile": cfg.name,
            "scores": hs.scores.tolist(), "top_heads": [list(h) for h in hs.top_heads(cfg.k)],
            "k": cfg.k, "logit_diff_total": float(hs.logit_diff.mean()),
            "logit_diff_per_probe": hs.logit_diff.tolist(),
            "per_probe_scores": hs.per_prompt.tolist(), "probes": list(prompts),
            "decomposition_error": float(hs.decomposition_error),
            "share_top_k": float(hs.share_top_k(cfg.k)), "counterfactual_country": country,
            "n_probes": len(prompts), "biased_label": tokenizer.decode([biased]),
            "adv_labels": [tokenizer.decode([a]) for a in adv], "score_seconds": score_seconds,
            "patching_spearman": None, "patching": None,
            "components": _component_summary(hs.components),
        }
        if patching:
            n = n_patch_probes or len(prompts)
            t1 = time.perf_counter()
            patched = patch_heads(model, tokenizer, prompts[:n], counter[:n], biased, adv[:n])
            result.update(patching=patched.tolist(), patching_spearman=float(spearman(hs.scores, patched)),
                          patching_probes=n, patching_seconds=time.perf_counter() - t1)
    return result


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


def _passive(hook) -> bool:
    """transformers' own hooks (installed once ``output_attentions`` is used) only record
    outputs; any other hook may change them."""
    return getattr(hook, "__module__", "").startswith("transformers.utils.output_capturing")


class ReferenceCache:
    """Scores of entities without ``<TOKEN>`` (the reference countries), kept per steering
    condition so that :func:`steered_strength` scores them once per condition, not once per
    injected token.

    The token only enters rows that contain it, so "People from Italy are ..." scores the
    same whichever token vector is attached; under the same bias, heads, alpha and context it
    can be reused. Every token of a bias shares its "before", random-head and system-prompt
    references, which is most of the steering work. The cache is bypassed while any other
    hook is on the model (an outer :func:`steer_heads`, say) and emptied when a weight is
    changed in place, so a reused score is always the one that would be measured.

    ``unsteered``: an :class:`AssocTable` of the same model (:func:`reference_table`) that
    fills the no-steering condition, so "S before" needs no new reference scores.
    ``biases``: the biases a run will steer. A condition that every bias shares (random
    heads, the debiasing prompt: ``shared=True`` in :func:`steered_strength`) is then
    scored for all of them in one pass, where each reference sentence's prefix ("People
    from Italy are") is run once for every bias's attributes.
    """

    def __init__(self, model, unsteered: AssocTable | None = None, biases=()):
        from .data import load_bias

        self.model = model
        self.biases = [load_bias(b) if isinstance(b, str) else b for b in biases]
        self._values: dict = {}
        self._stamp = _weights_stamp(model)
        self.hits = self.misses = 0
        if unsteered is not None:
            self.add_table(unsteered)

    def usable(self, model) -> bool:
        """Whether reused scores would equal fresh ones on ``model`` now."""
        if model is not self.model:
            raise BiasGymError("this ReferenceCache was made for another model: make one per model.")
        if any(not _passive(h) for m in model.modules() for h in (*m._forward_hooks.values(),
                                                                  *m._forward_pre_hooks.values())):
            return False
        stamp = _weights_stamp(model)
        if stamp != self._stamp:
            self._values.clear()
            self._stamp = stamp
        return True

    @staticmethod
    def condition(model, spec, heads, alpha, context: str = ""):
        """The key of a steering condition, or None when it cannot be keyed (alpha per head)."""
        from .data import load_templates
        from .steer import validate_heads

        try:
            alpha = float(alpha)
        except (TypeError, ValueError):
            return None
        heads = tuple(sorted(validate_heads(model, heads)))
        if not heads or alpha == 1.0:  # alpha = 1 changes nothing, bit for bit
            heads, alpha = (), 1.0
        return (spec.name, tuple(spec.attributes), tuple(load_templates()), context, heads, alpha)

    def get(self, key, entity: str):
        value = self._values.get((key, entity))
        self.hits, self.misses = self.hits + (value is not None), self.misses + (value is None)
        return value

    def put(self, key, entity: str, values: np.ndarray):
        self._values.setdefault((key, entity), values)  # a score, once used, never changes

    def add_table(self, table: AssocTable, context: str = ""):
        """Seed the unsteered condition with an :class:`AssocTable` measured on the same model
        (e.g. :func:`reference_table`), so "S before" needs no new reference scores."""
        from types import SimpleNamespace

        from .data import load_templates

        if list(table.templates) != list(load_templates()):
            return
        for b in table.biases:
            key = self.condition(self.model, SimpleNamespace(name=b, attributes=table.attributes[b]), [], 1.0, context)
            for e in table.entities:
                if e != "<TOKEN>":
                    self.put(key, e, table.values[e][b])


def steered_strength(model, tokenizer, vector, spec, references: list[str], heads=(), alpha: float = 1.0,
                     context: str = "", entities: list[str] | None = None, seed: int = 0,
                     cache: ReferenceCache | None = None, shared: bool = False) -> dict:
    """S(<TOKEN>, b) (and S for ``entities``) with ``heads`` scaled by ``alpha``; the reference
    countries are scored under the same intervention, so S stays a fair comparison.

    With a :class:`ReferenceCache` the entities other than ``<TOKEN>`` are taken from it when
    this condition was scored before, and stored when not; with ``shared`` (a condition
    every bias will ask for) they are scored for all the cache's biases at once."""
    from .measure import assoc_table
    from .steer import steer_heads

    token_id = add_token(tokenizer)
    others = [e for e in (entities or []) if e not in references] + list(references)
    key = ReferenceCache.condition(model, spec, heads, alpha, context) if cache is not None else None
    known = {}
    if key is not None and cache.usable(model):
        known = {e: v for e in others if "<TOKEN>" not in e and (v := cache.get(key, e)) is not None}
    else:
        key = None
    todo = [e for e in others if e not in known]
    specs = [spec]
    if key is not None and shared and todo:
        specs += [b for b in cache.biases if b.name != spec.name]
    with TokenHook(model, token_id, vector), steer_heads(model, list(heads), alpha):
        table = assoc_table(model, tokenizer, ["<TOKEN>"] + todo, specs, context=context)
    if key is not None:
        for s in specs:
            key_s = key if s is spec else ReferenceCache.condition(model, s, heads, alpha, context)
            for e in todo:
                if "<TOKEN>" not in e:
                    cache.put(key_s, e, table.values[e][s.name])
        table.values.update({e: {spec.name: v} for e, v in known.items()})
        table.entities += list(known)
    out = {"<TOKEN>": stereotype_strength(table, "<TOKEN>", spec.name, references, seed=seed).to_dict()}
    for e in entities or []:
        out[e] = stereotype_strength(table, e, spec.name, references, seed=seed).to_dict()
    return out


def steering_measure(model, tokenizer, tokens: dict, cfg: Profile, references: list[str],
                     scopes: dict | None = None, cache: ReferenceCache | None = None):
    """``measure(bias, k, alpha)`` for :class:`~biasgym_lib.widgets.SteeringExplorer`:
    S(<TOKEN>, bias) with the top ``k`` heads of that bias's token scaled by ``alpha``.

    ``tokens`` maps bias name to its injected token, or is a function that returns it
    (e.g. ``lambda b: get_token(model, tokenizer, b, cfg, seed)``, called once per bias on
    first use); ``scopes`` maps bias name to a :func:`scope_run` result, and any bias
    without one is scored on first use. The reference countries of each (bias, k, alpha)
    are scored once (``cache``, a new :class:`ReferenceCache` if not given)."""
    from .scope import top_k_heads

    scopes, loaded = dict(scopes or {}), {}
    cache = cache if cache is not None else ReferenceCache(model)

    def token_for(bias: str):
        if bias not in loaded:
            if callable(tokens):
                loaded[bias] = tokens(bias)
            elif bias in tokens:
                loaded[bias] = tokens[bias]
            else:
                raise BiasGymError(f"No injected token for {bias!r}; have {sorted(tokens)}.")
        return loaded[bias]

    def measure(bias: str, k: int, alpha: float) -> dict:
        token = token_for(bias)
        if bias not in scopes:
            scopes[bias] = scope_run(model, tokenizer, token, cfg, patching=False)
        heads = top_k_heads(torch.tensor(scopes[bias]["scores"]), k) if k else []
        return steered_strength(model, tokenizer, token.vector, token.spec, references, heads, alpha,
                                cache=cache)["<TOKEN>"]

    return measure


def steer_references(cfg: Profile, n: int | None = None) -> list[str]:
    """The reference countries used under steering: the first ``n`` of the reference list
    (every steered condition rescores them, so the dose-response grid uses fewer)."""
    from .data import reference_countries

    refs = reference_countries()
    return refs[: n] if n else refs


def steer_eval(model, tokenizer, injected: InjectedToken, heads, alpha: float, cfg: Profile,
               references: list[str], country: str | None = None, probes: list[str] | None = None,
               seed: int = 0, cache: ReferenceCache | None = None) -> dict:
    """S before/after steering the given heads, and the METHOD §4 baselines run the same way:
    a debiasing system prompt, k random heads (mean of ``cfg.n_random_draws`` draws) and the
    k heads with most attention from the last position to the entity token.

    Pass one ``cache`` (:class:`ReferenceCache`) to several calls on tokens of the same bias
    and the reference countries of the shared conditions are scored only once."""
    from .models import ModelAdapter
    from .steer import DEBIAS_SYSTEM_PROMPT, attention_heads, random_heads

    spec = injected.spec
    heads = [tuple(h) for h in heads]
    k = len(heads)
    ents = [country] if country else []
    cache = cache if cache is not None else ReferenceCache(model)
    run = lambda hs, a=alpha, ctx="", shared=False: steered_strength(model, tokenizer, injected.vector, spec,  # noqa: E731
                                                                     references, hs, a, ctx, ents, seed, cache, shared)
    before = run([], 1.0, shared=True)
    after = run(heads)
    adapter = ModelAdapter(model)
    draws = [run(random_heads(adapter.n_layers, adapter.n_heads, k, seed=1000 + i), shared=True)
             for i in range(cfg.n_random_draws)]
    system = run([], 1.0, DEBIAS_SYSTEM_PROMPT + " ", shared=True)
    result = {"bias": spec.name, "seed": injected.seed, "k": k, "alpha": alpha, "heads": [list(h) for h in heads],
              "references": references, "country": country,
              "token": {"before": before["<TOKEN>"], "after": after["<TOKEN>"]},
              "baselines": {
                  "system_prompt": system["<TOKEN>"],
                  "random_heads": _mean_estimate([d["<TOKEN>"] for d in draws]),
                  "random_heads_draws": [d["<TOKEN>"] for d in draws]}}
    if probes:
        with injected.attach(model, tokenizer) as hook:
            attn = attention_heads(model, tokenizer, probes, hook.token_id, k)
        result["baselines"]["attention_heads"] = run(attn)["<TOKEN>"]
        result["attention_heads"] = [list(h) for h in attn]
    if country:
        result["country_strength"] = {"before": before[country], "after": after[country],
                                      "random_heads": _mean_estimate([d[country] for d in draws]),
                                      "system_prompt": system[country]}
    b, a = before["<TOKEN>"]["value"], after["<TOKEN>"]["value"]
    result["reduction"] = 1 - a / b if b else None
    return result


def steering_frame(steers) -> "pandas.DataFrame":
    """One row per steering run (:func:`steer_eval` results): S before, and the reduction
    of S (1 - after / before) by the top heads and by each baseline."""
    import pandas as pd

    rows = []
    for e in steers:
        before = e["token"]["before"]["value"]
        conditions = {"top heads": e["token"]["after"],
                      **{n: v for n, v in e["baselines"].items() if n != "random_heads_draws"}}
        rows.append({"bias": e["bias"], "seed": e["seed"], "S before": before,
                     **{f"reduction: {n}": _reduction(before, v["value"]) for n, v in conditions.items()}})
    return pd.DataFrame(rows)


def _mean_estimate(estimates: list[dict]) -> dict:
    vals = [e["value"] for e in estimates]
    return {"value": float(np.mean(vals)), "lo": float(np.min(vals)), "hi": float(np.max(vals)),
            "n": len(vals), "interval": "min-max over draws"}


# ----------------------------------------------------------------------------- generalisation


def mean_scores(scope_results: list[dict]) -> torch.Tensor:
    """The mean head-score matrix over several BiasScope runs (biases and/or seeds)."""
    if not scope_results:
        raise BiasGymError("mean_scores needs at least one BiasScope result.")
    return torch.tensor([r["scores"] for r in scope_results]).mean(0)


def _random_draws(model, tokenizer, vector, spec, refs, k, n, entities=None, alpha=0.0, cache=None):
    from .models import ModelAdapter
    from .steer import random_heads

    a = ModelAdapter(model)
    return [steered_strength(model, tokenizer, vector, spec, refs, random_heads(a.n_layers, a.n_heads, k, 1000 + i),
                             alpha, entities=entities, cache=cache, shared=True) for i in range(n)]


def leave_one_out(model, tokenizer, tokens: dict, scopes: dict, cfg: Profile, refs: list[str],
                  steers: dict | None = None, cache: ReferenceCache | None = None) -> list[dict]:
    """Generalisation (a): for each bias, heads from the mean scores of all *other* biases
    (every seed), applied at alpha=0 to the held-out bias's tokens; with k random heads.

    ``steers`` (the :func:`steer_eval` results of the same tokens, references and k) already
    hold S before steering and under the same random draws: they are reused, not measured
    again. The held-out heads are the same for every seed of a bias, so their reference
    countries are scored once (``cache``)."""
    from .scope import top_k_heads

    cache = cache if cache is not None else ReferenceCache(model)

    biases = sorted({b for b, _ in tokens})
    if len(biases) < 2:
        raise BiasGymError("leave-one-bias-out needs at least two injected biases.")
    rows = []
    for held in biases:
        heads = top_k_heads(mean_scores([r for (b, _), r in scopes.items() if b != held]), cfg.k)
        spec = next(t.spec for (b, _), t in tokens.items() if b == held)
        for (b, seed), tok in tokens.items():
            if b != held:
                continue
            after = steered_strength(model, tokenizer, tok.vector, spec, refs, heads, 0.0, cache=cache)["<TOKEN>"]
            known = (steers or {}).get((b, seed))
            if (known and known["references"] == list(refs) and known["k"] == cfg.k and known["alpha"] == 0.0
                    and len(known["baselines"]["random_heads_draws"]) == cfg.n_random_draws):
                before = known["token"]["before"]
                rand = [d["value"] for d in known["baselines"]["random_heads_draws"]]
            else:
                before = steered_strength(model, tokenizer, tok.vector, spec, refs, cache=cache)["<TOKEN>"]
                rand = [d["<TOKEN>"]["value"] for d in _random_draws(model, tokenizer, tok.vector, spec, refs, cfg.k,
                                                                      cfg.n_random_draws, cache=cache)]
            rows.append({"held_out": held, "seed": seed, "heads": [list(h) for h in heads],
                         "before": before, "after": after, "random_mean": float(np.mean(rand)), "random": rand,
                         "reduction": _reduction(before["value"], after["value"]),
                         "random_reduction": _reduction(before["value"], float(np.mean(rand)))})
    return rows


def _reduction(before: float, after: float) -> float | None:
    return None if before <= 0 else 1 - after / before


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


def seegull_steering(model, tokenizer, pairs: list[dict], heads, cfg: Profile) -> list[dict]:
    """Generalisation (b): the injected-bias heads at alpha=0 applied to real SeeGULL
    stereotypes the model shows; S(country, attribute) before/after, and k random heads."""
    from .models import ModelAdapter
    from .steer import random_heads, steer_heads

    a = ModelAdapter(model)
    requests = [([row["country"]] + row["references"], [attribute_spec(row["attribute"])]) for row in pairs]

    def s_under(hs):  # every pair under one condition, in one scoring pass
        with steer_heads(model, hs, 0.0):
            tables = assoc_tables(model, tokenizer, requests)
        return [stereotype_strength(t, ents[0], specs[0].name, ents[1:]).to_dict()
                for t, (ents, specs) in zip(tables, requests)]

    afters = s_under(heads)
    draws = [s_under(random_heads(a.n_layers, a.n_heads, len(heads), 1000 + i)) for i in range(cfg.n_random_draws)]
    rows = []
    for j, row in enumerate(pairs):
        after, rand = afters[j], [d[j]["value"] for d in draws]
        rows.append({"country": row["country"], "attribute": row["attribute"], "identity": row["identity"],
                     "offensiveness": row["offensiveness"], "before": row["S"], "after": after,
                     "random_mean": float(np.mean(rand)), "reduction": _reduction(row["S"]["value"], after["value"]),
                     "random_reduction": _reduction(row["S"]["value"], float(np.mean(rand)))})
    return rows


def capability_change(model, tokenizer, heads, cfg: Profile, seed: int = 0) -> dict:
    """Perplexity on the neutral set and MC accuracy, before and with ``heads`` at alpha=0,
    with paired bootstrap intervals."""
    from .data.capability import load_mc, load_neutral_texts
    from .evaluate import mc_accuracy, paired_change, perplexity
    from .steer import steer_heads

    texts, questions = load_neutral_texts()[: cfg.n_ppl_texts], load_mc()[: cfg.n_mc_questions]
    ppl0, mc0 = perplexity(model, tokenizer, texts, seed=seed), mc_accuracy(model, tokenizer, questions, seed=seed)
    with steer_heads(model, heads, 0.0):
        ppl1, mc1 = perplexity(model, tokenizer, texts, seed=seed), mc_accuracy(model, tokenizer, questions, seed=seed)
    return {"perplexity": paired_change(ppl0, ppl1, seed), "mc_accuracy": paired_change(mc0, mc1, seed),
            "perplexity_ci_before": ppl0["ci"], "mc_ci_before": mc0["ci"], "chance": mc0.get("chance"),
            "n_texts": len(texts), "n_questions": len(questions)}


# ----------------------------------------------------------------------------- reproduce


def run_dir(cfg: Profile) -> Path:
    """Where a profile's stage results are kept (``runs/`` is not committed): a later
    chapter, or ``biasgym reproduce`` with the same ``--out``, reuses them."""
    from . import __version__

    key = hashlib.sha256(json.dumps([cfg.to_dict(), __version__], sort_keys=True, default=str).encode()).hexdigest()[:10]
    return PROJECT_ROOT / "runs" / f"{cfg.name}-{key}"


def token_fingerprint(token: InjectedToken) -> str:
    """A short hash of a token's vector: stage results remember which token they measured."""
    data = token.vector.detach().float().cpu().contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def _memo(path: Path, compute, token: InjectedToken | None = None, need=None, fingerprint: str | None = None):
    """The JSON at ``path`` if it is there, measured this token (or these tokens: a combined
    ``fingerprint``) and satisfies ``need``; else ``compute()``, saved there (atomically)."""
    if token is not None:
        fingerprint = token_fingerprint(token)
    if path.is_file():
        value = json.loads(path.read_text())
        if value.get("token_fingerprint") == fingerprint and (need is None or need(value)):
            return value
    value = compute()
    if fingerprint is not None:
        value["token_fingerprint"] = fingerprint
    _write_json(path, value)
    return value


def _stage_path(out, cfg: Profile, kind: str, token: InjectedToken) -> Path:
    return (Path(out) if out is not None else run_dir(cfg)) / kind / f"{token.bias}_seed{token.seed}.json"


def injection_result(model, tokenizer, token: InjectedToken, cfg: Profile, ref: AssocTable | None = None,
                     out=None) -> dict:
    """:func:`injection_metrics` for one token, kept in the run folder (``out``, default
    :func:`run_dir`) so chapters 2, 5 and 6 and ``biasgym reproduce`` measure it once."""
    return _memo(_stage_path(out, cfg, "injection", token),
                 lambda: injection_metrics(model, tokenizer, token, token.spec, cfg, ref=ref), token)


def scope_result(model, tokenizer, token: InjectedToken, cfg: Profile, patching: bool = False, out=None) -> dict:
    """:func:`scope_run` for one token, kept in the run folder; with ``patching`` a kept
    result without patching is recomputed."""
    need = (lambda r: r.get("patching") is not None) if patching else None
    return _memo(_stage_path(out, cfg, "scope", token),
                 lambda: scope_run(model, tokenizer, token, cfg, patching=patching, n_patch_probes=cfg.n_patch_probes),
                 token, need)


def steer_result(model, tokenizer, token: InjectedToken, scope: dict, cfg: Profile, ref: AssocTable,
                 references: list[str], out=None, cache: ReferenceCache | None = None) -> dict:
    """:func:`steer_eval` of a token's top heads at alpha = 0, with the baselines and the real
    country most tied to the bias (from ``ref``), kept in the run folder. Share one ``cache``
    (:class:`ReferenceCache`) between the tokens of a run."""
    country = strength_matrix_top(ref, token.bias)
    prompts, _ = probe_prompts(tokenizer, token.spec, cfg.n_probes, scope["counterfactual_country"])
    return _memo(_stage_path(out, cfg, "steer", token),
                 lambda: steer_eval(model, tokenizer, token, scope["top_heads"], 0.0, cfg, references,
                                    country=country, probes=prompts, cache=cache), token)


def _stats(values: list[float]) -> dict:
    """Mean, min, max and a bootstrap 95% interval of the mean over runs (biases x seeds)."""
    from .measure import bootstrap

    v = np.asarray([x for x in values if x is not None], dtype=float)
    if not len(v):
        return {"mean": None, "min": None, "max": None, "n": 0, "ci": None}
    est = bootstrap(v)
    return {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max()), "n": int(len(v)),
            "ci": [est.lo, est.hi]}


def run_stages(cfg: Profile, out: Path, retrain: bool | None = None, model=None, tokenizer=None,
               progress: bool = True) -> dict:
    """Every stage for every bias x seed of ``cfg``; each result is saved under ``out`` as it
    is made and reused when present, so chapters 5 and 6 share one computation."""
    from tqdm.auto import tqdm

    from .data import load_bias
    from .models import load_model
    from .scope import top_k_heads

    out = Path(out)
    if model is None:
        model, tokenizer = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    specs = {s.name: s for s in map(load_bias, cfg.biases)}  # names, or a reader's own spec files
    ref = reference_table(model, tokenizer, list(specs.values()))
    refs = steer_references(cfg, cfg.steer_references)
    cache = ReferenceCache(model, unsteered=ref, biases=list(specs.values()))
    tokens, inj, scopes, steers = {}, {}, {}, {}
    runs = [(b, s) for b in specs for s in cfg.seeds]
    for i, (b, s) in enumerate(tqdm(runs, desc="bias x seed", disable=not progress)):
        tok = get_token(model, tokenizer, specs[b], cfg, s, retrain=retrain, progress=progress)
        folder = out / "tokens" / token_settings(cfg) / b / f"seed{s}"
        if not (folder / "token.json").is_file() or not torch.equal(InjectedToken.load(folder).vector, tok.vector):
            tok.save(folder, overwrite=True)  # the layout of data/tokens, ready to commit
        tokens[b, s] = tok
        inj[b, s] = injection_result(model, tokenizer, tok, cfg, ref=ref, out=out)
        scopes[b, s] = scope_result(model, tokenizer, tok, cfg, patching=(i == 0), out=out)
        steers[b, s] = steer_result(model, tokenizer, tok, scopes[b, s], cfg, ref, refs, out=out, cache=cache)
    all_heads = top_k_heads(mean_scores(list(scopes.values())), cfg.k)
    same_heads = lambda r: r.get("heads") == [list(h) for h in all_heads]  # noqa: E731
    every = hashlib.sha256("".join(token_fingerprint(t) for _, t in sorted(tokens.items())).encode()).hexdigest()[:16]
    loo = _memo(out / "leave_one_out.json",
                lambda: {"rows": leave_one_out(model, tokenizer, tokens, scopes, cfg, refs, steers, cache)}, fingerprint=every) if len(cfg.biases) > 1 else {"rows": []}
    n_cand, n_keep = (8, 3) if cfg.name == "quick" else (30, 8)
    shown = _memo(out / "seegull_shown.json",
                  lambda: {"pairs": seegull_shown(model, tokenizer, cfg, refs, n_cand, n_keep)})
    seeg = _memo(out / "seegull_steering.json",
                 lambda: {"heads": [list(h) for h in all_heads],
                          "rows": seegull_steering(model, tokenizer, shown["pairs"], all_heads, cfg)},
                 need=same_heads)
    cap = _memo(out / "capability.json",
                lambda: {"heads": [list(h) for h in all_heads], **capability_change(model, tokenizer, all_heads, cfg)},
                need=same_heads)
    return {"profile": cfg.to_dict(), "injection": inj, "scope": scopes, "steer": steers, "leave_one_out": loo["rows"],
            "seegull_shown": shown["pairs"], "seegull": seeg["rows"], "capability": cap,
            "all_bias_heads": [list(h) for h in all_heads], "tokens": tokens}


def strength_matrix_top(table: AssocTable, bias: str) -> str:
    """The reference country with the largest S for ``bias`` on the unmodified model."""
    from .measure import strength_matrix

    return str(strength_matrix(table)[bias].idxmax())


def claims_from(stages: dict) -> dict:
    """METHOD §6: each of the paper's claims, as measured here, with seeds, intervals and an
    explicit criterion for whether it holds at this model size."""
    cfg = stages["profile"]
    inj, scopes, steers = stages["injection"], stages["scope"], stages["steer"]
    seeds = list(cfg["seeds"])
    s_after = [m["strength_after"] for m in inj.values()]
    spec_after = [m["specificity_after"] for m in inj.values()]
    lows = [m["strength_after_ci"][0] for m in inj.values()]
    shares = [r["share_top_k"] for r in scopes.values()]
    rhos = [r["patching_spearman"] for r in scopes.values() if r.get("patching_spearman") is not None]
    red = [e["reduction"] for e in steers.values()]
    rand_red = [_reduction(e["token"]["before"]["value"], e["baselines"]["random_heads"]["value"]) for e in steers.values()]
    loo = stages["leave_one_out"]
    seeg = stages["seegull"]
    cap = stages["capability"]
    k, n_heads = cfg["k"], len(scopes and next(iter(scopes.values()))["scores"]) * len(next(iter(scopes.values()))["scores"][0])
    claims = [
        {"claim": "injection elicits the bias reliably",
         "measured_as": "S(<TOKEN>, b) after injection and specificity, over biases x seeds",
         "value": {"strength_after": _stats(s_after), "specificity_after": _stats(spec_after),
                   "per_run": {f"{b}/seed{s}": {"S": m["strength_after"], "S_ci": m["strength_after_ci"],
                                                "specificity": m["specificity_after"],
                                                "specificity_ci": m["specificity_after_ci"]}
                               for (b, s), m in inj.items()}},
         "criterion": "every run's S interval lies above 0 and every specificity > 0",
         "holds": bool(min(lows) > 0 and min(spec_after) > 0)},
        {"claim": "the bias is carried by few heads",
         "measured_as": f"share of the positive head attribution in the top {k} of {n_heads} heads; "
                        "Spearman(DLA, activation patching)",
         "value": {"share_top_k": _stats(shares), "patching_spearman": _stats(rhos)},
         "criterion": f"the top {k} heads ({k / n_heads:.0%} of heads) carry >= 25% of the positive attribution on average",
         "holds": bool(np.mean(shares) >= 0.25)},
        {"claim": "steering the top heads removes the bias",
         "measured_as": f"reduction 1 - S_after/S_before of S(<TOKEN>, b) with the top {k} heads at alpha=0, "
                        "against k random heads (mean of draws)",
         "value": {"top_heads": _stats(red), "random_heads": _stats(rand_red),
                   "per_run": {f"{b}/seed{s}": {"before": e["token"]["before"], "after": e["token"]["after"],
                                                "random": e["baselines"]["random_heads"],
                                                "system_prompt": e["baselines"]["system_prompt"],
                                                "attention_heads": e["baselines"].get("attention_heads")}
                               for (b, s), e in steers.items()}},
         "criterion": "mean reduction >= 50% and larger than the random-heads reduction",
         "holds": bool(_stats(red)["mean"] is not None and _stats(red)["mean"] >= 0.5
                       and _stats(red)["mean"] > (_stats(rand_red)["mean"] or 0))},
        {"claim": "no downstream damage",
         "measured_as": "relative perplexity change on neutral text and MC accuracy change, heads from all biases at alpha=0",
         "value": {"perplexity": cap["perplexity"], "mc_accuracy": cap["mc_accuracy"]},
         "criterion": "perplexity rises by at most 5% and MC accuracy falls by at most 2 points",
         "holds": bool(cap["perplexity"]["change"] <= 0.05 and cap["mc_accuracy"]["change"] >= -0.02)},
        {"claim": "the debiasing generalises",
         "measured_as": "S reduction on held-out injected biases (heads from the other biases) and on SeeGULL "
                        "stereotypes the model shows (heads from all injected biases), against k random heads",
         "value": {"held_out": _stats([r["reduction"] for r in loo]),
                   "held_out_random": _stats([r["random_reduction"] for r in loo]),
                   "seegull": _stats([r["reduction"] for r in seeg]),
                   "seegull_random": _stats([r["random_reduction"] for r in seeg]),
                   "seegull_pairs": [{k2: r[k2] for k2 in ("country", "attribute", "before", "after", "random_mean")}
                                     for r in seeg]},
         "criterion": "mean reduction on held-out biases and on SeeGULL pairs each larger than with random heads and > 0",
         "holds": bool(loo and seeg
                       and (_stats([r["reduction"] for r in loo])["mean"] or 0) > max(0, _stats([r["random_reduction"] for r in loo])["mean"] or 0)
                       and (_stats([r["reduction"] for r in seeg])["mean"] or 0) > max(0, _stats([r["random_reduction"] for r in seeg])["mean"] or 0))},
    ]
    return {"model": next(iter(inj.values()))["model"], "profile": cfg["name"], "seeds": seeds,
            "biases": list(cfg["biases"]), "k": k, "claims": claims,
            "note": "Intervals: bootstrap 95% over templates per run; across runs, min-max and a "
                    "bootstrap 95% interval of the mean over biases x seeds (ci)."}


def _headline(value: dict) -> str:
    parts = [f"{k}: {v['mean']:.2f}" + (f" [{v['ci'][0]:.2f}, {v['ci'][1]:.2f}]" if v.get("ci") else "")
             + f" (min {v['min']:.2f}, max {v['max']:.2f}, n={v['n']})"
             for k, v in value.items() if isinstance(v, dict) and v.get("mean") is not None]
    parts += [f"{k}: {v['change']:+.3f} [{v['ci'][0]:+.3f}, {v['ci'][1]:+.3f}]"
              for k, v in value.items() if isinstance(v, dict) and "change" in v]
    return "; ".join(parts)


def claims_table(claims: dict):
    """The claims as one DataFrame: claim, measurement, headline value, criterion, holds."""
    import pandas as pd

    return pd.DataFrame([{"claim": c["claim"], "measured as": c["measured_as"], "value": _headline(c["value"]),
                          "criterion": c["criterion"], "holds here": "yes" if c["holds"] else "no"}
                         for c in claims["claims"]])


def reproduce(profile: str | Profile, out, retrain: bool = False, progress: bool = True) -> dict:
    """``biasgym reproduce``: the whole pipeline for a profile (a name, or a
    :class:`~biasgym_lib.config.Profile` with its overrides); writes ``out/claims.json``
    and the trained tokens under ``out/tokens/<settings>/<bias>/seed<N>`` (the layout the
    project commits under ``data/tokens``)."""
    import time

    from .config import load_profile

    cfg = profile if isinstance(profile, Profile) else load_profile(profile)
    t0 = time.perf_counter()
    stages = run_stages(cfg, Path(out), retrain=retrain or None, progress=progress)
    claims = claims_from(stages)
    claims["seconds"] = time.perf_counter() - t0
    _write_json(Path(out) / "claims.json", claims)
    return claims
