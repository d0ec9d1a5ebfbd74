"""Chapter 0: counting heads and the trained numbers."""


def total_heads(info: dict) -> int:
    # every layer has the same number of heads
    return info["layers"] * info["heads"]


def trained_numbers(info: dict) -> int:
    # BiasInject trains one row of the embedding matrix: hidden (d_model) numbers
    return info["hidden"]
