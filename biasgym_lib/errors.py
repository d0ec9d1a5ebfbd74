"""Errors that tell the reader what to do next, and where the trace of an unexpected one goes."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path


class BiasGymError(Exception):
    """A user-facing error: the message says what went wrong and what to do."""


class ModelNotAvailable(BiasGymError):
    """The requested model cannot be found or loaded here."""


class UnsupportedModel(BiasGymError):
    """The model's architecture is not one the adapter knows."""


class ArtifactMismatch(BiasGymError):
    """A saved artifact does not belong to the model it is loaded into."""


# ----------------------------------------------------------------------------- internal errors


def trace_dir() -> Path:
    """Where the full trace of an unexpected error is written: ``$BIASGYM_ERROR_DIR``, else
    ``errors/`` in the user's own cache folder (:func:`~biasgym_lib.artifacts.cache_dir`),
    never a folder shared by every user of the machine."""
    from .artifacts import cache_dir

    return Path(os.environ.get("BIASGYM_ERROR_DIR") or cache_dir() / "errors").expanduser()


def _private_temp_dir() -> Path:
    """``<temp>/biasgym-errors-<uid>``, created for this user only (mode 700) and refused if
    someone else owns it: where traces go when the cache folder cannot be written."""
    folder = Path(tempfile.gettempdir()) / f"biasgym-errors-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    folder.mkdir(mode=0o700, exist_ok=True)
    st = folder.lstat()
    if folder.is_symlink() or (hasattr(os, "getuid") and st.st_uid != os.getuid()) or st.st_mode & 0o077:
        raise OSError(f"{folder} is not a private folder of this user")
    return folder


def report_internal_error(command: str, exc: BaseException) -> int:
    """A bug, not a bad input: one line on stderr naming the file that holds the full trace
    (in :func:`trace_dir`, else a private temporary folder); returns the exit status 1."""
    import traceback

    first = (str(exc).splitlines() or [""])[0][:200]
    text = ("biasgym " + " ".join(sys.argv[1:]) + "\n\n"
            + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    name = f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    where = None
    for folder in (trace_dir, _private_temp_dir):
        try:
            path = folder()
            path.mkdir(parents=True, exist_ok=True)
            (path / name).write_text(text)
            where = f"full trace in {path / name}"
            break
        except OSError as log_exc:
            where = where or f"the trace could not be written ({log_exc})"
    print(f"biasgym {command}: internal error: {type(exc).__name__}: {first} ({where}; please report it).",
          file=sys.stderr)
    return 1
