"""BiasScope, part one: which attention heads carry the bias (:ref:`method §3 <method-3>`).

:func:`head_scores` -- **direct logit attribution** (DLA). One forward pass per batch
records, at the last real token, every head's output z[l, h] (the slice of the input of
``o_proj`` / GPT-2's ``c_proj``, before heads are mixed) and every other write into the
residual stream (:func:`~biasgym_lib.hooks.capture_last_position`). With the final norm
(and Gemma 2's post-attention norm) applied as a linear map whose scale is frozen from
that clean pass, the logit difference ``logit[biased] - logit[adv]`` splits *exactly* into
a sum of parts: the embeddings, one part per head, the ``o_proj`` biases, one part per
MLP, and the norm's bias. ``HeadScores.decomposition_error`` reports how exact that was.

The arithmetic is two small functions: :func:`residual_components` (captured pass ->
one residual-space vector per component) and :func:`logit_attribution` (vectors -> their
share of the logit difference); ``head_scores`` composes them through ``_dla``.
Contrastive DLA (:func:`contrastive_head_scores`) and attribute-matched DLA
(:func:`attribute_head_scores`) reuse both. Activation patching and the naive ablation
loop, the checks by intervention, are in :mod:`biasgym_lib.patching`.

Logit differences are taken *before* Gemma 2's final logit soft-capping everywhere, so
that they are a linear function of the last residual stream.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from .batching import Batch, batches, encode_batch, label_ids, n_prompts
from .data import load_templates
from .errors import BiasGymError
from .heads import Head, top_k_heads
from .hooks import (
    LastPositionCapture,
    capture_last_position,
    logit_diff_from_hidden,
    unembed_rows,
)
from .measure import template_prefix
from .models import ModelAdapter, adapter_of, model_info

__all__ = [
    "HeadScores", "residual_components", "logit_attribution", "head_scores", "mean_last_z",
    "contrastive_head_scores", "attribute_head_scores", "METHODS",
]

_SCORES_FORMAT = "biasgym.head_scores"
_SCORES_VERSION = 1


# ----------------------------------------------------------------------------- the DLA arithmetic


@torch.no_grad()
def residual_components(model, cap: LastPositionCapture) -> dict[str, torch.Tensor]:
    """Split the last residual stream into parts that add up to it exactly (float32):

    ``embed`` (P, d), ``heads`` (P, L, H, d): each head's write W_O[:, h] z[l, h],
    ``attn_bias`` (P, L, d): the o_proj bias, ``mlp`` (P, L, d). In Gemma 2 the
    post-attention norm sits between o_proj and the residual; it is applied to heads and
    bias as a linear map with its scale frozen from the clean attention output, so their
    sum is still that layer's attention write.
    """
    adapter = adapter_of(model)
    P = cap.z.shape[0]
    L, H, dh, d = adapter.n_layers, adapter.n_heads, adapter.d_head, adapter.d_model
    heads = torch.empty(P, L, H, d, dtype=torch.float32, device=cap.z.device)
    attn_bias = torch.zeros(P, L, d, dtype=torch.float32, device=cap.z.device)
    for layer in range(L):
        w = adapter.head_write_weight(layer).float().reshape(d, H, dh)
        z = cap.z[:, layer].float().reshape(P, H, dh)
        heads[:, layer] = torch.einsum("phk,dhk->phd", z, w)
        b = adapter.head_write_bias(layer)
        if b is not None:
            attn_bias[:, layer] = b.float()
        post = adapter.post_attn_norm(layer)
        if post is not None:
            scale = adapter.norm_scale(post, cap.attn_out[:, layer])  # (P, 1), frozen
            heads[:, layer] = adapter.apply_norm_linear(post, heads[:, layer], scale[:, None])
            attn_bias[:, layer] = adapter.apply_norm_linear(post, attn_bias[:, layer], scale)
            bias = adapter.norm_bias(post)
            if bias is not None:  # no such norm has one today; kept exact if one does
                attn_bias[:, layer] += bias
    return {"embed": cap.embed.float(), "heads": heads, "attn_bias": attn_bias,
            "mlp": cap.mlp_write.float()}


def logit_attribution(adapter: ModelAdapter, parts: torch.Tensor, direction: torch.Tensor,
                      scale: torch.Tensor) -> torch.Tensor:
    """Residual-space parts ``(P, ..., d)`` read out as logit-difference parts ``(P, ...)``:
    the final norm as a linear map with each prompt's ``scale`` (P, 1) frozen from the clean
    pass, then the dot product with each prompt's logit ``direction`` (P, d)."""
    extra = parts.ndim - 2
    s = scale.reshape(scale.shape[0], *([1] * extra), 1)
    v = direction.reshape(direction.shape[0], *([1] * extra), direction.shape[1])
    return (adapter.apply_norm_linear(adapter.final_norm, parts, s) * v).sum(-1)


def _final_scale(adapter: ModelAdapter, cap: LastPositionCapture) -> torch.Tensor:
    """(P, 1): the final norm's scale on the captured pass, frozen for the readout."""
    return adapter.norm_scale(adapter.final_norm, cap.final_in)


def _delta_heads(adapter: ModelAdapter, cap: LastPositionCapture, direction: torch.Tensor,
                 contrast_z: torch.Tensor) -> torch.Tensor:
    """(P, L, H): each head's write of ``z - contrast_z``, read out with this pass's frozen norm."""
    diff = replace(cap, z=cap.z.float() - contrast_z.to(cap.z.device))
    heads = residual_components(adapter, diff)["heads"]
    return logit_attribution(adapter, heads, direction.to(cap.final_in.device), _final_scale(adapter, cap)).cpu()


@dataclass
class HeadScores:
    """Direct logit attribution of ``logit[biased] - logit[adv]`` to every head.

    ``scores`` (L, H): mean over prompts; ``per_prompt`` (P, L, H); ``logit_diff`` (P):
    the model's own pre-softcap logit difference; ``components``: name -> (P,) tensor
    (``embed``, ``heads`` = all heads together, ``attn_bias.{l}``, ``mlp.{l}``,
    ``norm_bias``, and ``unembed_bias`` where lm_head has one); their sum is
    ``logit_diff`` up to ``decomposition_error`` (relative to the largest absolute ``logit_diff``).
    """

    scores: torch.Tensor
    per_prompt: torch.Tensor
    logit_diff: torch.Tensor
    components: dict[str, torch.Tensor]
    decomposition_error: float
    prompts: list[str] | None
    biased_ids: list[int]
    adv_ids: list[int]
    meta: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return int(self.scores.shape[0])

    @property
    def n_heads(self) -> int:
        return int(self.scores.shape[1])

    def top_heads(self, k: int) -> list[Head]:
        """The k heads with the largest score, in descending order."""
        return top_k_heads(self.scores, k)

    def share_top_k(self, k: int) -> float:
        """Share of the total positive head attribution that the top-k heads carry."""
        positive = self.scores.clamp(min=0)
        total = float(positive.sum())
        if total <= 0:
            return 0.0
        return float(sum(float(positive[l, h]) for l, h in self.top_heads(k))) / total

    def component_sum(self) -> torch.Tensor:
        return torch.stack(list(self.components.values())).sum(0)

    @staticmethod
    def concat(parts: Sequence["HeadScores"]) -> "HeadScores":
        """Join the results of several batches of prompts into one."""
        if not parts:
            raise BiasGymError("HeadScores.concat got nothing to join.")
        per_prompt = torch.cat([p.per_prompt for p in parts])
        logit_diff = torch.cat([p.logit_diff for p in parts])
        components = {k: torch.cat([p.components[k] for p in parts]) for k in parts[0].components}
        prompts = None if any(p.prompts is None for p in parts) else sum((p.prompts for p in parts), [])
        return HeadScores(scores=per_prompt.mean(0), per_prompt=per_prompt, logit_diff=logit_diff,
                          components=components,
                          decomposition_error=_relative_error(components, logit_diff),
                          prompts=prompts, biased_ids=sum((p.biased_ids for p in parts), []),
                          adv_ids=sum((p.adv_ids for p in parts), []), meta=dict(parts[0].meta))

    def to_dict(self) -> dict:
        return {"format": _SCORES_FORMAT, "version": _SCORES_VERSION,
                "scores": self.scores.tolist(), "per_prompt": self.per_prompt.tolist(),
                "logit_diff": self.logit_diff.tolist(),
                "components": {k: v.tolist() for k, v in self.components.items()},
                "decomposition_error": self.decomposition_error, "prompts": self.prompts,
                "biased_ids": list(self.biased_ids), "adv_ids": list(self.adv_ids),
                "meta": {k: v for k, v in self.meta.items() if k != "dla"}}

    @classmethod
    def from_dict(cls, data: dict) -> "HeadScores":
        if data.get("format") != _SCORES_FORMAT:
            raise BiasGymError(f"not a head-scores file (format {data.get('format')!r}, "
                               f"expected {_SCORES_FORMAT!r}); save one with HeadScores.to_json.")
        if data.get("version") != _SCORES_VERSION:
            raise BiasGymError(f"head-scores file version {data.get('version')} is not supported "
                               f"(this library reads version {_SCORES_VERSION}); recompute the scores.")
        t = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
        return cls(scores=t(data["scores"]), per_prompt=t(data["per_prompt"]),
                   logit_diff=t(data["logit_diff"]),
                   components={k: t(v) for k, v in data["components"].items()},
                   decomposition_error=float(data["decomposition_error"]), prompts=data["prompts"],
                   biased_ids=[int(i) for i in data["biased_ids"]],
                   adv_ids=[int(i) for i in data["adv_ids"]], meta=dict(data.get("meta") or {}))

    def to_json(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def from_json(cls, path) -> "HeadScores":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BiasGymError(f"could not read head scores from {path}: {exc}") from exc
        return cls.from_dict(data)


def _relative_error(components: dict[str, torch.Tensor], logit_diff: torch.Tensor) -> float:
    total = torch.stack([v.double() for v in components.values()]).sum(0)
    err = float((total - logit_diff.double()).abs().max())
    scale = float(logit_diff.double().abs().max())
    return err / scale if scale > 0 else err


def _dla(adapter: ModelAdapter, cap: LastPositionCapture, direction: torch.Tensor,
         bias_diff: torch.Tensor | None, target: torch.Tensor, prompts: list[str] | None,
         biased_ids: list[int], adv_ids: list[int]) -> HeadScores:
    """Split ``target`` (the model's own value of ``direction . final-norm output`` plus
    ``bias_diff``) into one part per residual-stream component, heads included."""
    parts = residual_components(adapter, cap)
    scale = _final_scale(adapter, cap)
    direction = direction.to(cap.final_in.device)
    read = {k: logit_attribution(adapter, v, direction, scale) for k, v in parts.items()}
    per_head = read["heads"]  # (P, L, H)
    comps: dict[str, torch.Tensor] = {"embed": read["embed"], "heads": per_head.sum((1, 2))}
    for layer in range(adapter.n_layers):
        comps[f"attn_bias.{layer}"] = read["attn_bias"][:, layer]
    for layer in range(adapter.n_layers):
        comps[f"mlp.{layer}"] = read["mlp"][:, layer]
    nb = adapter.norm_bias(adapter.final_norm)
    comps["norm_bias"] = (direction * nb).sum(-1) if nb is not None else torch.zeros_like(comps["embed"])
    if bias_diff is not None:
        comps["unembed_bias"] = bias_diff.to(direction.device)
    comps = {k: v.detach().cpu() for k, v in comps.items()}
    logit_diff = target.detach().float().cpu()
    per_head = per_head.detach().cpu()
    return HeadScores(scores=per_head.mean(0), per_prompt=per_head, logit_diff=logit_diff,
                      components=comps, decomposition_error=_relative_error(comps, logit_diff),
                      prompts=prompts, biased_ids=list(biased_ids), adv_ids=list(adv_ids))


def _labels(adapter: ModelAdapter, biased_ids, adv_ids, n: int):
    vocab = int(adapter.unembed.shape[0])
    return label_ids(biased_ids, n, "biased_ids", vocab), label_ids(adv_ids, n, "adv_ids", vocab)


_DLA_META = {"method": "direct_logit_attribution", "position": "last", "logits": "pre_softcap"}


@torch.no_grad()
def head_scores(model: nn.Module, tokenizer, prompts, biased_ids, adv_ids, batch_size: int = 32,
                contrast_z: torch.Tensor | None = None) -> HeadScores:
    """Direct logit attribution of ``logit[biased] - logit[adv]`` to every head (:ref:`method §3 <method-3>`).

    ``prompts``: full texts (already chat-formatted), or a tokenised, right-padded
    :class:`~biasgym_lib.batching.Batch` (then ``tokenizer`` may be None); the score is taken
    at each one's last real token. ``biased_ids`` / ``adv_ids``: one token id for all prompts
    or one per prompt. score[l, h] = mean over prompts of (W_U[biased] - W_U[adv]) .
    N(W_O[:, h] z[l, h]), N = the final norm with its scale frozen from the clean pass. One
    forward per ``batch_size`` prompts. With ``contrast_z``, see :func:`contrastive_head_scores`.
    """
    adapter = ModelAdapter(model)
    n = n_prompts(prompts, "head_scores")
    biased, adv = _labels(adapter, biased_ids, adv_ids, n)
    parts, deltas = [], []
    for rows, batch in batches(tokenizer, prompts, batch_size, adapter.device):
        cap = capture_last_position(adapter, batch)
        direction, bias_diff = unembed_rows(adapter, biased[rows], adv[rows])  # (P, d)
        target = logit_diff_from_hidden(adapter, cap.final_out, biased[rows], adv[rows])
        texts = None if isinstance(prompts, Batch) else [prompts[i] for i in rows]
        parts.append(_dla(adapter, cap, direction, bias_diff, target, texts, biased[rows].tolist(),
                          adv[rows].tolist()))
        if contrast_z is not None:
            deltas.append(_delta_heads(adapter, cap, direction, contrast_z[rows]))
    plain = parts[0] if len(parts) == 1 else HeadScores.concat(parts)
    plain.meta = {"model": model_info(model).to_dict(), **_DLA_META}
    if contrast_z is None:
        return plain
    per_prompt = torch.cat(deltas)
    return replace(plain, per_prompt=per_prompt, scores=per_prompt.mean(0),
                   meta={**plain.meta, "method": "contrastive_dla", "dla": plain})


# ----------------------------------------------------------------------------- contrastive DLA


@torch.no_grad()
def mean_last_z(model: nn.Module, tokenizer, prompt_sets: Sequence[Sequence[str]],
                batch_size: int = 32) -> torch.Tensor:
    """Every head's output z at the last real token, averaged over several aligned prompt
    sets (e.g. the same probes about each of several real countries): ``(P, L, H*dh)``."""
    if not prompt_sets or not prompt_sets[0]:
        raise BiasGymError("mean_last_z needs at least one non-empty set of prompts.")
    n = len(prompt_sets[0])
    if any(len(p) != n for p in prompt_sets):
        raise BiasGymError("every prompt set of mean_last_z must hold the same number of prompts, in the same order.")
    adapter = ModelAdapter(model)
    total = None
    for prompts in prompt_sets:
        z = torch.cat([capture_last_position(adapter, batch).z.float().cpu()
                       for _, batch in batches(tokenizer, prompts, batch_size, adapter.device)])
        total = z if total is None else total + z
    return total / len(prompt_sets)


@torch.no_grad()
def contrastive_head_scores(model: nn.Module, tokenizer, prompts: list[str], biased_ids, adv_ids,
                            contrast_z: torch.Tensor, batch_size: int = 32) -> HeadScores:
    """Contrastive DLA, ΔDLA (:ref:`method §3 <method-3>`): what each head writes towards the biased label on
    ``prompts`` *beyond* what it writes on the same prompts about real countries.

    ``contrast_z`` (P, L, H*dh): the heads' mean output on the real-country prompts, from
    :func:`mean_last_z`. ΔDLA[l, h] = mean over prompts of
    (W_U[biased] - W_U[adv]) . N(W_O[:, h] (z[l, h] - contrast_z[l, h])), with N the final
    norm frozen from *this* prompt's pass: the same readout for both terms, so that ΔDLA is
    exactly the effect of direct-path patching (:func:`direct_path_patching`). Plain DLA
    credits what a head writes for any country; S subtracts reference countries, so only
    this token-specific part can be removed by steering. The returned ``components``,
    ``logit_diff`` and ``decomposition_error`` are those of the plain DLA on ``prompts``,
    and ``meta["dla"]`` is that plain DLA (:func:`head_scores`, from the same pass).
    """
    adapter = ModelAdapter(model)
    shape = (n_prompts(prompts, "contrastive_head_scores"), adapter.n_layers, adapter.n_heads * adapter.d_head)
    if tuple(contrast_z.shape) != shape:
        raise BiasGymError(f"contrast_z must have shape {shape} (prompts x layers x heads*head size), "
                           f"got {tuple(contrast_z.shape)}: compute it with mean_last_z on the same prompts.")
    return head_scores(model, tokenizer, prompts, biased_ids, adv_ids, batch_size, contrast_z=contrast_z)


# ----------------------------------------------------------------------------- scores matched to S


@torch.no_grad()
def attribute_head_scores(model: nn.Module, tokenizer, entity: str, attributes: Sequence[str],
                          contrast: Sequence[str], templates: Sequence[str] | None = None) -> HeadScores:
    """Contrastive DLA with labels matched to S: on each template's prefix ("People from
    <TOKEN> are"), the direction is the mean over the bias's attributes of W_U[first token
    of the attribute] minus the model's expected unembedding E_p[W_U] at that position (so
    the explained quantity moves like log P(attribute's first token)); each head's write of
    z(entity) - mean z(contrast countries) is read out with the entity prompt's frozen final
    norm. One prompt per template, weighted equally, as S weights them."""
    adapter = ModelAdapter(model)
    templates = list(templates or load_templates())
    prompts = [template_prefix(t, entity) for t in templates]
    contrast_prompts = [[template_prefix(t, c) for t in templates] for c in contrast]
    first_ids = [tokenizer(" " + a, add_special_tokens=False)["input_ids"][0] for a in attributes]
    batch = encode_batch(tokenizer, prompts, device=adapter.device, add_special_tokens=True)
    cap = capture_last_position(adapter, batch)
    logits = adapter.lm_head(cap.final_out).float()  # (P, vocab), pre-softcap
    weights = -torch.softmax(logits, -1)
    weights[:, first_ids] += 1.0 / len(first_ids)
    W = adapter.unembed.float()
    direction = weights @ W  # (P, d)
    b = getattr(adapter.lm_head, "bias", None)
    bias_term = None if b is None else weights @ b.float()
    target = (logits * weights).sum(-1)
    plain = _dla(adapter, cap, direction, bias_term, target, prompts, first_ids, [])
    zc = torch.stack([capture_last_position(adapter, encode_batch(tokenizer, cp, device=adapter.device,
                                                                  add_special_tokens=True)).z.float()
                      for cp in contrast_prompts]).mean(0)
    per_prompt = _delta_heads(adapter, cap, direction, zc)
    plain.per_prompt, plain.scores = per_prompt, per_prompt.mean(0)
    plain.meta = {"model": model_info(model).to_dict(), "method": "attribute_contrastive_dla",
                  "contrast": list(contrast)}
    return plain


# ----------------------------------------------------------------------------- the stage for one token


METHODS = ("dla", "dla_chat", "delta_dla", "attr", "atp", "atp_selective", "patching", "attention", "robust",
           "robust_chat", "random")
"""Ways of ranking heads (:ref:`method §4 <method-4>`): the paper's DLA on probes that elicit the bias
(``dla``) and on its chat probes (``dla_chat``, the variant that does not elicit it),
contrastive DLA (ΔDLA), contrastive DLA with labels matched to S's attributes, attribution
patching of S, attribution patching of S minus that of country facts held out from the
knowledge control (``atp_selective``, :func:`~biasgym_lib.patching.knowledge_atp`), exact
patching on the top union, attention from the last position to the entity, the robust
overlap of DLA over seeds (the paper's selection; ``robust_chat`` on the chat probes) and
random heads."""
