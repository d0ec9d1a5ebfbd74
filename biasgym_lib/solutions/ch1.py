"""Chapter 1: the log-probability of a continuation, and S by hand."""

import numpy as np
import torch


def continuation_logprob(logits: torch.Tensor, ids: torch.Tensor, n_prefix: int) -> torch.Tensor:
    logprobs = logits.log_softmax(dim=-1)  # (T, V): log P(next token) at each position
    # position t - 1 predicts token t; the continuation is ids[n_prefix:]
    targets = ids[n_prefix:]
    predicted_by = logprobs[n_prefix - 1:-1]  # rows n_prefix-1 .. T-2
    return predicted_by.gather(-1, targets.unsqueeze(-1)).sum()


def strength_by_hand(table, country: str, bias: str, countries: list[str]) -> float:
    # S(e, b) = assoc(e, b) minus the mean assoc of the other reference countries
    others = [c for c in countries if c != country]
    return table.assoc(country, bias) - float(np.mean([table.assoc(c, bias) for c in others]))
