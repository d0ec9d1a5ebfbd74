"""Build the book: execute every chapter with papermill, then build the HTML from the
executed copies with Jupyter Book (warnings are errors), then check the pages in a browser.

``biasgym book --profile quick`` (or ``python -m biasgym_lib.tools.bookbuild --profile quick``)
does, in order:

1. executes each ``book/chapters/*.ipynb`` (in file-name order) with papermill and the
   parameter ``profile`` into ``<out>/executed/book/chapters/``, with a kernel that runs
   this very Python (``sys.executable``), so that the chapters see the same packages;
2. copies the book sources into ``<out>/src/`` with the executed notebooks in place of
   the clean ones and runs ``jupyter-book build`` on them with ``-W --keep-going``; the
   HTML ends up in ``<out>/html/`` (``_build/html/index.html`` by default);
3. runs ``scripts/browser_check.py`` on the HTML (skipped, with a reason, without chromium).

Timings go to ``<out>/timings.json``. Any failing cell stops the run with a non-zero exit
status and the path of the failing notebook's executed copy.

Nothing waits without a bound: each cell may run at most the profile's ``cell_timeout``
seconds (``--cell-timeout`` overrides it), a kernel must start and a cell's last output
follow its reply within the bounds of :mod:`~biasgym_lib.tools.nbexec`, and Jupyter Book and the
browser check are stopped after :data:`BUILD_TIMEOUT` / :data:`BROWSER_TIMEOUT`. A cell that
never finishes (or whose completion never reaches the build) and a kernel that dies fail
their chapter with a message that names the chapter and the cell.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from ..config import DEFAULT_PROFILE, PROJECT_ROOT, load_profile, profile_names
from ..errors import BiasGymError

CHAPTERS_DIR = PROJECT_ROOT / "book" / "chapters"
DEFAULT_OUT = PROJECT_ROOT / "_build"
BROWSER_CHECK = PROJECT_ROOT / "scripts" / "browser_check.py"
KERNEL_NAME = "biasgym-venv"
BOOK_CONFIG_FILES = ("_config.yml", "_toc.yml")

# Exit statuses of main(): one per stage, so that CI logs say which stage failed.
EXIT_OK, EXIT_USAGE, EXIT_CHAPTER, EXIT_BUILD, EXIT_BROWSER = 0, 2, 3, 4, 5

# Bounds on the waits of a build beyond the chapters' (seconds; a cell's is the profile's cell_timeout).
BUILD_TIMEOUT = 1800  # jupyter-book build (about 15 s here)
BROWSER_TIMEOUT = 600  # the headless-browser check (about 10 s here)


@dataclass
class ChapterRun:
    """How one chapter's execution went (one row of the summary and of timings.json)."""

    name: str
    status: str  # "ok", "failed" or "not run"
    seconds: float
    executed: str  # path of the executed copy
    solutions: int = 0  # reference solutions that passed their checks in the chapter's kernel


def discover_chapters(chapters_dir: Path = CHAPTERS_DIR, only: list[str] | None = None) -> list[Path]:
    """The chapter notebooks in reading order (file-name order), optionally filtered.

    ``only`` holds full names (``02_bias_inject``) or number prefixes (``02``); a name that
    matches no chapter is an error, so that a typo never builds less than was asked for.
    """
    chapters = sorted(p for p in Path(chapters_dir).glob("*.ipynb") if not p.name.startswith("."))
    if not chapters:
        raise BiasGymError(f"no chapter notebooks (*.ipynb) found in {chapters_dir}.")
    if not only:
        return chapters
    wanted = [w.strip().removesuffix(".ipynb") for item in only for w in item.split(",") if w.strip()]
    unknown = [w for w in wanted if not any(_matches(p.stem, w) for p in chapters)]
    if unknown:
        raise BiasGymError(f"--only: no chapter named {', '.join(unknown)}; chapters: "
                           f"{', '.join(p.stem for p in chapters)}.")
    return [p for p in chapters if any(_matches(p.stem, w) for w in wanted)]


def _matches(stem: str, wanted: str) -> bool:
    return stem == wanted or stem.split("_", 1)[0] == wanted


def ensure_kernel(out: Path) -> str:
    """Write a kernelspec that runs ``sys.executable`` under ``<out>/kernels`` and put it on
    ``JUPYTER_PATH``. Returns its name.

    A fresh virtual environment may have no kernelspec at all, or one whose ``python``
    resolves to another interpreter on ``PATH``; this one always runs the interpreter that
    runs the build, so the chapters import the packages installed next to it.
    """
    spec_dir = Path(out) / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": f"Python ({Path(sys.prefix).name}, BiasGym build)",
            "language": "python", "metadata": {"debugger": False}}
    (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1))
    paths = [str(Path(out).resolve())] + [p for p in os.environ.get("JUPYTER_PATH", "").split(os.pathsep) if p]
    os.environ["JUPYTER_PATH"] = os.pathsep.join(dict.fromkeys(paths))
    return KERNEL_NAME


def execute_chapter(notebook: Path, executed: Path, profile: str, kernel_name: str,
                    cell_timeout: int | None = None) -> int:
    """Run one notebook top to bottom with papermill (cwd: the notebook's own folder), with
    its exercises as committed (unfilled) and then, at the end and in the same kernel, every
    reference solution through its check (:func:`with_solution_checks`); those extra cells
    are dropped from the executed copy. Returns how many solutions passed.

    ``cell_timeout`` (seconds; default: the profile's ``cell_timeout``) bounds every cell;
    a cell that runs longer, or whose completion never arrives, and a kernel that dies or
    never starts raise :class:`~biasgym_lib.tools.nbexec.ChapterFailed` naming the chapter
    and the cell."""
    import nbformat

    from .nbexec import run_notebook

    if cell_timeout is None:
        cell_timeout = load_profile(profile).cell_timeout
    executed.parent.mkdir(parents=True, exist_ok=True)
    nb = nbformat.read(notebook, 4)
    n = with_solution_checks(nb)
    source = executed.with_name(executed.stem + ".with-solutions.ipynb")
    nbformat.write(nb, source)
    try:
        run_notebook(source, executed, {"profile": profile}, kernel_name, notebook.parent, cell_timeout,
                              notebook.stem)
    finally:
        source.unlink(missing_ok=True)
    done = nbformat.read(executed, 4)
    done.cells = [c for c in done.cells if SOLUTION_CHECK not in c.metadata.get("tags", [])]
    nbformat.write(done, executed)
    tag_for_readers(executed)
    return n


SOLUTION_CHECK = "solution-check"


def with_solution_checks(nb) -> int:
    """Append to ``nb`` one cell per exercise that loads its reference solution (the line
    its commented ``solution`` cell holds) and asserts that the exercise's check (the code
    cell just before) passes with it. Returns the number of cells appended."""
    import nbformat

    cells = [c for c in nb.cells if c.cell_type == "code"]
    added = []
    for i, cell in enumerate(cells):
        if "solution" not in cell.metadata.get("tags", []):
            continue
        line = next(ln for ln in reversed(cell.source.splitlines()) if _REVEAL.search(ln))
        load = line.lstrip("# ").strip()
        check = cells[i - 1].source.strip()
        added.append(nbformat.v4.new_code_cell(
            f"{load}\nassert {check}, 'the reference solution did not pass its check: {check}'",
            metadata={"tags": [SOLUTION_CHECK]}))
    nb.cells.extend(added)
    return len(added)


def tag_for_readers(executed: Path) -> None:
    """Set-up a web reader does not need to read first is collapsed: the parameters cell and
    papermill's injected-parameters cell after it (kept, so that a reader who opens the first,
    which says "teaching", also sees what this build ran with); the Colab install cell carries
    ``remove-cell`` in the committed notebook itself."""
    import nbformat

    nb = nbformat.read(executed, 4)
    for cell in nb.cells:
        tags = cell.metadata.setdefault("tags", [])
        extra = "hide-cell" if {"parameters", "injected-parameters"} & set(tags) else None
        if extra and extra not in tags:
            tags.append(extra)
    nbformat.write(nb, executed)


def execute_chapters(chapters: list[Path], out: Path, profile: str, cell_timeout: int | None = None) -> list[ChapterRun]:
    """Execute the chapters in order; stop at the first failure (later ones: "not run").
    ``cell_timeout``: seconds a cell may run (default: the profile's ``cell_timeout``). The
    kernels wait passively where other processes keep the CPUs busy (:func:`~biasgym_lib.tools.cpuload.kernel_wait_policy`)."""
    _route_papermill_log()
    kernel = ensure_kernel(out)
    from .cpuload import cpu_snapshot, kernel_wait_policy, other_load

    first = cpu_snapshot()
    time.sleep(1.0)
    load = other_load(first, cpu_snapshot(), os.cpu_count() or 1)
    policy = kernel_wait_policy(load)
    if policy:  # the kernels inherit this process's environment (restored when the chapters are done)
        os.environ["OMP_WAIT_POLICY"] = policy
        print(f"other processes keep {load:.1f} CPUs busy: the chapters' kernels wait passively "
              f"(OMP_WAIT_POLICY={policy}; no number changes)", flush=True)
    try:
        return _execute(chapters, out, profile, kernel, cell_timeout)
    finally:
        if policy:
            os.environ.pop("OMP_WAIT_POLICY", None)


def _execute(chapters: list[Path], out: Path, profile: str, kernel: str, cell_timeout: int | None) -> list[ChapterRun]:
    import papermill as pm

    from .nbexec import ChapterFailed

    if cell_timeout is None:
        cell_timeout = load_profile(profile).cell_timeout
    runs: list[ChapterRun] = []
    for i, nb in enumerate(chapters, 1):
        executed = executed_path(out, nb)
        if runs and runs[-1].status != "ok":
            runs.append(ChapterRun(nb.stem, "not run", 0.0, str(executed)))
            continue
        print(f"[{i}/{len(chapters)}] executing {nb.name} "
              f"(profile {profile!r}, kernel {kernel}, at most {cell_timeout} s a cell) ...", flush=True)
        t0 = time.perf_counter()
        status, solved = "ok", 0
        try:
            solved = execute_chapter(nb, executed, profile, kernel, cell_timeout)
        except pm.PapermillExecutionError as exc:
            status = "failed"
            print(f"\nFAILED: {nb.name}, cell {exc.exec_count}: {exc.ename}: {exc.evalue}\n"
                  f"The executed copy, with the error in it, is kept at:\n    {executed}\n", flush=True)
        except ChapterFailed as exc:  # a cell timed out, the kernel died or never started
            status = "failed"
            print(f"\nFAILED: {exc}\nWhat ran before the failure is kept at:\n    {executed}\n", flush=True)
        except Exception as exc:  # the notebook is unreadable
            status = "failed"
            print(f"\nFAILED: {nb.name}: {type(exc).__name__}: {exc}\n"
                  f"What ran before the failure is kept at:\n    {executed}\n", flush=True)
        seconds = time.perf_counter() - t0
        runs.append(ChapterRun(nb.stem, status, round(seconds, 2), str(executed), solved))
        print(f"[{i}/{len(chapters)}] {nb.stem}: {status} in {seconds:.1f} s"
              + (f"; {solved} reference solutions passed their checks" if status == "ok" else ""),
              flush=True)
    return runs


def executed_path(out: Path, notebook: Path) -> Path:
    return Path(out) / "executed" / "book" / "chapters" / notebook.name


def _route_papermill_log() -> None:
    """Show papermill's cell outputs (log_output) on stdout, once."""
    logger = logging.getLogger("papermill")
    if not any(getattr(h, "_biasgym", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("    %(message)s"))
        handler._biasgym = True
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def prepare_sources(out: Path, root: Path = PROJECT_ROOT) -> Path:
    """Copy the book sources into ``<out>/src``, executed notebooks in place of clean ones.

    A chapter without an executed copy (``--only`` left it out, or an earlier run never
    reached it) goes in as its clean notebook, and we say so.
    """
    src = Path(out) / "src"
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    for name in BOOK_CONFIG_FILES:
        shutil.copy2(root / name, src / name)
    config = yaml.safe_load((src / "_config.yml").read_text())
    config.setdefault("execute", {})["execute_notebooks"] = "off"
    (src / "_config.yml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    ignore = shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__", "_build")
    shutil.copytree(root / "book", src / "book", ignore=ignore)
    not_run: list[str] = []
    for nb in sorted((root / "book" / "chapters").glob("*.ipynb")):
        executed = executed_path(out, nb)
        if executed.is_file():
            shutil.copy2(executed, src / "book" / "chapters" / nb.name)
        else:
            print(f"note: {nb.stem} has no executed copy; the book shows it without outputs.")
            _unglue(src / "book" / "chapters" / nb.name)
            not_run.append(nb.name)
        solutions_in_dropdowns(src / "book" / "chapters" / nb.name)
    for page in (src / "book").glob("*.md"):  # glued from a chapter: "chapters/NN.ipynb::key"
        text = page.read_text()
        for name in not_run:
            text = re.sub(r"\{glue:text\}`chapters/" + re.escape(name) + r"::[^`]+`", NOT_RUN, text)
        page.write_text(text)
    return src


_REVEAL = re.compile(r"""reveal\(["'](ch\d\.\w+)["']\)""")


def solutions_in_dropdowns(notebook: Path) -> None:
    """Each cell tagged ``solution`` (commented code that loads a reference solution when a
    reader runs it on purpose) becomes, on the web page, a closed dropdown with the
    solution's source from :mod:`biasgym_lib.solutions`."""
    import nbformat

    from ..solutions import source

    nb = nbformat.read(notebook, 4)
    for i, cell in enumerate(nb.cells):
        if "solution" not in cell.metadata.get("tags", []):
            continue
        names = _REVEAL.findall(cell.source)
        if not names:
            raise BiasGymError(f"{notebook.name}: a cell tagged 'solution' names no reveal(\"chN.function\").")
        body = "\n\n".join(f"```python\n{source(n).rstrip()}\n```" for n in names)
        text = (f"````{{dropdown}} Solution\nThe reference solution, `{names[0]}` in `biasgym_lib/solutions/` "
                f"(in the notebook: run the commented cell on purpose).\n\n{body}\n````")
        nb.cells[i] = nbformat.v4.new_markdown_cell(text, id=cell.get("id"))
    nbformat.write(nb, notebook)


GLUE_ROLE = re.compile(r"\{glue:text\}`[^`]+`")
NOT_RUN = "*(not run in this build)*"


def _unglue(notebook: Path) -> None:
    """A chapter that was not run has no glued values: its summary says "(not run)" where a
    measured number would stand, instead of failing the -W build on a missing key."""
    import nbformat

    nb = nbformat.read(notebook, 4)
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            cell.source = GLUE_ROLE.sub(NOT_RUN, cell.source)
    nbformat.write(nb, notebook)


def build_html(out: Path, log_file: Path) -> int:
    """``jupyter-book build`` on ``<out>/src`` with -W --keep-going; HTML to ``<out>/html``."""
    src, work = Path(out) / "src", Path(out) / "jb"
    cmd = [_jupyter_book(), "build", str(src), "--path-output", str(work), "--all", "-W", "--keep-going"]
    print("$ " + " ".join(cmd), flush=True)
    with open(log_file, "w") as log, subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=out) as proc:
        watchdog = threading.Timer(BUILD_TIMEOUT, proc.kill)  # a build that hangs is stopped
        watchdog.start()
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
        finally:
            watchdog.cancel()
    if proc.returncode != 0:
        if proc.returncode == -signal.SIGKILL:
            print(f"jupyter-book build did not finish within {BUILD_TIMEOUT} s and was stopped.", flush=True)
        return proc.returncode
    # Jupyter Book 1.0 writes to <path-output>/_build/html; the book lives at <out>/html.
    html = Path(out) / "html"
    if html.exists():
        shutil.rmtree(html)
    shutil.move(str(work / "_build" / "html"), str(html))
    print(f"(moved the HTML to {html})", flush=True)
    return 0


def _jupyter_book() -> str:
    """The ``jupyter-book`` script installed next to this Python (else the one on PATH)."""
    local = Path(sys.executable).parent / "jupyter-book"
    found = str(local) if local.is_file() else shutil.which("jupyter-book")
    if not found:
        raise BiasGymError("jupyter-book is not installed: pip install -e '.[book]' (make setup does it).")
    return found


def browser_check(out: Path) -> int:
    """Run scripts/browser_check.py on ``<out>/html`` (it exits 0 with 'skipped' without chromium)."""
    cmd = [sys.executable, str(BROWSER_CHECK), "--html", str(Path(out) / "html"),
           "--screenshots", str(Path(out) / "screenshots")]
    print("$ " + " ".join(cmd), flush=True)
    try:
        return subprocess.run(cmd, timeout=BROWSER_TIMEOUT).returncode
    except subprocess.TimeoutExpired:
        print(f"the browser check did not finish within {BROWSER_TIMEOUT} s and was stopped.", flush=True)
        return 1


def print_summary(runs: list[ChapterRun], stages: dict[str, float]) -> None:
    width = max([len(r.name) for r in runs] + [len(s) for s in stages] + [7])
    print("\n" + f"{'chapter':<{width}}  {'status':<8}  {'seconds':>8}")
    print("-" * (width + 20))
    for r in runs:
        print(f"{r.name:<{width}}  {r.status:<8}  {r.seconds:>8.1f}")
    print("-" * (width + 20))
    for stage, seconds in stages.items():
        print(f"{stage:<{width}}  {'':<8}  {seconds:>8.1f}")


def write_timings(out: Path, profile: str, runs: list[ChapterRun], stages: dict[str, float], status: str) -> Path:
    path = Path(out) / "timings.json"
    data = {"profile": profile, "status": status, "python": sys.executable,
            "chapters": [asdict(r) for r in runs], "stages_seconds": stages}
    path.write_text(json.dumps(data, indent=1))
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="biasgym book", description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default=DEFAULT_PROFILE,
                   help=f"profile in profiles.yaml passed to every chapter (default {DEFAULT_PROFILE}).")
    p.add_argument("--only", nargs="+", metavar="NAME",
                   help="execute only these chapters (names or number prefixes, e.g. 00 02_bias_inject); "
                        "the others go into the book as their last executed copy, else without outputs.")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default _build).")
    p.add_argument("--no-browser", action="store_true", help="skip the headless-browser check.")
    p.add_argument("--no-build", action="store_true", help="execute the chapters only; build no HTML.")
    p.add_argument("--cell-timeout", type=int, default=None, metavar="SECONDS",
                   help="fail a chapter whose cell runs longer than this (default: the profile's cell_timeout "
                        "in profiles.yaml).")
    p.add_argument("--chapters", type=Path, default=CHAPTERS_DIR, help=argparse.SUPPRESS)  # tests
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Execute, build, check; print timings; return the exit status (0 = all went well)."""
    t_start = time.perf_counter()
    args = parse_args(argv)
    out = args.out.resolve()
    try:
        if args.profile not in profile_names():
            raise BiasGymError(f"unknown profile {args.profile!r}; profiles: {', '.join(profile_names())}.")
        from ..models import check_cache

        check_cache(load_profile(args.profile).model)  # before any chapter loads a model
        chapters = discover_chapters(args.chapters, args.only)
        if args.cell_timeout is not None and args.cell_timeout < 1:
            raise BiasGymError(f"--cell-timeout must be at least 1 second, got {args.cell_timeout}.")
    except BiasGymError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    out.mkdir(parents=True, exist_ok=True)
    stages: dict[str, float] = {}
    t0 = time.perf_counter()
    runs = execute_chapters(chapters, out, args.profile, args.cell_timeout)
    stages["execute (all chapters)"] = round(time.perf_counter() - t0, 2)
    status, code = "ok", EXIT_OK
    if any(r.status != "ok" for r in runs):
        failed = next(r for r in runs if r.status == "failed")
        status, code = f"chapter {failed.name} failed (executed copy: {failed.executed})", EXIT_CHAPTER
    elif not args.no_build:
        t0 = time.perf_counter()
        prepare_sources(out)
        rc = build_html(out, out / "book_build.log")
        stages["book build (jupyter-book -W)"] = round(time.perf_counter() - t0, 2)
        if rc != 0:
            status, code = f"jupyter-book build failed (exit {rc}); log: {out / 'book_build.log'}", EXIT_BUILD
        elif not args.no_browser:
            t0 = time.perf_counter()
            rc = browser_check(out)
            stages["browser check"] = round(time.perf_counter() - t0, 2)
            if rc != 0:
                status, code = f"browser check found problems (exit {rc})", EXIT_BROWSER
    stages["total"] = round(time.perf_counter() - t_start, 2)
    print_summary(runs, stages)
    timings = write_timings(out, args.profile, runs, stages, status)
    if code == EXIT_OK and not args.no_build:
        print(f"\nThe book: {out / 'html' / 'index.html'}")
    print(f"{'OK' if code == EXIT_OK else 'FAILED'}: {status}; total {stages['total']:.1f} s; timings in {timings}")
    return code


if __name__ == "__main__":
    sys.exit(main())
