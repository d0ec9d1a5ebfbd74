"""Chapter 4's build exercises: the edit that steers one head, as a pre-hook on o_proj.

``scale_head(z, head, d_head, alpha)`` and ``mean_ablate_head(z, head, d_head, mean)`` get z
``(B, T, H*d_head)``, the input of the layer's output projection (every head's output side by
side), and return a new z with one head's slice scaled by ``alpha``, or replaced by its mean
``(d_head,)``: what :class:`biasgym_lib.steer.HeadSteering` and
:class:`biasgym_lib.steer.MeanAblation` apply (:ref:`method §4 <method-4>`). The check also
registers the function as a forward pre-hook on o_proj and compares the model's logits with
:func:`biasgym_lib.steer.steer_heads`.
"""

from __future__ import annotations

import torch

from ..models import ModelAdapter
from ..steer import HeadSteering, MeanAblation, steer_heads
from . import Checked, as_tensor, call, check, diagnose, exercise_model, judge

SCALE, MEAN = "Exercise 1 (scale_head)", "Exercise 2 (mean_ablate_head)"
_ON_ERROR = "z is (B, T, H*d_head); head h's slice is z[..., h*d_head:(h+1)*d_head]."


def _inputs(adapter: ModelAdapter, seed: int):
    g = torch.Generator().manual_seed(4000 + seed)
    z = torch.randn(2, 3 + seed, adapter.n_heads * adapter.d_head, generator=g)
    layer = int(torch.randint(0, adapter.n_layers, (1,), generator=g))
    head = int(torch.randint(0, adapter.n_heads, (1,), generator=g))
    return g, z, layer, head


def _mutated(z_in: torch.Tensor, z: torch.Tensor) -> str | None:
    if not torch.equal(z_in, z):
        return ("you changed z in place. Return a new tensor (clone first): the same tensor may be "
                "held by other hooks or by a capture of the clean run.")
    return None


def check_scale_head(fn, model=None) -> Checked:
    """Compare ``fn`` with :class:`biasgym_lib.steer.HeadSteering`'s edit on random z, then run
    it as a pre-hook on ``model`` (default: a tiny random model) against
    :func:`biasgym_lib.steer.steer_heads`."""
    model = exercise_model() if model is None else model
    adapter = ModelAdapter(model)
    H, dh = adapter.n_heads, adapter.d_head

    def trial(seed: int) -> str | None:
        g, z, layer, head = _inputs(adapter, seed)
        alpha = [0.0, 0.5, -1.5][seed % 3]
        want = HeadSteering(model, [(layer, head)], alpha).edit(layer)(z.to(adapter.device)).double().cpu()
        z_in = z.clone()
        got = as_tensor(call(fn, z_in, head, dh, alpha))
        if problem := _mutated(z_in, z):
            return problem
        wrong_slice = z.clone()
        wrong_slice[..., head::H] *= alpha  # every H-th channel
        mistakes = {
            "scale only the chosen head's slice; the other heads keep their output.": z * alpha,
            "head h's slice is the contiguous block h*d_head:(h+1)*d_head, not every H-th entry.": wrong_slice,
        }
        problem = diagnose(got, want, mistakes, fallback="multiply z[..., h*d_head:(h+1)*d_head] by alpha and "
                                                         "leave the rest of z as it is.")
        return problem or (_as_prehook(fn, model, adapter, layer, head, alpha, g) if seed == 0 else None)
    return judge(SCALE, trial, on_error=_ON_ERROR)


def _as_prehook(fn, model, adapter, layer, head, alpha, g) -> str | None:
    """The reader's edit as a forward pre-hook on o_proj gives the logits of steer_heads."""
    ids = torch.randint(3, adapter.unembed.shape[0], (2, 6), generator=g).to(adapter.device)
    dh = adapter.d_head

    def pre(module, args):
        return (call(fn, args[0], head, dh, alpha),) + tuple(args[1:])
    with torch.inference_mode():
        with steer_heads(model, [(layer, head)], alpha):
            want = model(ids).logits
        handle = adapter.head_input_module(layer).register_forward_pre_hook(pre)
        try:
            got = model(ids).logits
        finally:
            handle.remove()
    if not torch.allclose(got, want, atol=1e-5, rtol=1e-5):
        return "as a pre-hook on o_proj your edit gives other logits than steer_heads; check the slice."
    return None


def check_mean_ablate_head(fn, model=None) -> Checked:
    """Compare ``fn`` with :class:`biasgym_lib.steer.MeanAblation`'s edit on random z and a
    random mean."""
    model = exercise_model() if model is None else model
    adapter = ModelAdapter(model)
    H, dh = adapter.n_heads, adapter.d_head

    def trial(seed: int) -> str | None:
        g, z, layer, head = _inputs(adapter, seed)
        mean = torch.randn(dh, generator=g)
        means = torch.zeros(adapter.n_layers, H * dh)
        means[layer, head * dh:(head + 1) * dh] = mean
        want = MeanAblation(model, [(layer, head)], means).edit(layer)(z.to(adapter.device)).double().cpu()
        z_in = z.clone()
        got = as_tensor(call(fn, z_in, head, dh, mean.clone()))
        if problem := _mutated(z_in, z):
            return problem
        sl = (..., slice(head * dh, (head + 1) * dh))
        subtracted, zeroed, added = z.clone(), z.clone(), z.clone()
        subtracted[sl] -= mean
        zeroed[sl] = 0.0
        added[sl] += mean
        mistakes = {
            "mean-ablation replaces the head's output by its mean; it does not subtract the mean.": subtracted,
            "that is zero-ablation (alpha = 0): put the mean in the head's slice instead of zeros.": zeroed,
            "replace the head's slice by the mean; do not add the mean to it.": added,
        }
        return diagnose(got, want, mistakes, fallback="set z[..., h*d_head:(h+1)*d_head] to mean (broadcast "
                                                      "over batch and positions) and leave the rest of z.")
    return judge(MEAN, trial, on_error=_ON_ERROR)


def check_reduction(answer, row: dict) -> Checked:
    """Exercise 3: the mean over seeds of 1 - S_after / S_before for one row of the results."""
    expected = sum(1 - s["value"] / b for b, s in zip(row["S_before"], row["S"])) / len(row["S"])
    return check("Exercise 3", answer, expected, tol=1e-6, hint='pair row["S_before"][i] with row["S"][i]["value"]')
