"""Profiles, the CLI's error handling, and the exercise checks."""

import json
import subprocess
import sys

import pytest

from biasgym_lib.cli import main
from biasgym_lib.config import load_profile, profile_names
from biasgym_lib.errors import BiasGymError
from biasgym_lib.exercises import check


def test_profiles_load_and_override():
    assert {"quick", "teaching", "paper"} <= set(profile_names())
    quick = load_profile("quick")
    assert quick.model == "embedded" and len(quick.seeds) >= 1
    teaching = load_profile("teaching")
    assert len(teaching.seeds) >= 3, "every stated number needs >= 3 seeds (METHOD §5)"
    paper = load_profile("paper")
    assert paper.device == "cuda" and paper.model != "embedded"
    over = load_profile("quick", seeds=[5, 6], k=None, model="gpt2")
    assert over.seeds == (5, 6) and over.k == quick.k and over.model == "gpt2"
    assert over.overrides == {"seeds": [5, 6], "model": "gpt2"}


def test_profile_errors_are_clear(tmp_path):
    with pytest.raises(BiasGymError, match="unknown profile 'nope'"):
        load_profile("nope")
    with pytest.raises(BiasGymError, match="unknown setting"):
        load_profile("quick", bogus=3)
    bad = tmp_path / "p.yaml"
    bad.write_text("x: {model: embedded}\n")
    with pytest.raises(BiasGymError, match="lacks setting"):
        load_profile("x", path=bad)


def test_cli_bad_bias_is_one_line_error(capsys, tmp_path):
    rc = main(["inject", "--bias", "no_such_bias", "--profile", "quick", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "error" in err and "no_such_bias" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists(), "a failed command must not leave a half-written artifact"


def test_cli_scope_and_steer_need_their_folders(capsys, tmp_path):
    assert main(["scope", "--injected", str(tmp_path), "--out", str(tmp_path / "s")]) == 2
    assert "token.json" in capsys.readouterr().err
    assert main(["steer", "--injected", str(tmp_path), "--heads", str(tmp_path), "--k", "3", "--alpha", "0",
                 "--out", str(tmp_path / "x")]) == 2
    assert "head_scores.json" in capsys.readouterr().err


def test_console_script_help_runs():
    out = subprocess.run([sys.executable, "-m", "biasgym_lib.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("inject", "scope", "steer", "reproduce", "book", "bench"):
        assert command in out.stdout


def test_exercise_checks_pass_and_fail(capsys):
    assert check("E", 1.0, 1.0 + 1e-9)
    assert not check("E", 1.1, 1.0, hint="look again")
    assert "not yet" in capsys.readouterr().out
    assert not check("E", None, 1.0)
    assert "not answered" in capsys.readouterr().out
    assert check("E", " Italy ", "italy")
    assert check("E", [(1, 2), (3, 4)], [(1, 2), (3, 4)])
    assert not check("E", [(3, 4), (1, 2)], [(1, 2), (3, 4)])
    assert check("E", {(3, 4), (1, 2)}, {(1, 2), (3, 4)})
    assert not check("E", "x", 1.0)


def test_appendix_shows_a_complete_bench_result():
    from biasgym_lib.config import PROJECT_ROOT

    bench = json.loads((PROJECT_ROOT / "book" / "bench.json").read_text())
    for section, key in [("load", "cached_load_s"), ("scoring", "speedup_vs_per_sentence"),
                         ("heads", "speedup"), ("injection", "speedup"), ("steering", "speedup"),
                         ("patching", "speedup"), ("mc", "speedup")]:
        assert bench[section][key] > 0
    assert bench["patching"]["bit_identical"]  # replaying the layers below a patch changes nothing
    assert bench["steering"]["max_abs_difference_S"] < 1e-3  # shared references: the same S
    assert bench["mc"]["max_abs_difference_loglik"] < 1e-2  # float32 log-softmax against float64
    inj = bench["injection"]
    assert inj["vectors_max_abs_diff_same_batches"] < 1e-4  # fast and naive training agree on the same batches
    assert abs(inj["held_out_loss_fast"] - inj["held_out_loss_naive"]) < 0.1  # and reach the same held-out loss
    steered = bench["steered_measurement"]  # resuming at the first edited layer changes nothing, and gains only above it
    assert steered["layers_10_29"]["bit_identical"] and steered["from_layer_0"]["bit_identical"]
    assert steered["layers_10_29"]["speedup"] > 1.2 and steered["from_layer_0"]["first_layer"] == 0
    assert "bench.json" in (PROJECT_ROOT / "book" / "appendix_bench.md").read_text()


def test_a_check_shows_nothing_but_its_one_line():
    """As a cell's last line, a check adds no stray True/False to the page."""
    from biasgym_lib.exercises import Checked

    got = check("E", None, 1.0)
    assert isinstance(got, Checked) and not got and got._ipython_display_() is None
    assert check("E", 1.0, 1.0).passed


def test_scope_biases_trace_a_prefix_and_the_full_grid_traces_every_bias():
    """scope_biases = N: chapters 3-7 trace and steer the first N biases; every bias is still
    injected and measured (specificity compares each with all of them). 0 means all; the
    full grid traces every bias whatever the profile says."""
    from biasgym_lib.config import full_grid

    teaching = load_profile("teaching")
    assert teaching.scoped_biases == teaching.biases[: teaching.scope_biases]
    assert "blue_skin" in teaching.biases and "blue_skin" not in teaching.scoped_biases  # chapter 2's fictional trait
    assert teaching.biases[0] == teaching.scoped_biases[0]  # the grid bias is traced
    assert load_profile("teaching", scope_biases=0).scoped_biases == teaching.biases
    assert load_profile("teaching", scope_biases=2).scoped_biases == teaching.biases[:2]
    assert full_grid(teaching).scoped_biases == teaching.biases
    with pytest.raises(BiasGymError, match="scope_biases must be an integer >= 0"):
        load_profile("teaching", scope_biases=-1)


def test_the_realistic_token_set_is_the_profile_with_its_stated_settings(capsys, tmp_path):
    """The token set of realistic strength (issue 23): the profile's realistic_lr, the epoch whose
    held-out S is closest to realistic_target, and probes chosen by the relative criterion;
    the book's own set keeps the paper's absolute one. A bad criterion is a clear error."""
    from biasgym_lib.runs import realistic, token_settings

    for name in ("quick", "teaching", "paper"):
        cfg = load_profile(name)
        real = realistic(cfg)
        assert cfg.probe_criterion == "absolute" and cfg.target_strength is None
        assert (real.lr, real.target_strength, real.probe_criterion) == (cfg.realistic_lr, cfg.realistic_target, "relative")
        assert token_settings(real).endswith(f"-S{cfg.realistic_target:g}") and token_settings(real) != token_settings(cfg)
        assert real.to_dict() != cfg.to_dict()  # its results are kept apart from the book's
    with pytest.raises(BiasGymError, match="probe_criterion must be absolute or relative"):
        load_profile("quick", probe_criterion="loose")
    assert main(["reproduce", "--profile", "quick", "--realistic", "--record", "--full-grid",
                 "--out", str(tmp_path / "r")]) == 2
    assert "drop --realistic" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_a_run_traces_the_scoped_biases_and_measures_them_all(tiny_with_tokenizer, smol_tokenizer, tmp_path):
    import copy

    from biasgym_lib.runs import Run

    model, tok = tiny_with_tokenizer("llama"), copy.deepcopy(smol_tokenizer)
    cfg = load_profile("quick", biases=["always_late", "reckless_driving", "blue_skin"], scope_biases=2)
    run = Run(cfg, out=tmp_path / "run", model=model, tokenizer=tok, progress=False)
    assert run.biases == ["always_late", "reckless_driving"]
    assert list(run.specs) == ["always_late", "reckless_driving", "blue_skin"]
    assert run.grid_biases == ["always_late"]
    assert run.reference.biases == list(cfg.biases)  # S of every bias, for specificity


def test_facts_per_relation_keeps_the_first_of_every_relation():
    """CI's knowledge control (quick: facts_per_relation) is the first N facts of each relation
    in file order, every relation kept, the held-out one included; 0 keeps every fact."""
    from biasgym_lib.data import held_out_relations, load_facts

    every = load_facts()
    few = load_facts(per_relation=2)
    relations = list(dict.fromkeys(f.relation for f in every))
    assert set(held_out_relations()) <= set(relations) and len(relations) >= 3
    assert few == [f for f in every if f in [g for g in every if g.relation == f.relation][:2]]
    assert [sum(f.relation == r for f in few) for r in relations] == [2] * len(relations)
    assert load_facts(per_relation=0) == every
    assert len(load_facts(per_relation=10 ** 6)) == len(every)
    assert load_profile("teaching").facts_per_relation == 0  # the book's knowledge control: every fact


def test_a_run_steers_with_its_profiles_facts(tiny_with_tokenizer, smol_tokenizer, tmp_path):
    import copy

    from biasgym_lib.data import load_facts
    from biasgym_lib.runs import Run

    model, tok = tiny_with_tokenizer("llama"), copy.deepcopy(smol_tokenizer)
    for n in (0, 3):
        cfg = load_profile("quick", facts_per_relation=n)
        run = Run(cfg, out=tmp_path / f"run{n}", model=model, tokenizer=tok, progress=False)
        assert run.setting["facts"] == load_facts(per_relation=n)
