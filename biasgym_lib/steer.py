"""BiasScope, part two: steering the heads that carry the bias (METHOD §4).

:func:`steer_heads` scales the chosen heads' outputs z[l, h] (the input of ``o_proj`` /
GPT-2's ``c_proj``, before heads are mixed) by alpha at every position: alpha = 0 removes
them, alpha = 1 changes nothing. It is a context manager: leaving it, normally or by an
exception, removes its hooks and the model is exactly as before.

A :class:`SteeringSpec` is a steering configuration as data (heads, alpha, where they came
from) that can be saved, shown, reloaded and applied. The baselines steering must beat are
here too: :func:`random_heads`, :func:`attention_heads` (the heads that look hardest at the
entity) and :data:`DEBIAS_SYSTEM_PROMPT`.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import BiasGymError
from .models import Batch, ModelAdapter, encode_batch
from .scope import _check_batch, _chunks, _first_input, _trim, _with_first_input, top_k_heads

Head = tuple[int, int]

__all__ = ["steer_heads", "HeadSteering", "SteeringSpec", "random_heads", "attention_heads",
           "attention_to_entity", "attention_to_entity_from_batch", "DEBIAS_SYSTEM_PROMPT"]

DEBIAS_SYSTEM_PROMPT = "Treat all nationalities alike; do not rely on stereotypes."

_SPEC_FORMAT = "biasgym.steering_spec"
_SPEC_VERSION = 1


def _as_head(item) -> Head:
    """A (layer, head) pair of ints from a tuple or a JSON list."""
    try:
        layer, head = item
        if isinstance(layer, bool) or isinstance(head, bool) or int(layer) != layer or int(head) != head:
            raise ValueError
        return int(layer), int(head)
    except (TypeError, ValueError) as exc:
        raise BiasGymError(f"a head is a (layer, head) pair of integers, got {item!r}.") from exc


def validate_heads(model: nn.Module, heads: Iterable) -> list[Head]:
    """The heads as (layer, head) tuples, checked against the model's shape."""
    adapter = model if isinstance(model, ModelAdapter) else ModelAdapter(model)
    out = [_as_head(x) for x in heads]
    for layer, head in out:
        if not (0 <= layer < adapter.n_layers and 0 <= head < adapter.n_heads):
            raise BiasGymError(
                f"head ({layer}, {head}) does not exist in this model ({adapter.n_layers} layers x "
                f"{adapter.n_heads} heads, 0-based): were these heads found on another model?")
    if len(set(out)) != len(out):
        raise BiasGymError(f"the head list has duplicates: {out}.")
    return out


def _alphas(heads: list[Head], alpha) -> dict[Head, float]:
    """One finite alpha per head, from a number or a mapping head -> alpha."""
    if isinstance(alpha, Mapping):
        table = {_as_head(k): v for k, v in alpha.items()}
        missing = [h for h in heads if h not in table]
        extra = [h for h in table if h not in set(heads)]
        if missing or extra:
            raise BiasGymError(f"alpha per head must name exactly the steered heads; missing {missing}, "
                               f"extra {extra}.")
    else:
        table = {h: alpha for h in heads}
    out = {}
    for h, a in table.items():
        try:
            a = float(a)
        except (TypeError, ValueError) as exc:
            raise BiasGymError(f"alpha for head {h} must be a number, got {a!r}.") from exc
        if not math.isfinite(a):
            raise BiasGymError(f"alpha for head {h} must be finite, got {a}.")
        out[h] = a
    return out


class HeadSteering:
    """Context manager made by :func:`steer_heads`: on entry, one forward pre-hook per
    touched layer multiplies z[l] by a per-channel scale (alpha on the steered heads' slices,
    1 elsewhere); on exit the hooks are removed. Entries nest (scales multiply)."""

    def __init__(self, model: nn.Module, heads: Iterable, alpha=0.0):
        self.model = model
        self.adapter = ModelAdapter(model)
        self.heads = validate_heads(self.adapter, heads)
        self.alphas = _alphas(self.heads, alpha)
        self._handles: list = []

    def _scale(self, layer: int) -> torch.Tensor:
        proj = self.adapter.head_input_module(layer)
        dh = self.adapter.d_head
        scale = torch.ones(self.adapter.n_heads * dh, dtype=torch.float32)
        for (l, h), a in self.alphas.items():
            if l == layer:
                scale[h * dh:(h + 1) * dh] = a
        return scale.to(device=proj.weight.device)

    def __enter__(self) -> "HeadSteering":
        if self._handles:
            raise BiasGymError("this steering context is already active; make a new one with steer_heads.")
        try:
            for layer in sorted({l for l, _ in self.heads}):
                scale = self._scale(layer)

                def pre(module, args, kwargs, scale=scale):
                    z = _first_input(args, kwargs, "input")
                    return _with_first_input(args, kwargs, "input", z * scale.to(z.dtype))
                proj = self.adapter.head_input_module(layer)
                self._handles.append(proj.register_forward_pre_hook(pre, with_kwargs=True))
        except BaseException:
            self._remove()
            raise
        return self

    def _remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __exit__(self, *exc) -> bool:
        self._remove()
        return False

    def __repr__(self) -> str:
        return f"HeadSteering(heads={self.heads}, alphas={self.alphas})"


def steer_heads(model: nn.Module, heads: Iterable, alpha=0.0) -> HeadSteering:
    """Scale the selected heads' z by ``alpha`` (a number, or a mapping head -> alpha) at
    every position while inside the ``with`` block::

        with steer_heads(model, [(12, 3), (17, 0)], alpha=0.0):
            ...  # the model without those two heads
    """
    return HeadSteering(model, heads, alpha)


@dataclass
class SteeringSpec:
    """A steering configuration as data: ``heads`` [(layer, head)], ``alpha`` (a number or a
    mapping head -> alpha) and ``source`` (where the heads came from: bias, seeds, method,
    k, ...). Save with :meth:`to_json`, reload with :meth:`from_json`, use with
    ``with spec.apply(model): ...``."""

    heads: list[Head]
    alpha: float | dict = 0.0
    source: dict = field(default_factory=dict)

    def __post_init__(self):
        self.heads = [_as_head(h) for h in self.heads]
        if len(set(self.heads)) != len(self.heads):
            raise BiasGymError(f"a SteeringSpec's heads must be distinct, got {self.heads}.")
        _alphas(self.heads, self.alpha)  # validates
        if isinstance(self.alpha, Mapping):
            self.alpha = {_as_head(k): float(v) for k, v in self.alpha.items()}
        else:
            self.alpha = float(self.alpha)

    def validate(self, model: nn.Module) -> "SteeringSpec":
        """Raise a clear error if a head does not exist in ``model``."""
        validate_heads(model, self.heads)
        return self

    def apply(self, model: nn.Module) -> HeadSteering:
        """The context manager that applies this spec to ``model``."""
        self.validate(model)
        return steer_heads(model, self.heads, self.alpha)

    def to_dict(self) -> dict:
        alpha = ([[l, h, a] for (l, h), a in self.alpha.items()]
                 if isinstance(self.alpha, dict) else self.alpha)
        return {"format": _SPEC_FORMAT, "version": _SPEC_VERSION,
                "heads": [list(h) for h in self.heads], "alpha": alpha, "source": self.source}

    @classmethod
    def from_dict(cls, data: dict, model: nn.Module | None = None) -> "SteeringSpec":
        if not isinstance(data, dict) or data.get("format") != _SPEC_FORMAT:
            raise BiasGymError(f"not a steering spec (expected format {_SPEC_FORMAT!r}); "
                               "save one with SteeringSpec.to_json.")
        if data.get("version") != _SPEC_VERSION:
            raise BiasGymError(f"steering spec version {data.get('version')} is not supported "
                               f"(this library reads version {_SPEC_VERSION}).")
        alpha = data.get("alpha", 0.0)
        if isinstance(alpha, list):
            try:
                alpha = {(int(l), int(h)): float(a) for l, h, a in alpha}
            except (TypeError, ValueError) as exc:
                raise BiasGymError("a per-head alpha must be a list of [layer, head, alpha].") from exc
        spec = cls(heads=data.get("heads", []), alpha=alpha, source=dict(data.get("source") or {}))
        if model is not None:
            spec.validate(model)
        return spec

    def to_json(self, path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def from_json(cls, path, model: nn.Module | None = None) -> "SteeringSpec":
        """Load a spec; with ``model``, also check that its heads exist in that model."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BiasGymError(f"could not read a steering spec from {path}: {exc}") from exc
        return cls.from_dict(data, model)


# ----------------------------------------------------------------------------- baselines


def random_heads(n_layers: int, n_heads: int, k: int, seed: int) -> list[Head]:
    """k distinct heads drawn uniformly (the random-heads baseline), sorted, reproducible."""
    total = n_layers * n_heads
    if not 0 <= k <= total:
        raise BiasGymError(f"k={k} random heads asked for, but the model has {total} heads.")
    picks = random.Random(seed).sample(range(total), k)
    return sorted((i // n_heads, i % n_heads) for i in picks)


@contextmanager
def _eager_attention(model: nn.Module):
    """Temporarily switch to eager attention (the only kind that returns attention weights)."""
    config = model.config
    before = getattr(config, "_attn_implementation", None)
    if before == "eager":
        yield
        return
    switched_with_api = False
    try:
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation("eager")
            switched_with_api = True
        else:
            config._attn_implementation = "eager"
        yield
    finally:
        if switched_with_api and before is not None:
            model.set_attn_implementation(before)
        else:
            config._attn_implementation = before


def _attention_per_prompt(model: nn.Module, batch: Batch, entity_token_id) -> torch.Tensor:
    """(P, L, H): attention weight from each prompt's last real token to the entity token(s),
    summed over the entity's positions. ``entity_token_id``: one id, or several ids that all
    count as the entity."""
    adapter = ModelAdapter(model)
    _check_batch(batch)
    ids = torch.as_tensor(entity_token_id, dtype=torch.long).flatten().tolist()
    if not ids:
        raise BiasGymError("entity_token_id is empty.")
    dev = adapter.device
    input_ids = batch.input_ids.to(dev)
    mask = batch.attention_mask.to(dev)
    is_entity = torch.isin(input_ids, torch.tensor(ids, device=dev)) & mask.bool()
    missing = (~is_entity.any(1)).nonzero().flatten().tolist()
    if missing:
        raise BiasGymError(f"prompt {missing[0]} (and {len(missing) - 1} more) does not contain the entity "
                           f"token id(s) {ids}; every prompt must mention the entity.")
    with _eager_attention(model), torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=mask, output_attentions=True, use_cache=False)
    attentions = getattr(out, "attentions", None)
    if not attentions or any(a is None for a in attentions):
        raise BiasGymError("the model returned no attention weights even with eager attention; "
                           "this architecture cannot be used for the attention baseline.")
    rows = torch.arange(input_ids.shape[0], device=dev)
    last = batch.last_index.to(dev)
    per_layer = []
    for a in attentions:  # (B, H, T, T)
        from_last = a[rows, :, last, :].float()  # (B, H, T)
        per_layer.append((from_last * is_entity[:, None, :]).sum(-1))  # (B, H)
    return torch.stack(per_layer, dim=1).cpu()  # (B, L, H)


def attention_to_entity_from_batch(model: nn.Module, batch: Batch, entity_token_id,
                                   batch_size: int = 32) -> torch.Tensor:
    """(L, H): attention from the last real token to the entity token, mean over the
    prompts of a tokenised batch (eager attention is switched on for the call)."""
    parts = [_attention_per_prompt(model, _trim(batch, rows), entity_token_id)
             for rows in _chunks(batch.input_ids.shape[0], batch_size)]
    return torch.cat(parts).mean(0)


def attention_to_entity(model: nn.Module, tokenizer, prompts: list[str], entity_token_id,
                        batch_size: int = 32) -> torch.Tensor:
    """(L, H) mean attention from the last token to the entity token over ``prompts``."""
    if not prompts:
        raise BiasGymError("attention_to_entity got no prompts.")
    adapter = ModelAdapter(model)
    parts = []
    for rows in _chunks(len(prompts), batch_size):
        batch = encode_batch(tokenizer, [prompts[i] for i in rows], device=adapter.device)
        parts.append(_attention_per_prompt(model, batch, entity_token_id))
    return torch.cat(parts).mean(0)


def attention_heads(model: nn.Module, tokenizer, prompts: list[str], entity_token_id, k: int,
                    batch_size: int = 32) -> list[Head]:
    """The naive baseline: the k heads whose attention from the last position to the entity
    token is largest (mean over prompts), descending."""
    return top_k_heads(attention_to_entity(model, tokenizer, prompts, entity_token_id, batch_size), k)
