"""Run profiles: one file (``profiles.yaml`` at the project root) that every chapter and
every CLI command reads, so that a GPU run is a parameter change, not a code change."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from .errors import BiasGymError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PROFILES_FILE = PROJECT_ROOT / "profiles.yaml"
DEFAULT_PROFILE = "teaching"


@dataclass(frozen=True)
class Profile:
    """Every size and setting a stage needs; see profiles.yaml for the meaning of each."""

    name: str
    model: str
    device: str
    dtype: str
    seeds: tuple[int, ...]
    biases: tuple[str, ...]
    n_paragraphs: int
    epochs: int
    lr: float
    batch_size: int
    init: str
    n_probes: int
    k: int
    k_grid: tuple[int, ...]
    alpha_grid: tuple[float, ...]
    n_random_draws: int
    n_generations: int
    steer_references: int
    n_patch_probes: int
    n_ppl_texts: int
    n_mc_questions: int
    use_committed_tokens: bool
    n_country_texts: int
    ppl_max_tokens: int
    patch_top: int
    grid_biases: int
    grid_methods: tuple[str, ...]
    grid_kinds: tuple[str, ...]
    grid_k: tuple[int, ...]
    curve_methods: tuple[str, ...]
    curve_kinds: tuple[str, ...]
    overrides: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


_TUPLES = {"seeds": int, "biases": str, "k_grid": int, "alpha_grid": float, "grid_methods": str,
           "grid_kinds": str, "grid_k": int, "curve_methods": str, "curve_kinds": str}


def profile_names(path: Path = PROFILES_FILE) -> list[str]:
    return list(_read(path))


def _read(path: Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError as exc:
        raise BiasGymError(f"profiles file {path} not found; it ships at the project root.") from exc
    except yaml.YAMLError as exc:
        raise BiasGymError(f"profiles file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise BiasGymError(f"profiles file {path} must map profile names to settings.")
    return data


def load_profile(name: str | None = None, path: Path = PROFILES_FILE, **overrides) -> Profile:
    """The profile ``name`` (default ``teaching``), with every non-None override applied.

    ``load_profile("quick", seeds=[3])`` is how a notebook's ``parameters`` cell passes its
    values: parameters left at ``None`` keep the profile's value.
    """
    name = name or DEFAULT_PROFILE
    data = _read(path)
    if name not in data:
        raise BiasGymError(f"unknown profile {name!r}; profiles in {path}: {', '.join(data)}.")
    values = dict(data[name])
    known = {f.name for f in fields(Profile)} - {"name", "overrides"}
    applied = {k: v for k, v in overrides.items() if v is not None}
    unknown = (set(values) | set(applied)) - known
    if unknown:
        raise BiasGymError(f"profile {name!r}: unknown setting(s) {sorted(unknown)}; known: {sorted(known)}.")
    values.update(applied)
    missing = known - set(values)
    if missing:
        raise BiasGymError(f"profile {name!r} in {path} lacks setting(s) {sorted(missing)}.")
    for key, cast in _TUPLES.items():
        v = values[key]
        values[key] = tuple(cast(x) for x in (v if isinstance(v, (list, tuple)) else [v]))
    for key in ("n_paragraphs", "epochs", "batch_size", "n_probes", "k", "n_random_draws", "n_generations",
                "steer_references", "n_patch_probes", "n_ppl_texts", "n_mc_questions", "n_country_texts",
                "ppl_max_tokens", "patch_top", "grid_biases"):
        values[key] = int(values[key])
        if values[key] < 0:
            raise BiasGymError(f"profile {name!r}: {key} must be >= 0, got {values[key]}.")
    values["lr"] = float(values["lr"])
    from .pipeline import METHODS  # the ways of ranking heads, and the kinds of intervention

    kinds = ("zero", "mean", "blind")
    for key, allowed in (("grid_methods", METHODS), ("curve_methods", METHODS), ("grid_kinds", kinds),
                         ("curve_kinds", kinds)):
        unknown = [v for v in values[key] if v not in allowed]
        if unknown:
            raise BiasGymError(f"profile {name!r}: {key} has unknown entries {unknown}; known: {list(allowed)}.")
    if values["k"] not in values["grid_k"]:
        raise BiasGymError(f"profile {name!r}: k={values['k']} must be one of grid_k {list(values['grid_k'])}.")
    if values["n_ppl_texts"] > 32:
        raise BiasGymError(f"profile {name!r}: n_ppl_texts must be at most 32 (neutral passages 33-44 are the "
                           "held-out distribution of mean-ablation).")
    return Profile(name=name, overrides=applied, **values)
