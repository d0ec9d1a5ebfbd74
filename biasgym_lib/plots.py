"""Seaborn figures used by the chapters (one function per figure, same names as the text)."""

from __future__ import annotations

import matplotlib

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
