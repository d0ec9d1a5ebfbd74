"""Where BiasGym reads and edits a model's forward pass: the hook sites, named once.

(Being reorganised: see issue 13.)"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .batching import Batch, _check_batch, _label_ids
from .errors import BiasGymError
from .models import ModelAdapter


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

