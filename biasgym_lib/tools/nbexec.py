"""Executing one notebook with papermill so that no wait is unbounded, and a cell's
completion that the kernel left stranded is fetched instead of waited for.

papermill (through nbclient) sends a cell to the kernel and waits for two things: the
``execute_reply`` on the shell channel and the ``idle`` status on IOPub. Without
``execution_timeout`` nbclient waits for the reply with no bound at all; so a reply that
never reaches the client hangs the build for good. That is what issue 21 reported: papermill
waited 18 minutes on a cell of chapter 3 while the kernel sat idle, and a second client's
``1+1`` was answered at once (the kernel had finished the cell). That is the shape of a lost
wake-up in the kernel's sockets: a reply (or request) left in a socket until another message
reaches the kernel's shell socket (ipykernel 7 relays every shell message between threads;
its issue #1554 describes one such window, fixed in the pinned 7.4.0). It was not reproduced
on this project's machine (issue 21 records what was tried), so the build guards against it
on both sides.

So every execution here is bounded (:data:`START_TIMEOUT`, :data:`IOPUB_TIMEOUT`, and the
caller's per-cell timeout), and :class:`KeepAliveClient` nudges: while a cell's reply is
awaited and the kernel is not running it (IOPub said ``idle``, or never said ``busy``), it
sends a ``kernel_info_request`` on the shell channel every :data:`NUDGE_SECONDS`. That
message reaches the kernel's shell socket as the second client's did; its reply is ignored,
and on a healthy kernel it costs nothing. Each nudge is logged and counted
(``timings.json``): a build that needed one says so. A reply that is truly lost still fails
its chapter at the cell timeout, naming the cell.
"""

from __future__ import annotations

import asyncio

import papermill as pm
from nbclient.exceptions import CellTimeoutError, DeadKernelError
from nbclient.util import run_sync
from papermill.clientwrap import PapermillNotebookClient
from papermill.engines import NBClientEngine, papermill_engines
from papermill.log import logger
from papermill.utils import merge_kwargs, remove_args
from traitlets import Any

from ..errors import BiasGymError

START_TIMEOUT = 300  # seconds for a kernel to start on a loaded machine
IOPUB_TIMEOUT = 60  # seconds for a cell's last output after its reply (nbclient's 4 s fails a loaded machine)
NUDGE_SECONDS = 15  # seconds without a reply from an idle kernel before it is nudged (and again every as many)
ENGINE = "biasgym-keepalive"


class ChapterFailed(BiasGymError):
    """A chapter did not run to its end: the message names the chapter, the cell and why."""


class KeepAliveClient(PapermillNotebookClient):
    """papermill's client, which nudges an idle kernel whose reply has not come (see the
    module docstring). ``nudged``: a list that gets the index of the cell at each nudge."""

    nudged = Any(None)

    async def async_execute_cell(self, cell, cell_index, execution_count=None, store_history=True):
        watch = asyncio.ensure_future(self._keep_alive(cell, cell_index))
        try:
            return await super().async_execute_cell(cell, cell_index, execution_count=execution_count,
                                                    store_history=store_history)
        finally:
            watch.cancel()

    execute_cell = run_sync(async_execute_cell)  # nbclient binds the synchronous one to its own coroutine

    async def _keep_alive(self, cell, index: int) -> None:
        while True:
            await asyncio.sleep(NUDGE_SECONDS)
            timing = cell.get("metadata", {}).get("execution", {})  # nbclient's record of the cell's messages
            if "shell.execute_reply" in timing:
                return
            if "iopub.status.busy" in timing and "iopub.status.idle" not in timing:
                continue  # the kernel is running the cell: nothing is lost
            if self.nudged is not None:
                self.nudged.append(index)
            state = "went idle" if "iopub.status.idle" in timing else "has not started it"
            self.log.warning(f"cell {index}: no reply {NUDGE_SECONDS} s after the kernel {state}; nudging the "
                             "kernel (a kernel_info_request wakes a reply or request stuck in its sockets)")
            self.kc.kernel_info()


class KeepAliveEngine(NBClientEngine):
    """papermill's nbclient engine with :class:`KeepAliveClient` (same arguments)."""

    @classmethod
    def execute_managed_notebook(cls, nb_man, kernel_name, log_output=False, stdout_file=None, stderr_file=None,
                                 start_timeout=60, execution_timeout=None, **kwargs):
        kwargs = remove_args(["input_path"], **kwargs)
        safe_kwargs = remove_args(["timeout", "startup_timeout"], **kwargs)
        final_kwargs = merge_kwargs(safe_kwargs, timeout=execution_timeout if execution_timeout else kwargs.get("timeout"),
                                    startup_timeout=start_timeout, kernel_name=kernel_name, log=logger,
                                    log_output=log_output, stdout_file=stdout_file, stderr_file=stderr_file)
        return KeepAliveClient(nb_man, **final_kwargs).execute()


papermill_engines.register(ENGINE, KeepAliveEngine)


def run_notebook(source, executed, parameters: dict, kernel_name: str, cwd, cell_timeout: int, name: str) -> list:
    """papermill ``source`` into ``executed`` with every wait bounded (``cell_timeout`` s a
    cell) and idle kernels nudged; returns the cells nudged (usually none). An error raised
    by a cell's own code is papermill's :class:`~papermill.PapermillExecutionError`; any other
    failure (a timeout, a dead kernel, one that never starts) is a :class:`ChapterFailed`
    naming the chapter ``name`` and the cell."""
    current: dict = {}
    nudged: list = []

    def on_cell_execute(cell, cell_index, **_):  # which cell is running, for the failure message
        current.update(index=cell_index, source=cell.source)

    try:
        pm.execute_notebook(str(source), str(executed), parameters=parameters, engine_name=ENGINE,
                            kernel_name=kernel_name, progress_bar=False, log_output=True, cwd=str(cwd),
                            execution_timeout=cell_timeout, start_timeout=START_TIMEOUT,
                            iopub_timeout=IOPUB_TIMEOUT, on_cell_execute=on_cell_execute, nudged=nudged)
    except pm.PapermillExecutionError:
        raise
    except Exception as exc:
        raise ChapterFailed(why(name, current, exc, cell_timeout, nudged)) from exc
    return nudged


def why(chapter: str, current: dict, exc: Exception, cell_timeout: int, nudged=()) -> str:
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
        tried = f"; {len(nudged)} nudges of the idle kernel did not bring it" if nudged else ""
        return (f"{where}: no completion within the cell timeout of {cell_timeout} s (the cell ran longer, or "
                f"its completion never reached the build{tried}); if the cell is just slow here, raise the timeout "
                "with `biasgym book --cell-timeout SECONDS` or the profile's cell_timeout in profiles.yaml.")
    if isinstance(exc, DeadKernelError):
        return f"{where}: the kernel died (killed, or out of memory?) while the cell ran."
    if isinstance(exc, RuntimeError) and "didn't respond" in str(exc):
        return f"{where}: the kernel did not start within {START_TIMEOUT} s."
    return f"{where}: {type(exc).__name__}: {exc}"
