"""Reference solutions to the chapters' exercises, kept out of the notebooks.

A reader who wants one runs, on purpose, a cell such as::

    continuation_logprob = reveal("ch1.continuation_logprob")

which prints the solution's source and returns the function, so the cells after it run
with it. The HTML book shows the same source in a closed dropdown under each exercise. The
tests run every build exercise's check on these solutions.
"""

from __future__ import annotations

import importlib
import inspect

from ..errors import BiasGymError

CHAPTERS = ("ch0", "ch1", "ch2", "ch3", "ch4", "ch5", "ch6", "ch7")


def solution(name: str):
    """The solution function ``"chN.name"``, without printing it."""
    chapter, _, func = name.partition(".")
    if chapter not in CHAPTERS or not func:
        raise BiasGymError(f"no solution {name!r}: use 'chN.function', N from 0 to 7 (e.g. 'ch1.continuation_logprob').")
    module = importlib.import_module(f"{__name__}.{chapter}")
    if not hasattr(module, func):
        names = [n for n, f in vars(module).items() if inspect.isfunction(f) and f.__module__ == module.__name__]
        raise BiasGymError(f"no solution {name!r}; chapter {chapter[2:]} has {', '.join(names)}.")
    return getattr(module, func)


def source(name: str) -> str:
    """The source of the solution ``"chN.name"``."""
    return inspect.getsource(solution(name))


def reveal(name: str):
    """Print the solution ``"chN.name"`` and return it (run on purpose: it is the answer)."""
    print(source(name))
    return solution(name)
