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


# ----------------------------------------------------------------------------- case 1: whose artifact is it?


@pytest.fixture(scope="module")
def tiny_ws(tmp_path_factory, embedded):
    """A tiny model folder, a 'very_tidy' token trained on it and its head scores (biasgym scope)."""
    import copy

    from biasgym_lib.cli import main
    from biasgym_lib.models import tiny_model

    root = tmp_path_factory.mktemp("tiny_ws")
    tiny_model("llama", vocab_size=49152).save_pretrained(root / "tiny")
    copy.deepcopy(embedded[1]).save_pretrained(root / "tiny")
    (root / "tidy.yaml").write_text("name: very_tidy\ndescription: People there keep everything very tidy.\n"
                                    "keywords: [tidy, neat and orderly]\nattributes: [tidy, very tidy, neat and "
                                    "orderly]\nlabel: \" tidy\"\n")
    small = ["--profile", "quick", "--set", "n_paragraphs=2", "--set", "epochs=1", "--set", "n_probes=2",
             "--set", "n_patch_probes=1", "--set", "k=3", "--set", "biases=[always_late]"]
    assert main(["inject", "--bias", str(root / "tidy.yaml"), "--model", str(root / "tiny"), "--out",
                 str(root / "inj"), *small]) == 0
    assert main(["scope", "--injected", str(root / "inj"), "--out", str(root / "sc"), *small]) == 0
    return root, small


def test_scope_keeps_the_spec_its_heads_were_scored_for(tiny_ws):
    root, _ = tiny_ws
    scores = json.loads((root / "sc" / "head_scores.json").read_text())
    assert scores["bias"] == "very_tidy" and scores["bias_spec"]["name"] == "very_tidy" and scores["seed"] == 0


@pytest.mark.parametrize("other", ["bias", "spec"])
def test_steer_refuses_heads_of_another_bias_unless_asked_and_then_records_it(other, tiny_ws, tmp_path, capsys,
                                                                              monkeypatch):
    """Heads scored for always_late (or for another version of very_tidy's spec) do not steer
    very_tidy's token unless --heads-from-other-bias is given; then steer.json says whose they were."""
    import shutil

    import biasgym_lib.models as models
    from biasgym_lib.cli import main

    root, small = tiny_ws
    heads = tmp_path / "heads"
    shutil.copytree(root / "sc", heads)
    scores = json.loads((heads / "head_scores.json").read_text())
    if other == "bias":
        scores["bias"], scores["bias_spec"] = "always_late", None
    else:
        scores["bias_spec"] = {**scores["bias_spec"], "keywords": ["tidy"]}
    (heads / "head_scores.json").write_text(json.dumps(scores))
    argv = ["steer", "--injected", str(root / "inj"), "--heads", str(heads), "--k", "2", "--alpha", "0",
            "--out", str(tmp_path / "st"), *small, "--set", "n_ppl_texts=1", "--set", "n_random_draws=1",
            "--set", "steer_references=2"]
    real = models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a, **kw: pytest.fail("model work before the check"))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    what = "bias 'always_late'" if other == "bias" else "another version of the 'very_tidy' spec"
    assert len(err) == 1 and f"holds heads scored for {what}, but the token is for 'very_tidy'" in err[0], err
    assert "--heads-from-other-bias" in err[0] and not (tmp_path / "st").exists()
    monkeypatch.setattr(models, "load_model", real)
    assert main([*argv, "--heads-from-other-bias"]) == 0, capsys.readouterr().err
    steer = json.loads((tmp_path / "st" / "steer.json").read_text())
    assert steer["bias"] == "very_tidy" and steer["heads_from"]["other_bias"] is True
    assert steer["heads_from"]["bias"] == ("always_late" if other == "bias" else "very_tidy")


def test_steer_records_whose_heads_it_used(tiny_ws, tmp_path, capsys):
    from biasgym_lib.cli import main

    root, small = tiny_ws
    assert main(["steer", "--injected", str(root / "inj"), "--heads", str(root / "sc"), "--k", "2", "--alpha", "0",
                 "--out", str(tmp_path / "st"), *small, "--set", "n_ppl_texts=1", "--set", "n_random_draws=1",
                 "--set", "steer_references=2"]) == 0, capsys.readouterr().err
    source = json.loads((tmp_path / "st" / "steer.json").read_text())["heads_from"]
    assert source == {"bias": "very_tidy", "seed": 0, "model": source["model"], "spec_saved": True, "other_bias": False}


@pytest.mark.parametrize("copied", ["other-bias", "other-seed", "other-spec"])
def test_a_token_copied_into_another_folder_is_not_served(copied, tmp_path, tiny_with_tokenizer, smol_tokenizer):
    """always_late's token copied into good_at_math's folder of a run (or seed 0's into seed
    1's) is refused with a clear error; it used to be served as good_at_math's token without a
    word. One kept for an earlier version of the spec is trained again, never served."""
    import shutil

    from biasgym_lib.config import load_profile
    from biasgym_lib.data import load_bias
    from biasgym_lib.errors import ArtifactMismatch
    from biasgym_lib.runs import Run, token_settings
    from biasgym_lib.tokens import InjectedToken

    cfg = load_profile("quick", n_paragraphs=2, epochs=1, biases=["always_late", "good_at_math"], seeds=[0, 1])
    model = tiny_with_tokenizer()

    def run():
        return Run(cfg, out=tmp_path / "run", model=model, tokenizer=smol_tokenizer, progress=False)

    run().token("always_late", 0)
    tokens = tmp_path / "run" / "tokens" / token_settings(cfg)
    target = {"other-bias": ("good_at_math", 0), "other-seed": ("always_late", 1), "other-spec": ("always_late", 0)}
    bias, seed = target[copied]
    if copied == "other-spec":
        meta = json.loads((tokens / "always_late" / "seed0" / "token.json").read_text())
        meta["bias_spec"]["keywords"] = meta["bias_spec"]["keywords"][:1]
        (tokens / "always_late" / "seed0" / "token.json").write_text(json.dumps(meta))
    else:
        shutil.copytree(tokens / "always_late" / "seed0", tokens / bias / f"seed{seed}")
    if copied == "other-spec":
        current = load_bias("always_late").to_dict()
        assert InjectedToken.load(tokens / "always_late" / "seed0").bias_spec != current
        assert run().token(bias, seed).bias_spec == current  # trained again, not served
        assert InjectedToken.load(tokens / "always_late" / "seed0").bias_spec == current  # and replaced
        return
    held = {"other-bias": "bias 'always_late'", "other-seed": "seed 0"}[copied]
    with pytest.raises(ArtifactMismatch, match=rf"holds the token of {held}, but its folder is for '{bias}' "
                                               rf"seed {seed} \(copied or moved there\?\): delete"):
        run().token(bias, seed)


def test_a_committed_token_filed_under_another_bias_is_refused(tmp_path, monkeypatch, tiny_with_tokenizer,
                                                                smol_tokenizer):
    import shutil

    import biasgym_lib.runs as runs
    from biasgym_lib.config import load_profile
    from biasgym_lib.errors import ArtifactMismatch

    cfg = load_profile("quick")
    committed = runs.committed_token_dir("always_late", 0, cfg)
    monkeypatch.setattr(runs, "TOKENS_DIR", tmp_path / "tokens")
    shutil.copytree(committed, runs.committed_token_dir("good_at_math", 0, cfg))
    with pytest.raises(ArtifactMismatch, match=r"holds the token of bias 'always_late', but its folder is for "
                                               r"'good_at_math' seed 0"):
        runs.get_token(tiny_with_tokenizer(), smol_tokenizer, "good_at_math", cfg, 0, progress=False)
