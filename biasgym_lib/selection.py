"""Comparing ways of ranking heads fairly (issue 23): two rankings only where the grid steered
both with the same kind and k, with a tie rule read off their intervals. Chapters 4 and 6 lead
with it; the rule's choice and the paper's selection, each at its own k, come after."""

from __future__ import annotations

from collections.abc import Sequence

from .evaluate import SteeringResult, _interval
from .stats import Estimate


def compare(a: Estimate | None, b: Estimate | None, names: tuple[str, str], word: str = "higher") -> str:
    """Which of two estimates is larger, judged by their 95% intervals: "tie" when the
    intervals overlap (the data do not separate them, which is not the same as showing them
    equal), else "<name of the larger> <word>": a difference inside the noise is never read as
    a win. With few units (three seeds) a percentile interval is little more than their range."""
    if a is None or b is None:
        return "not measured"
    if a.lo > b.hi:
        return f"{names[0]} {word}"
    if b.lo > a.hi:
        return f"{names[1]} {word}"
    return "tie"


def at_equal_k(summary: Sequence[SteeringResult | dict], methods: tuple[str, str]) -> list[dict]:
    """Two ways of ranking heads compared only where both were steered with the same kind
    and k (issue 23: a comparison across different k says more about k than about the
    ranking). For each such (kind, k): each method's S removed and facts lost, with their
    intervals and the number of heads actually steered (the robust set can hold fewer than
    k), random heads at the same kind and k where the grid measured them, and
    :func:`compare`'s verdict on each (tie when the intervals overlap; "unequal heads" added
    where the two sets hold different numbers of heads). Nothing to compare when both names
    are the same ranking (the rule chose the paper's)."""
    lines = [x if isinstance(x, SteeringResult) else SteeringResult.from_dict(x) for x in summary]
    by_key = {x.key: x for x in lines}
    a_name, b_name = methods
    out = []
    if a_name == b_name:
        return out
    for kind, k in sorted({(x.kind, x.k) for x in lines}):
        a, b = by_key.get((a_name, kind, k)), by_key.get((b_name, kind, k))
        if a is None or b is None:
            continue
        rand = by_key.get(("random", kind, k))
        out.append({"kind": kind, "k": k, "methods": [a_name, b_name], "heads": [a.mean_heads, b.mean_heads],
                    "reduction": [a.reduction, b.reduction], "facts_reduction": [a.facts_reduction, b.facts_reduction],
                    "random_reduction": rand.reduction if rand else None,
                    "S": compare(a.reduction, b.reduction, methods)
                    + ("" if a.mean_heads == b.mean_heads else f" (unequal heads: {a.mean_heads:g} / {b.mean_heads:g})"),
                    # the one that loses clearly more of the facts' S, the *other* keeps more
                    "facts": compare(a.facts_reduction, b.facts_reduction, (b_name, a_name), "keeps more")})
    return out


def equal_k_frame(rows: Sequence[dict]):
    """:func:`at_equal_k`'s comparisons as a table: one row per (kind, k)."""
    import pandas as pd

    table = []
    for r in rows:
        a, b = r["methods"]
        table.append({"kind": r["kind"], "k": r["k"], f"heads ({a} / {b})": f"{r['heads'][0]:.0f} / {r['heads'][1]:.0f}",
                      f"S removed, {a}": _interval(r["reduction"][0]), f"S removed, {b}": _interval(r["reduction"][1]),
                      "random heads": _interval(r["random_reduction"]) if r["random_reduction"] else "not measured",
                      "S: verdict": r["S"], f"facts lost, {a}": _interval(r["facts_reduction"][0]),
                      f"facts lost, {b}": _interval(r["facts_reduction"][1]), "facts: verdict": r["facts"]})
    return pd.DataFrame(table)


def equal_k_text(rows: Sequence[dict]) -> str:
    """:func:`at_equal_k`'s comparisons in one line of prose for the book's summaries."""
    def pct(e):  # a share that rounds to 0 is "0%", never "-0%"
        return "not measured" if e is None else f"{e.value:.0%}".replace("-0%", "0%")

    parts = []
    for r in rows:
        a, b = r["reduction"]
        fa, fb = r["facts_reduction"]
        parts.append(f"k = {r['k']} ({r['kind']}): S removed {pct(a)} vs {pct(b)}, {r['S']}; "
                     f"facts lost {pct(fa)} vs {pct(fb)}, {r['facts']}")
    return "; ".join(parts) if parts else "no k at which both were steered"


def equal_k_tally(rows: Sequence[dict]) -> str:
    """:func:`at_equal_k`'s verdicts counted, for a summary where one line per (kind, k) is too
    long: at how many (kind, k) each ranking removed clearly more of S, and kept clearly more of
    the facts, and at how many they tied (intervals overlapping)."""
    if not rows:
        return "no k at which both were steered"
    a, b = rows[0]["methods"]

    def count(key: str, word: str) -> str:
        verdicts = [r[key].split(" (")[0] for r in rows]
        return (f"{a} {verdicts.count(f'{a} {word}')}, {b} {verdicts.count(f'{b} {word}')}, "
                f"tie {verdicts.count('tie')}")
    return (f"over {len(rows)} pairs of kind and k, S removed clearly more: {count('S', 'higher')}; "
            f"facts kept clearly more: {count('facts', 'keeps more')}")
