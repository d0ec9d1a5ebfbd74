"""BiasScope, part two: steering the heads that carry the bias (:ref:`method §4 <method-4>`).

:func:`steer_heads` scales the chosen heads' outputs z[l, h] (the input of ``o_proj`` /
GPT-2's ``c_proj``, before heads are mixed) by alpha at every position: alpha = 0 removes
them, alpha = 1 changes nothing. It is a context manager: leaving it, normally or by an
exception, removes its hooks and the model is exactly as before.

A :class:`SteeringSpec` is a steering configuration as data (heads, alpha, where they came
from) that can be saved, shown, reloaded and applied. The baselines steering must beat are
beside it: :func:`~biasgym_lib.heads.random_heads` and
:func:`~biasgym_lib.heads.attention_heads` (the heads that look hardest at the entity).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .batching import Batch, chunks, encode_batch
from .errors import BiasGymError
from .heads import Head, as_head, validate_heads
from .hooks import Hooks, run
from .models import ModelAdapter
from .tokens import add_token

__all__ = ["steer_heads", "HeadSteering", "head_means", "mean_ablate_heads", "MeanAblation",
           "entity_token_ids", "blind_heads", "EntityBlind", "SteeringSpec", "KINDS"]


_SPEC_FORMAT = "biasgym.steering_spec"
_SPEC_VERSION = 2


def _alphas(heads: list[Head], alpha) -> dict[Head, float]:
    """One finite alpha per head, from a number or a mapping head -> alpha."""
    if isinstance(alpha, Mapping):
        table = {as_head(k): v for k, v in alpha.items()}
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


class HeadEdit:
    """The shared part of :class:`HeadSteering` and :class:`MeanAblation`: a context manager
    that, on entry, hooks z at every layer holding a chosen head (with :meth:`edit`'s
    function) and, on exit, normally or by an exception, removes the hooks."""

    def __init__(self, model: nn.Module, heads: Iterable):
        self.model = model
        self.adapter = ModelAdapter(model)
        self.heads = validate_heads(self.adapter, heads)
        self._hooks = Hooks(self.adapter)

    def edit(self, layer: int):
        """The function of z[l] (B, T, H*dh) that this intervention applies at ``layer``."""
        raise NotImplementedError

    def __enter__(self):
        if self._hooks.active:
            raise BiasGymError(f"this {type(self).__name__} context is already active; make a new one.")
        try:
            for layer in sorted({l for l, _ in self.heads}):
                self._hooks.add("z", layer, self.edit(layer))
        except BaseException:
            self._hooks.remove()
            raise
        return self

    def __exit__(self, *exc) -> bool:
        self._hooks.remove()
        return False


class HeadSteering(HeadEdit):
    """Context manager made by :func:`steer_heads`: z[l] times a per-channel scale (alpha on
    the steered heads' slices, 1 elsewhere) at every touched layer. Entries nest (scales multiply)."""

    def __init__(self, model: nn.Module, heads: Iterable, alpha=0.0):
        super().__init__(model, heads)
        self.alphas = _alphas(self.heads, alpha)

    def edit(self, layer: int):
        proj = self.adapter.head_input_module(layer)
        dh = self.adapter.d_head
        scale = torch.ones(self.adapter.n_heads * dh, dtype=torch.float32)
        for (l, h), a in self.alphas.items():
            if l == layer:
                scale[h * dh:(h + 1) * dh] = a
        scale = scale.to(device=proj.weight.device)
        return lambda z: z * scale.to(z.dtype)

    def __repr__(self) -> str:
        return f"HeadSteering(heads={self.heads}, alphas={self.alphas})"


def steer_heads(model: nn.Module, heads: Iterable, alpha=0.0) -> HeadSteering:
    """Scale the selected heads' z by ``alpha`` (a number, or a mapping head -> alpha) at
    every position while inside the ``with`` block::

        with steer_heads(model, [(12, 3), (17, 0)], alpha=0.0):
            ...  # the model without those two heads
    """
    return HeadSteering(model, heads, alpha)


# ----------------------------------------------------------------------------- mean-ablation


def head_means(model: nn.Module, tokenizer, texts: list[str], batch_size: int = 8,
               max_length: int = 256) -> torch.Tensor:
    """Every head's mean output z over all real token positions of ``texts``: an
    ``(L, H*dh)`` float32 tensor (row l holds layer l's heads side by side). The reference
    distribution of mean-ablation (:ref:`method §4 <method-4>`); each text is cut to ``max_length`` tokens."""
    adapter = ModelAdapter(model)
    if not texts:
        raise BiasGymError("head_means got no texts: give the reference distribution's texts.")
    L, width = adapter.n_layers, adapter.n_heads * adapter.d_head
    sums = torch.zeros(L, width, dtype=torch.float64)
    count = 0
    state: dict = {}

    def keep(layer):
        def fn(z):
            sums[layer] += (z.double() * state["mask"][..., None]).sum((0, 1)).cpu()
        return fn
    hooks = {("z", l): keep(l) for l in range(L)}
    for rows in chunks(len(texts), batch_size):
        batch = encode_batch(tokenizer, [texts[i] for i in rows], device=adapter.device)
        cut = Batch(batch.input_ids[:, :max_length], batch.attention_mask[:, :max_length])
        state["mask"] = cut.attention_mask.to(torch.float64)
        run(adapter, cut, hooks)
        count += int(cut.attention_mask.sum())
    return (sums / count).float()


class MeanAblation(HeadEdit):
    """Context manager made by :func:`mean_ablate_heads`: the steered heads' slices of z[l]
    are replaced by their means, at every position."""

    def __init__(self, model: nn.Module, heads: Iterable, means: torch.Tensor):
        super().__init__(model, heads)
        means = torch.as_tensor(means, dtype=torch.float32)
        shape = (self.adapter.n_layers, self.adapter.n_heads * self.adapter.d_head)
        if tuple(means.shape) != shape:
            raise BiasGymError(f"means must be an (L, H*dh) = {shape} tensor (from head_means on this model), "
                               f"got shape {tuple(means.shape)}.")
        if not bool(torch.isfinite(means).all()):
            raise BiasGymError("means holds a NaN or an infinity; recompute them with head_means.")
        self.means = means

    def edit(self, layer: int):
        dh = self.adapter.d_head
        device = self.adapter.head_input_module(layer).weight.device
        cols = torch.cat([torch.arange(h * dh, (h + 1) * dh) for l, h in self.heads if l == layer])
        values = self.means[layer, cols].to(device)
        cols = cols.to(device)

        def fn(z):
            z = z.clone()
            z[..., cols] = values.to(z.dtype)
            return z
        return fn


def mean_ablate_heads(model: nn.Module, heads: Iterable, means: torch.Tensor) -> MeanAblation:
    """Replace the selected heads' z by their mean (``means`` from :func:`head_means`) at
    every position while inside the ``with`` block; leaving it restores the model exactly."""
    return MeanAblation(model, heads, means)


# ----------------------------------------------------------------------------- entity-blind heads


def entity_token_ids(tokenizer, names: Iterable[str], token: str | None = "<TOKEN>") -> dict[str, int]:
    """The token ids that count as an entity for :func:`blind_heads`: each name as one token,
    with a leading space (" Italy", mid-sentence) and without ("Italy", after a newline),
    where the tokenizer has it as a single token; plus the injected ``token``, added to the
    tokenizer if not there yet, so the set never depends on what ran before. Returns
    ``{token text: id}``."""
    out: dict[str, int] = {}
    for name in names:
        for text in (" " + name, name):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) == 1:
                out[text] = int(ids[0])
    if token:
        out[token] = int(add_token(tokenizer, token))
    if not out:
        raise BiasGymError("none of the entity names is a single token for this tokenizer.")
    return out


_BLIND_PREFIX = "biasgym_blind_"


def _blind_attention(base: str):
    """An attention function that runs ``base`` (sdpa, eager, ...) and, for the heads an
    :class:`EntityBlind` marked on the module, masks the keys at entity positions."""
    import sys

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def attention(module, query, key, value, attention_mask, **kwargs):
        original = (getattr(sys.modules[type(module).__module__], "eager_attention_forward")
                    if base == "eager" else ALL_ATTENTION_FUNCTIONS[base])
        blind = getattr(module, "_biasgym_blind", None)
        entity = blind.keys_entity if blind is not None else None
        if blind is None or entity is None or not bool(entity.any()):
            return original(module, query, key, value, attention_mask, **kwargs)
        B, H, Tq, _ = query.shape
        Tk = key.shape[2]
        if tuple(entity.shape) != (B, Tk):
            raise BiasGymError(f"entity-blind steering lost track of the entity positions ({tuple(entity.shape)} "
                               f"for {B} rows x {Tk} keys); run the whole text inside one blind_heads block.")
        low = torch.finfo(query.dtype).min
        kpos = torch.arange(Tk, device=query.device)
        qpos = kpos[Tk - Tq:]
        causal = kpos[None, :] <= qpos[:, None]  # (Tq, Tk)
        if attention_mask is None:
            base_mask = torch.where(causal, 0.0, low).to(query.dtype)[None, None]
        elif attention_mask.dtype == torch.bool:
            base_mask = torch.where(attention_mask[..., :Tk], 0.0, low).to(query.dtype)
        else:
            base_mask = attention_mask[..., :Tk].to(query.dtype)
        mask = base_mask.expand(B, H, Tq, Tk).clone()
        # a query may still read its own position; every *earlier* entity position is hidden
        hide = entity.to(query.device)[:, None, :] & (kpos[None, None, :] < qpos[None, :, None])  # (B, Tq, Tk)
        heads = blind.heads_by_layer[module.layer_idx].to(query.device)
        mask[:, heads] = torch.where(hide[:, None], torch.tensor(low, dtype=query.dtype), mask[:, heads])
        kwargs["is_causal"] = False
        return original(module, query, key, value, mask, **kwargs)
    return attention


def _register_blind(base: str) -> str:
    from transformers.masking_utils import (
        ALL_MASK_ATTENTION_FUNCTIONS,
        AttentionMaskInterface,
    )
    from transformers.modeling_utils import AttentionInterface

    name = _BLIND_PREFIX + base
    if name not in ALL_MASK_ATTENTION_FUNCTIONS:
        if base not in ALL_MASK_ATTENTION_FUNCTIONS:
            raise BiasGymError(f"entity-blind steering does not support attention implementation {base!r}; "
                               "load the model with attn_implementation='sdpa' or 'eager'.")
        AttentionInterface.register(name, _blind_attention(base))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def _cache_of(mapping) -> object | None:
    """The key/value cache passed to (or returned by) the transformer body, if any."""
    for key in ("cache", "past_key_values"):
        value = mapping.get(key) if isinstance(mapping, dict) else getattr(mapping, key, None)
        if value is not None:
            return value
    return None


class EntityBlind:
    """Context manager made by :func:`blind_heads`: the selected heads may not attend to
    entity positions (tokens in ``entity_ids``: the injected token, country names).

    An entity-specific intervention: on text without an entity the model is unchanged, bit
    for bit. Implemented as an attention function that wraps the model's own (sdpa or eager)
    and adds -inf to the blocked heads' scores at entity keys before the softmax. Entity
    positions are read from ``input_ids`` and carried along a key/value cache (also through
    :func:`~biasgym_lib.models.select_cache`), so prefix-cached scoring works inside it.
    """

    def __init__(self, model: nn.Module, heads: Iterable, entity_ids: Iterable[int]):
        self.model = model
        self.adapter = ModelAdapter(model)
        self.heads = validate_heads(self.adapter, heads)
        try:
            ids = sorted({int(i) for i in entity_ids})
        except (TypeError, ValueError) as exc:
            raise BiasGymError(f"entity_ids must be token ids (integers), got {entity_ids!r}.") from exc
        vocab = int(self.adapter.embed.weight.shape[0])
        if not ids:
            raise BiasGymError("blind_heads needs at least one entity token id (see entity_token_ids).")
        if min(ids) < 0:
            raise BiasGymError(f"entity token id {min(ids)} is negative.")
        self.entity_ids = torch.tensor(ids, dtype=torch.long)
        self.heads_by_layer = {}
        for l, h in self.heads:
            self.heads_by_layer.setdefault(l, []).append(h)
        self.heads_by_layer = {l: torch.tensor(sorted(hs)) for l, hs in self.heads_by_layer.items()}
        self.keys_entity: torch.Tensor | None = None
        self._vocab = vocab
        self._before: str | None = None
        self._hooks = Hooks(self.adapter)

    def _pre(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise BiasGymError("entity-blind steering needs input_ids (it cannot see entities in inputs_embeds).")
        now = torch.isin(ids, self.entity_ids.to(ids.device))
        cache = _cache_of(kwargs)
        past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        if past:
            before = getattr(cache, "_biasgym_entity", None)
            if before is None or before.shape != (ids.shape[0], past):
                raise BiasGymError("entity-blind steering got a key/value cache made outside it (or "
                                   "reshaped without select_cache): run the prefix inside the same blind_heads block.")
            now = torch.cat([before.to(now.device), now], dim=1)
        self.keys_entity = now

    def _post(self, module, args, kwargs, output):
        cache = _cache_of(output)
        if cache is not None and self.keys_entity is not None:
            cache._biasgym_entity = self.keys_entity

    def __enter__(self) -> "EntityBlind":
        if self._hooks.active:
            raise BiasGymError("this entity-blind context is already active; make a new one with blind_heads.")
        config = self.model.config
        self._before = getattr(config, "_attn_implementation", None) or "eager"
        base = self._before.removeprefix(_BLIND_PREFIX)
        try:
            for layer in self.heads_by_layer:
                attn = self.adapter.attn(layer)
                if getattr(attn, "_biasgym_blind", None) is not None:
                    raise BiasGymError("blind_heads blocks cannot be nested on the same layer; put all heads in one.")
                attn._biasgym_blind = self
            self.model.set_attn_implementation(_register_blind(base))
            self._hooks.add_raw(self.adapter.body, pre=self._pre, post=self._post)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> bool:
        self._hooks.remove()
        for layer in self.heads_by_layer:
            attn = self.adapter.attn(layer)
            if getattr(attn, "_biasgym_blind", None) is self:
                del attn._biasgym_blind
        if self._before is not None and self.model.config._attn_implementation != self._before:
            self.model.set_attn_implementation(self._before)
        self.keys_entity = None
        return False


def blind_heads(model: nn.Module, heads: Iterable, entity_ids: Iterable[int]) -> EntityBlind:
    """The selected heads may not attend to entity tokens (``entity_ids``, e.g. from
    :func:`entity_token_ids`) while inside the ``with`` block::

        ids = entity_token_ids(tokenizer, reference_countries()).values()
        with blind_heads(model, [(12, 3)], ids):
            ...  # head (12, 3) reads nothing from "<TOKEN>", " Italy", ... positions
    """
    return EntityBlind(model, heads, entity_ids)


# ----------------------------------------------------------------------------- specs

KINDS = ("scale", "mean", "blind")


@dataclass
class SteeringSpec:
    """A steering configuration as data (pyvene-style): ``heads`` [(layer, head)], the
    intervention ``kind`` and what it needs, and ``source`` (where the heads came from:
    bias, seeds, method, k, ...). Kinds:

    - ``"scale"``: z times ``alpha`` (a number or a mapping head -> alpha); alpha = 0 is
      zero-ablation, alpha = 1 changes nothing.
    - ``"mean"``: z replaced by ``means`` (an (L, H*dh) tensor from :func:`head_means`) over
      the reference distribution named in ``mean_source``.
    - ``"blind"``: the heads may not attend to the tokens ``entity_tokens`` ({text: id}).

    Save with :meth:`to_json`, reload with :meth:`from_json`, use with
    ``with spec.apply(model): ...``."""

    heads: list[Head]
    alpha: float | dict = 0.0
    source: dict = field(default_factory=dict)
    kind: str = "scale"
    means: torch.Tensor | None = None
    mean_source: str | None = None
    entity_tokens: dict | None = None

    def __post_init__(self):
        self.heads = [as_head(h) for h in self.heads]
        if len(set(self.heads)) != len(self.heads):
            raise BiasGymError(f"a SteeringSpec's heads must be distinct, got {self.heads}.")
        if self.kind not in KINDS:
            raise BiasGymError(f"kind={self.kind!r} is not a steering kind; use one of {list(KINDS)}.")
        _alphas(self.heads, self.alpha)  # validates
        if isinstance(self.alpha, Mapping):
            self.alpha = {as_head(k): float(v) for k, v in self.alpha.items()}
        else:
            self.alpha = float(self.alpha)
        if self.kind == "mean":
            if self.means is None or not self.mean_source:
                raise BiasGymError("a mean-ablation spec needs means (head_means(...)) and mean_source "
                                   "(the name of the texts they were measured on).")
            self.means = torch.as_tensor(self.means, dtype=torch.float32)
        if self.kind == "blind":
            if not self.entity_tokens:
                raise BiasGymError("an entity-blind spec needs entity_tokens ({text: id}, from entity_token_ids).")
            self.entity_tokens = {str(k): int(v) for k, v in dict(self.entity_tokens).items()}

    def validate(self, model: nn.Module) -> "SteeringSpec":
        """Raise a clear error if a head does not exist in ``model``."""
        validate_heads(model, self.heads)
        return self

    def apply(self, model: nn.Module):
        """The context manager that applies this spec to ``model``."""
        self.validate(model)
        if self.kind == "mean":
            return mean_ablate_heads(model, self.heads, self.means)
        if self.kind == "blind":
            return blind_heads(model, self.heads, self.entity_tokens.values())
        return steer_heads(model, self.heads, self.alpha)

    @property
    def first_layer(self) -> int | None:
        """The lowest layer this spec edits (None: no heads): everything below it is the
        unmodified model's (:class:`~biasgym_lib.layerskip.LayerTape`)."""
        return min((l for l, _ in self.heads), default=None)

    @property
    def label(self) -> str:
        """A short name of the intervention: "alpha=0", "mean", "blind"."""
        return {"mean": "mean", "blind": "blind"}.get(self.kind, f"alpha={self.alpha:g}"
                                                       if not isinstance(self.alpha, dict) else "alpha per head")

    def to_dict(self) -> dict:
        alpha = ([[l, h, a] for (l, h), a in self.alpha.items()]
                 if isinstance(self.alpha, dict) else self.alpha)
        out = {"format": _SPEC_FORMAT, "version": _SPEC_VERSION, "kind": self.kind,
               "heads": [list(h) for h in self.heads], "alpha": alpha, "source": self.source}
        if self.kind == "mean":
            out.update(means=self.means.tolist(), mean_source=self.mean_source)
        if self.kind == "blind":
            out["entity_tokens"] = self.entity_tokens
        return out

    def __eq__(self, other) -> bool:
        return isinstance(other, SteeringSpec) and self.to_dict() == other.to_dict()

    @classmethod
    def from_dict(cls, data: dict, model: nn.Module | None = None) -> "SteeringSpec":
        if not isinstance(data, dict) or data.get("format") != _SPEC_FORMAT:
            raise BiasGymError(f"not a steering spec (expected format {_SPEC_FORMAT!r}); "
                               "save one with SteeringSpec.to_json.")
        if data.get("version") not in (1, _SPEC_VERSION):
            raise BiasGymError(f"steering spec version {data.get('version')} is not supported "
                               f"(this library reads versions 1 and {_SPEC_VERSION}).")
        alpha = data.get("alpha", 0.0)
        if isinstance(alpha, list):
            try:
                alpha = {(int(l), int(h)): float(a) for l, h, a in alpha}
            except (TypeError, ValueError) as exc:
                raise BiasGymError("a per-head alpha must be a list of [layer, head, alpha].") from exc
        means = data.get("means")
        spec = cls(heads=data.get("heads", []), alpha=alpha, source=dict(data.get("source") or {}),
                   kind=data.get("kind", "scale"), means=None if means is None else torch.tensor(means),
                   mean_source=data.get("mean_source"), entity_tokens=data.get("entity_tokens"))
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
