"""The selection grid on several biases is measured in parts a rerun resumes (issue 22: the
full grid takes hours on 2 cores). Its numbers must be the one-piece grid's, bit for bit,
whether it ran through or was interrupted and resumed in a new process."""

import copy
import json
import shutil

import pytest

from biasgym_lib import grid_parts
from biasgym_lib.config import load_profile
from biasgym_lib.grid_parts import phases, plan
from biasgym_lib.models import load_tokenizer

SMALL = dict(biases=["always_late", "blue_skin"], grid_biases=2, seeds=[0], n_paragraphs=4, epochs=1, n_probes=2,
             n_patch_probes=1, n_random_draws=2, steer_references=2, n_ppl_texts=1, n_mc_questions=2, k=3,
             grid_k=[1, 2, 3], n_country_texts=1, ppl_max_tokens=16, grid_methods=["atp", "robust", "random"],
             grid_kinds=["zero", "mean", "blind"], curve_methods=["atp", "random"], curve_kinds=["zero"])


def _json(x):
    return json.loads(json.dumps(x))


def test_the_parts_follow_the_one_piece_order():
    cfg = load_profile("quick", **SMALL)
    assert [(b, k) for b, k, *_ in plan(phases(cfg), cfg.biases)] == [
        ("always_late", 3), ("blue_skin", 3), ("always_late", 1), ("always_late", 2), ("blue_skin", 1), ("blue_skin", 2)]
    assert plan(phases(cfg), cfg.biases)[2][2:] == (["atp", "random"], ["zero"])  # the curve's methods and kinds
    assert [k for _, k, *_ in plan(phases(load_profile("quick", **{**SMALL, "grid_k": [3]})), cfg.biases)] == [3, 3]  # no curve


@pytest.mark.timeout(900)
def test_grid_in_parts_equals_the_one_piece_grid_and_resumes_where_it_stopped(tiny_with_tokenizer, smol_tokenizer,
                                                                              tmp_path, monkeypatch):
    import biasgym_lib.evaluate as ev
    from biasgym_lib.runs import Run

    model, tok = tiny_with_tokenizer("llama"), copy.deepcopy(smol_tokenizer)
    cfg = load_profile("quick", **SMALL)

    def run(folder):
        return Run(cfg, out=tmp_path / folder, model=model, tokenizer=tok, progress=False)

    whole_run = run("whole")
    whole = _json(whole_run.grid_whole(list(cfg.biases)))  # the reference: one piece, as before parts existed
    for folder in ("parts", "resumed"):  # the same tokens, so that only the grid is measured below
        shutil.copytree(tmp_path / "whole" / "tokens", tmp_path / folder / "tokens")
    parts = _json(run("parts").grid())
    assert len(parts["parts"]) == 6 and (tmp_path / "parts" / "grid_parts" / "blue_skin_k2.json").is_file()
    for key in ("biases", "before", "rows"):
        assert parts[key] == whole[key], key  # bit for bit, rows in the same order

    # interrupted while measuring blue_skin's first part: always_late's part is kept
    real = Run._grid

    def stop_at_blue_skin(self, runs, *a, **kw):
        if runs[0]["bias"].name == "blue_skin":
            raise KeyboardInterrupt
        return real(self, runs, *a, **kw)
    monkeypatch.setattr(Run, "_grid", stop_at_blue_skin)
    with pytest.raises(KeyboardInterrupt):
        run("resumed").grid()
    assert [p.name for p in (tmp_path / "resumed" / "grid_parts").glob("*.json")] == ["always_late_k3.json"]
    monkeypatch.setattr(Run, "_grid", real)

    shutil.copytree(tmp_path / "resumed", tmp_path / "resumed_blind")

    # a new process (a new Run, nothing in memory, a tokenizer that has never seen <TOKEN>)
    # resumes: the kept part is not measured again, and what it measured (capability, costs of
    # shared head sets) is taken back, not remeasured. The fresh tokenizer matters: entity-blind
    # heads once hid <TOKEN> only where an earlier stage of the same process had added it, and a
    # full grid resumed this way blinded the country names alone (found in the recorded run)
    calls = []
    perplexity = ev.perplexity
    monkeypatch.setattr(ev, "perplexity", lambda *a, **kw: calls.append(1) or perplexity(*a, **kw))
    fresh = load_tokenizer()
    assert "<TOKEN>" not in fresh.get_vocab()
    resumed = Run(cfg, out=tmp_path / "resumed", model=model, tokenizer=fresh, progress=False)
    got = _json(resumed.grid())
    for key in ("biases", "before", "rows"):
        assert got[key] == whole[key], key
    with_restore, calls[:] = len(calls), []
    monkeypatch.setattr(grid_parts, "restore", lambda shared, part: None)  # a resume that forgets what was kept
    blind = _json(run("resumed_blind").grid())
    assert [r["bias"] for r in blind["rows"]] == [r["bias"] for r in whole["rows"]]
    kept = json.loads((tmp_path / "resumed" / "grid_parts" / "always_late_k3.json").read_text())
    reused = [c for c in kept["costs"] if c["heads"] in [r["heads"] for r in got["rows"] if r["bias"] == "blue_skin"]]
    assert reused  # random heads: the same draws for every bias
    # each kept head set's perplexity (on every text set) is measured again only by the forgetful
    # resume; random draws beyond the profile's n_cost_draws never get perplexity
    with_ppl = [c for c in reused if "perplexity" in c["cost"]]
    assert with_ppl and len(with_ppl) < len(reused) if cfg.n_cost_draws < cfg.n_random_draws else with_ppl
    assert len(calls) - with_restore >= len(with_ppl) * len(resumed.setting["texts"]), (len(calls), with_restore)
