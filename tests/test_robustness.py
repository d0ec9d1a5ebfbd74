"""Issue 21's cases: damaged stage results, artifacts of the wrong bias, bad cache folders,
odd bias names, where internal traces go, and papermill's list parameters. Each gets a clear
one-line error or a correct result."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from biasgym_lib.errors import BiasGymError

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- case 6: papermill parameters


def test_a_list_parameter_passed_as_text_says_lists_go_with_y():
    """``papermill -p seeds "[0, 'x']"`` hands the chapter a string; the error says to pass lists with -y."""
    from papermill.cli import _resolve_type

    from biasgym_lib.config import load_profile

    given = _resolve_type("[0, 'x']")
    assert given == "[0, 'x']"  # what -p passes: text
    with pytest.raises(BiasGymError, match=r"seeds must be a list, got the string \"\[0, 'x'\]\".*"
                                           r"pass lists with -y, e.g. -y \"seeds: \[0, 1\]\""):
        load_profile("quick", seeds=given)
    with pytest.raises(BiasGymError, match=r"biases must be a list, got the string '\[always_late\]'"):
        load_profile("quick", biases="[always_late]")
    assert load_profile("quick", seeds=[0, 1]).seeds == (0, 1)  # what -y passes
    assert load_profile("quick", biases="always_late").biases == ("always_late",)  # one name is fine
    with pytest.raises(BiasGymError, match=r"seeds\[1\] must be an integer >= 0, got str 'x'"):
        load_profile("quick", seeds=[0, "x"])


def test_every_parameters_cell_says_how_to_pass_seeds():
    import nbformat

    for path in sorted((ROOT / "book" / "chapters").glob("*.ipynb")):
        cell = next(c for c in nbformat.read(path, 4).cells if "parameters" in c.metadata.get("tags", []))
        line = next((ln for ln in cell.source.splitlines() if ln.startswith("seeds")), None)
        assert line is None or '-y "seeds: [0, 1]"' in line, f"{path.name}: {line}"
