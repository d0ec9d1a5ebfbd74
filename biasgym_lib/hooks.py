"""Where BiasGym reads and edits a model's forward pass: the hook sites, named once.

Sites (``layer``: a decoder layer's index; ``None`` for the sites that exist once):

- ``z`` (layer): the heads' outputs, the input of ``head_input_module`` (o_proj, or GPT-2's
  c_proj), heads side by side: (B, T, H*dh)
- ``attn_out`` (layer): the output of that module, (B, T, d)
- ``attn_write`` / ``mlp_write`` (layer): what attention / the MLP adds to the residual stream
- ``layer_out`` (layer): a decoder layer's output (recorded for :func:`replaying`)
- ``embed``: the residual stream entering layer 0
- ``final_in`` / ``final_out``: the input / output of the final norm
- ``token_ids`` / ``token_embed``: the ids entering / the vectors leaving the input embedding

A hook is a function of the site's tensor; what it returns (unless None) replaces that
tensor. :func:`hooked` attaches hooks for the length of a ``with`` block and always
removes them; :func:`run` runs the transformer body with hooks; :func:`capture_last_position`
keeps every site DLA needs at each prompt's last token. :func:`replaying` is the one place
where layers are skipped instead of hooked.

Why a small hand-written layer rather than nnsight or TransformerLens: neither is installed
here. Both are on PyPI (nnsight 0.8.1, a 312 kB wheel that pulls in greenlet, pydantic,
cloudpickle, httpx, websocket-client and zstandard; TransformerLens 4.3.0, which pulls in
wandb, datasets, jaxtyping, beartype and more). TransformerLens runs its own
re-implementation of each architecture on converted weights, so its numbers are not the
Hugging Face model's own kernels, and BiasGym's exactness checks (DLA parts summing to the
model's logit difference, alpha = 1 changing nothing bit for bit) are about the model the
reader loaded. nnsight traces the real model, but through a deferred-execution graph that
a student must learn before reading any scorer. What BiasGym needs is a dozen sites on six
architectures, which PyTorch's forward hooks give in about a hundred lines that a reader
can check; :class:`~biasgym_lib.models.ModelAdapter` already names the modules.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .batching import Batch, check_batch, label_ids
from .errors import BiasGymError
from .models import ModelAdapter, adapter_of

Hook = Callable[[torch.Tensor], "torch.Tensor | None"]

# site -> (the module it lives on, "in" or "out", the name of the module's first argument)
_SITES = {
    "z": (lambda a, l: a.head_input_module(l), "in", "input"),
    "attn_out": (lambda a, l: a.head_input_module(l), "out", None),
    "attn_write": (lambda a, l: a.attn_write_module(l), "out", None),
    "mlp_write": (lambda a, l: a.mlp_write_module(l), "out", None),
    "layer_out": (lambda a, l: a.layers[l], "out", None),
    "embed": (lambda a, l: a.layers[0], "in", "hidden_states"),
    "final_in": (lambda a, l: a.final_norm, "in", "hidden_states"),
    "final_out": (lambda a, l: a.final_norm, "out", None),
    "token_ids": (lambda a, l: a.embed, "in", "input"),
    "token_embed": (lambda a, l: a.embed, "out", None),
}
SITES = tuple(_SITES)


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


def _with_output(output, value: torch.Tensor):
    return (value,) + tuple(output[1:]) if isinstance(output, (tuple, list)) else value


class Hooks:
    """Hooks on one model's sites, removed together by :meth:`remove` (or on leaving a
    ``with`` block). ``add`` a site hook; ``add_raw`` a plain PyTorch hook on any module."""

    def __init__(self, model):
        self.adapter = adapter_of(model)
        self._handles: list = []

    def add(self, site: str, layer: int | None, fn: Hook) -> "Hooks":
        if site not in _SITES:
            raise BiasGymError(f"unknown hook site {site!r}; the sites are {list(SITES)}.")
        where, kind, name = _SITES[site]
        module = where(self.adapter, layer)
        if kind == "in":
            def pre(module, args, kwargs):
                new = fn(_first_input(args, kwargs, name))
                return None if new is None else _with_first_input(args, kwargs, name, new)
            return self.add_raw(module, pre=pre)

        def post(module, args, kwargs, output):
            new = fn(_output_tensor(output))
            return None if new is None else _with_output(output, new)
        return self.add_raw(module, post=post)

    def add_raw(self, module: nn.Module, pre=None, post=None) -> "Hooks":
        """``pre(module, args, kwargs)`` / ``post(module, args, kwargs, output)``, as PyTorch calls them."""
        if pre is not None:
            self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        if post is not None:
            self._handles.append(module.register_forward_hook(post, with_kwargs=True))
        return self

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> "Hooks":
        return self

    def __exit__(self, *exc) -> bool:
        self.remove()
        return False


@contextmanager
def hooked(model, hooks: Mapping[tuple[str, int | None], Hook]):
    """``with hooked(model, {("z", 3): fn, ("final_out", None): keep}):`` the hooks are live
    inside the block and removed on leaving it, even by an exception."""
    h = Hooks(model)
    try:
        for (site, layer), fn in hooks.items():
            h.add(site, layer, fn)
        yield h
    finally:
        h.remove()


@contextmanager
def replaying(model, outputs: list, below: int):
    """Inside the block, decoder layers ``0 .. below-1`` return ``outputs[j]`` (recorded from a
    run of the same batch) instead of computing it. A PyTorch hook runs around a module's
    forward, never instead of it, so this is the one place that swaps ``forward`` itself (an
    instance attribute, deleted on leaving: the class's forward is back)."""
    layers = adapter_of(model).layers
    swapped = []
    try:
        for j in range(below):
            layers[j].forward = (lambda out: lambda *a, **kw: out)(outputs[j])
            swapped.append(layers[j])
        yield
    finally:
        for module in swapped:
            del module.forward


def record_layers(outputs: list, n_layers: int) -> dict:
    """Hooks that keep a copy of every decoder layer's output in ``outputs`` (for :func:`replaying`)."""
    outputs[:] = [None] * n_layers

    def keep(layer):
        def fn(out):
            outputs[layer] = out.detach().clone()
        return fn
    return {("layer_out", j): keep(j) for j in range(n_layers)}


def run(model, batch: Batch, hooks: Mapping | None = None, grad: bool = False,
        replay: list | None = None, below: int = 0) -> torch.Tensor:
    """The final-norm output (B, T, d) of the transformer body on ``batch`` with ``hooks``
    (see :func:`hooked`), without gradients unless ``grad``; with ``replay``, layers below
    ``below`` are replayed (:func:`replaying`)."""
    adapter = adapter_of(model)
    dev = adapter.device
    with hooked(adapter, hooks or {}), replaying(adapter, replay or [], below if replay else 0), \
            torch.set_grad_enabled(grad):
        return adapter.body(input_ids=batch.input_ids.to(dev), attention_mask=batch.attention_mask.to(dev),
                            use_cache=False).last_hidden_state


def gather_last(x: torch.Tensor, last_index: torch.Tensor) -> torch.Tensor:
    """Rows ``x[i, last_index[i]]`` of a ``(batch, seq, ...)`` tensor."""
    rows = torch.arange(x.shape[0], device=x.device)
    return x[rows, last_index.to(x.device)]


# ----------------------------------------------------------------------------- logit differences


def unembed_rows(adapter: ModelAdapter, biased: torch.Tensor, adv: torch.Tensor):
    """(W_U[biased] - W_U[adv]) per prompt, and the matching lm_head-bias difference (or None)."""
    w = adapter.unembed
    dev = w.device
    direction = w[biased.to(dev)].float() - w[adv.to(dev)].float()
    b = getattr(adapter.lm_head, "bias", None)
    bias_diff = None if b is None else (b[biased.to(dev)].float() - b[adv.to(dev)].float())
    return direction, bias_diff


def logit_diff_from_hidden(adapter: ModelAdapter, hidden: torch.Tensor,
                           biased: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """Pre-softcap ``logit[biased] - logit[adv]`` from final-norm outputs ``(P, d)``,
    computed as the model's lm_head computes it (in its dtype), then in float."""
    logits_b = adapter.lm_head(hidden)  # (P, vocab): same arithmetic as the model's own head
    rows = torch.arange(hidden.shape[0], device=logits_b.device)
    return (logits_b[rows, biased.to(logits_b.device)].float()
            - logits_b[rows, adv.to(logits_b.device)].float())


def last_logit_diff(model: nn.Module, batch: Batch, biased_ids, adv_ids) -> torch.Tensor:
    """The model's pre-softcap ``logit[biased] - logit[adv]`` at each prompt's last real token
    (one forward of the transformer body: no full-vocabulary logits at every position)."""
    adapter = adapter_of(model)
    check_batch(batch)
    n = batch.input_ids.shape[0]
    vocab = int(adapter.unembed.shape[0])
    biased = label_ids(biased_ids, n, "biased_ids", vocab)
    adv = label_ids(adv_ids, n, "adv_ids", vocab)
    with torch.no_grad():
        hidden = gather_last(run(adapter, batch), batch.last_index)
        return logit_diff_from_hidden(adapter, hidden, biased, adv).cpu()


# ----------------------------------------------------------------------------- captures


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


_PER_LAYER = ("z", "attn_out", "attn_write", "mlp_write")
_ONCE = ("embed", "final_in", "final_out")


def capture_last_position(model, batch: Batch) -> LastPositionCapture:
    """Run ``batch`` once with hooks and keep, at the last real token of each prompt, the
    per-head outputs z and every write into the residual stream (see the dataclass)."""
    adapter = adapter_of(model)
    check_batch(batch)
    last = batch.last_index.to(adapter.device)
    L = adapter.n_layers
    store: dict[str, list] = {k: [None] * L for k in _PER_LAYER}
    single: dict[str, torch.Tensor] = {}

    def keep(site, layer):
        def fn(x):
            value = gather_last(x, last).detach()
            if layer is None:
                single[site] = value
            else:
                store[site][layer] = value
        return fn
    hooks = {(s, l): keep(s, l) for l in range(L) for s in _PER_LAYER}
    hooks.update({(s, None): keep(s, None) for s in _ONCE})
    run(adapter, batch, hooks)
    missing = [k for k, v in store.items() if any(t is None for t in v)]
    missing += [k for k in _ONCE if k not in single]
    if missing:
        raise BiasGymError(f"the forward pass never reached the hooks for {missing}; "
                           "the adapter's module map does not match this model.")
    stacked = {k: torch.stack(v, dim=1) for k, v in store.items()}
    return LastPositionCapture(**stacked, **single)


def capture_z(model, batch: Batch) -> list[torch.Tensor]:
    """z[l] at every position, one (P, T, H*dh) tensor per layer, from one forward."""
    adapter = adapter_of(model)
    zs: list = [None] * adapter.n_layers

    def keep(layer):
        def fn(z):
            zs[layer] = z.detach().clone()
        return fn
    run(adapter, batch, {("z", l): keep(l) for l in range(adapter.n_layers)})
    return zs

