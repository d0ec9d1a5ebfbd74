"""Chapter 3: one head's direct logit attribution, and how generic its score is."""

import torch


def head_dla(z: torch.Tensor, W_O: torch.Tensor, head: int, d_head: int, scale: torch.Tensor,
             gamma: torch.Tensor, u_biased: torch.Tensor, u_adv: torch.Tensor) -> torch.Tensor:
    block = slice(head * d_head, (head + 1) * d_head)
    write = z[:, block] @ W_O[:, block].T  # (P, d_model): what the head adds to the residual stream
    normed = write * scale * gamma  # the final RMSNorm as a linear map, its scale frozen
    return normed @ (u_biased - u_adv)  # (P,): its part of logit[biased] - logit[adv]


def generic_share(scores: dict, head: tuple) -> float:
    # the part of the head's DLA that real countries get too: 1 - delta_dla / dla
    layer, h = head
    return 1 - scores["delta_dla"][layer, h].item() / scores["dla"][layer, h].item()
