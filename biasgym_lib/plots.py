"""Seaborn figures used by the chapters (one function per figure, same names as the text)."""

from __future__ import annotations

import matplotlib
import matplotlib.ticker

import matplotlib.pyplot as plt
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


def dose_response(df: pd.DataFrame, x: str, y: str, hue: str, title: str = "", ylabel: str = "S (nats)", ax=None):
    """Lines of ``y`` against ``x`` (e.g. S against k), one per ``hue`` (e.g. alpha or method)."""
    ax = ax or plt.subplots(figsize=(6.5, 3.8))[1]
    sns.lineplot(df, x=x, y=y, hue=hue, marker="o", ax=ax, errorbar=("pi", 95) if df.duplicated([x, hue]).any() else None)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    return ax


def tradeoff(df: pd.DataFrame, target_reduction: float = 0.5, max_ppl_change: float = 0.05, title: str = "", ax=None):
    """Each (k, alpha) as a point: S reduction against perplexity change. The shaded corner
    is where a steering setting would meet both targets (reduction >= ``target_reduction``,
    perplexity change <= ``max_ppl_change``). Needs columns k, alpha, reduction, ppl_change."""
    ax = ax or plt.subplots(figsize=(6.5, 4))[1]
    sns.scatterplot(df, x="ppl_change", y="reduction", hue="alpha", style="alpha", s=70, ax=ax, palette="viridis")
    for _, r in df.iterrows():
        ax.annotate(f"k={int(r.k)}", (r.ppl_change, r.reduction), textcoords="offset points", xytext=(4, 4), fontsize=7)
    xmin = min(float(df.ppl_change.min()), 0.0) - 0.02
    ax.fill_between([xmin, max_ppl_change], target_reduction, max(1.0, float(df.reduction.max()) + 0.05),
                    color="green", alpha=0.12, label="meets both targets")
    ax.axhline(target_reduction, color="green", ls="--", lw=0.8)
    ax.axvline(max_ppl_change, color="green", ls="--", lw=0.8)
    ax.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.set_xlabel("perplexity change on neutral text")
    ax.set_ylabel("reduction of S(<TOKEN>, b)")
    ax.set_title(title or "Steering: bias removed against ability lost")
    ax.legend(fontsize=8)
    return ax
