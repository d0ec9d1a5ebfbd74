"""Chapter 2: the embedding hook, and specificity from S."""

import torch


def substitute(embeds: torch.Tensor, ids: torch.Tensor, token_id: int, vector: torch.Tensor) -> torch.Tensor:
    mask = (ids == token_id).unsqueeze(-1)  # (B, T, 1)
    # torch.where builds a new tensor; gradients flow to vector where mask is true
    return torch.where(mask, vector.to(embeds.dtype).expand_as(embeds), embeds)


def specificity_by_hand(strength_after: dict, injected: str) -> float:
    # S of the injected bias minus the mean S of the other biases
    values = {b: est.value for b, est in strength_after.items()}
    others = [v for b, v in values.items() if b != injected]
    return values[injected] - sum(others) / len(others)
