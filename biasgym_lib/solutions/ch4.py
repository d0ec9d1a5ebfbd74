"""Chapter 4: steering one head (scale or mean-ablate), and a reduction by hand."""

import numpy as np
import torch


def scale_head(z: torch.Tensor, head: int, d_head: int, alpha: float) -> torch.Tensor:
    z = z.clone()  # a new tensor: never edit the activation in place
    z[..., head * d_head:(head + 1) * d_head] *= alpha
    return z


def mean_ablate_head(z: torch.Tensor, head: int, d_head: int, mean: torch.Tensor) -> torch.Tensor:
    z = z.clone()
    z[..., head * d_head:(head + 1) * d_head] = mean.to(z.dtype)  # broadcast over batch and positions
    return z


def reduction_by_hand(row: dict) -> float:
    # the mean over seeds of 1 - S_after / S_before
    return float(np.mean([1 - s["value"] / b for b, s in zip(row["S_before"], row["S"])]))
