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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import BiasGymError
from .models import Batch, ModelAdapter, encode_batch, model_info

Head = tuple[int, int]

__all__ = [
    "HeadScores", "LastPositionCapture", "capture_last_position", "residual_components",
    "head_scores", "head_scores_from_batch", "patch_heads", "patch_heads_from_batch",
    "ablation_loop_scores", "ablation_loop_scores_from_batch", "last_logit_diff",
    "spearman", "top_k_heads", "robust_heads", "overlap",
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
                "biased_ids": list(self.biased_ids), "adv_ids": list(self.adv_ids), "meta": self.meta}

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


@torch.no_grad()
def _attribute(adapter: ModelAdapter, model: nn.Module, batch: Batch, biased: torch.Tensor,
               adv: torch.Tensor, prompts: list[str] | None) -> HeadScores:
    """DLA for one batch: one forward with hooks, then linear algebra only."""
    cap = capture_last_position(model, batch)
    parts = residual_components(model, cap)
    direction, bias_diff = _unembed_rows(adapter, biased, adv)  # (P, d)
    direction = direction.to(cap.final_in.device)
    norm = adapter.final_norm
    scale = adapter.norm_scale(norm, cap.final_in)  # (P, 1): frozen from the clean pass

    def project(x: torch.Tensor) -> torch.Tensor:
        """(P, ..., d) residual-space parts -> (P, ...) logit-difference parts."""
        extra = x.ndim - 2
        s = scale.reshape(scale.shape[0], *([1] * extra), 1)
        v = direction.reshape(direction.shape[0], *([1] * extra), direction.shape[1])
        return (adapter.apply_norm_linear(norm, x, s) * v).sum(-1)

    per_head = project(parts["heads"])  # (P, L, H)
    comps: dict[str, torch.Tensor] = {"embed": project(parts["embed"]), "heads": per_head.sum((1, 2))}
    attn_bias = project(parts["attn_bias"])  # (P, L)
    mlp = project(parts["mlp"])
    for layer in range(adapter.n_layers):
        comps[f"attn_bias.{layer}"] = attn_bias[:, layer]
    for layer in range(adapter.n_layers):
        comps[f"mlp.{layer}"] = mlp[:, layer]
    nb = adapter.norm_bias(norm)
    comps["norm_bias"] = (direction * nb).sum(-1) if nb is not None else torch.zeros_like(comps["embed"])
    if bias_diff is not None:
        comps["unembed_bias"] = bias_diff.to(direction.device)
    with torch.no_grad():
        logit_diff = _logit_diff_from_hidden(adapter, cap.final_out, biased, adv)
    comps = {k: v.detach().cpu() for k, v in comps.items()}
    logit_diff = logit_diff.detach().cpu()
    per_head = per_head.detach().cpu()
    return HeadScores(scores=per_head.mean(0), per_prompt=per_head, logit_diff=logit_diff,
                      components=comps, decomposition_error=_relative_error(comps, logit_diff),
                      prompts=prompts, biased_ids=biased.tolist(), adv_ids=adv.tolist())


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
    """Logit difference per row of ``batch`` after editing z in place per layer.

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
        return _run_logit_diff(adapter, batch, biased, adv)
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
