"""A recorded run: what the teaching build cannot afford, run once and committed (issue 23).

``biasgym reproduce --profile teaching --full-grid --record`` runs every bias, way of
ranking heads, intervention and k with 20 uniform and 20 layer-matched random draws, and
the second token set (of realistic strength) through BiasScope, then writes the results the
book shows to ``data/recorded/<profile>.json`` with the commit and the code-and-data hash
(:func:`~biasgym_lib.cache.source_hash`) they were computed by, and how long each stage
took. The chapters show them beside the live numbers of the build; :func:`status` says
whether the library or the data has changed since the recording (then the build warns).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from .artifacts import write_json
from .config import PROJECT_ROOT

RECORDED_DIR = PROJECT_ROOT / "data" / "recorded"
FORMAT = "biasgym.recorded_run"


def recorded_path(profile: str) -> Path:
    return RECORDED_DIR / f"{profile}.json"


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "biasgym_lib", "data"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+uncommitted" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def record(profile: str, claims: dict, realistic: dict | None, stages: dict[str, float], out: Path | None = None) -> Path:
    """Write a recorded run: ``claims`` (:func:`~biasgym_lib.claims.claims_from` of the full
    run), ``realistic`` (the same for the realistic token set, or None) and the seconds per
    stage, with the commit and code-and-data hash."""
    from .cache import source_hash

    data = {"format": FORMAT, "profile": profile, "commit": _commit(), "source_hash": source_hash(),
            "recorded_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "stages_seconds": stages,
            "claims": claims, "realistic": realistic}
    return write_json(out or recorded_path(profile), data)


def load_recorded(profile: str = "teaching", path: Path | None = None) -> dict | None:
    """The recorded run of ``profile`` (None if none was committed)."""
    path = path or recorded_path(profile)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return data if data.get("format") == FORMAT else None


def status(recorded: dict | None) -> str:
    """One line for the book: where the recorded numbers come from, and a warning when the
    library or the data has changed since they were recorded."""
    from .cache import source_hash

    if recorded is None:
        return "No recorded run is committed for this profile: run biasgym reproduce --full-grid --record."
    where = f"recorded on commit {recorded.get('commit') or 'unknown'} ({recorded.get('recorded_at')})"
    if recorded.get("source_hash") != source_hash():
        return (f"WARNING: the library or its data changed since this run was {where}: its numbers may differ "
                "from what the current code computes; rerun biasgym reproduce --full-grid --record.")
    return f"The recorded numbers were {where}, by the library and data this build runs (hash {source_hash()})."
