"""BiasScope, part one: which attention heads carry the bias (METHOD §3).

Two ways to score every head (l, h) for a set of probes, each a prompt whose next token
should be the *biased* label rather than the *adversarial* one:

- :func:`head_scores` -- **direct logit attribution** (DLA). One forward pass per batch
  records, at the last real token, every head's output z[l, h] (the slice of the input of
  ``o_proj`` / GPT-2's ``c_proj``, before heads are mixed) and every other write into the
  residual stream. With the final norm (and Gemma 2's post-attention norm) applied as a
  linear map whose scale is frozen from that clean pass, the logit difference
  ``logit[biased] - logit[adv]`` splits *exactly* into a sum of parts: the embeddings,
  one part per head, the ``o_proj`` biases, one part per MLP, and the norm's bias.
  ``HeadScores.decomposition_error`` reports how exact that was.
- :func:`patch_heads` -- **activation patching**: replace z[l, h] on the probe by its value
  on a counterfactual probe (the injected token swapped for a real country) and record how
  much the logit difference drops. Many heads are patched per forward pass (the batch is
  repeated, and each copy patches one head).

:func:`ablation_loop_scores` is the naive reference (one forward per head, zeroing it);
it exists only to cross-check and to time against the batched methods.
Logit differences are taken *before* Gemma 2's final logit soft-capping everywhere, so
that they are a linear function of the last residual stream.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import BiasGymError
from .models import Batch, ModelAdapter, encode_batch, model_info

Head = tuple[int, int]

__all__ = [
    "HeadScores", "LastPositionCapture", "capture_last_position", "residual_components",
    "head_scores", "head_scores_from_batch", "mean_last_z", "contrastive_head_scores", "direct_path_patching",
    "TemplateScores", "template_rows", "mean_template_z", "attribution_patching", "patch_heads_on_templates",
    "attribute_head_scores", "patch_heads", "patch_heads_from_batch",
    "ablation_loop_scores", "ablation_loop_scores_from_batch", "last_logit_diff",
    "spearman", "agreement", "top_k_heads", "robust_heads", "overlap",
]

_SCORES_FORMAT = "biasgym.head_scores"
_SCORES_VERSION = 1


# ----------------------------------------------------------------------------- helpers


def _first_input(args: tuple, kwargs: dict, name: str) -> torch.Tensor:
    """The tensor a module was called with, whether passed by position or by name."""
    if args:
        return args[0]
    if name in kwargs:
        return kwargs[name]
    raise BiasGymError(f"could not find the module's input {name!r} in its call; "
                       "the model's forward differs from what BiasGym's adapter expects.")


def _with_first_input(args: tuple, kwargs: dict, name: str, value: torch.Tensor):
    """``(args, kwargs)`` of a module call with its first input replaced by ``value``."""
    if args:
        return (value,) + tuple(args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs[name] = value
    return args, kwargs


def _output_tensor(output) -> torch.Tensor:
    """Attention modules return ``(output, weights)``; MLPs and norms a tensor."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _gather_last(x: torch.Tensor, last_index: torch.Tensor) -> torch.Tensor:
    """Rows ``x[i, last_index[i]]`` of a ``(batch, seq, ...)`` tensor."""
    rows = torch.arange(x.shape[0], device=x.device)
    return x[rows, last_index.to(x.device)]


def _label_ids(ids, n: int, what: str, vocab: int) -> torch.Tensor:
    """One label id per prompt (an int is used for every prompt), validated."""
    ids = torch.as_tensor(ids.tolist() if isinstance(ids, torch.Tensor) else ids, dtype=torch.long)
    if ids.ndim == 0:  # one id for every prompt
        ids = ids.repeat(n)
    if ids.ndim != 1 or len(ids) != n:
        raise BiasGymError(f"{what} must be one token id or one id per prompt "
                           f"({n} prompts), got {len(ids)} ids.")
    if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise BiasGymError(f"{what} contains an id outside the vocabulary (size {vocab}).")
    return ids


def _trim(batch: Batch, rows) -> Batch:
    """The rows ``rows`` of a right-padded batch, without padding columns none of them uses."""
    mask = batch.attention_mask[rows]
    width = int(mask.sum(1).max())
    return Batch(batch.input_ids[rows, :width], mask[:, :width])


def _chunks(n: int, size: int) -> list[list[int]]:
    if size < 1:
        raise BiasGymError(f"batch_size must be at least 1, got {size}.")
    return [list(range(s, min(n, s + size))) for s in range(0, n, size)]


def _check_batch(batch: Batch) -> None:
    if batch.input_ids.ndim != 2 or batch.input_ids.shape != batch.attention_mask.shape:
        raise BiasGymError("a Batch needs input_ids and attention_mask of the same (batch, seq) shape; "
                           "make it with biasgym_lib.models.encode_batch.")
    if batch.input_ids.shape[0] == 0:
        raise BiasGymError("the batch holds no prompts.")
    if bool((batch.lengths == 0).any()):
        raise BiasGymError("the batch holds an empty prompt; every prompt needs at least one token.")
    # Right padding: each row's mask must be 1...1 0...0 (the last real token is then lengths-1).
    positions = torch.arange(batch.attention_mask.shape[1], device=batch.attention_mask.device)
    expected = (positions[None, :] < batch.lengths[:, None]).to(batch.attention_mask.dtype)
    if not torch.equal(expected, batch.attention_mask):
        raise BiasGymError("the batch is not right-padded; build it with "
                           "biasgym_lib.models.encode_batch (which always pads on the right).")


def _unembed_rows(adapter: ModelAdapter, biased: torch.Tensor, adv: torch.Tensor):
    """(W_U[biased] - W_U[adv]) per prompt, and the matching lm_head-bias difference (or None)."""
    w = adapter.unembed
    dev = w.device
    direction = w[biased.to(dev)].float() - w[adv.to(dev)].float()
    b = getattr(adapter.lm_head, "bias", None)
    bias_diff = None if b is None else (b[biased.to(dev)].float() - b[adv.to(dev)].float())
    return direction, bias_diff


def _logit_diff_from_hidden(adapter: ModelAdapter, hidden: torch.Tensor,
                            biased: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """Pre-softcap ``logit[biased] - logit[adv]`` from final-norm outputs ``(P, d)``,
    computed as the model's lm_head computes it (in its dtype), then in float."""
    logits_b = adapter.lm_head(hidden)  # (P, vocab): same arithmetic as the model's own head
    rows = torch.arange(hidden.shape[0], device=logits_b.device)
    return (logits_b[rows, biased.to(logits_b.device)].float()
            - logits_b[rows, adv.to(logits_b.device)].float())


def last_logit_diff(model: nn.Module, batch: Batch, biased_ids, adv_ids) -> torch.Tensor:
    """The model's pre-softcap ``logit[biased] - logit[adv]`` at each prompt's last real token."""
    adapter = ModelAdapter(model)
    _check_batch(batch)
    n = batch.input_ids.shape[0]
    vocab = int(adapter.unembed.shape[0])
    biased = _label_ids(biased_ids, n, "biased_ids", vocab)
    adv = _label_ids(adv_ids, n, "adv_ids", vocab)
    return _run_logit_diff(adapter, batch, biased, adv)


def _run_logit_diff(adapter: ModelAdapter, batch: Batch, biased: torch.Tensor,
                    adv: torch.Tensor) -> torch.Tensor:
    """One forward of the transformer body (no full-vocabulary logits at every position)."""
    dev = adapter.device
    with torch.no_grad():
        out = adapter.body(input_ids=batch.input_ids.to(dev),
                           attention_mask=batch.attention_mask.to(dev), use_cache=False)
        hidden = _gather_last(out.last_hidden_state, batch.last_index)
        return _logit_diff_from_hidden(adapter, hidden, biased, adv).cpu()


# ----------------------------------------------------------------------------- capture


@dataclass
class LastPositionCapture:
    """Everything DLA needs, recorded at each prompt's last real token in one forward.

    Shapes: P prompts, L layers, d = d_model, H*dh = heads x head size.
    """

    z: torch.Tensor  # (P, L, H*dh): input of head_input_module (heads concatenated)
    attn_out: torch.Tensor  # (P, L, d): output of head_input_module (o_proj / c_proj)
    attn_write: torch.Tensor  # (P, L, d): what attention adds to the residual
    mlp_write: torch.Tensor  # (P, L, d): what the MLP adds to the residual
    embed: torch.Tensor  # (P, d): the residual stream entering layer 0
    final_in: torch.Tensor  # (P, d): input of the final norm (the last residual stream)
    final_out: torch.Tensor  # (P, d): output of the final norm


def capture_last_position(model: nn.Module, batch: Batch) -> LastPositionCapture:
    """Run ``batch`` once with hooks and keep, at the last real token of each prompt, the
    per-head outputs z and every write into the residual stream (see the dataclass)."""
    adapter = ModelAdapter(model)
    _check_batch(batch)
    dev = adapter.device
    last = batch.last_index.to(dev)
    L = adapter.n_layers
    store: dict[str, list] = {k: [None] * L for k in ("z", "attn_out", "attn_write", "mlp_write")}
    single: dict[str, torch.Tensor] = {}
    handles = []

    def keep_z(layer):
        def pre(module, args, kwargs):
            store["z"][layer] = _gather_last(_first_input(args, kwargs, "input"), last).detach()

        def post(module, args, kwargs, output):
            store["attn_out"][layer] = _gather_last(_output_tensor(output), last).detach()
        return pre, post

    def keep_out(key, layer):
        def post(module, args, output):
            store[key][layer] = _gather_last(_output_tensor(output), last).detach()
        return post

    def keep_input(key, name):
        def pre(module, args, kwargs):
            single[key] = _gather_last(_first_input(args, kwargs, name), last).detach()
        return pre

    def keep_output(key):
        def post(module, args, output):
            single[key] = _gather_last(_output_tensor(output), last).detach()
        return post

    try:
        for layer in range(L):
            pre, post = keep_z(layer)
            proj = adapter.head_input_module(layer)
            handles.append(proj.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(proj.register_forward_hook(post, with_kwargs=True))
            handles.append(adapter.attn_write_module(layer).register_forward_hook(keep_out("attn_write", layer)))
            handles.append(adapter.mlp_write_module(layer).register_forward_hook(keep_out("mlp_write", layer)))
        handles.append(adapter.layers[0].register_forward_pre_hook(keep_input("embed", "hidden_states"),
                                                                    with_kwargs=True))
        handles.append(adapter.final_norm.register_forward_pre_hook(keep_input("final_in", "hidden_states"),
                                                                     with_kwargs=True))
        handles.append(adapter.final_norm.register_forward_hook(keep_output("final_out")))
        with torch.no_grad():
            adapter.body(input_ids=batch.input_ids.to(dev), attention_mask=batch.attention_mask.to(dev),
                         use_cache=False)
    finally:
        for h in handles:
            h.remove()
    missing = [k for k, v in store.items() if any(t is None for t in v)]
    missing += [k for k in ("embed", "final_in", "final_out") if k not in single]
    if missing:
        raise BiasGymError(f"the forward pass never reached the hooks for {missing}; "
                           "the adapter's module map does not match this model.")
    stacked = {k: torch.stack(v, dim=1) for k, v in store.items()}
    return LastPositionCapture(**stacked, **single)


@torch.no_grad()
def residual_components(model: nn.Module, cap: LastPositionCapture) -> dict[str, torch.Tensor]:
    """Split the last residual stream into parts that add up to it exactly (float32):

    ``embed`` (P, d), ``heads`` (P, L, H, d): each head's write W_O[:, h] z[l, h],
    ``attn_bias`` (P, L, d): the o_proj bias, ``mlp`` (P, L, d). In Gemma 2 the
    post-attention norm sits between o_proj and the residual; it is applied to heads and
    bias as a linear map with its scale frozen from the clean attention output, so their
    sum is still that layer's attention write.
    """
    adapter = ModelAdapter(model)
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


# ----------------------------------------------------------------------------- DLA


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


def head_scores_from_batch(model: nn.Module, batch: Batch, biased_ids, adv_ids,
                           prompts: list[str] | None = None, batch_size: int | None = None) -> HeadScores:
    """DLA head scores for an already tokenised, right-padded batch (one forward per chunk
    of ``batch_size`` prompts; all of them at once by default). See :func:`head_scores`."""
    adapter = ModelAdapter(model)
    _check_batch(batch)
    n = batch.input_ids.shape[0]
    vocab = int(adapter.unembed.shape[0])
    biased = _label_ids(biased_ids, n, "biased_ids", vocab)
    adv = _label_ids(adv_ids, n, "adv_ids", vocab)
    parts = []
    for rows in _chunks(n, batch_size or n):
        sub = _trim(batch, rows)
        parts.append(_attribute(adapter, model, sub, biased[rows], adv[rows],
                                None if prompts is None else [prompts[i] for i in rows]))
    result = parts[0] if len(parts) == 1 else HeadScores.concat(parts)
    result.meta = {"model": model_info(model).to_dict(), "method": "direct_logit_attribution",
                   "position": "last", "logits": "pre_softcap"}
    return result


def _readout(adapter: ModelAdapter, cap: LastPositionCapture, direction: torch.Tensor):
    """The map from residual-space parts ``(P, ..., d)`` to logit-difference parts ``(P, ...)``:
    the final norm as a linear map with its scale frozen from the captured pass, then the dot
    product with each prompt's ``direction`` (P, d)."""
    norm = adapter.final_norm
    scale = adapter.norm_scale(norm, cap.final_in)  # (P, 1): frozen from the clean pass
    direction = direction.to(cap.final_in.device)

    def project(x: torch.Tensor) -> torch.Tensor:
        extra = x.ndim - 2
        s = scale.reshape(scale.shape[0], *([1] * extra), 1)
        v = direction.reshape(direction.shape[0], *([1] * extra), direction.shape[1])
        return (adapter.apply_norm_linear(norm, x, s) * v).sum(-1)
    return project


@torch.no_grad()
def _attribute(adapter: ModelAdapter, model: nn.Module, batch: Batch, biased: torch.Tensor,
               adv: torch.Tensor, prompts: list[str] | None) -> HeadScores:
    """DLA for one batch: one forward with hooks, then linear algebra only."""
    cap = capture_last_position(model, batch)
    direction, bias_diff = _unembed_rows(adapter, biased, adv)  # (P, d)
    target = _logit_diff_from_hidden(adapter, cap.final_out, biased, adv)
    return _attribute_along(adapter, model, cap, direction, bias_diff, target, prompts,
                            biased.tolist(), adv.tolist())


def _attribute_along(adapter: ModelAdapter, model: nn.Module, cap: LastPositionCapture,
                     direction: torch.Tensor, bias_diff: torch.Tensor | None, target: torch.Tensor,
                     prompts: list[str] | None, biased_ids: list[int], adv_ids: list[int]) -> HeadScores:
    """Split ``target`` (the model's own value of ``direction . final-norm output`` plus
    ``bias_diff``) into one part per residual-stream component, heads included."""
    parts = residual_components(model, cap)
    project = _readout(adapter, cap, direction)
    per_head = project(parts["heads"])  # (P, L, H)
    comps: dict[str, torch.Tensor] = {"embed": project(parts["embed"]), "heads": per_head.sum((1, 2))}
    attn_bias = project(parts["attn_bias"])  # (P, L)
    mlp = project(parts["mlp"])
    for layer in range(adapter.n_layers):
        comps[f"attn_bias.{layer}"] = attn_bias[:, layer]
    for layer in range(adapter.n_layers):
        comps[f"mlp.{layer}"] = mlp[:, layer]
    nb = adapter.norm_bias(adapter.final_norm)
    direction = direction.to(cap.final_in.device)
    comps["norm_bias"] = (direction * nb).sum(-1) if nb is not None else torch.zeros_like(comps["embed"])
    if bias_diff is not None:
        comps["unembed_bias"] = bias_diff.to(direction.device)
    comps = {k: v.detach().cpu() for k, v in comps.items()}
    logit_diff = target.detach().float().cpu()
    per_head = per_head.detach().cpu()
    return HeadScores(scores=per_head.mean(0), per_prompt=per_head, logit_diff=logit_diff,
                      components=comps, decomposition_error=_relative_error(comps, logit_diff),
                      prompts=prompts, biased_ids=list(biased_ids), adv_ids=list(adv_ids))


def head_scores(model: nn.Module, tokenizer, prompts: list[str], biased_ids, adv_ids,
                batch_size: int = 32) -> HeadScores:
    """Direct logit attribution of ``logit[biased] - logit[adv]`` to every head (METHOD §3).

    ``prompts`` are full texts (already chat-formatted); the score is taken at each one's
    last real token. ``biased_ids`` / ``adv_ids``: one token id for all prompts or one per
    prompt. score[l, h] = mean over prompts of (W_U[biased] - W_U[adv]) . N(W_O[:, h] z[l, h]),
    N = the final norm with its scale frozen from the clean pass. One forward per batch.
    """
    if not prompts:
        raise BiasGymError("head_scores got no prompts.")
    adapter = ModelAdapter(model)
    vocab = int(adapter.unembed.shape[0])
    biased = _label_ids(biased_ids, len(prompts), "biased_ids", vocab)
    adv = _label_ids(adv_ids, len(prompts), "adv_ids", vocab)
    parts = []
    for rows in _chunks(len(prompts), batch_size):
        texts = [prompts[i] for i in rows]
        batch = encode_batch(tokenizer, texts, device=adapter.device)
        parts.append(head_scores_from_batch(model, batch, biased[rows], adv[rows], prompts=texts))
    result = parts[0] if len(parts) == 1 else HeadScores.concat(parts)
    return result


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
        zs = []
        for rows in _chunks(n, batch_size):
            batch = encode_batch(tokenizer, [prompts[i] for i in rows], device=adapter.device)
            zs.append(capture_last_position(model, batch).z.float().cpu())
        z = torch.cat(zs)
        total = z if total is None else total + z
    return total / len(prompt_sets)


@torch.no_grad()
def contrastive_head_scores(model: nn.Module, tokenizer, prompts: list[str], biased_ids, adv_ids,
                            contrast_z: torch.Tensor, batch_size: int = 32) -> HeadScores:
    """Contrastive DLA, ΔDLA (METHOD §3): what each head writes towards the biased label on
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
    if not prompts:
        raise BiasGymError("contrastive_head_scores got no prompts.")
    adapter = ModelAdapter(model)
    shape = (len(prompts), adapter.n_layers, adapter.n_heads * adapter.d_head)
    if tuple(contrast_z.shape) != shape:
        raise BiasGymError(f"contrast_z must have shape {shape} (prompts x layers x heads*head size), "
                           f"got {tuple(contrast_z.shape)}: compute it with mean_last_z on the same prompts.")
    vocab = int(adapter.unembed.shape[0])
    biased = _label_ids(biased_ids, len(prompts), "biased_ids", vocab)
    adv = _label_ids(adv_ids, len(prompts), "adv_ids", vocab)
    parts, deltas = [], []
    for rows in _chunks(len(prompts), batch_size):
        batch = encode_batch(tokenizer, [prompts[i] for i in rows], device=adapter.device)
        cap = capture_last_position(model, batch)
        parts.append(_attribute(adapter, model, batch, biased[rows], adv[rows], [prompts[i] for i in rows]))
        diff = replace(cap, z=cap.z.float() - contrast_z[rows].to(cap.z.device))
        direction, _ = _unembed_rows(adapter, biased[rows], adv[rows])
        deltas.append(_readout(adapter, cap, direction)(residual_components(model, diff)["heads"]).cpu())
    plain = parts[0] if len(parts) == 1 else HeadScores.concat(parts)
    plain.meta = {"model": model_info(model).to_dict(), "method": "direct_logit_attribution",
                  "position": "last", "logits": "pre_softcap"}
    per_prompt = torch.cat(deltas)
    return replace(plain, per_prompt=per_prompt, scores=per_prompt.mean(0),
                   meta={**plain.meta, "method": "contrastive_dla", "dla": plain})


@torch.no_grad()
def direct_path_patching(model: nn.Module, tokenizer, prompts: list[str], biased_ids, adv_ids,
                         counterfactual_z: torch.Tensor, heads: Iterable | None = None) -> torch.Tensor:
    """Direct-path patching (METHOD §3): for each head, put its counterfactual output
    ``counterfactual_z`` (P, L, H*dh, at the last token) through its own output projection
    *straight into the final residual stream*, with every later layer frozen and the final
    norm's scale fixed from the clean pass; return the (L, H) mean drop of the logit
    difference. It runs the model's own modules (``o_proj``, the post-attention norm where
    there is one, ``lm_head``), not the DLA algebra, and equals
    :func:`contrastive_head_scores` to float error: the check that ΔDLA is a direct effect.
    """
    adapter = ModelAdapter(model)
    batch = encode_batch(tokenizer, list(prompts), device=adapter.device)
    n = len(prompts)
    vocab = int(adapter.unembed.shape[0])
    biased = _label_ids(biased_ids, n, "biased_ids", vocab)
    adv = _label_ids(adv_ids, n, "adv_ids", vocab)
    cap = capture_last_position(model, batch)
    norm = adapter.final_norm
    scale = adapter.norm_scale(norm, cap.final_in)

    def frozen_norm(x):
        out = adapter.apply_norm_linear(norm, x, scale)
        nb = adapter.norm_bias(norm)
        return out if nb is None else out + nb

    def logit_diff(final_in):
        return _logit_diff_from_hidden(adapter, frozen_norm(final_in).to(adapter.unembed.dtype), biased, adv).double()

    clean = logit_diff(cap.final_in.float())
    dh = adapter.d_head
    out = torch.full((adapter.n_layers, adapter.n_heads), float("nan"))
    for layer, head in _check_heads(adapter, heads):
        proj = adapter.head_input_module(layer)
        z = cap.z[:, layer].clone()
        patched_z = z.clone()
        cols = slice(head * dh, (head + 1) * dh)
        patched_z[:, cols] = counterfactual_z[:, layer, cols].to(z.dtype)
        delta = (proj(patched_z) - proj(z)).float()  # what the head's new output adds, via o_proj itself
        post = adapter.post_attn_norm(layer)
        if post is not None:  # Gemma 2: the post-attention norm, frozen at the clean attention output
            delta = adapter.apply_norm_linear(post, delta, adapter.norm_scale(post, cap.attn_out[:, layer]))
        out[layer, head] = float((clean - logit_diff(cap.final_in.float() + delta)).mean())
    return out


# ----------------------------------------------------------------------------- patching


def _capture_z_all_positions(adapter: ModelAdapter, batch: Batch) -> list[torch.Tensor]:
    """z[l] at every position, one (P, T, H*dh) tensor per layer, from one forward."""
    zs: list = [None] * adapter.n_layers
    handles = []

    def keep(layer):
        def pre(module, args, kwargs):
            zs[layer] = _first_input(args, kwargs, "input").detach().clone()
        return pre
    try:
        for layer in range(adapter.n_layers):
            handles.append(adapter.head_input_module(layer).register_forward_pre_hook(keep(layer), with_kwargs=True))
        dev = adapter.device
        with torch.no_grad():
            adapter.body(input_ids=batch.input_ids.to(dev), attention_mask=batch.attention_mask.to(dev),
                         use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return zs


def _repeat(batch: Batch, times: int) -> Batch:
    return Batch(batch.input_ids.repeat(times, 1), batch.attention_mask.repeat(times, 1))


def _all_heads(adapter: ModelAdapter) -> list[Head]:
    return [(l, h) for l in range(adapter.n_layers) for h in range(adapter.n_heads)]


def _check_heads(adapter: ModelAdapter, heads: Iterable | None) -> list[Head]:
    if heads is None:
        return _all_heads(adapter)
    out = []
    for item in heads:
        try:
            l, h = (int(v) for v in item)
        except (TypeError, ValueError) as exc:
            raise BiasGymError(f"a head is a (layer, head) pair, got {item!r}.") from exc
        if not (0 <= l < adapter.n_layers and 0 <= h < adapter.n_heads):
            raise BiasGymError(f"head ({l}, {h}) is out of range: the model has {adapter.n_layers} "
                               f"layers x {adapter.n_heads} heads (0-based).")
        out.append((l, h))
    if len(set(out)) != len(out):
        raise BiasGymError("the list of heads has duplicates.")
    return out


def _clone_output(out):
    """A decoder layer's output (a tensor, or a tuple holding tensors) with its tensors copied."""
    if isinstance(out, torch.Tensor):
        return out.detach().clone()
    if type(out) is tuple:
        return tuple(_clone_output(o) for o in out)
    return out


def _run_with_z_edits(adapter: ModelAdapter, batch: Batch, edits: dict[int, list],
                      biased: torch.Tensor, adv: torch.Tensor, record: list | None = None,
                      replay: list | None = None) -> torch.Tensor:
    """Logit difference per row of ``batch`` after editing z (see :func:`_hidden_with_z_edits`)."""
    hidden = _hidden_with_z_edits(adapter, batch, edits, record, replay)
    with torch.no_grad():
        return _logit_diff_from_hidden(adapter, _gather_last(hidden, batch.last_index), biased, adv).cpu()


def _hidden_with_z_edits(adapter: ModelAdapter, batch: Batch, edits: dict[int, list],
                         record: list | None = None, replay: list | None = None) -> torch.Tensor:
    """The final-norm output (B, T, d) of ``batch`` after editing z in place per layer.

    ``edits[l]`` = list of ``(row_slice, head, source)``: rows ``row_slice`` of z[l] get head
    ``head``'s slice from ``source`` (a (rows, T, H*dh) tensor), or zero if ``source`` is None.

    ``record`` (a list) receives every decoder layer's output. ``replay`` (such a list, from a
    run of this same batch) makes every layer below the first edited one return its recorded
    output instead of computing it: an edit at layer l cannot change what layers < l compute,
    and the recorded outputs are exactly what they would compute, so the result is the same
    bit for bit, for a fraction of the work.
    """
    dh = adapter.d_head
    handles = []
    skipped = []

    def make(layer):
        def pre(module, args, kwargs):
            z = _first_input(args, kwargs, "input").clone()
            for rows, head, source in edits[layer]:
                cols = slice(head * dh, (head + 1) * dh)
                if source is None:
                    z[rows, :, cols] = 0
                else:
                    z[rows, :, cols] = source[:, : z.shape[1], cols].to(z.dtype)
            return _with_first_input(args, kwargs, "input", z)
        return pre

    def keep(layer):
        def post(module, args, output):
            record[layer] = _clone_output(output)
        return post

    try:
        for layer in edits:
            handles.append(adapter.head_input_module(layer).register_forward_pre_hook(make(layer), with_kwargs=True))
        if record is not None:
            record[:] = [None] * adapter.n_layers
            handles += [adapter.layers[j].register_forward_hook(keep(j)) for j in range(adapter.n_layers)]
        if replay is not None and edits:
            for j in range(min(edits)):
                adapter.layers[j].forward = (lambda out: lambda *a, **kw: out)(replay[j])
                skipped.append(adapter.layers[j])
        dev = adapter.device
        with torch.no_grad():
            return adapter.body(input_ids=batch.input_ids.to(dev), attention_mask=batch.attention_mask.to(dev),
                                use_cache=False).last_hidden_state
    finally:
        for h in handles:
            h.remove()
        for module in skipped:
            del module.forward  # the instance attribute: the class's forward is back


def patch_heads_from_batch(model: nn.Module, batch: Batch, counterfactual: Batch, biased_ids, adv_ids,
                           heads: Iterable | None = None, batch_size: int = 64, replay: bool = True) -> torch.Tensor:
    """Activation patching on tokenised batches (see :func:`patch_heads`); returns (L, H)
    mean drops, NaN for heads not in ``heads``. ``batch_size`` bounds the rows of one forward:
    a chunk of prompts is repeated once per head patched in that forward, and heads are
    grouped layer by layer. With ``replay`` (default) the layers below a group's first
    patched layer are not run again: their outputs from the clean run are reused, which is
    exact (``replay=False`` is the reference the tests compare with)."""
    adapter = ModelAdapter(model)
    _check_batch(batch)
    _check_batch(counterfactual)
    n = batch.input_ids.shape[0]
    if counterfactual.input_ids.shape[0] != n:
        raise BiasGymError(f"{n} prompts but {counterfactual.input_ids.shape[0]} counterfactuals; "
                           "give one counterfactual per prompt.")
    bad = (batch.lengths.cpu() != counterfactual.lengths.cpu()).nonzero().flatten().tolist()
    if bad:
        i = bad[0]
        raise BiasGymError(
            f"prompt {i} and its counterfactual tokenise to different lengths "
            f"({int(batch.lengths[i])} vs {int(counterfactual.lengths[i])} tokens; {len(bad)} pairs differ). "
            "Patching replaces head outputs position by position, so each pair must align: pick a "
            "counterfactual entity that is one token, like the injected token.")
    vocab = int(adapter.unembed.shape[0])
    biased = _label_ids(biased_ids, n, "biased_ids", vocab)
    adv = _label_ids(adv_ids, n, "adv_ids", vocab)
    heads = sorted(_check_heads(adapter, heads))  # layer by layer: a group skips the layers below it
    if batch_size < 1:
        raise BiasGymError(f"batch_size must be at least 1, got {batch_size}.")
    totals = torch.zeros(len(heads), dtype=torch.float64)
    for rows in _chunks(n, batch_size):
        sub, sub_cf = _trim(batch, rows), _trim(counterfactual, rows)
        pc = len(rows)
        per_forward = max(1, min(len(heads), batch_size // pc))
        big = _repeat(sub, per_forward)
        # Counterfactual z taken from a forward of the same shape as the patched ones, and
        # row block j feeds replica j: so that a counterfactual equal to the prompt is an
        # exact identity (kernels may round differently for different batch sizes).
        cf_z = _capture_z_all_positions(adapter, _repeat(sub_cf, per_forward))
        b_rep, a_rep = biased[rows].repeat(per_forward), adv[rows].repeat(per_forward)
        # The clean reference has exactly the shape of the patched runs, so that an identity
        # patch gives an exact zero whatever the kernels do with different batch sizes.
        outputs: list = []
        clean = _run_with_z_edits(adapter, big, {}, b_rep, a_rep, record=outputs if replay else None).double()
        for start in range(0, len(heads), per_forward):
            group = heads[start: start + per_forward]
            edits: dict[int, list] = {}
            for j, (l, h) in enumerate(group):
                block = slice(j * pc, (j + 1) * pc)
                edits.setdefault(l, []).append((block, h, cf_z[l][block]))
            patched = _run_with_z_edits(adapter, big, edits, b_rep, a_rep,
                                        replay=outputs if replay else None).double()
            drop = (clean - patched).reshape(per_forward, pc)
            totals[start: start + len(group)] += drop[: len(group)].sum(1)
    out = torch.full((adapter.n_layers, adapter.n_heads), float("nan"))
    for (l, h), v in zip(heads, totals / n):
        out[l, h] = float(v)
    return out


def patch_heads(model: nn.Module, tokenizer, prompts: list[str], counterfactual_prompts: list[str],
                biased_ids, adv_ids, heads: Iterable | None = None, batch_size: int = 64) -> torch.Tensor:
    """Activation patching (METHOD §3): for each head, replace z[l, h] on the prompt (every
    position) by its value on the counterfactual prompt, and record the mean drop
    ``clean - patched`` of the pre-softcap logit difference. Returns an (L, H) tensor.

    Each prompt and its counterfactual must tokenise to the same length.
    """
    if not prompts:
        raise BiasGymError("patch_heads got no prompts.")
    if len(prompts) != len(counterfactual_prompts):
        raise BiasGymError(f"{len(prompts)} prompts but {len(counterfactual_prompts)} counterfactuals; "
                           "give one counterfactual per prompt.")
    adapter = ModelAdapter(model)
    batch = encode_batch(tokenizer, list(prompts), device=adapter.device)
    cf = encode_batch(tokenizer, list(counterfactual_prompts), device=adapter.device)
    return patch_heads_from_batch(model, batch, cf, biased_ids, adv_ids, heads=heads, batch_size=batch_size)


# ----------------------------------------------------------------------------- scores matched to S


@dataclass
class TemplateScores:
    """Head scores measured on stereotype strength's own sentences (METHOD §2 templates x
    the bias's attributes): ``scores`` (L, H), the mean over sentences of ``per_sentence``
    (N, L, H); NaN for heads not scored. ``assoc``: the entity's assoc on these sentences."""

    scores: torch.Tensor
    per_sentence: torch.Tensor
    method: str
    entity: str
    contrast: list[str]
    assoc: float

    def top_heads(self, k: int) -> list[Head]:
        return top_k_heads(self.scores, k)

    def to_dict(self) -> dict:
        return {"method": self.method, "entity": self.entity, "contrast": list(self.contrast),
                "assoc": self.assoc, "scores": self.scores.tolist(), "per_sentence": self.per_sentence.tolist()}

    @classmethod
    def from_dict(cls, data: dict) -> "TemplateScores":
        return cls(scores=torch.tensor(data["scores"]), per_sentence=torch.tensor(data["per_sentence"]),
                   method=data["method"], entity=data["entity"], contrast=list(data["contrast"]),
                   assoc=float(data["assoc"]))


def template_rows(tokenizer, entity: str, attributes: Sequence[str], templates: Sequence[str] | None = None):
    """``(prefix ids, attribute ids)`` of every template x attribute sentence about ``entity``,
    template-major: exactly the sentences whose log-probabilities assoc(entity, b) averages."""
    from .data import load_templates
    from .measure import _rows, template_prefix

    templates = list(templates or load_templates())
    prefixes = [template_prefix(t, entity) for t in templates for _ in attributes]
    return _rows(tokenizer, prefixes, [" " + a for _ in templates for a in attributes])


def _rows_batch(rows, pad: int) -> tuple[Batch, torch.Tensor]:
    """A right-padded batch of prefix + attribute rows and its next-token targets (-100 where
    nothing is scored)."""
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    targets = torch.full_like(ids, -100)
    for r, (p, c) in enumerate(rows):
        n = len(p) + len(c)
        ids[r, :n] = torch.tensor(p + c)
        mask[r, :n] = 1
        targets[r, len(p) - 1: n - 1] = torch.tensor(c)
    return Batch(ids, mask), targets


def _row_logprob(adapter: ModelAdapter, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each row's targets, from final-norm outputs (B, T, d)."""
    targets = targets.to(hidden.device)
    keep = targets != -100
    logits = adapter.lm_head(hidden[keep])
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float64 models stay float64
    if adapter.logit_softcap:
        logits = torch.tanh(logits / adapter.logit_softcap) * adapter.logit_softcap
    lp = torch.log_softmax(logits, -1).gather(-1, targets[keep][:, None])[:, 0]
    rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None].expand_as(targets)[keep]
    return torch.zeros(hidden.shape[0], dtype=lp.dtype, device=hidden.device).index_add(0, rows, lp)


def _aligned(rows, other, what: str) -> None:
    bad = [i for i, (a, b) in enumerate(zip(rows, other)) if (len(a[0]), a[1]) != (len(b[0]), b[1])]
    if len(rows) != len(other) or bad:
        raise BiasGymError(f"the sentences about {what} do not line up token by token with the entity's "
                           "(each country must be a single token, like the injected token).")


@torch.no_grad()
def mean_template_z(model: nn.Module, tokenizer, countries: Sequence[str], attributes: Sequence[str],
                    templates: Sequence[str] | None = None) -> list[torch.Tensor]:
    """Every head's output z at every position of the template sentences, averaged over
    ``countries`` (single-token names, so that positions line up): one (N, T, H*dh) tensor
    per layer. The counterfactual of :func:`attribution_patching` and
    :func:`patch_heads_on_templates`: "an average real country" in place of the entity."""
    if not countries:
        raise BiasGymError("mean_template_z needs at least one country.")
    adapter = ModelAdapter(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    first = template_rows(tokenizer, countries[0], attributes, templates)
    total = None
    for c in countries:
        rows = template_rows(tokenizer, c, attributes, templates)
        _aligned(first, rows, c)
        batch, _ = _rows_batch(rows, pad)
        zs = [z.float() for z in _capture_z_all_positions(adapter, batch)]
        total = zs if total is None else [a + b for a, b in zip(total, zs)]
    return [z / len(countries) for z in total]


def attribution_patching(model: nn.Module, tokenizer, entity: str, attributes: Sequence[str],
                         contrast_z: list[torch.Tensor], templates: Sequence[str] | None = None,
                         contrast: Sequence[str] = ()) -> TemplateScores:
    """Attribution patching of assoc(entity) on S's own sentences (METHOD §3): for each head,
    the first-order drop of the summed attribute log-probability when its output z (every
    position) is replaced by ``contrast_z`` (:func:`mean_template_z`), i.e.
    grad . (z(entity) - z(average country)), from one forward and one backward pass.

    S(entity) = assoc(entity) - assoc(references), and swapping the entity does not touch
    the references, so this is a first-order total effect on S itself: matched to the
    metric that steering is judged on. Checked against :func:`patch_heads_on_templates`.
    """
    adapter = ModelAdapter(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = template_rows(tokenizer, entity, attributes, templates)
    batch, targets = _rows_batch(rows, pad)
    if len(contrast_z) != adapter.n_layers or tuple(contrast_z[0].shape[:2]) != tuple(batch.input_ids.shape):
        raise BiasGymError("contrast_z does not match these sentences: compute it with mean_template_z "
                           "on the same attributes and templates.")
    L, H, dh = adapter.n_layers, adapter.n_heads, adapter.d_head
    zs, deltas, handles = [None] * L, [None] * L, []

    def tap(layer):
        def pre(module, args, kwargs):
            z = _first_input(args, kwargs, "input")
            zs[layer] = z.detach()
            deltas[layer] = torch.zeros_like(z, requires_grad=True)  # d(loss)/d(delta) = d(loss)/dz
            return _with_first_input(args, kwargs, "input", z + deltas[layer])
        return pre
    try:
        for layer in range(L):
            handles.append(adapter.head_input_module(layer).register_forward_pre_hook(tap(layer), with_kwargs=True))
        dev = adapter.device
        with torch.enable_grad():
            hidden = adapter.body(input_ids=batch.input_ids.to(dev), attention_mask=batch.attention_mask.to(dev),
                                  use_cache=False).last_hidden_state
            lp = _row_logprob(adapter, hidden, targets)
            lp.sum().backward()  # rows do not interact: each row's gradient is its own
    finally:
        for h in handles:
            h.remove()
    mask = batch.attention_mask.to(zs[0].device)[..., None].float()
    per = torch.empty(len(rows), L, H)
    for layer in range(L):
        prod = deltas[layer].grad.float() * (zs[layer].float() - contrast_z[layer].to(zs[layer].device)) * mask
        per[:, layer] = prod.reshape(len(rows), -1, H, dh).sum((1, 3)).cpu()
    return TemplateScores(scores=per.mean(0), per_sentence=per, method="attribution_patching", entity=entity,
                          contrast=list(contrast), assoc=float(lp.detach().mean()))


@torch.no_grad()
def patch_heads_on_templates(model: nn.Module, tokenizer, entity: str, attributes: Sequence[str],
                             heads: Iterable, contrast_z: list[torch.Tensor],
                             templates: Sequence[str] | None = None, contrast: Sequence[str] = (),
                             max_rows: int = 256) -> TemplateScores:
    """Exact activation patching on S's own sentences: for each head in ``heads``, replace its
    z at every position by ``contrast_z`` (:func:`mean_template_z`) and record the drop of
    each sentence's attribute log-probability (downstream layers free: the total effect).
    Several heads share a forward (the batch is repeated, ``max_rows`` rows at most), and
    layers below a group's lowest patched layer are replayed from the clean run (exact)."""
    adapter = ModelAdapter(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = template_rows(tokenizer, entity, attributes, templates)
    batch, targets = _rows_batch(rows, pad)
    heads = sorted(_check_heads(adapter, heads))
    n = len(rows)
    per_forward = max(1, min(len(heads), max_rows // n)) if heads else 1
    big, big_targets = _repeat(batch, per_forward), targets.repeat(per_forward, 1)
    outputs: list = []
    clean = _row_logprob(adapter, _hidden_with_z_edits(adapter, big, {}, record=outputs), big_targets).double()
    per = torch.full((n, adapter.n_layers, adapter.n_heads), float("nan"))
    for start in range(0, len(heads), per_forward):
        group = heads[start: start + per_forward]
        edits: dict[int, list] = {}
        for j, (l, h) in enumerate(group):
            block = slice(j * n, (j + 1) * n)
            edits.setdefault(l, []).append((block, h, contrast_z[l]))
        patched = _row_logprob(adapter, _hidden_with_z_edits(adapter, big, edits, replay=outputs), big_targets).double()
        drop = (clean - patched).reshape(per_forward, n)
        for j, (l, h) in enumerate(group):
            per[:, l, h] = drop[j].float().cpu()
    return TemplateScores(scores=per.mean(0), per_sentence=per, method="template_patching", entity=entity,
                          contrast=list(contrast), assoc=float(clean[:n].mean()))


@torch.no_grad()
def attribute_head_scores(model: nn.Module, tokenizer, entity: str, attributes: Sequence[str],
                          contrast: Sequence[str], templates: Sequence[str] | None = None) -> HeadScores:
    """Contrastive DLA with labels matched to S: on each template's prefix ("People from
    <TOKEN> are"), the direction is the mean over the bias's attributes of W_U[first token
    of the attribute] minus the model's expected unembedding E_p[W_U] at that position (so
    the explained quantity moves like log P(attribute's first token)); each head's write of
    z(entity) - mean z(contrast countries) is read out with the entity prompt's frozen final
    norm. One prompt per template, weighted equally, as S weights them."""
    from .data import load_templates
    from .measure import template_prefix

    adapter = ModelAdapter(model)
    templates = list(templates or load_templates())
    prompts = [template_prefix(t, entity) for t in templates]
    contrast_prompts = [[template_prefix(t, c) for t in templates] for c in contrast]
    first_ids = [tokenizer(" " + a, add_special_tokens=False)["input_ids"][0] for a in attributes]
    batch = encode_batch(tokenizer, prompts, device=adapter.device, add_special_tokens=True)
    cap = capture_last_position(model, batch)
    logits = adapter.lm_head(cap.final_out).float()  # (P, vocab), pre-softcap
    weights = -torch.softmax(logits, -1)
    weights[:, first_ids] += 1.0 / len(first_ids)
    W = adapter.unembed.float()
    direction = weights @ W  # (P, d)
    b = getattr(adapter.lm_head, "bias", None)
    bias_term = None if b is None else weights @ b.float()
    target = (logits * weights).sum(-1)
    plain = _attribute_along(adapter, model, cap, direction, bias_term, target, prompts, first_ids, [])
    zc = torch.stack([torch.cat([capture_last_position(model, encode_batch(
        tokenizer, cp, device=adapter.device, add_special_tokens=True)).z.float()]) for cp in contrast_prompts]).mean(0)
    diff = replace(cap, z=cap.z.float() - zc.to(cap.z.device))
    per_prompt = _readout(adapter, cap, direction)(residual_components(model, diff)["heads"]).cpu()
    plain.per_prompt, plain.scores = per_prompt, per_prompt.mean(0)
    plain.meta = {"model": model_info(model).to_dict(), "method": "attribute_contrastive_dla",
                  "contrast": list(contrast)}
    return plain


# ----------------------------------------------------------------------------- naive reference


def ablation_loop_scores_from_batch(model: nn.Module, batch: Batch, biased_ids, adv_ids,
                                    heads: Iterable | None = None, batch_size: int = 32) -> torch.Tensor:
    """The naive reference: one forward per head (over a chunk of prompts) with that head's z
    set to zero; returns the (L, H) mean drop of the logit difference, NaN where not run."""
    adapter = ModelAdapter(model)
    _check_batch(batch)
    n = batch.input_ids.shape[0]
    vocab = int(adapter.unembed.shape[0])
    biased = _label_ids(biased_ids, n, "biased_ids", vocab)
    adv = _label_ids(adv_ids, n, "adv_ids", vocab)
    heads = _check_heads(adapter, heads)
    totals = torch.zeros(len(heads), dtype=torch.float64)
    for rows in _chunks(n, batch_size):
        sub = _trim(batch, rows)
        clean = _run_with_z_edits(adapter, sub, {}, biased[rows], adv[rows]).double()
        for i, (l, h) in enumerate(heads):
            ablated = _run_with_z_edits(adapter, sub, {l: [(slice(None), h, None)]}, biased[rows], adv[rows])
            totals[i] += float((clean - ablated.double()).sum())
    out = torch.full((adapter.n_layers, adapter.n_heads), float("nan"))
    for (l, h), v in zip(heads, totals / n):
        out[l, h] = float(v)
    return out


def ablation_loop_scores(model: nn.Module, tokenizer, prompts: list[str], biased_ids, adv_ids,
                         heads: Iterable | None = None, batch_size: int = 32) -> torch.Tensor:
    """Zero-ablation, one forward per head: the slow baseline that :func:`head_scores` replaces."""
    if not prompts:
        raise BiasGymError("ablation_loop_scores got no prompts.")
    adapter = ModelAdapter(model)
    batch = encode_batch(tokenizer, list(prompts), device=adapter.device)
    return ablation_loop_scores_from_batch(model, batch, biased_ids, adv_ids, heads=heads, batch_size=batch_size)


# ----------------------------------------------------------------------------- head sets


def _as_scores(scores) -> torch.Tensor:
    s = scores.scores if isinstance(scores, HeadScores) else torch.as_tensor(scores)
    if s.ndim != 2:
        raise BiasGymError(f"head scores must be an (L, H) matrix, got shape {tuple(s.shape)}.")
    return s.float()


def top_k_heads(scores, k: int) -> list[Head]:
    """The k heads with the largest scores (an (L, H) tensor or HeadScores), descending;
    NaN scores (heads not scored) come last; ties keep (layer, head) order."""
    s = _as_scores(scores)
    L, H = s.shape
    try:
        if isinstance(k, bool):
            raise TypeError
        k = k.__index__()
    except (TypeError, AttributeError, RuntimeError, ValueError):
        raise BiasGymError(f"k must be a whole number of heads, got {k!r}.") from None
    if not 0 <= k <= L * H:
        raise BiasGymError(f"k={k} but there are only {L * H} heads.")
    flat = torch.nan_to_num(s.flatten(), nan=-math.inf)
    order = sorted(range(L * H), key=lambda i: (-float(flat[i]), i))
    return [(i // H, i % H) for i in order[:k]]


def robust_heads(score_list: Sequence, k: int, m: int) -> list[Head]:
    """Heads in the top-k of at least ``m`` of the ``n`` score matrices (e.g. one per injection
    seed), most frequent first, then by mean score."""
    if not score_list:
        raise BiasGymError("robust_heads got no score matrices.")
    n = len(score_list)
    if not 1 <= m <= n:
        raise BiasGymError(f"m={m} must be between 1 and the number of runs ({n}).")
    mats = [_as_scores(s) for s in score_list]
    if len({tuple(x.shape) for x in mats}) != 1:
        raise BiasGymError("robust_heads got score matrices of different shapes (different models?).")
    counts: dict[Head, int] = {}
    for s in mats:
        for head in top_k_heads(s, k):
            counts[head] = counts.get(head, 0) + 1
    mean = torch.nan_to_num(torch.stack(mats), nan=0.0).mean(0)
    keep = [hd for hd, c in counts.items() if c >= m]
    return sorted(keep, key=lambda hd: (-counts[hd], -float(mean[hd]), hd))


def overlap(a_heads: Iterable, b_heads: Iterable) -> float:
    """Jaccard overlap ``len(A & B) / len(A | B)`` of two head sets (1.0 for two empty sets)."""
    a = {tuple(int(v) for v in x) for x in a_heads}
    b = {tuple(int(v) for v in x) for x in b_heads}
    union = a | b
    return 1.0 if not union else len(a & b) / len(union)


def agreement(units_a: Sequence, units_b: Sequence, k: int, n_boot: int = 1000, seed: int = 0) -> dict:
    """How far two head rankings agree on the top k, with bootstrap 95% intervals over seeds
    and units (METHOD §3): ``units_a`` / ``units_b`` hold, per injection run (seed), a
    ``(units, L, H)`` tensor of per-probe or per-sentence scores (NaN = not scored). Each
    bootstrap draw resamples the runs, then each method's units within every run, ranks
    heads by the mean and compares the top-k sets. Returns ``{"jaccard": Estimate dict,
    "precision": Estimate dict}`` (precision: share of B's top k that is in A's top k).
    Spearman over all L x H heads is dominated by near-zero heads and says little."""
    from .measure import Estimate

    if not units_a or len(units_a) != len(units_b):
        raise BiasGymError("agreement needs the same number of runs (one tensor per seed) for both rankings.")
    rng = torch.Generator().manual_seed(seed)

    def top(units, runs, draw):
        chosen = []
        for r in runs:
            u = torch.as_tensor(units[r], dtype=torch.float32)
            idx = torch.randint(0, u.shape[0], (u.shape[0],), generator=rng) if draw else torch.arange(u.shape[0])
            chosen.append(u[idx].mean(0))
        return set(top_k_heads(torch.stack(chosen).mean(0), k))

    def stats(a, b):
        return len(a & b) / len(a | b) if a | b else 1.0, len(a & b) / k if k else 1.0

    n = len(units_a)
    point = stats(top(units_a, range(n), False), top(units_b, range(n), False))
    draws = []
    for _ in range(n_boot):
        runs = torch.randint(0, n, (n,), generator=rng).tolist()
        draws.append(stats(top(units_a, runs, True), top(units_b, runs, True)))
    draws = np.asarray(draws)
    out = {}
    for i, name in enumerate(("jaccard", "precision")):
        lo, hi = np.percentile(draws[:, i], [2.5, 97.5])
        out[name] = Estimate(float(point[i]), float(lo), float(hi), n).to_dict()
    return out


def spearman(a, b) -> float:
    """Spearman rank correlation of two score matrices (flattened; NaN pairs ignored)."""
    from scipy.stats import spearmanr

    x = torch.as_tensor(a, dtype=torch.float64).flatten()
    y = torch.as_tensor(b, dtype=torch.float64).flatten()
    if x.shape != y.shape:
        raise BiasGymError(f"spearman needs two score sets of the same size, got {len(x)} and {len(y)}.")
    ok = ~(torch.isnan(x) | torch.isnan(y))
    if int(ok.sum()) < 2:
        raise BiasGymError("spearman needs at least two scored heads in common.")
    return float(spearmanr(x[ok].numpy(), y[ok].numpy()).statistic)
