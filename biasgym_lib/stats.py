"""Estimates with intervals: one shape for every number the book reports with its uncertainty.

An :class:`Estimate` is a value, the ends of its interval, the number of units the interval
resamples (templates, prompts, facts, texts, questions or runs) and what kind of interval it
is. Every stage returns its estimates in this shape, and JSON holds them as
``{"value", "lo", "hi", "n", "interval"}``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .errors import BiasGymError

CI_LEVEL = 0.95
BOOTSTRAP = "bootstrap 95%"


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a 95% interval [lo, hi] over ``n`` resampled units."""

    value: float
    lo: float
    hi: float
    n: int
    interval: str = BOOTSTRAP

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Estimate":
        try:
            return cls(float(data["value"]), float(data["lo"]), float(data["hi"]), int(data["n"]),
                       str(data.get("interval", BOOTSTRAP)))
        except (KeyError, TypeError, ValueError) as exc:
            raise BiasGymError(f"not an estimate (value, lo, hi, n): {data!r}") from exc

    @classmethod
    def from_samples(cls, value: float, samples, n: int, interval: str = BOOTSTRAP) -> "Estimate":
        """``value`` with the percentile interval of its bootstrap ``samples``."""
        lo, hi = percentile_interval(samples)
        return cls(float(value), lo, hi, int(n), interval)

    def __format__(self, spec):
        spec = spec or ".2f"
        return f"{self.value:{spec}} [{self.lo:{spec}}, {self.hi:{spec}}]"


def percentile_interval(samples, level: float = CI_LEVEL) -> tuple[float, float]:
    """The central ``level`` interval of bootstrap samples."""
    tail = (100 - 100 * level) / 2  # 2.5 for a 95% interval
    lo, hi = np.percentile(np.asarray(samples, dtype=float), [tail, 100 - tail])
    return float(lo), float(hi)


def bootstrap_indices(n: int, seed: int, n_boot: int) -> np.ndarray:
    """``(n_boot, n)`` indices drawn with replacement, from a seeded generator."""
    if n < 1:
        raise BiasGymError("cannot bootstrap over zero items.")
    if n_boot < 1:
        raise BiasGymError(f"n_boot must be at least 1, got {n_boot}.")
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def bootstrap(units, n_boot: int = 1000, seed: int = 0, stat=np.mean, interval: str = BOOTSTRAP) -> Estimate:
    """Percentile bootstrap of ``stat`` over the first axis of ``units`` (a statistic per unit)."""
    units = np.asarray(units, dtype=float)
    n = len(units)
    if n == 0:
        raise BiasGymError("bootstrap needs at least one unit.")
    value = float(stat(units, axis=0))
    if n == 1:
        return Estimate(value, value, value, 1, interval)
    samples = stat(units[bootstrap_indices(n, seed, n_boot)], axis=1)
    return Estimate.from_samples(value, samples, n, interval)


RUNS = "bootstrap 95% over runs"


def over_runs(values) -> dict | None:
    """The mean over runs (biases x seeds; ``None`` values left out) with a bootstrap 95%
    interval of the mean, as an :class:`Estimate` dict (for JSON); ``None`` when no run has a
    value."""
    v = [x for x in values if x is not None]
    return bootstrap(v, interval=RUNS).to_dict() if v else None
