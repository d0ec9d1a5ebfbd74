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
from .measure import AssocTable, assoc_table, rank, specificity, stereotype_strength
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
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(table_to_json(table)))
        tmp.replace(path)
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


def committed_token_dir(bias: str, seed: int) -> Path:
    return TOKENS_DIR / bias / f"seed{seed}"


def get_token(model, tokenizer, bias, cfg: Profile, seed: int, retrain: bool | None = None,
              progress: bool = True) -> InjectedToken:
    """The injected token for (bias, seed): the committed artifact when the profile says
    so and one exists for this model, else trained now."""
    from .data import load_bias

    spec = load_bias(bias)
    folder = committed_token_dir(spec.name, seed)
    use_committed = cfg.use_committed_tokens if retrain is None else not retrain
    if use_committed and (folder / "token.json").is_file():
        meta = json.loads((folder / "token.json").read_text())
        same = (meta.get("n_paragraphs"), meta.get("epochs"), meta.get("lr")) == (cfg.n_paragraphs, cfg.epochs, cfg.lr)
        if same and meta.get("model", {}).get("revision") == model_info(model).revision:
            return InjectedToken.load(folder, model)
    return train_token(model, tokenizer, spec, cfg, seed, progress=progress)


def injection_metrics(model, tokenizer, injected: InjectedToken, bias, cfg: Profile,
                      ref: AssocTable | None = None, seed: int = 0) -> dict:
    """Before/after strength, specificity and rank for an injected token (``metrics.json``).

    "Before" is the token with its initial vector (the mean country embedding), i.e. a
    generic country; "after" is the trained vector.
    """
    from .data import load_bias, reference_countries

    spec = load_bias(bias)
    biases = list(dict.fromkeys([spec.name] + [b for b in cfg.biases if b != spec.name]))
    if spec.name not in cfg.biases and len(biases) < 2:
        biases = [spec.name] + list(cfg.biases)
    ref = ref or reference_table(model, tokenizer, biases)
    refs = reference_countries()
    start = initial_vector(model, tokenizer, injected.init)
    before = ref.merged(token_table(model, tokenizer, start, biases))
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
        "strength_after_all_biases": {b: stereotype_strength(after, tok, b, refs, seed=seed).to_dict() for b in biases},
        "closest_country": closest[0][0], "closest_countries": closest,
        "train_seconds": injected.train_seconds, "chosen_epoch": injected.epoch,
        "final_loss": injected.losses[-1] if injected.losses else None,
    }


def scope_command(*args, **kwargs):  # filled in with BiasScope
    raise BiasGymError("`biasgym scope` is not available yet in this version.")


def steer_command(*args, **kwargs):
    raise BiasGymError("`biasgym steer` is not available yet in this version.")


def reproduce(*args, **kwargs):
    raise BiasGymError("`biasgym reproduce` is not available yet in this version.")
