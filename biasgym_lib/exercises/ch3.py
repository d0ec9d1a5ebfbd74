"""Chapter 3's build exercise: one head's direct logit attribution.

``head_dla(z, W_O, head, d_head, scale, gamma, u_biased, u_adv)`` gets, at each prompt's last
position, one layer's captured z ``(P, H*d_head)`` (every head's output, side by side), that
layer's output projection W_O ``(d_model, H*d_head)``, the head's index, the final norm's
scale frozen from the clean pass ``(P, 1)``, the final norm's gain ``gamma`` ``(d_model,)``,
and the unembedding rows of the biased and the adversarial label ``(d_model,)``, and returns
the head's contribution to logit[biased] - logit[adv] for each prompt ``(P,)``: the number
:func:`biasgym_lib.scope.head_scores` averages over prompts (:ref:`method §3 <method-3>`).
"""

from __future__ import annotations

import torch

from ..batching import Batch
from ..hooks import capture_last_position
from ..models import ModelAdapter
from ..scope import logit_attribution, residual_components
from . import Checked, as_tensor, call, check, diagnose, exercise_model, judge

NAME = "Exercise 1 (head_dla)"


def _supported(adapter: ModelAdapter) -> bool:
    return adapter.norm_kind == "rms" and adapter.post_attn_norm(0) is None


def check_head_dla(fn, model=None) -> Checked:
    """Capture random prompts on ``model`` (default, or when its architecture is not plain
    RMSNorm without post-attention norms: a tiny random Llama) and compare ``fn`` for a random
    head with :func:`biasgym_lib.scope.residual_components` and
    :func:`biasgym_lib.scope.logit_attribution`."""
    if model is None or not _supported(ModelAdapter(model)):
        model = exercise_model()
    adapter = ModelAdapter(model)
    L, H, dh = adapter.n_layers, adapter.n_heads, adapter.d_head
    U = adapter.unembed

    def trial(seed: int) -> str | None:
        g = torch.Generator().manual_seed(3000 + seed)
        P, T = 4, 5 + seed
        ids = torch.randint(3, U.shape[0], (P, T), generator=g)
        cap = capture_last_position(model, Batch(ids.to(adapter.device), torch.ones_like(ids).to(adapter.device)))
        layer, head = int(torch.randint(0, L, (1,), generator=g)), int(torch.randint(0, H, (1,), generator=g))
        biased, adv = torch.randperm(U.shape[0], generator=g)[:2].tolist()
        u_b, u_a = U[biased].detach().float().cpu(), U[adv].detach().float().cpu()
        scale = adapter.norm_scale(adapter.final_norm, cap.final_in).cpu()
        gamma = adapter.norm_gain(adapter.final_norm).detach().cpu()
        W_O = adapter.head_write_weight(layer).detach().float().cpu()
        z = cap.z[:, layer].float().cpu()
        write = residual_components(adapter, cap)["heads"][:, layer, head].cpu()
        want = logit_attribution(adapter, write.to(adapter.device), (u_b - u_a).expand(P, -1).to(adapter.device),
                                 scale.to(adapter.device)).double().cpu()
        got = as_tensor(call(fn, z.clone(), W_O.clone(), head, dh, scale.clone(), gamma.clone(), u_b.clone(),
                             u_a.clone()))
        if got.numel() == 1 and P > 1:
            return "return one score per prompt, shape (P,): do not sum or average over the prompts."
        got = got.reshape(-1) if got.numel() == P else got
        w, z64, d = write.double(), z.double(), (u_b - u_a).double()
        s, gm = scale.double(), gamma.double()
        inter = torch.einsum("pk,dk->pd", z64[:, head::H], W_O.double()[:, head::H])
        own = torch.rsqrt(w.pow(2).mean(-1, keepdim=True) + 1e-6)
        mistakes = {
            "multiply by the frozen final-norm scale (the argument scale, one per prompt): the final "
            "RMSNorm divides the residual stream by its rms before the unembedding.": (w * gm) @ d,
            "the final norm also multiplies each channel by its gain gamma.": (w * s) @ d,
            "the score is for the logit difference: take the dot product with u_biased - u_adv.":
                (w * s * gm) @ u_b.double(),
            "head h's part of z, and of W_O's columns, is the contiguous block h*d_head:(h+1)*d_head, "
            "not every H-th entry.": (inter * s * gm) @ d,
            "use the scale frozen from the whole residual stream (given), not the rms of this head's "
            "write alone: the norm sees every component at once.": (w * own * gm) @ d,
        }
        return diagnose(got, want, mistakes, atol=1e-4, rtol=1e-3, fallback=(
            "go through the three steps of the exercise again: what the head writes into the residual "
            "stream, how the final norm reads that write, and how the two unembedding rows read the result."))
    return judge(NAME, trial, on_error="z is (P, H*d_head), W_O (d_model, H*d_head): head h's columns are "
                                       "W_O[:, h*d_head:(h+1)*d_head].")


def check_generic_share(answer, scope) -> Checked:
    """Exercise 2: the share of the top DLA head's score that is not specific to the token."""
    layer, head = scope.top_heads("dla")[0]
    expected = 1 - scope.scores["delta_dla"][layer, head].item() / scope.scores["dla"][layer, head].item()
    return check("Exercise 2", answer, expected, tol=1e-6, hint="look up both scores at [layer, head] of the top DLA head")
