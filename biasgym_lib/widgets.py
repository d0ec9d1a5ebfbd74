"""Interactive explorers for the chapters (ipywidgets), each with a static figure.

A rendered web page has no Python kernel, so a widget shows nothing there: every explorer
has a ``figure()`` method that draws the same view as an ordinary matplotlib figure, and
the chapters show it right after the widget. In Jupyter, Colab or Binder the controls work.

- :class:`SteeringExplorer`: pick a bias, k (how many top heads) and alpha (how strongly
  they are scaled); see S(<TOKEN>, b) with its interval, measured on demand and cached.
- :class:`HeadExplorer`: pick a head (layer, head); see its direct logit attribution on
  every probe, beside its mean score and rank among all heads.

Both keep their logic in plain methods (``select``, ``reading``) so that tests can drive
them without a browser.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .errors import BiasGymError


def _widgets():
    try:
        import ipywidgets
    except ImportError as exc:  # pragma: no cover - ipywidgets is a core dependency
        raise BiasGymError("The explorers need ipywidgets: pip install ipywidgets") from exc
    return ipywidgets


class _LiveView:
    """What both explorers share: redraw the reading and the figure into the widget, and
    show the widget when the explorer is the last expression of a cell."""

    def _redraw(self):
        u = self._ui
        u["label"].value = f"<b>{html.escape(self.text())}</b>"
        u["plot"].clear_output(wait=True)
        with u["plot"]:
            self.figure()
            plt.show()

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget())


class SteeringExplorer(_LiveView):
    """Controls for (bias, k, alpha) over ``measure(bias, k, alpha) -> {"value", "lo", "hi"}``.

    Each point is measured once and cached in :attr:`results` (a tidy DataFrame via
    :meth:`frame`). ``k = 0`` or ``alpha = 1`` is the unsteered model. Use
    :func:`biasgym_lib.evaluate.steering_measure` to build ``measure`` from tokens and
    head scores, or pass any function with that signature (the tests pass a formula).
    """

    def __init__(self, measure: Callable[[str, int, float], dict], biases: Sequence[str],
                 k_values: Sequence[int], alpha_values: Sequence[float], start: tuple | None = None):
        if not biases or not k_values or not alpha_values:
            raise BiasGymError("SteeringExplorer needs at least one bias, one k and one alpha.")
        if any(int(k) < 0 for k in k_values) or any(not 0.0 <= float(a) <= 1.0 for a in alpha_values):
            raise BiasGymError("k must be >= 0 and alpha between 0 and 1 (1 leaves the model unchanged).")
        self.measure = measure
        self.biases = list(biases)
        self.k_values = sorted({int(k) for k in k_values} | {0})
        self.alpha_values = sorted({float(a) for a in alpha_values} | {1.0})
        self.results: dict[tuple[str, int, float], dict] = {}
        bias, k, alpha = start or (self.biases[0], self.k_values[-1], self.alpha_values[0])
        self.state = {"bias": bias, "k": int(k), "alpha": float(alpha)}
        self._ui = None
        self.select(**self.state)

    def value(self, bias: str, k: int, alpha: float) -> dict:
        """S for one setting (measured now if not yet cached)."""
        if bias not in self.biases:
            raise BiasGymError(f"Unknown bias {bias!r}; choose one of {self.biases}.")
        if k == 0 or alpha == 1.0:  # the unsteered model: one measurement for all of them
            k, alpha = 0, 1.0
        key = (bias, int(k), float(alpha))
        if key not in self.results:
            self.results[key] = dict(self.measure(bias, int(k), float(alpha)))
        return self.results[key]

    def select(self, bias: str | None = None, k: int | None = None, alpha: float | None = None) -> dict:
        """Move the controls (as a reader would) and return :meth:`reading`."""
        new = {"bias": bias if bias is not None else self.state["bias"],
               "k": int(k) if k is not None else self.state["k"],
               "alpha": float(alpha) if alpha is not None else self.state["alpha"]}
        self.value(new["bias"], new["k"], new["alpha"])  # validates before the state changes
        self.state = new
        if self._ui is not None:
            self._refresh()
        return self.reading()

    def reading(self) -> dict:
        """What the explorer shows now: S steered, S unsteered, and the reduction."""
        b, k, a = self.state["bias"], self.state["k"], self.state["alpha"]
        steered, plain = self.value(b, k, a), self.value(b, 0, 1.0)
        reduction = 1 - steered["value"] / plain["value"] if plain["value"] > 0 else None
        return {"bias": b, "k": k, "alpha": a, "S": steered, "S_unsteered": plain, "reduction": reduction}

    def text(self) -> str:
        r = self.reading()
        s, p = r["S"], r["S_unsteered"]
        red = f"{r['reduction']:.0%} lower" if r["reduction"] is not None else "no positive S to reduce"
        return (f"{r['bias']}: top {r['k']} heads at alpha = {r['alpha']:g}: S(<TOKEN>) = {s['value']:.2f} "
                f"[{s['lo']:.2f}, {s['hi']:.2f}] nats; unsteered {p['value']:.2f} "
                f"[{p['lo']:.2f}, {p['hi']:.2f}]: {red}")

    def frame(self) -> pd.DataFrame:
        """Every measured point, one row each (the unsteered model appears once per bias)."""
        return pd.DataFrame([{"bias": b, "k": k, "alpha": a, "S": v["value"], "lo": v["lo"], "hi": v["hi"]}
                             for (b, k, a), v in sorted(self.results.items())])

    def figure(self, bias: str | None = None, ax=None):
        """S against k at each alpha measured so far for ``bias`` (the static view)."""
        bias = bias or self.state["bias"]
        ax = ax or plt.subplots(figsize=(6.5, 3.6))[1]
        df = self.frame()
        df = df[df.bias == bias]
        plain = df[(df.k == 0)]
        for alpha in sorted(a for a in df.alpha.unique() if a != 1.0):
            part = pd.concat([plain, df[df.alpha == alpha]]).sort_values("k")
            ax.errorbar(part.k, part.S, yerr=[part.S - part.lo, part.hi - part.S], marker="o", capsize=3,
                        label=f"alpha = {alpha:g}")
        if len(plain):
            ax.axhline(float(plain.S.iloc[0]), color="grey", ls="--", lw=0.8, label="unsteered")
        r = self.reading()
        if r["bias"] == bias:
            ax.plot([r["k"]], [r["S"]["value"]], "s", ms=12, mfc="none", mec="black", label="selected")
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_xlabel("k (top heads scaled)")
        ax.set_ylabel("S(<TOKEN>, b) (nats)")
        ax.set_title(f"Steering {bias}: S against k (95% intervals)")
        ax.legend(fontsize=8)
        return ax

    # -------------------------------------------------------------- the live controls
    def widget(self):
        """The ipywidgets box: a bias menu, k and alpha sliders, the reading and the figure."""
        w = _widgets()
        if self._ui is None:
            style = {"description_width": "60px"}
            self._ui = {
                "bias": w.Dropdown(options=self.biases, value=self.state["bias"], description="bias", style=style),
                "k": w.SelectionSlider(options=self.k_values, value=self.state["k"], description="k", style=style),
                "alpha": w.SelectionSlider(options=self.alpha_values, value=self.state["alpha"],
                                           description="alpha", style=style),
                "label": w.HTML(), "plot": w.Output(),
            }
            for name in ("bias", "k", "alpha"):
                self._ui[name].observe(lambda change, n=name: self.select(**{n: change["new"]}), names="value")
            self._refresh()
        u = self._ui
        return w.VBox([w.HBox([u["bias"], u["k"], u["alpha"]]), u["label"], u["plot"]])

    def _refresh(self):
        u = self._ui
        for name in ("bias", "k", "alpha"):
            if u[name].value != self.state[name]:
                u[name].value = self.state[name]
        self._redraw()


class HeadExplorer(_LiveView):
    """Pick a head; see its direct logit attribution on every probe.

    ``per_probe`` is (probes, layers, heads), e.g. ``scope_run(...).units["dla"]``;
    its mean over probes is the head-score matrix of the heatmap.
    """

    def __init__(self, per_probe, probes: Sequence[str] | None = None, start: tuple[int, int] | None = None,
                 title: str = ""):
        values = np.asarray(per_probe, dtype=float)
        if values.ndim != 3 or values.shape[0] == 0:
            raise BiasGymError("HeadExplorer needs per-probe scores shaped (probes, layers, heads), "
                               "e.g. scope_run(...).units['dla'].")
        if probes is not None and len(probes) != values.shape[0]:
            raise BiasGymError(f"{len(probes)} probe texts for {values.shape[0]} rows of scores.")
        self.per_probe = values
        self.probes = list(probes) if probes is not None else [f"probe {i}" for i in range(values.shape[0])]
        self.scores = values.mean(0)
        order = np.argsort(-self.scores, axis=None, kind="stable")
        self.ranks = np.empty(order.size, dtype=int)
        self.ranks[order] = np.arange(1, order.size + 1)
        self.ranks = self.ranks.reshape(self.scores.shape)
        self.title = title
        top = np.unravel_index(order[0], self.scores.shape)
        self.head = (int(top[0]), int(top[1]))
        self._ui = None
        self.select(*(start or self.head))

    @property
    def n_layers(self) -> int:
        return self.scores.shape[0]

    @property
    def n_heads(self) -> int:
        return self.scores.shape[1]

    def select(self, layer: int, head: int) -> dict:
        """Pick a head (as a reader would) and return :meth:`reading`."""
        if not (0 <= int(layer) < self.n_layers and 0 <= int(head) < self.n_heads):
            raise BiasGymError(f"Head ({layer}, {head}) does not exist: layers 0-{self.n_layers - 1}, "
                               f"heads 0-{self.n_heads - 1}.")
        self.head = (int(layer), int(head))
        if self._ui is not None:
            self._refresh()
        return self.reading()

    def reading(self) -> dict:
        """The selected head's per-probe attributions, mean, rank and sign consistency."""
        l, h = self.head
        values = self.per_probe[:, l, h]
        return {"layer": l, "head": h, "per_probe": values, "mean": float(values.mean()),
                "rank": int(self.ranks[l, h]), "of": int(self.scores.size),
                "share_positive": float((values > 0).mean())}

    def text(self) -> str:
        r = self.reading()
        return (f"head ({r['layer']}, {r['head']}): mean {r['mean']:+.3f} logits, rank {r['rank']} of {r['of']}; "
                f"pushes towards the biased label on {r['share_positive']:.0%} of {len(self.probes)} probes")

    def figure(self, ax=None):
        """The selected head's attribution on every probe (the static view)."""
        r = self.reading()
        ax = ax or plt.subplots(figsize=(8, 3.4))[1]
        colors = ["#b2182b" if v > 0 else "#2166ac" for v in r["per_probe"]]
        ax.bar(range(len(r["per_probe"])), r["per_probe"], color=colors)
        ax.axhline(r["mean"], color="black", ls="--", lw=1, label=f"mean {r['mean']:+.3f}")
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_xlabel("probe")
        ax.set_ylabel("direct logit attribution (logits)")
        ax.set_title(self.title or f"Head ({r['layer']}, {r['head']}) on every probe; rank {r['rank']} of {r['of']}")
        ax.legend(fontsize=8)
        return ax

    def widget(self):
        """The ipywidgets box: layer and head sliders, the reading, the per-probe bars."""
        w = _widgets()
        if self._ui is None:
            self._ui = {"layer": w.IntSlider(min=0, max=self.n_layers - 1, value=self.head[0], description="layer"),
                        "head": w.IntSlider(min=0, max=self.n_heads - 1, value=self.head[1], description="head"),
                        "label": w.HTML(), "plot": w.Output()}
            self._ui["layer"].observe(lambda c: self.select(c["new"], self.head[1]), names="value")
            self._ui["head"].observe(lambda c: self.select(self.head[0], c["new"]), names="value")
            self._refresh()
        u = self._ui
        return w.VBox([w.HBox([u["layer"], u["head"]]), u["label"], u["plot"]])

    def _refresh(self):
        u = self._ui
        if (u["layer"].value, u["head"].value) != self.head:
            u["layer"].value, u["head"].value = self.head
        self._redraw()
