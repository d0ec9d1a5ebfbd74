"""Seaborn figures used by the chapters (one function per figure, same names as the text)."""

from __future__ import annotations

import matplotlib
import matplotlib.pyplot as plt
import matplotlib.patches
import matplotlib.ticker
import numpy as np
import pandas as pd
import seaborn as sns

sns.set_theme(style="whitegrid", context="notebook")


def strength_heatmap(matrix: pd.DataFrame, title: str = "Stereotype strength S (nats)", ax=None):
    """Entities x biases heatmap of S, centred at 0 (red = more associated than average)."""
    ax = ax or plt.subplots(figsize=(1.2 * matrix.shape[1] + 3, 0.32 * matrix.shape[0] + 1.5))[1]
    lim = float(np.nanmax(np.abs(matrix.values))) or 1.0
    sns.heatmap(matrix, cmap="RdBu_r", center=0, vmin=-lim, vmax=lim, annot=True, fmt=".1f",
                annot_kws={"size": 7}, cbar_kws={"label": "S (nats)"}, ax=ax)
    ax.set_title(title)
    ax.set_xlabel("bias")
    ax.set_ylabel("")
    return ax


def loss_curve(injected_list, ax=None):
    """Training loss per step for one or several injected tokens (one line per seed/bias)."""
    ax = ax or plt.subplots(figsize=(7, 3.5))[1]
    rows = [{"step": i + 1, "loss": v, "run": f"{t.bias} seed {t.seed}"}
            for t in injected_list for i, v in enumerate(t.losses)]
    sns.lineplot(pd.DataFrame(rows), x="step", y="loss", hue="run", ax=ax)
    ax.set_ylabel("answer-token cross-entropy (nats)")
    ax.set_title("BiasInject: training loss (only the <TOKEN> vector is trained)")
    return ax


def interval_bars(df: pd.DataFrame, x: str, y: str, lo: str, hi: str, hue: str | None = None,
                  title: str = "", ylabel: str = "S (nats)", ax=None):
    """Bars with 95% intervals drawn from explicit lo/hi columns (our bootstrap intervals)."""
    ax = ax or plt.subplots(figsize=(max(6, 0.9 * df[x].nunique() * (df[hue].nunique() if hue else 1)), 3.8))[1]
    sns.barplot(df, x=x, y=y, hue=hue, ax=ax, errorbar=None)
    # place the interval on each bar, matching bars by their centre and height
    xs = [(p.get_x() + p.get_width() / 2, p.get_height()) for p in ax.patches if p.get_width() > 0]
    for (cx, h) in xs:
        match = df[np.isclose(df[y], h)]
        if len(match):
            r = match.iloc[0]
            ax.plot([cx, cx], [r[lo], r[hi]], color="black", lw=1.2)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.set_xlabel("")
    ax.tick_params(axis="x", rotation=20)
    return ax


def head_heatmap(scores, title: str = "Head scores: direct logit attribution (nats)", ax=None, top=None):
    """Layers x heads heatmap of head scores; ``top`` heads are outlined."""
    scores = np.asarray(scores)
    ax = ax or plt.subplots(figsize=(0.5 * scores.shape[1] + 2.5, 0.22 * scores.shape[0] + 1.5))[1]
    lim = float(np.abs(scores).max()) or 1.0
    sns.heatmap(scores, cmap="RdBu_r", center=0, vmin=-lim, vmax=lim, ax=ax,
                cbar_kws={"label": "score"}, yticklabels=max(1, scores.shape[0] // 15))
    for (l, h) in (top or []):
        ax.add_patch(matplotlib.patches.Rectangle((h, l), 1, 1, fill=False, edgecolor="black", lw=1.5))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title)
    return ax


def selection_frontier(summary, costs=(("facts_reduction", "facts' S lost"), ("perplexity:countries", "perplexity change, text naming countries")),
                       bounds=None, title: str = "", axes=None):
    """Selection decided by intervention: for each kind of intervention (a row of panels)
    and each cost (a column), the mean S reduction against that cost; one curve per way of
    ranking heads, its points at increasing k (hollow markers, one shape per method, so that
    curves that coincide stay visible); random heads as grey crosses. The green corner,
    labelled in the legend, is the target stated in advance. ``summary``: the
    :class:`~biasgym_lib.selection.SteeringResult` lines of :func:`~biasgym_lib.selection.summarise_grid`."""
    from .selection import GRID_BOUNDS

    bounds = bounds or GRID_BOUNDS
    df = pd.DataFrame([{"method": x.method, "kind": x.kind, "k": x.k,
                        "reduction": x.reduction.value if x.reduction else np.nan,
                        "facts_reduction": x.facts_reduction.value,
                        **{f"perplexity:{n}": v.value for n, v in x.perplexity.items()}} for x in summary])
    kinds = list(dict.fromkeys(df["kind"]))
    if axes is None:
        fig, axes = plt.subplots(len(kinds), len(costs), figsize=(5.2 * len(costs), 3.6 * len(kinds)), squeeze=False)
    methods = [m for m in dict.fromkeys(df["method"]) if m != "random"]
    palette = dict(zip(methods, sns.color_palette("tab10", len(methods))))
    markers = dict(zip(methods, "os^DvP*X"))  # curves that coincide stay distinguishable
    for i, kind in enumerate(kinds):
        for j, (col, label) in enumerate(costs):
            ax = axes[i][j]
            sub = df[df.kind == kind]
            if col not in sub:
                ax.set_visible(False)
                continue
            for m in methods:
                line = sub[sub.method == m].sort_values("k")
                if len(line):
                    ax.plot(line[col], line["reduction"], marker=markers.get(m, "o"), ms=5, mfc="none", color=palette[m],
                            label=m)
                    last = line.iloc[-1]
                    ax.annotate(f"k={int(last.k)}", (last[col], last.reduction), fontsize=6, xytext=(3, 2),
                                textcoords="offset points", color=palette[m])
            rnd = sub[sub.method == "random"]
            ax.scatter(rnd[col], rnd["reduction"], marker="x", color="grey", label="random heads", zorder=3)
            bound = bounds["facts"] if col == "facts_reduction" else bounds["perplexity"]
            xmin = min(0.0, float(np.nanmin(sub[col])) if len(sub) else 0.0) - 0.02
            ax.fill_between([xmin, bound], 0.5, 1.0, color="green", alpha=0.1,
                            label="target: >= 50% removed, cost within its bound")
            ax.axhline(0, color="grey", lw=0.6)
            ax.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
            ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
            ax.set_xlabel(label)
            ax.set_ylabel(f"S removed ({kind})" if j == 0 else "")
            if i == 0 and j == len(costs) - 1:
                ax.legend(fontsize=7, loc="lower right")
    if title:
        axes[0][0].figure.suptitle(title)
    axes[0][0].figure.tight_layout()
    return axes


PIPELINE = (("BiasInject", "ch. 2", "train one new\ntoken's vector"),
            ("measure", "ch. 1", "S, specificity,\nwith intervals"),
            ("BiasScope", "ch. 3", "score every head\n(DLA, ΔDLA, patching)"),
            ("steer", "ch. 4", "scale, mean-ablate\nor blind the top k"),
            ("generalise", "ch. 5-6", "held-out biases,\nSeeGULL, the claims"))
"""The book's stages, in the order the method runs them: (name, chapter, what it does)."""


def culture_kept(lines, title: str = "", ax=None):
    """Stereotype removed against cultural knowledge lost, one point per selection of
    :func:`~biasgym_lib.culture.culture_summary` (its margin lost with the bootstrap interval
    over items as a horizontal bar); random heads as grey crosses. The shaded band is the
    bound stated in advance (the margin loses at most 10%)."""
    from .culture import CULTURE_BOUNDS

    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 4.0))
    palette = sns.color_palette("tab10", 10)
    for i, x in enumerate(lines):
        m = x["culture"]["all"]["margin_lost"]
        y = np.nan if x["reduction"] is None else x["reduction"]
        label = f"{x['source']}: {x['method']} / {x['kind']} / k = {x['k']}"
        if x["method"] == "random":
            ax.errorbar(m["value"], y, xerr=[[m["value"] - m["lo"]], [m["hi"] - m["value"]]], fmt="x", color="grey",
                        capsize=2, label=label)
        else:
            ax.errorbar(m["value"], y, xerr=[[m["value"] - m["lo"]], [m["hi"] - m["value"]]], fmt="o", mfc="none",
                        color=palette[i % 10], capsize=2, label=label)
    ax.axvspan(ax.get_xlim()[0], CULTURE_BOUNDS["margin"], color="green", alpha=0.08,
               label=f"culture margin loses <= {CULTURE_BOUNDS['margin']:.0%} (stated in advance)")
    ax.axvline(0, color="black", lw=0.5)
    ax.set_xlabel("cultural knowledge lost (share of the right country's margin)")
    ax.set_ylabel("stereotype removed (share of S)")
    ax.set_title(title or "What each selection removes, and what it keeps")
    ax.legend(fontsize=6, loc="best")
    return ax


def pipeline_diagram(stages=PIPELINE, ax=None):
    """The method as boxes and arrows, one box per stage of :data:`PIPELINE`, drawn at build time."""
    ax = ax or plt.subplots(figsize=(2.3 * len(stages), 1.9))[1]
    for i, (name, chapter, what) in enumerate(stages):
        ax.add_patch(matplotlib.patches.FancyBboxPatch((i * 2.3, 0), 1.8, 1.2, boxstyle="round,pad=0.05",
                                                       facecolor="#dbe9f6", edgecolor="#2b5b84"))
        ax.text(i * 2.3 + 0.9, 0.92, name, ha="center", va="center", fontsize=10, weight="bold")
        ax.text(i * 2.3 + 0.9, 0.45, f"{what}\n({chapter})", ha="center", va="center", fontsize=7.5)
        if i:
            ax.annotate("", xy=(i * 2.3 - 0.05, 0.6), xytext=(i * 2.3 - 0.45, 0.6),
                        arrowprops={"arrowstyle": "->", "color": "#2b5b84", "lw": 1.5})
    ax.set_xlim(-0.2, 2.3 * len(stages) - 0.3)
    ax.set_ylim(-0.15, 1.35)
    ax.axis("off")
    return ax


def glue(name: str, value, display: bool = False) -> None:
    """myst-nb's ``glue`` (the web page puts ``value`` where the text cites ``name``), plus
    one printed line ``name: value``: in Jupyter the text's ``{glue:text}`` roles are not
    filled in, so a reader there sees the numbers the summary quotes in this cell's output
    (the web page removes the cell)."""
    from myst_nb import glue as myst_glue

    myst_glue(name, value, display=display)
    shown = f"{value:.4g}" if isinstance(value, float) else str(value)
    print(f"{name}: {shown}")
