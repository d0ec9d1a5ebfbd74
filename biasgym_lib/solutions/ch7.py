"""Chapter 7: the culture margin, and two readings of the culture tables."""


def culture_margin(logp, right):
    mean = logp.mean(0)  # average over the phrasings: one log-probability per country
    best = max(right, key=lambda i: float(mean[i]))  # the best of the right countries
    others = [i for i in range(len(mean)) if i not in right]  # every country that is not right
    return mean[best] - mean[others].mean()


def best_dimension(before):
    margins = {d: v["value"] for d, v in before["margin"].items() if d != "all"}
    return max(margins, key=margins.get)


def paper_against_random(lines, k):
    by = {(x["source"], x["method"], x["kind"], x["k"]): x for x in lines}
    paper, rand = by[("confirm", "robust", "zero", k)], by[("confirm", "random", "zero", k)]
    return 100 * (paper["culture"]["all"]["margin_lost"]["value"] - rand["culture"]["all"]["margin_lost"]["value"])
