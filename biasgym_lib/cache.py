"""The one cache of results, at the edge: a profile's stage results are kept as JSON in a run
folder (``runs/``; ``make clean`` removes it), and each is reused only when it was computed
by this library's source, on these data files, with this profile, for these tokens.
Anything else is computed again."""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import contextmanager
from pathlib import Path

from .artifacts import parse_json, write_json
from .config import PROJECT_ROOT, Profile
from .errors import BiasGymError
from .tokens import InjectedToken


def source_hash() -> str:
    """A hash of the library's code and the project's data files: a kept stage result is
    only reused by the code and data that computed it (read afresh each time: a few ms)."""
    h = hashlib.sha256()
    lib, data = Path(__file__).resolve().parent, PROJECT_ROOT / "data"
    files = [(lib, f) for f in sorted(lib.rglob("*.py"))]
    # the committed tokens are artifacts checked by their own metadata; a recorded run holds
    # this very hash (it would change what it records)
    files += [(data, f) for f in sorted(data.rglob("*"))
              if f.is_file() and not {"tokens", "recorded"} & set(f.relative_to(data).parts)]
    for base, f in files:
        h.update(f"{base.name}/{f.relative_to(base)}".encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def run_dir(cfg: Profile) -> Path:
    """Where a profile's stage results are kept (``runs/``, not committed; ``make clean``
    removes it): keyed by the profile, the library's code and the data files, so that
    editing either never serves an old number."""
    key = hashlib.sha256(json.dumps([cfg.to_dict(), source_hash()], sort_keys=True, default=str).encode()).hexdigest()[:10]
    return PROJECT_ROOT / "runs" / f"{cfg.name}-{key}"


def token_fingerprint(token: InjectedToken) -> str:
    """A short hash of a token's vector: stage results remember which token they measured."""
    data = token.vector.detach().float().cpu().contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def memo(path: Path, compute, token: InjectedToken | None = None, need=None, fingerprint: str | None = None,
          profile: dict | None = None):
    """The JSON at ``path`` if it is there, was computed by this code on these data files
    (:func:`source_hash`) with these profile settings (``profile``), measured this token
    (or these tokens: a combined ``fingerprint``) and satisfies ``need``; else ``compute()``,
    saved there (atomically). The one cache of stage results: any change to the library, the
    data, the profile or the tokens computes again, whichever folder the results are kept in."""
    if token is not None:
        fingerprint = token_fingerprint(token)
    code = source_hash()
    if profile is not None:
        code += "-" + hashlib.sha256(json.dumps(profile, sort_keys=True, default=str).encode()).hexdigest()[:10]
    if path.is_file():
        try:  # a damaged entry (truncated, not UTF-8, not a JSON object) is computed again and replaced
            value = parse_json(path.read_bytes(), path, "stage result")
        except (OSError, BiasGymError):
            value = None
        if (value is not None and value.get("token_fingerprint") == fingerprint and value.get("code") == code
                and (need is None or need(value))):
            return value
    value = compute()
    value["token_fingerprint"] = fingerprint
    value["code"] = code
    write_json(path, value)
    global _computed
    _computed += 1
    return value


_computed = 0  # stage results computed (not served) by memo in this process, for announce()


@contextmanager
def announce(what: str, on: bool = True):
    """``with announce("[3/12] BiasScope of reckless_driving (seed 0)"):`` print what a long
    stage is doing, then how long it took, or that its result was kept from an earlier run
    (``biasgym reproduce`` used to say nothing for minutes)."""
    if on:
        print(f"{what} ...", flush=True)
    t0, before = time.perf_counter(), _computed
    yield
    if on:
        how = "computed" if _computed > before else "kept from an earlier run"
        print(f"{what}: {how}, {time.perf_counter() - t0:.1f} s", flush=True)

