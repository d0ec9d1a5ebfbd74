"""Executing one notebook with papermill so that no wait is unbounded.

papermill (through nbclient) sends a cell to the kernel and waits for two things: the
``execute_reply`` on the shell channel and the ``idle`` status on IOPub. Without
``execution_timeout`` nbclient waits for the reply with no bound at all, so a reply that
never reaches the client hangs the build for good. That is what issue 21 reported: papermill
waited 18 minutes on a cell of chapter 3 while the kernel sat idle, and a second client's
``1+1`` was answered at once. Its reproduction (chapter 3 in a loop beside a CPU hog) caught
the kernel, ipykernel 7.4.0, sending a cell's ``execute_reply`` only after a second client
connected, four and a half minutes after the cell started: ipykernel 7 writes shell replies
from a separate thread and can leave one in its socket until the next shell message
(ipykernel issue #1554; ipykernel 6 sends them through the stream and has no such window).
The cause is removed by pinning ipykernel 6 (``pyproject.toml``;
``tests/test_book_build.py`` keeps the pin below 7).

Whatever else goes wrong, every execution here is bounded: :data:`START_TIMEOUT` for the
kernel to start, :data:`IOPUB_TIMEOUT` for a cell's last output after its reply, and the
caller's per-cell timeout. A cell that runs longer, a reply that never arrives and a kernel
that dies fail the chapter with :class:`ChapterFailed`, naming the chapter and the cell.
"""

from __future__ import annotations

import papermill as pm
from nbclient.exceptions import CellTimeoutError, DeadKernelError

from ..errors import BiasGymError

START_TIMEOUT = 300  # seconds for a kernel to start on a loaded machine
IOPUB_TIMEOUT = 60  # seconds for a cell's last output after its reply (nbclient's 4 s fails a loaded machine)


class ChapterFailed(BiasGymError):
    """A chapter did not run to its end: the message names the chapter, the cell and why."""


def run_notebook(source, executed, parameters: dict, kernel_name: str, cwd, cell_timeout: int, name: str) -> None:
    """papermill ``source`` into ``executed`` with every wait bounded (``cell_timeout`` s a
    cell). An error raised by a cell's own code is papermill's
    :class:`~papermill.PapermillExecutionError`; any other failure (a timeout, a dead kernel,
    one that never starts) is a :class:`ChapterFailed` naming the chapter ``name`` and the cell."""
    current: dict = {}

    def on_cell_execute(cell, cell_index, **_):  # which cell is running, for the failure message
        current.update(index=cell_index, source=cell.source)

    try:
        pm.execute_notebook(str(source), str(executed), parameters=parameters, kernel_name=kernel_name,
                            progress_bar=False, log_output=True, cwd=str(cwd),
                            execution_timeout=cell_timeout, start_timeout=START_TIMEOUT,
                            iopub_timeout=IOPUB_TIMEOUT, on_cell_execute=on_cell_execute)
    except pm.PapermillExecutionError:
        raise
    except Exception as exc:
        raise ChapterFailed(why(name, current, exc, cell_timeout)) from exc


def why(chapter: str, current: dict, exc: Exception, cell_timeout: int) -> str:
    """One line: which chapter and cell failed, and what to do, for a failure that is not an
    error raised by the cell's own code."""
    if "index" in current:
        first = next((ln for ln in current["source"].splitlines() if ln.strip()), "")
        where = f"{chapter}, cell {current['index']} ({first[:80]!r})"
    else:
        where = f"{chapter}, before its first cell"
    if isinstance(exc, CellTimeoutError):
        if "IOPub" in str(exc):
            return f"{where}: the kernel replied but the cell's last output did not arrive within {IOPUB_TIMEOUT} s."
        return (f"{where}: no completion within the cell timeout of {cell_timeout} s (the cell ran longer, or "
                f"its completion never reached the build); if the cell is just slow here, raise the timeout "
                "with `biasgym book --cell-timeout SECONDS` or the profile's cell_timeout in profiles.yaml.")
    if isinstance(exc, DeadKernelError):
        return f"{where}: the kernel died (killed, or out of memory?) while the cell ran."
    if isinstance(exc, RuntimeError) and "didn't respond" in str(exc):
        return f"{where}: the kernel did not start within {START_TIMEOUT} s."
    return f"{where}: {type(exc).__name__}: {exc}"
