"""Run profiles: one file (``profiles.yaml`` at the project root) that every chapter and
every CLI command reads, so that a GPU run is a parameter change, not a code change."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

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
    target_strength: float | None  # None: keep the epoch with the largest held-out specificity
    realistic_lr: float  # the second token set, of realistic strength (issue 23)
    realistic_target: float
    batch_size: int
    init: str
    n_probes: int
    n_probe_pool: int
    probe_criterion: str  # "absolute": the biased label wins on the probe; "relative": it gains against a real country
    k: int
    k_grid: tuple[int, ...]
    alpha_grid: tuple[float, ...]
    n_random_draws: int
    n_matched_draws: int  # layer-matched random draws per compared selection (issue 23)
    n_cost_draws: int  # random draws (uniform or matched) that also get perplexity and multiple choice
    grid_matched: bool  # the grid's every point gets its layer-matched draws (else only the later stages)
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
    culture_per_dimension: int = 0  # chapter 7's items: the first N of each dimension of data/culture.yaml (0: all)
    seegull_per_country: int = 6  # chapter 5: at most this many SeeGULL pairs per country
    facts_per_relation: int = 0  # the knowledge control: the first N facts of each relation (0: all)
    scope_biases: int = 0  # BiasScope, steering and transfer (chapters 3-7) on the first N biases (0: all)
    vlm: str = ""  # a vision-language model for chapter 7's photos ("": none; needs the hub)
    cell_timeout: int = 1800  # seconds a chapter's cell may run in the book build (not part of any result)
    overrides: dict = field(default_factory=dict)

    @property
    def scoped_biases(self) -> tuple[str, ...]:
        """The biases that BiasScope traces and steering removes (chapters 3-7): the first
        ``scope_biases`` of ``biases``, or all of them. The rest are injected and measured
        (chapters 1-2, and as the other biases of specificity) but never traced."""
        return self.biases[: self.scope_biases] if self.scope_biases else self.biases

    def to_dict(self) -> dict:
        """The settings that can change a result (the run keys of :mod:`~biasgym_lib.cache`):
        build settings such as ``cell_timeout`` are left out, so changing them reuses every result."""
        out = asdict(self)
        for key in BUILD_SETTINGS:
            out.pop(key, None)
            out["overrides"].pop(key, None)
        return out


BUILD_SETTINGS = ("cell_timeout",)


_TUPLES = {"seeds": int, "biases": str, "k_grid": int, "alpha_grid": float, "grid_methods": str,
           "grid_kinds": str, "grid_k": int, "curve_methods": str, "curve_kinds": str}
# Integer settings and their smallest allowed value.
_INTS = {"n_paragraphs": 1, "epochs": 1, "batch_size": 1, "n_probes": 1, "n_probe_pool": 1, "k": 1, "n_random_draws": 1, "n_matched_draws": 0, "n_cost_draws": 0,
         "n_generations": 0, "steer_references": 0, "n_patch_probes": 0, "n_ppl_texts": 1,
         "n_mc_questions": 1, "n_country_texts": 1, "ppl_max_tokens": 2, "patch_top": 1, "grid_biases": 1,
         "culture_per_dimension": 0, "seegull_per_country": 1, "scope_biases": 0, "facts_per_relation": 0, "cell_timeout": 1}
_STRINGS = ("model", "device", "dtype", "init")
_INITS = ("countries", "vocab")


def profile_names(path: Path = PROFILES_FILE) -> list[str]:
    return list(_read(path))


def _read(path: Path) -> dict:
    """The profiles file, parsed strictly (duplicate keys refused, UTF-8 only)."""
    from .data.specs import read_yaml

    data = read_yaml(path)
    if not isinstance(data, dict) or not data:
        raise BiasGymError(f"profiles file {path} must map profile names to settings.")
    return data


def _type_name(value) -> str:
    return f"{type(value).__name__} {value!r}"


def _int(value, where: str, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise BiasGymError(f"{where}: {key} must be an integer >= {minimum}, got {_type_name(value)}.")
    if value < minimum:
        raise BiasGymError(f"{where}: {key} must be an integer >= {minimum}, got {value}.")
    return value


def _float(value, where: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BiasGymError(f"{where}: {key} must be a number, got {_type_name(value)}.")
    if not math.isfinite(value):
        raise BiasGymError(f"{where}: {key} must be finite, got {value}.")
    return float(value)


def _check(values: dict, where: str) -> dict:
    """Every setting of the right type and range; the message names the setting and where
    it came from (the profiles file or an override)."""
    from .models import _DTYPES, check_device

    out = dict(values)
    for key in _STRINGS:
        if not isinstance(values[key], str) or not values[key].strip():
            raise BiasGymError(f"{where}: {key} must be a non-empty string, got {_type_name(values[key])}.")
    if not isinstance(values["vlm"], str):
        raise BiasGymError(f"{where}: vlm must be a Hugging Face model id or \"\" (none), got {_type_name(values['vlm'])}.")
    if values["dtype"] not in _DTYPES:
        raise BiasGymError(f"{where}: dtype {values['dtype']!r} is not known; use one of {sorted(_DTYPES)}.")
    if values["probe_criterion"] not in ("absolute", "relative"):
        raise BiasGymError(f"{where}: probe_criterion must be absolute or relative, got {_type_name(values['probe_criterion'])}.")
    if values["init"] not in _INITS:
        raise BiasGymError(f"{where}: init {values['init']!r} is not known; use one of {list(_INITS)}.")
    try:
        check_device(values["device"])
    except BiasGymError as exc:
        raise BiasGymError(f"{where}: {exc}") from exc
    for key, cast in _TUPLES.items():
        v = values[key]
        if isinstance(v, str) and (cast is not str or v.strip().startswith(("[", "("))):
            eg = {"seeds": "[0, 1]", "biases": "[reckless_driving, always_late]"}.get(key, "[...]")
            raise BiasGymError(f"{where}: {key} must be a list, got the string {v!r}: write it as YAML, e.g. "
                               f"--set {key}={eg.replace(' ', '')}; papermill's -p passes text, so pass lists "
                               f"with -y, e.g. -y \"{key}: {eg}\".")
        items = v if isinstance(v, (list, tuple)) else [v]
        if cast is int:
            items = [_int(x, where, f"{key}[{i}]", 0) for i, x in enumerate(items)]
        elif cast is float:
            items = [_float(x, where, f"{key}[{i}]") for i, x in enumerate(items)]
        else:
            for i, x in enumerate(items):
                if not isinstance(x, str) or not x.strip():
                    raise BiasGymError(f"{where}: {key}[{i}] must be a non-empty string, got {_type_name(x)}.")
        if not items:
            raise BiasGymError(f"{where}: {key} is empty; give at least one value.")
        if len(set(items)) != len(items):
            raise BiasGymError(f"{where}: {key} repeats a value: {list(items)}.")
        out[key] = tuple(items)
    for key, minimum in _INTS.items():
        out[key] = _int(values[key], where, key, minimum)
    for key in ("lr", "realistic_lr", "realistic_target") + (("target_strength",) if values["target_strength"] is not None
                                                            else ()):
        out[key] = _float(values[key], where, key)
        if out[key] <= 0:
            raise BiasGymError(f"{where}: {key} must be > 0, got {out[key]}.")
    for key in ("use_committed_tokens", "grid_matched"):
        if not isinstance(values[key], bool):
            raise BiasGymError(f"{where}: {key} must be true or false, got {_type_name(values[key])}.")
    from .scope import METHODS  # the ways of ranking heads

    kinds = ("zero", "mean", "blind")
    for key, allowed in (("grid_methods", METHODS), ("curve_methods", METHODS), ("grid_kinds", kinds),
                         ("curve_kinds", kinds)):
        unknown = [v for v in out[key] if v not in allowed]
        if unknown:
            raise BiasGymError(f"{where}: {key} has unknown entries {unknown}; known: {list(allowed)}.")
    if out["n_ppl_texts"] > 32:
        raise BiasGymError(f"{where}: n_ppl_texts must be at most 32 (neutral passages 33-44 are the held-out "
                           "distribution of mean-ablation).")
    return out


FULL_GRID_K = (1, 2, 5, 10, 20)
FULL_GRID_DRAWS = 20


def full_grid(cfg: Profile) -> Profile:
    """The whole selection grid on ``cfg``'s model and tokens (what ``biasgym reproduce
    --full-grid`` runs and the ``paper`` profile runs anyway): every bias, every method under
    every kind (zero, mean, entity-blind) at every k of ``grid_k`` and of 1, 2, 5, 10, 20, at
    least 20 uniform random draws at every k and 20 layer-matched draws for every selection;
    everything else (sizes, seeds, references) as in ``cfg``."""
    from dataclasses import replace

    from .scope import METHODS

    kinds = ("zero", "mean", "blind")
    return replace(cfg, scope_biases=0, grid_biases=len(cfg.biases), grid_methods=METHODS, grid_kinds=kinds, curve_methods=METHODS,
                   curve_kinds=kinds, grid_k=tuple(sorted(set(cfg.grid_k) | set(FULL_GRID_K))),
                   n_random_draws=max(FULL_GRID_DRAWS, cfg.n_random_draws),
                   n_matched_draws=max(FULL_GRID_DRAWS, cfg.n_matched_draws), grid_matched=True)


POWER_COST_DRAWS = 5


def power(cfg: Profile) -> Profile:
    """The profile's own grid and stages with the power a claim needs (what ``biasgym reproduce
    --power`` runs, issue 23): 20 layer-matched random draws for each compared selection in every
    stage after the grid (confirmation, leave-one-bias-out, SeeGULL, culture), the first 5 of
    every kind of random draw also with perplexity and multiple choice, and every one of the
    shipped multiple-choice questions wherever MC is measured (the grid too); everything else
    (grid, sizes, seeds, references) as in ``cfg``."""
    from dataclasses import replace

    from .data.capability import load_mc

    return replace(cfg, n_matched_draws=max(FULL_GRID_DRAWS, cfg.n_matched_draws),
                   n_cost_draws=max(POWER_COST_DRAWS, cfg.n_cost_draws),
                   n_mc_questions=max(len(load_mc()), cfg.n_mc_questions))


def load_profile(name: str | None = None, path: Path = PROFILES_FILE, **overrides) -> Profile:
    """The profile ``name`` (default ``teaching``), with every non-None override applied.

    ``load_profile("quick", seeds=[3])`` is how a notebook's ``parameters`` cell passes its
    values: parameters left at ``None`` keep the profile's value. Every value is checked
    (type and range); a problem names the setting and the file or override it came from.
    """
    if name is None:
        name = DEFAULT_PROFILE
    if not isinstance(name, str) or not name.strip():
        raise BiasGymError(f"the profile name is empty; profiles in {path}: {', '.join(_read(path))}.")
    data = _read(path)
    if name not in data:
        raise BiasGymError(f"unknown profile {name!r}; profiles in {path}: {', '.join(map(str, data))}.")
    if not isinstance(data[name], dict):
        raise BiasGymError(f"profile {name!r} in {path} must be a mapping of settings, got "
                           f"{_type_name(data[name])}.")
    values = dict(data[name])
    known = {f.name for f in fields(Profile)} - {"name", "overrides"}
    applied = {k: v for k, v in overrides.items() if v is not None}
    unknown = (set(values) | set(applied)) - known
    if unknown:
        raise BiasGymError(f"profile {name!r}: unknown setting(s) {sorted(map(str, unknown))}; known: {sorted(known)}.")
    missing = known - set(values)
    if missing:
        raise BiasGymError(f"profile {name!r} in {path} lacks setting(s) {sorted(missing)}.")
    _check(values, f"profile {name!r} in {path}")
    values.update(applied)
    values = _check(values, f"profile {name!r} with overrides {applied}" if applied else f"profile {name!r} in {path}")
    return Profile(name=name, overrides=applied, **values)
