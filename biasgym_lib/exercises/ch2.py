"""Chapter 2's build exercise: the embedding hook that puts the trainable vector in place.

``substitute(embeds, ids, token_id, vector)`` gets the embedding layer's output ``embeds``
``(B, T, d)``, the input ids ``(B, T)``, the new token's id and its trainable ``vector``
``(d,)``, and returns the embeddings with ``vector`` at every position holding ``token_id``:
what :class:`biasgym_lib.tokens.TokenHook` does with :func:`biasgym_lib.tokens.place_vector`.
Gradients must reach ``vector``: that is the only thing BiasInject trains.
"""

from __future__ import annotations

import torch

from ..tokens import place_vector
from . import Checked, call, check, judge

NAME = "Exercise 1 (substitute)"


def check_substitute(fn) -> Checked:
    """Run ``fn`` on random embeddings and ids (the token two or more times, and once not at
    all) and compare values and gradients with :func:`biasgym_lib.tokens.place_vector`."""

    def trial(seed: int) -> str | None:
        g = torch.Generator().manual_seed(2000 + seed)
        B, T, d, token_id = 2, 5 + seed, 8, 7
        embeds = torch.randn(B, T, d, generator=g)
        ids = torch.randint(0, 7, (B, T), generator=g)  # ids 0..6: token 7 only where we put it
        if seed < 2:
            ids[0, 1] = ids[1, T - 1] = token_id
            ids[seed, 0] = token_id
        vector = torch.randn(d, generator=g)
        mask = ids == token_id
        want = place_vector(embeds, mask, vector)
        e_in, ids_in, v_in = embeds.clone(), ids.clone(), vector.clone().requires_grad_(True)
        out = call(fn, e_in, ids_in, token_id, v_in)
        if not torch.equal(e_in, embeds):
            return ("you changed embeds in place. Return a new tensor (torch.where, or clone first): "
                    "the embedding output is shared with autograd and with other hooks.")
        if not isinstance(out, torch.Tensor) or out.shape != embeds.shape:
            return f"return a tensor of the shape of embeds, {tuple(embeds.shape)}."
        if not torch.allclose(out.detach()[~mask], want[~mask]):
            return "positions whose id is not token_id changed: only the new token's positions get the vector."
        if not torch.allclose(out.detach()[mask], want[mask]):
            return "some positions whose id is token_id do not hold vector: write it at every one, in every row."
        if not mask.any():
            return None
        w = torch.randn(out.shape, generator=g)
        if not out.requires_grad:
            return ("the gradient does not reach vector: do not detach it, use .data, or write it "
                    "under torch.no_grad(); BiasInject trains vector through this output.")
        (out * w).sum().backward()
        expected_grad = (w * mask.unsqueeze(-1)).sum((0, 1))
        if v_in.grad is None or not torch.allclose(v_in.grad, expected_grad, atol=1e-5):
            return ("the gradient does not reach vector (or reaches it wrongly): do not detach it, use "
                    ".data, or copy its numbers; build the output from vector itself.")
        return None
    return judge(NAME, trial, on_error="embeds is (B, T, d), ids (B, T), vector (d,); ids == token_id is the mask.")


def check_specificity(answer, result) -> Checked:
    """Exercise 2: the specificity of one injection run, from its S for every bias."""
    return check("Exercise 2", answer, result.specificity_after.value, tol=1e-6,
                 hint="use the .value of each bias's estimate; exclude the injected bias from the mean")
