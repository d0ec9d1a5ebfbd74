"""A recorded run: what the teaching build cannot afford, run once and committed (issue 23).

``biasgym reproduce --profile teaching --full-grid`` steers every bias with every way of
ranking heads, every intervention kind and every k: hours on 2 cores, more than ``make
book`` can spend. ``biasgym record RUN_FOLDER`` turns such a finished run into
``data/recorded/<profile>.json``: its claims (with the whole grid's summary), those of the
token set of realistic strength where ``reproduce --record`` ran it, and how long each stage took, with the code-and-data hash (:func:`~biasgym_lib.cache.source_hash`) its
stage results were computed by, read from the results themselves, and the commit where
known. ``biasgym reproduce --realistic`` runs (the token set of realistic strength at the
profile's sizes) are recorded the same way, to ``data/recorded/<profile>-realistic.json``. The book shows it beside the numbers of the live build; :func:`status` says whether
the library or the data has changed since (then the book warns: the recorded numbers may
not be what the current code computes).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from .artifacts import read_json, write_json
from .config import PROJECT_ROOT
from .errors import BiasGymError
from .claims import MIN_DRAWS

RECORDED_DIR = PROJECT_ROOT / "data" / "recorded"  # left out of source_hash: a recording never invalidates itself
FORMAT = "biasgym.recorded_run/1"


def recorded_path(profile: str) -> Path:
    return RECORDED_DIR / f"{profile}.json"


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def stage_hashes(folder: Path) -> set[str]:
    """The code-and-data hashes that computed the stage results in ``folder``."""
    return {str(v["code"]).split("-")[0] for p in sorted(Path(folder).rglob("*.json"))
            if "code" in (v := read_json(p, "stage result"))}


def record(folder, out: Path | None = None, commit: str | None = None, overwrite: bool = False) -> Path:
    """Write the recorded run of a finished ``biasgym reproduce --full-grid`` folder (its
    ``claims.json`` and ``grid_full.json``) to ``out`` (default ``data/recorded/<profile>.json``).
    Refused when the run did not finish, was not a full-grid run, or its stage results were
    computed by different versions of the code (a recording must come from one). ``commit``:
    the commit that ran it; by default the checkout's, when its code is the run's. An existing
    recording is replaced only with ``overwrite``."""
    from .cache import source_hash

    folder = Path(folder)
    if not folder.is_dir():
        raise BiasGymError(f"{folder} is not a folder: give the --out folder of a finished biasgym reproduce --full-grid.")
    claims_file, grid_file = folder / "claims.json", folder / "grid_full.json"
    if not claims_file.is_file():
        raise BiasGymError(f"{folder} holds no claims.json: run biasgym reproduce --full-grid --out {folder} "
                           "to its end first (it resumes where it stopped).")
    claims = read_json(claims_file, "claims")
    real = (claims.get("injection") or {}).get("target_strength") is not None  # reproduce --realistic
    # reproduce --power: the profile's grid with the layer-matched draws a claim needs in every later stage
    powered = not grid_file.is_file() and (claims.get("draws") or {}).get("matched", 0) >= MIN_DRAWS
    if not grid_file.is_file() and not real and not powered:
        raise BiasGymError(f"{folder} was not a --full-grid run (no grid_full.json): only the whole grid, the "
                           "token set of realistic strength (reproduce --realistic) or a run with the power a "
                           f"claim needs (reproduce --power: {MIN_DRAWS} layer-matched draws) is recorded.")
    hashes = stage_hashes(folder)
    if len(hashes) != 1:
        raise BiasGymError(f"the stage results in {folder} were computed by {len(hashes)} versions of the code "
                           f"({sorted(hashes)}); a recording must come from one: rerun biasgym reproduce there.")
    (run_hash,) = hashes
    if commit is None and run_hash == source_hash():
        head, dirty = _git("rev-parse", "HEAD"), _git("status", "--porcelain", "--", "biasgym_lib", "data")
        commit = head and head + ("+uncommitted" if dirty else "")
    grid = read_json(grid_file, "grid") if grid_file.is_file() else {}
    kind = ("-realistic" if real else "") + ("-power" if powered else "")
    out = Path(out) if out is not None else recorded_path(str(claims.get("profile")) + kind)
    if out.exists() and not overwrite:
        raise BiasGymError(f"{out} exists; pass --overwrite to replace that recording.")
    seconds_file, real_file = folder / "stage_seconds.json", folder / "realistic" / "claims.json"
    check_file = folder / "reference_check.json"
    data = {"format": FORMAT, "profile": claims.get("profile"), "commit": commit, "source_hash": run_hash,
            "recorded_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "stage_seconds": read_json(seconds_file, "stage log") if seconds_file.is_file() else None,
            "token_set": "realistic" if real else "book", "power": powered, "grid_parts": grid.get("parts"),
            "claims": claims,
            "reference_check": read_json(check_file, "reference check") if check_file.is_file() else None,
            "realistic": read_json(real_file, "realistic token set's claims") if real_file.is_file() else None}
    return write_json(out, data)


def reference_frame(check: dict):
    """Do the steering references stand for all of them? :func:`~biasgym_lib.runs.reference_check`
    (kept in a recording) as a table: per selection and token, S against the steering
    references and against every reference country, whether the second lies inside the first's
    95% interval, and the share of S each removes."""
    import pandas as pd

    n = {r: len(c) for r, c in check["references"].items()}
    rows = []
    for name, per_ref in check["S"].items():
        for i, (a, b) in enumerate(zip(per_ref["steering"], per_ref["all"])):
            red = check["reduction"].get(name, {})
            rows.append({"selection": name, "seed": check["seeds"][i],
                         f"S, {n['steering']} references": a["value"], "95% lo": a["lo"], "95% hi": a["hi"],
                         f"S, all {n['all']}": b["value"], "inside the interval": a["lo"] <= b["value"] <= a["hi"],
                         f"removed, {n['steering']}": red["steering"][i] if red else None,
                         f"removed, all {n['all']}": red["all"][i] if red else None})
    return pd.DataFrame(rows).set_index(["selection", "seed"]).round(3)


def load_recorded(profile: str = "teaching", path: Path | None = None) -> dict | None:
    """The recorded run of ``profile``; None if none is committed."""
    path = Path(path) if path is not None else recorded_path(profile)
    if not path.is_file():
        return None
    data = read_json(path, "recorded run")
    if data.get("format") != FORMAT:
        raise BiasGymError(f"{path} is not a recorded run of this library (format {data.get('format')!r}); "
                           "write it with biasgym record.")
    return data


def changed_since(commit: str | None) -> list[str] | None:
    """The library and data files (those :func:`~biasgym_lib.cache.source_hash` reads) that
    differ between ``commit`` and this checkout, committed or not; None where that cannot be
    told (no commit recorded, no git, or a shallow clone without it)."""
    commit = (commit or "").split("+")[0]
    if not commit or _git("cat-file", "-e", f"{commit}^{{commit}}") is None:
        return None
    out = _git("diff", "--name-only", commit, "--", "biasgym_lib", "data", ":(exclude)data/tokens",
               ":(exclude)data/recorded")
    return None if out is None else sorted(f for f in out.splitlines()
                                           if f.startswith("data/") or f.endswith(".py"))


def status(recorded: dict | None) -> str:
    """One line for the book: where the recorded numbers come from, and a warning when the
    library or its data has changed since they were recorded, naming the files that changed
    (from git, where the recorded commit is in this clone's history) so a reader can judge."""
    from .cache import source_hash

    if recorded is None:
        return ("No recorded run is committed for this profile: the numbers below the live build's are not shown. "
                "biasgym reproduce --full-grid, then biasgym record, makes one.")
    where = f"recorded on commit {recorded.get('commit') or 'unknown'} ({recorded.get('recorded_at')}, code hash {recorded['source_hash']})"
    if recorded["source_hash"] != source_hash():
        files = changed_since(recorded.get("commit"))
        which = ("" if files is None else f" Changed since (git diff {str(recorded['commit'])[:7]}): "
                 + (", ".join(files) if files else "only files the hash reads outside git's view") + ".")
        return (f"WARNING: the library or its data changed since this run was {where}; this build runs hash "
                f"{source_hash()}.{which} Its numbers may differ from what the current code computes: rerun "
                "biasgym reproduce --full-grid and biasgym record.")
    return f"The recorded numbers were {where}: the library and data this build runs."


def parts_frame(recorded: dict):
    """The whole grid's time on the machine that recorded it: seconds per part (rows the
    biases, columns k), as each part was kept (``grid_parts``; a part kept in an earlier
    sitting keeps the time it took then)."""
    import pandas as pd

    parts = recorded.get("grid_parts") or []
    if not parts:
        raise BiasGymError("this recording has no grid parts: it was not made from a --full-grid run kept in parts.")
    df = pd.DataFrame(parts).pivot(index="bias", columns="k", values="seconds")
    return df.loc[list(dict.fromkeys(p["bias"] for p in parts))].round(0)

