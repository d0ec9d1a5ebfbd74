"""Writing results so that nothing is lost, mixed or half-written.

* :func:`strict_dumps` / :func:`write_json`: JSON that every parser reads (no ``NaN`` or
  ``Infinity``: a non-finite number is an error that names where it is), written to a
  unique temporary file and renamed into place.
* :func:`check_out`: is ``out`` a place a result may be written to? Called by every command
  *before* any model work, so a bad ``--out`` costs nothing.
* :func:`result_folder`: a result is a folder (``token.json`` + ``token.safetensors`` +
  ``metrics.json``, say). It is written into a unique temporary folder next to the target
  and renamed into place as a whole, so a reader sees the old result or the new one, never
  a mix. An existing result is replaced only with ``overwrite=True`` (and then swapped in
  one step where the system allows it). Two writers racing for the same folder: the first
  rename wins; the other gets :class:`ConcurrentWrite`, and its own complete result is kept
  in a sibling folder whose name the message gives.
* :func:`resumable_folder`: the same for a long result of many stages (``biasgym
  reproduce``): its work folder beside the target has a fixed name and is kept when the run
  stops (Ctrl-C, SIGTERM, SIGKILL, an error), so the same command continues from the
  finished stages instead of starting over.
* :func:`sweep`: what dead writers left behind (temporary files and folders) is removed by
  the next writer; a live writer's never is (a temporary folder is locked while its writer
  lives, a temporary file names its writer's process).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .errors import BiasGymError

# Files that mark a folder as a result of one of the commands (inject, scope, steer,
# reproduce). Only such a folder (or an empty one) may be replaced with ``overwrite``.
RESULT_FILES = ("token.json", "token.safetensors", "metrics.json", "head_scores.json", "steer.json",
                "claims.json")
_TMP_PREFIX = ".biasgym-tmp-"
_WORK_PREFIX = ".biasgym-work-"


class ResultExists(BiasGymError):
    """The target folder already holds a result and ``overwrite`` was not given."""


class ConcurrentWrite(BiasGymError):
    """Another writer put a result at the target while this one was working."""


# ----------------------------------------------------------------------------- JSON


def _nonfinite(data, path="$"):
    """The first (path, value) of a float that is NaN or infinite in ``data``, else None."""
    if isinstance(data, float):
        return None if math.isfinite(data) else (path, data)
    if isinstance(data, dict):
        items = ((f"{path}.{k}", v) for k, v in data.items())
    elif isinstance(data, (list, tuple)):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(data))
    else:
        return None
    for p, v in items:
        hit = _nonfinite(v, p)
        if hit:
            return hit
    return None


def strict_dumps(data, indent: int | None = 1) -> str:
    """``json.dumps`` that refuses NaN and Infinity (they are not JSON), naming where one is."""
    try:
        return json.dumps(data, indent=indent, allow_nan=False)
    except ValueError as exc:
        hit = _nonfinite(data)
        if hit is None:
            raise
        raise BiasGymError(f"refusing to write {hit[1]} at {hit[0]}: JSON has no NaN or Infinity, "
                           "so a non-finite number here means a computation went wrong.") from exc


def write_json(path, data, indent: int | None = 1) -> Path:
    """Write ``data`` as strict JSON to ``path``: a unique temporary file in the same folder,
    then an atomic rename (a reader sees the old file or the new one, never half of one)."""
    path = Path(path)
    text = strict_dumps(data, indent)  # before touching the disk
    path.parent.mkdir(parents=True, exist_ok=True)
    # the writer's pid in the name: sweep() removes the file only once that process is gone
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.biasgym-{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def read_json(path, what: str = "file") -> dict:
    """A JSON object from ``path``; every problem (missing, unreadable, truncated, not an
    object) is a :class:`BiasGymError` that names the file."""
    path = Path(path)
    if not path.is_file():
        raise BiasGymError(f"{path}: {what} not found.")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise BiasGymError(f"{path}: cannot read the {what}: {exc.strerror or exc}.") from exc
    return parse_json(raw, path, what)


def parse_json(raw: bytes, path, what: str = "file") -> dict:
    """:func:`read_json` of bytes already read from ``path``."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise BiasGymError(f"{path}: {what} is not UTF-8 text ({exc.reason} at byte {exc.start}).") from exc
    except json.JSONDecodeError as exc:
        raise BiasGymError(f"{path}: {what} is not valid JSON (truncated or damaged?): {exc}.") from exc
    if not isinstance(data, dict):
        raise BiasGymError(f"{path}: {what} must hold a JSON object, found {type(data).__name__}.")
    return data


# ----------------------------------------------------------------------------- folders


def read_files(folder, names, attempts: int = 5) -> dict[str, bytes]:
    """The bytes of several files of one result folder, read through one handle on the
    folder: even if the folder is replaced meanwhile, they all come from the same result.
    (If the result being read is replaced and removed half-way, it is read again from the
    new one.)"""
    folder = Path(folder)
    if os.open not in os.supports_dir_fd:
        return {n: (folder / n).read_bytes() for n in names}
    for attempt in range(attempts):
        dir_fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            out = {}
            for name in names:
                fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
                with os.fdopen(fd, "rb") as f:
                    out[name] = f.read()
            return out
        except FileNotFoundError:
            # Gone from the folder we opened: if the path now holds every file, that folder
            # was replaced while we read it; read the new one.
            if attempt == attempts - 1 or not all((folder / n).is_file() for n in names):
                raise
        finally:
            os.close(dir_fd)
    raise AssertionError("unreachable")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def is_result(folder) -> bool:
    folder = Path(folder)
    return any((folder / name).exists() for name in RESULT_FILES)


def check_out(out, overwrite: bool = False, flag: str = "--out") -> Path:
    """Raise :class:`BiasGymError` unless a result folder may be written at ``out``:
    not an existing file, not a folder holding other things, not an existing result
    (unless ``overwrite``), and somewhere this process can create folders."""
    if out is None or not str(out).strip():
        raise BiasGymError(f"{flag} is empty: give the folder to write the result to.")
    out = Path(out).expanduser()
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise BiasGymError(f"{flag} {out} is an existing file, not a folder: give a new folder "
                               "(the result is a folder of files).")
        entries = [p.name for p in out.iterdir()]
        if entries and not is_result(out):
            raise BiasGymError(f"{flag} {out} is a folder that holds other things ({len(entries)} "
                               f"entries, e.g. {sorted(entries)[0]!r}) and no biasgym result: give a "
                               "new or empty folder (a result replaces the whole folder).")
        if entries and not overwrite:
            how = "--overwrite" if flag.startswith("--") else "overwrite=True"
            raise ResultExists(f"{flag} {out} already holds a result; pass {how} to replace "
                               "it, or give another folder.")
    # The nearest existing ancestor must be a folder we can create things in.
    parent = out.parent
    while not parent.exists():
        if parent.is_symlink():
            raise BiasGymError(f"{flag} {out}: {parent} is a broken link.")
        parent = parent.parent
    if not parent.is_dir():
        raise BiasGymError(f"{flag} {out}: {parent} is a file, not a folder, so nothing can be written "
                           "under it.")
    try:
        probe = tempfile.mkdtemp(prefix=_TMP_PREFIX + "probe-", dir=parent)
        os.rmdir(probe)
    except OSError as exc:
        raise BiasGymError(f"{flag} {out}: cannot write in {parent} ({exc.strerror or exc}); "
                           "give a folder you can write to.") from exc
    return out


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where
    the system cannot."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _keep_aside(tmp: Path, out: Path) -> Path:
    """Give an orphaned complete result a visible name beside ``out``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        alt = out.with_name(f"{out.name}.{stamp}-{os.getpid()}" + (f"-{i}" if i else ""))
        try:
            os.rename(tmp, alt)  # refuses a non-empty alt, so never clobbers
            return alt
        except OSError:
            if alt.exists():
                continue
            raise
    return tmp


def _commit(tmp: Path, out: Path, overwrite: bool) -> None:
    """Put the finished folder ``tmp`` at ``out`` in one rename."""
    os.chmod(tmp, 0o777 & ~_umask())
    for _ in range(20):
        try:
            os.rename(tmp, out)  # atomic; replaces only a missing or empty folder
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise
        # Something is at ``out`` now that was not acceptable a moment ago, or a result.
        if not overwrite or not out.is_dir() or not is_result(out):
            alt = _keep_aside(tmp, out)
            raise ConcurrentWrite(
                f"{out} was written by another run while this one was working "
                f"({'a result' if out.is_dir() and is_result(out) else 'not a biasgym result'} is there now); "
                f"this run's complete result was kept in {alt}.")
        if _exchange(tmp, out):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old result
            return
        old = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX + "old-", dir=out.parent))
        try:
            os.rename(out, old)  # move the old result aside (replaces the empty ``old``)
        except FileNotFoundError:
            pass  # another writer moved it first: try again
        shutil.rmtree(old, ignore_errors=True)
    alt = _keep_aside(tmp, out)
    raise ConcurrentWrite(f"{out} kept changing under other writers; this run's result was kept in {alt}.")


@contextlib.contextmanager
def result_folder(out, overwrite: bool = False, flag: str = "--out", precheck: bool = True):
    """``with result_folder(out) as tmp:`` write the result's files into ``tmp``; on a clean
    exit the folder is renamed to ``out`` as a whole; on an error it is removed and ``out``
    is untouched. See the module docstring for ``overwrite`` and concurrent writers.

    ``precheck=False`` is for a caller that ran :func:`check_out` before its (long) work:
    whatever appeared at ``out`` since then is another writer's, and this result is then
    kept beside it (:class:`ConcurrentWrite` names where) rather than lost."""
    out = check_out(out, overwrite, flag) if precheck else Path(out).expanduser()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{out.name}-", dir=out.parent))
        lock = _lock(tmp)  # held while this writer lives: sweep() leaves the folder alone
    except OSError as exc:
        raise BiasGymError(f"{flag} {out}: cannot create a folder in {out.parent} "
                           f"({exc.strerror or exc}).") from exc
    try:
        sweep(out.parent)  # what killed writers left beside it
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            _commit(tmp, out, overwrite)
        except BaseException:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        _unlock(lock)


def work_folder_of(out) -> Path:
    """The fixed work folder of :func:`resumable_folder` for ``out`` (beside it, hidden)."""
    out = Path(out).expanduser()
    name = out.name if len(out.name) <= 150 else f"{out.name[:100]}-{hashlib.sha256(out.name.encode()).hexdigest()[:12]}"
    return out.parent / f"{_WORK_PREFIX}{name}"


@contextlib.contextmanager
def resumable_folder(out, overwrite: bool = False, flag: str = "--out"):
    """``with resumable_folder(out) as work:`` like :func:`result_folder` (the caller has run
    :func:`check_out`), for a result computed in many stages: ``work`` is a fixed folder
    beside ``out`` (:func:`work_folder_of`), kept when the work stops half-way (an error,
    Ctrl-C, SIGTERM, SIGKILL), and used again by the next run into the same ``out``. Every
    file in it was written whole (:func:`write_json`, :func:`result_folder`) and is keyed by
    what computed it (:func:`~biasgym_lib.cache.memo`), so a rerun uses the finished stages
    and computes the rest, with the same numbers. Whatever a killed writer left half-done is
    removed first (:func:`sweep`). On success the folder becomes ``out`` in one rename. Two
    runs into one ``out`` at once: the second is refused while the first lives."""
    out = Path(out).expanduser()
    work = work_folder_of(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        work.mkdir(exist_ok=True)
        lock = _lock(work)
    except BlockingIOError as exc:
        raise BiasGymError(f"{flag} {out}: another run into the same folder is working in {work}; wait for it "
                           "to finish, or give another folder.") from exc
    except OSError as exc:
        raise BiasGymError(f"{flag} {out}: cannot create the work folder {work} ({exc.strerror or exc}).") from exc
    try:
        kept = sum(1 for p in work.rglob("*.json") if not p.name.startswith("."))
        swept = sweep(work, recursive=True, min_age=0) + sweep(out.parent)  # no live writer in a locked work folder
        if kept or swept:
            print(f"Continuing from {work}: {kept} result files of an earlier run that stopped"
                  + (f" ({swept} half-written leftovers removed)" if swept else "") + ".", flush=True)
        try:
            yield work
        except BaseException as exc:
            why = f"failed ({type(exc).__name__})" if isinstance(exc, Exception) else "stopped"
            print(f"The run {why}; its finished stages are kept in {work}: the same command continues from them "
                  "(delete that folder to start over).", file=sys.stderr, flush=True)
            raise
        _commit(work, out, overwrite)
    finally:
        _unlock(lock)


# ----------------------------------------------------------------------------- leftovers of dead writers

_JSON_TMP = re.compile(r"^\..+\.biasgym-(\d+)\.[a-z0-9_]+\.tmp$")  # write_json's: .<name>.biasgym-<pid>.<random>.tmp
_STALE_SECONDS = 600  # an unlocked probe- or old- folder this old is a leftover


def _lock(folder: Path):
    """An exclusive lock on ``folder``, held until :func:`_unlock` or until this process ends
    (the system releases it even on SIGKILL); BlockingIOError if another holder has it.
    None where the system has no ``flock`` (nothing is then swept as dead)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux or macOS
        return None
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    return fd


def _unlock(fd) -> None:
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the lock


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process, say: alive
        return True
    return True


def _unclaimed(folder: Path) -> bool:
    """Whether no live writer holds ``folder`` (a temporary folder of :func:`result_folder`)."""
    try:
        fd = _lock(folder)
    except OSError:
        return False  # locked by a live writer (or unreadable: leave it)
    if fd is None:
        return False
    _unlock(fd)
    return True


def sweep(folder, recursive: bool = False, min_age: float = 60) -> int:
    """Remove what killed writers left in ``folder`` (and below, with ``recursive``):
    :func:`write_json` temporary files whose process is gone, and temporary folders of
    :func:`result_folder` that no live process holds and that are older than ``min_age``
    seconds (the moment between creating a folder and locking it; the short-lived probe- and
    old- folders: ten minutes). Never a live writer's, and nothing that is not ours (only
    our own names). Returns how many were removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    now, removed = time.time(), 0
    try:
        entries = list(folder.rglob(".*") if recursive else folder.glob(".*"))
    except OSError:
        return 0
    for p in entries:
        try:
            age = now - p.lstat().st_mtime
            if p.is_file() and p.name.endswith(".tmp"):
                m = _JSON_TMP.match(p.name)
                if m and not _alive(int(m.group(1))):
                    p.unlink()
                    removed += 1
            elif p.is_dir() and p.name.startswith(_TMP_PREFIX) and not p.is_symlink():
                probe_or_old = p.name.startswith((_TMP_PREFIX + "probe-", _TMP_PREFIX + "old-"))
                if age >= (_STALE_SECONDS if probe_or_old and min_age else min_age) and _unclaimed(p):
                    shutil.rmtree(p)
                    removed += 1
        except OSError:
            continue  # gone meanwhile, or not ours to remove
    return removed


# ----------------------------------------------------------------------------- the library's files


CACHE_ENV = "BIASGYM_CACHE"


def cache_dir() -> Path:
    """Root of the library's file cache: the converted model and the downloaded SeeGULL file,
    never results (override with the ``BIASGYM_CACHE`` variable)."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "biasgym"


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
