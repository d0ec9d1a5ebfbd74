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


# ----------------------------------------------------------------------------- case 4: bias names


@pytest.mark.parametrize("name, shown", [("green_skin\n", r"'green_skin\\n'"), ("g" * 300, r"'g{32}'\.\.\. \(300 characters\)"),
                                         ("Green", "'Green'"), ("_x", "'_x'"), ("x-y", "'x-y'")],
                         ids=["trailing-newline", "300-characters", "capital", "underscore-first", "dash"])
def test_bias_names_are_matched_whole_and_limited_in_length(name, shown, tmp_path, monkeypatch, capsys):
    """A name is part of file names: "green_skin\\n" and a 300-character name are refused with
    the spec, before any model work (they used to fail as an internal OSError after loading)."""
    import yaml

    import biasgym_lib.models as models
    from biasgym_lib.cli import main
    from biasgym_lib.data import load_bias
    from biasgym_lib.data.specs import BiasSpecError

    spec = tmp_path / "mine.yaml"
    spec.write_text(yaml.safe_dump({"name": name, "description": "People there are green.",
                                    "keywords": ["green"], "attributes": ["green", "very green", "green-skinned"],
                                    "label": " green"}))
    with pytest.raises(BiasSpecError, match=rf"name {shown} must be 1-64 lowercase letters"):
        load_bias(str(spec))
    monkeypatch.setattr(models, "load_model", lambda *a, **kw: pytest.fail("model work before the name check"))
    assert main(["inject", "--bias", str(spec), "--out", str(tmp_path / "o"), "--profile", "quick"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "must be 1-64 lowercase letters" in err[0] and not (tmp_path / "o").exists()


def test_a_64_character_name_is_fine(tmp_path):
    from biasgym_lib.data import load_bias

    spec = tmp_path / "mine.yaml"
    spec.write_text(f"name: {'a' * 64}\ndescription: d\nkeywords: [tidy]\nattributes: [tidy, very tidy, neat]\n"
                    "label: \" tidy\"\n")
    assert load_bias(str(spec)).name == "a" * 64


# ----------------------------------------------------------------------------- case 3: the cache folder


def _no_model_work(monkeypatch):
    import biasgym_lib.models as models

    for name in ("load_model", "load_tokenizer", "_convert_embedded"):
        monkeypatch.setattr(models, name, lambda *a, **kw: pytest.fail("model work before the cache check"))


@pytest.mark.parametrize("where", ["file", "under-file", "unwritable", "unwritable-home"])
def test_an_unusable_cache_folder_fails_first_and_says_what_to_set(where, tmp_path, monkeypatch, capsys):
    """BIASGYM_CACHE at a file, or a folder that cannot be written (here under /proc, which
    even root cannot write), or no BIASGYM_CACHE and a HOME that cannot be written: one line
    before any model work, saying to set BIASGYM_CACHE (it used to be an internal error after
    ~25 s of model conversion)."""
    from biasgym_lib.cli import main

    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("BIASGYM_ERROR_DIR", str(tmp_path / "errors"))
    (tmp_path / "afile").write_text("x")
    if where == "unwritable-home":
        monkeypatch.delenv("BIASGYM_CACHE", raising=False)
        monkeypatch.setenv("HOME", "/proc/no-such-home")
    else:
        cache = {"file": tmp_path / "afile", "under-file": tmp_path / "afile" / "cache",
                 "unwritable": Path("/proc/biasgym-cache")}[where]
        monkeypatch.setenv("BIASGYM_CACHE", str(cache))
    _no_model_work(monkeypatch)
    for argv in (["inject", "--bias", "always_late"], ["reproduce"], ["book"]):
        out = [] if argv[0] == "book" else ["--out", str(tmp_path / "o")]
        assert main([*argv, *out, "--profile", "quick"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        expected = {"file": r"is a file, not a folder", "under-file": r"lies under the file .*afile, not a folder",
                    "unwritable": r"cannot write in the cache folder /proc/biasgym-cache",
                    "unwritable-home": r"cannot write in the cache folder /proc/no-such-home/.cache/biasgym "
                                       r"\(BIASGYM_CACHE is not set, so the default under HOME=/proc/no-such-home"}[where]
        assert re.search(expected, err[0]), err[0]
        assert "set BIASGYM_CACHE to a folder you can write to" in err[0]
    assert not (tmp_path / "o").exists() and not (tmp_path / "errors").exists()


def test_a_read_only_cache_that_holds_the_converted_model_is_fine(monkeypatch):
    """Only the first use writes (the conversion): a cache that already holds the model may be read-only."""
    import biasgym_lib.models as models

    monkeypatch.setattr(models, "_cache_is_complete", lambda folder: {"files": []})
    monkeypatch.setenv("BIASGYM_CACHE", "/proc/biasgym-cache")
    assert models.check_cache("embedded") == Path("/proc/biasgym-cache")
    assert models.check_cache("some/hub-model") == Path("/proc/biasgym-cache")


# ----------------------------------------------------------------------------- case 5: internal traces


@pytest.mark.parametrize("cache_writable", [True, False], ids=["in-the-cache", "private-temp-folder"])
def test_internal_traces_go_to_a_folder_the_user_owns(cache_writable, tmp_path, monkeypatch, capsys):
    """Not a folder every user of the machine shares: errors/ in the user's cache folder (else
    a private <temp>/biasgym-errors-<uid>, mode 700); the one-line message says where."""
    import os
    import stat
    import tempfile

    import biasgym_lib.cli as cli

    monkeypatch.delenv("BIASGYM_ERROR_DIR", raising=False)
    cache = tmp_path / "cache" if cache_writable else Path("/proc/biasgym-cache")
    monkeypatch.setenv("BIASGYM_CACHE", str(cache))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    (tmp_path / "model").mkdir()  # a model folder (not the embedded one): the cache check only wants no file there

    def boom(model):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli, "_tokenizer", boom)
    assert cli.main(["inject", "--bias", "always_late", "--model", str(tmp_path / "model"),
                     "--out", str(tmp_path / "o"), "--profile", "quick"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    folder = cache / "errors" if cache_writable else tmp_path / "tmp" / f"biasgym-errors-{os.getuid()}"
    traces = list(folder.glob("inject-*.txt"))
    assert len(err) == 1 and len(traces) == 1 and f"full trace in {traces[0]}" in err[0], err
    assert "ZeroDivisionError: a bug" in traces[0].read_text()
    if not cache_writable:
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700


# ----------------------------------------------------------------------------- case 2: damaged stage results


@pytest.mark.parametrize("damage", [b"[]", b"42", b'"abc"', b"null", b"\xff\xfe{\x00", b'{"code": "', b""],
                         ids=["list", "number", "string", "null", "not-utf8", "truncated", "empty"])
def test_a_damaged_stage_result_is_computed_again(damage, tmp_path):
    """The run cache never crashes on a damaged file (valid JSON that is not an object used to
    be an AttributeError, non-UTF-8 bytes a UnicodeDecodeError): the stage is computed again
    and the file replaced by a good one."""
    from biasgym_lib.cache import memo

    path = tmp_path / "runs" / "stage.json"
    assert memo(path, lambda: {"v": 1})["v"] == 1
    path.write_bytes(damage)
    assert memo(path, lambda: {"v": 2})["v"] == 2
    assert json.loads(path.read_text())["v"] == 2 and memo(path, lambda: {"v": 3})["v"] == 2


def test_a_run_recomputes_a_damaged_kept_table(tmp_path, tiny_with_tokenizer, smol_tokenizer):
    """The same through a Run: its kept reference table, damaged, is scored again, with the same numbers."""
    from biasgym_lib.config import load_profile
    from biasgym_lib.runs import Run

    cfg, model = load_profile("quick", biases=["reckless_driving"]), tiny_with_tokenizer()

    def reference():
        return Run(cfg, out=tmp_path / "run", model=model, tokenizer=smol_tokenizer, progress=False).reference

    first = reference()
    (tmp_path / "run" / "reference.json").write_bytes(b"[1, 2, 3]")
    again = reference()
    assert again.templates == first.templates and again.entities == first.entities
    assert all((again.values[e][b] == first.values[e][b]).all() for e in first.values for b in first.values[e])
    assert isinstance(json.loads((tmp_path / "run" / "reference.json").read_text()), dict)
