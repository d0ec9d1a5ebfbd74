"""Chapter 0's exercises: counting heads, and what BiasInject trains."""

from __future__ import annotations

from . import Checked, check


def check_total_heads(answer, adapter) -> Checked:
    return check("Exercise 1", answer, adapter.n_heads_total, hint="how many layers, and how many heads in each?")


def check_trained_numbers(answer, adapter) -> Checked:
    return check("Exercise 2", answer, adapter.d_model, hint="how long is one row of the embedding matrix?")
