"""Chapter 5: the leave-one-bias-out split, and a fair comparison."""


def held_out_splits(runs: list) -> dict:
    biases = list(dict.fromkeys(bias for bias, _ in runs))
    splits = {}
    for held in biases:
        train = [r for r in runs if r[0] != held]  # every seed of every OTHER bias
        test = [r for r in runs if r[0] == held]  # every seed of the held-out bias
        splits[held] = (train, test)
    return splits


def fair_comparison(held, k: int) -> float:
    # the paper's heads minus random heads of the same kind and k, averaged over held-out biases
    col = held["S removed (mean over seeds)"]
    return float(col["paper"].mean() - col[f"random / zero / k = {k}"].mean())
