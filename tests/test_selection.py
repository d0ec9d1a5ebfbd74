"""Steering measured fairly (issue 12): S under an intervention, the knowledge control,
the selection grid, its summary with intervals, and the rule that picks the book's BiasScope."""

import copy
from types import SimpleNamespace
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from biasgym_lib import generalise
from biasgym_lib.data import Fact, load_bias
from biasgym_lib.errors import BiasGymError
from biasgym_lib.evaluate import facts_reduction, make_spec, reduction, selection_grid, strength_under

from biasgym_lib.selection import SteeringResult, choose_selection, summarise_grid
from biasgym_lib.inject import initial_vector
from biasgym_lib.tokens import InjectedToken
from biasgym_lib.measure import assoc_table, stereotype_strength
from biasgym_lib.stats import Estimate
from biasgym_lib.models import ModelAdapter
from biasgym_lib.steer import SteeringSpec

REFS = ["Italy", "Japan", "Brazil"]
FACTS = [Fact("Italy", "demonym", "Italian"), Fact("Japan", "continent", "Asian")]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _token(model, tok, shift, seed=0):
    vec = initial_vector(model, tok) + shift
    return InjectedToken(token="<TOKEN>", vector=vec, bias="reckless_driving", seed=seed, epoch=1, lr=0.01,
                         epochs=1, init="countries", n_paragraphs=1, losses=[1.0], val_losses=[1.0],
                         checkpoints=vec[None], model={}, d_model=vec.numel())


@pytest.fixture(scope="module")
def setup(smol_tokenizer):
    from biasgym_lib.models import tiny_model

    model = tiny_model("llama", vocab_size=49152)
    tok = copy.deepcopy(smol_tokenizer)
    return model, tok, [_token(model, tok, 0.02, 0), _token(model, tok, -0.03, 1)]


def _num(estimate: dict) -> dict:
    """An Estimate dict's numbers (its kind of interval is a string, compared exactly elsewhere)."""
    assert estimate["interval"] == "bootstrap 95%"
    return {k: v for k, v in estimate.items() if k != "interval"}


def test_strength_under_nothing_is_the_plain_measurement(setup):
    from biasgym_lib.tokens import add_token, TokenHook

    model, tok, tokens = setup
    bias = load_bias("reckless_driving")
    got = strength_under(model, tok, None, tokens, bias, REFS, FACTS, countries=["Italy"])
    ref = assoc_table(model, tok, REFS, [bias])
    for t, g in zip(tokens, got["tokens"]):
        with TokenHook(model, add_token(tok), t.vector):
            table = ref.merged(assoc_table(model, tok, ["<TOKEN>"], [bias]))
        want = stereotype_strength(table, "<TOKEN>", bias.name, REFS).to_dict()
        assert _num(g) == pytest.approx(_num(want), rel=1e-5, abs=1e-6)  # same sentences, other batch shapes: float rounding
    fact_table = assoc_table(model, tok, ["Italy", "Japan", "Brazil"], [FACTS[0]])
    assert _num(got["facts"][0]) == pytest.approx(
        _num(stereotype_strength(fact_table, "Italy", FACTS[0].name, ["Japan", "Brazil"]).to_dict()), rel=1e-5, abs=1e-6)
    assert _num(got["countries"]["Italy"]) == pytest.approx(
        _num(stereotype_strength(ref, "Italy", bias.name, ["Japan", "Brazil"]).to_dict()), rel=1e-5, abs=1e-6)
    # alpha = 1 is the unmodified model, bit for bit; zero-ablation is not
    same = strength_under(model, tok, SteeringSpec([(0, 1), (2, 3)], 1.0), tokens, bias, REFS, FACTS)
    assert same["tokens"] == got["tokens"] and same["facts"] == got["facts"]
    zeroed = strength_under(model, tok, SteeringSpec([(0, 1), (2, 3)], 0.0), tokens, bias, REFS, FACTS)
    assert zeroed["tokens"] != got["tokens"]


def test_reductions_and_their_guards():
    assert reduction(4.0, 1.0) == 0.75 and reduction(-1.0, 0.5) is None and reduction(0.0, 1.0) is None
    before = [{"value": 2.0}, {"value": 4.0}]
    assert facts_reduction(before, [{"value": 1.0}, {"value": 2.0}]) == pytest.approx(0.5)
    with pytest.raises(BiasGymError, match="facts that the model knows"):
        facts_reduction([{"value": -1.0}, {"value": 0.5}], before)


def test_selection_grid_measures_each_head_set_once_and_reports_every_point(setup, monkeypatch):
    import biasgym_lib.evaluate as ev

    model, tok, tokens = setup
    a = ModelAdapter(model)
    calls = []
    real = ev.strength_under
    monkeypatch.setattr(ev, "strength_under", lambda *args, **kw: calls.append(args[2]) or real(*args, **kw))
    rankings = {"dla": [(2, 1), (1, 3), (0, 0)], "random": {1: [[(0, 2)], [(1, 1)]], 2: [[(0, 2), (2, 2)], [(1, 1), (0, 4)]]}}
    runs = [{"bias": "reckless_driving", "tokens": tokens, "rankings": rankings}]
    texts = {"neutral": ["The kettle boiled and the tea was ready.", "Rivers carry sand to the sea."]}
    means = torch.zeros(a.n_layers, a.n_heads * a.d_head)
    shared = {}
    kw = dict(kinds=["zero", "mean"], ks=[1, 2], methods=["dla", "random"], references=REFS, facts=FACTS,
              texts=texts, means=means, entities={" Italy": 1}, max_length=16, shared=shared, progress=False)
    grid = selection_grid(model, tok, runs, **kw)
    assert len(grid["rows"]) == 2 * 2 * (1 + 2)  # kinds x ks x (one dla set + two random draws)
    n = len(calls)
    steered = [c for c in calls if c is not None]
    assert len(steered) == len({(tuple(r["heads"][0]), r["kind"], len(r["heads"])) for r in grid["rows"]})
    assert 1 <= n - len(steered) <= 2  # S before (recorded for the layer tape); S alone, recorded once
    again = selection_grid(model, tok, runs, **kw)  # everything is in `shared`: nothing measured again
    assert len(calls) == n and again["rows"] == grid["rows"]
    row = next(r for r in grid["rows"] if r["method"] == "dla" and r["k"] == 2 and r["kind"] == "zero")
    assert row["heads"] == [[2, 1], [1, 3]] and len(row["S"]) == 2 and row["seeds"] == [0, 1]
    assert row["facts_reduction"] == pytest.approx(1 - np.mean(row["facts"]) / np.mean([f["value"] for f in grid["before"]["facts"]]))
    assert row["reduction"] == [reduction(b, s["value"]) for b, s in zip(row["S_before"], row["S"])]
    summary = summarise_grid(grid, n_boot=50)
    line = next(x for x in summary if x.key == ("dla", "zero", 2))
    kept = [v for v in row["reduction"] if v is not None]  # a token with S <= 0 before has no reduction
    assert (line.reduction is None) if not kept else line.reduction.value == pytest.approx(np.mean(kept))
    assert line.facts_reduction.value == pytest.approx(row["facts_reduction"])
    assert line.n_head_sets == 1 and set(line.perplexity) == {"neutral"}
    rnd = next(x for x in summary if x.key == ("random", "zero", 2))
    assert rnd.n_head_sets == 2 and rnd.n_runs == sum(b > 0 for b in row["S_before"])
    assert SteeringResult.from_dict(json.loads(json.dumps(line.to_dict()))) == line  # JSON round trip


def test_selection_grid_resumed_at_the_first_edited_layer_equals_the_full_passes(setup, monkeypatch):
    """Issue 22: every steered measurement of the grid starts at its first edited layer; the
    grid is the same, bit for bit, as with every pass run in full."""
    import biasgym_lib.layerskip as ls

    model, tok, tokens = setup
    a = ModelAdapter(model)
    rankings = {"dla": [(2, 1), (1, 3), (0, 0)], "attention": [(2, 4), (2, 0)],
                "random": {1: [[(1, 2)], [(2, 1)]], 2: [[(1, 2), (2, 2)], [(2, 1), (1, 4)]]}}
    runs = [{"bias": "reckless_driving", "tokens": tokens, "rankings": rankings, "countries": ["Italy"]},
            {"bias": "always_late", "tokens": tokens[:1], "rankings": rankings}]
    texts = {"neutral": ["The kettle boiled and the tea was ready.", "Rivers carry sand to the sea."]}
    questions = [{"question": "What colour is the sky?", "options": ["blue", "green", "loud"], "answer": 0}]
    kw = dict(kinds=["zero", "mean", "blind"], ks=[1, 2], methods=["dla", "attention", "random"], references=REFS,
              facts=FACTS, texts=texts, means=torch.randn(a.n_layers, a.n_heads * a.d_head), questions=questions,
              mc=True, entities={" Italy": tok.convert_tokens_to_ids("ĠItaly")}, max_length=16, progress=False)
    tapes = []
    real_init = ls.Resumer.__init__
    monkeypatch.setattr(ls.Resumer, "__init__", lambda self, *a, **k: real_init(self, *a, **k) or tapes.append(self))
    fast = selection_grid(model, tok, runs, **kw, shared={})
    tape = tapes[-1].tape
    assert tape.starts == [1, 2] and tape.hits > 0 and tape.misses == 0
    monkeypatch.setattr(ls.Resumer, "__call__", lambda self, signature, spec, fn: fn(spec))
    full = selection_grid(model, tok, runs, **kw, shared={})
    assert fast == full


def test_a_second_grid_call_records_the_unmodified_pass_only_where_it_pays(setup, monkeypatch):
    """Issue 22: after a first call (the grid) has measured each bias before steering, a second
    one (the confirmation) would pay a full unmodified pass to record it; it does only for the
    signatures whose resumed passes save more than that, and runs the others in full. The
    numbers are the same, bit for bit, as with every pass in full."""
    import biasgym_lib.layerskip as ls

    model, tok, tokens = setup
    a = ModelAdapter(model)
    rankings = {"dla": [(2, 1), (2, 3)], "attention": [(2, 4), (2, 0)],
                "random": {1: [[(1, 2)], [(2, 1)]], 2: [[(1, 2), (2, 2)], [(2, 1), (1, 4)]]}}
    runs = [{"bias": "reckless_driving", "tokens": tokens, "rankings": rankings}]
    kw = dict(kinds=["zero"], references=REFS, facts=FACTS, texts={},
              means=torch.randn(a.n_layers, a.n_heads * a.d_head), progress=False)
    calls = [dict(ks=[1], methods=["dla", "attention", "random"]),  # the grid: measures S before steering
             dict(ks=[2], methods=["random"]),                      # two passes from layer 1 of 3: not worth a recording
             dict(ks=[2], methods=["dla", "attention"])]            # two from layer 2: worth one
    made = []
    real_init = ls.Resumer.__init__
    monkeypatch.setattr(ls.Resumer, "__init__", lambda self, *a, **k: real_init(self, *a, **k) or made.append(self))
    shared = {}
    fast = [selection_grid(model, tok, runs, shared=shared, **kw, **c) for c in calls]
    low, high = made[1], made[2]
    assert low.plan and low.full == set(low.plan) and not low.recorded & set(low.plan)
    assert high.plan and not high.full and high.recorded >= set(high.plan) and high.tape.hits > 0
    for r in (low, high):
        for sig, starts in r.plan.items():
            assert (sig in r.full) == (sum(starts) / r.n_layers <= 1), (sig, starts)
    monkeypatch.setattr(ls.Resumer, "__call__", lambda self, signature, spec, fn: fn(spec))
    shared = {}
    assert fast == [selection_grid(model, tok, runs, shared=shared, **kw, **c) for c in calls]


def _e(v):
    return Estimate(v, v - 0.05, v + 0.05, 10)


def _line(method, kind, k, red, facts, ppl, mc=None):
    return SteeringResult(method, kind, k, 6, 1, float(k), _e(red), _e(facts), {"neutral": _e(ppl)},
                          None if mc is None else _e(mc))


def test_the_rule_that_chooses_the_book_s_biascope():
    summary = [_line("dla", "zero", 10, 0.6, 0.5, 0.3), _line("atp", "blind", 10, 0.4, 0.05, 0.0),
               _line("atp", "blind", 20, 0.9, 0.02, 0.0), _line("random", "blind", 10, 0.95, 0.0, 0.0),
               _line("atp", "mean", 5, 0.45, 0.08, 0.2)]
    best = choose_selection(summary, k_max=10)
    assert best.key == ("atp", "blind", 10) and "within the bounds" in best.why
    assert "multiple choice not measured" in best.why  # never claims a bound it did not test
    summary[1] = replace(summary[1], mc=_e(0.0))
    assert "perplexity and multiple choice within the bounds" in choose_selection(summary, k_max=10).why
    summary[1] = replace(summary[1], perplexity={"neutral": _e(0.3)})
    best = choose_selection(summary, k_max=10)
    assert (best.method, best.kind) == ("atp", "mean") and "not every capability bound" in best.why
    summary = [replace(x, facts_reduction=_e(0.5)) for x in summary]
    assert choose_selection(summary, k_max=10).why.startswith("nothing keeps the facts")
    with pytest.raises(BiasGymError, match="no grid point"):
        choose_selection([_line("random", "zero", 10, 0.1, 0.0, 0.0)], k_max=10)


def test_grid_specs_are_the_named_interventions():
    means = torch.zeros(3, 48)
    assert make_spec([(0, 1)], "zero").alpha == 0.0
    assert make_spec([(0, 1)], "mean", means, source={"mean_source": "x"}).kind == "mean"
    assert make_spec([(0, 1)], "blind", entities={"<TOKEN>": 5}).entity_tokens == {"<TOKEN>": 5}
    with pytest.raises(BiasGymError, match="unknown intervention kind"):
        make_spec([(0, 1)], "half")


def test_after_the_grid_each_selection_is_steered_at_its_own_k(monkeypatch):
    """The chosen selection runs at the k the rule chose, the paper's at the profile's k, and
    random heads at each (kind, k) pair, never a random baseline of another size."""
    from biasgym_lib.config import load_profile
    from biasgym_lib.selection import PAPER
    from biasgym_lib.runs import Run

    run = object.__new__(Run)
    run.cfg = load_profile("teaching")
    monkeypatch.setattr(Run, "best", lambda self: _line("atp_selective", "mean", 5, 0.1, 0.0, 0.0))
    assert run.conditions() == [("atp_selective", "mean", 5), (*PAPER, run.cfg.k),
                                ("random", "mean", 5), ("random", PAPER[1], run.cfg.k)]
    monkeypatch.setattr(Run, "best", lambda self: _line(PAPER[0], PAPER[1], run.cfg.k, 0.1, 0.0, 0.0))
    assert run.conditions() == [(*PAPER, run.cfg.k), ("random", PAPER[1], run.cfg.k)]


def test_the_full_grid_is_every_bias_method_kind_and_k():
    from biasgym_lib.config import full_grid, load_profile
    from biasgym_lib.scope import METHODS

    cfg = load_profile("teaching")
    whole = full_grid(cfg)
    assert whole.grid_biases == len(cfg.biases) and set(whole.grid_methods) == set(METHODS) == set(whole.curve_methods)
    assert set(whole.grid_kinds) == set(whole.curve_kinds) == {"zero", "mean", "blind"}
    assert {1, 2, 5, 10, 20} <= set(whole.grid_k) and set(cfg.grid_k) <= set(whole.grid_k)
    assert whole.n_random_draws >= 5
    same = {f: getattr(cfg, f) for f in ("seeds", "biases", "k", "n_probes", "steer_references", "n_mc_questions")}
    assert same == {f: getattr(whole, f) for f in same}
    assert full_grid(whole) == whole


def _scopes(seed, n=2, L=3, H=4):
    g = torch.Generator().manual_seed(seed)
    methods = ("dla", "delta_dla", "attr", "atp", "attention")
    return [SimpleNamespace(scores={m: torch.randn(L, H, generator=g) for m in methods}) for _ in range(n)]


def test_random_heads_do_not_depend_on_the_biases_that_ranked_them():
    """What lets leave-one-out and SeeGULL reuse the confirmation's random rows: the random
    head sets are the same whichever scopes (one bias, or several pooled) rank the heads."""
    from biasgym_lib.heads import bias_rankings

    a = bias_rankings(_scopes(0), 4, n_random=3, n_layers=3, n_heads=4)
    b = bias_rankings(_scopes(1, n=5), 4, n_random=3, n_layers=3, n_heads=4)
    assert a["dla"] != b["dla"] or a["atp"] != b["atp"]  # the scores differ ...
    assert a["random"] == b["random"]                    # ... the random draws do not
    assert all(len(draws) == 3 and len(set(map(tuple, draws))) == 3 for draws in a["random"].values())


def test_the_chat_probes_robust_set_is_ranked_beside_exact_patching():
    """robust_chat (the paper's robust set on its chat probes) comes from dla_chat whether or not
    exact patching is ranked too (a name reused for patching's scores once hid it)."""
    from biasgym_lib.heads import bias_rankings, robust_heads

    scopes = _scopes(2, n=3)
    g = torch.Generator().manual_seed(7)
    for s in scopes:
        s.scores["dla_chat"] = torch.randn(3, 4, generator=g)
    patching = {"scores": [[None, 0.5, None, 0.1], [0.3, None, None, None], [None, None, 0.9, None]]}
    for exact in (None, patching):
        got = bias_rankings(scopes, 4, exact, n_random=1, n_layers=3, n_heads=4)
        assert got["robust_chat"][3] == robust_heads([s.scores["dla_chat"] for s in scopes], 3, 2)
        assert got["robust_chat"][3] != got["robust"][3] or got["dla_chat"] != got["dla"]
    assert got["patching"] == [(2, 2), (0, 1), (1, 0), (0, 3)]


def test_leave_one_out_takes_random_rows_from_the_confirmation(monkeypatch):
    from biasgym_lib.runs import Run

    from pathlib import Path

    from biasgym_lib.config import load_profile

    run = object.__new__(Run)
    run.biases, run.specs, run._kept = ["a", "b"], {"a": "A", "b": "B"}, {}
    run.cfg, run.out = load_profile("quick"), Path("/nonexistent")  # memo is replaced: nothing is written
    monkeypatch.setattr(Run, "best", lambda self: _line("atp", "zero", 2, 0.1, 0.0, 0.0))
    monkeypatch.setattr(Run, "_fingerprint", lambda self, biases: "fp")
    monkeypatch.setattr(Run, "tokens", lambda self, b: [b])
    monkeypatch.setattr(generalise, "pooled_rankings", lambda run, biases, method: {"pooled": biases})
    monkeypatch.setattr(Run, "memo", lambda self, name, compute, **kw: compute())
    rand = [{"method": "random", "bias": b, "draw": d} for b in "ab" for d in (0, 1)]
    monkeypatch.setattr(Run, "confirm", lambda self: {"before": {"biases": {"a": 1, "b": 2}}, "rows": rand + [
        {"method": "atp", "bias": "a"}]})
    calls = []

    def grid_at(self, runs, mc, cost=True, random=True):
        calls.append((runs[0]["bias"], runs[0]["rankings"]["pooled"], mc, cost, random))
        return {"before": {}, "rows": [{"method": "atp", "bias": runs[0]["bias"], "pooled": True}]}

    monkeypatch.setattr(Run, "_grid_at", grid_at)
    loo = generalise.leave_one_out(run)
    # each held-out bias: its selections with their costs (S, facts, perplexity, MC), no uniform draws of its own
    assert calls == [("A", ["b"], True, True, False), ("B", ["a"], True, True, False)]
    assert [r for r in loo["rows"] if r["method"] == "random"] == rand
    assert loo["before"] == {"biases": {"a": 1, "b": 2}}


def test_the_book_s_tables_never_report_an_unmeasured_bound_as_held():
    from biasgym_lib.selection import summary_frame

    def line(mc_ok):
        return _line("atp_selective", "zero", 2, 0.1, 0.05, 0.0, mc=None if mc_ok is None else (0.0 if mc_ok else -0.1))

    frame = summary_frame([line(None), line(True), line(False)])
    assert list(frame["within bounds"]) == ["yes (MC not measured)", "yes", "no"]
    # no capability measured at all (leave-one-out without layer-matched draws): the facts alone
    bare = replace(line(None), perplexity={})
    assert list(summary_frame([bare])["within bounds"]) == ["facts yes (capability not measured)"]
    assert "held-out relation lost" not in frame and "percentile among matched draws" not in frame
    # the held-out relation and the layer-matched draws get columns of their own where measured,
    # and a held-out relation over the bound breaks the bounds though the other facts hold
    held = replace(line(True), held_out_reduction=Estimate(0.3, 0.2, 0.4, 3, "t"),
                   matched={"n": 20, "mean": 0.02, "p95": 0.05, "percentile": 97.5})
    frame = summary_frame([held])
    assert list(frame["held-out relation lost"]) == ["+30% [+20%, +40%]"]
    assert list(frame["percentile among matched draws"]) == ["98 of 20"] and list(frame["within bounds"]) == ["no"]


def test_the_target_and_its_frontier():
    from biasgym_lib.selection import target_result

    def line(method, k, red, facts, mc_ok=True, ppl_ok=True):
        return _line(method, "zero", k, red, facts, 0.0 if ppl_ok else 0.3, None if mc_ok is None else 0.0 if mc_ok else -0.1)

    lines = [line("dla", 10, 0.40, 0.70), line("atp", 10, 0.52, 0.25), line("sel", 10, 0.34, 0.07),
             line("sel", 2, 0.08, 0.09), line("robust", 2, 0.08, 0.00), line("random", 10, 0.9, 0.0),
             line("atp", 20, 0.66, 0.05)]
    got = target_result(lines, 10)
    assert got["met_by"] == []  # nothing >= 50% within the bounds at k <= 10
    assert [(x.method, x.k) for x in got["frontier"]] == [("robust", 2), ("sel", 10), ("atp", 10)]
    lines.append(line("new", 5, 0.55, 0.05, mc_ok=None))  # MC not measured: not met
    assert target_result(lines, 10)["met_by"] == []
    lines.append(line("new", 5, 0.55, 0.05))
    assert [x.method for x in target_result(lines, 10)["met_by"]] == ["new"]


# ----------------------------------------------------------------------------- issue 23: baselines with power


def test_layer_matched_heads_keep_the_count_per_layer_and_are_reproducible():
    from biasgym_lib.heads import layer_matched_heads, matched_seed, percentile

    chosen = [(21, 3), (21, 7), (10, 0), (29, 8)]
    draws = [layer_matched_heads(chosen, 9, matched_seed(chosen, d)) for d in range(20)]
    for d in draws:
        assert sorted(l for l, _ in d) == sorted(l for l, _ in chosen) and len(set(d)) == len(d)
    assert len({tuple(d) for d in draws}) > 10  # they vary
    assert draws[3] == layer_matched_heads(chosen, 9, matched_seed(list(reversed(chosen)), 3))  # order-free
    other = [(21, 0), (21, 1), (10, 5), (29, 2)]  # the same layer profile shares its draws
    assert matched_seed(other, 4) == matched_seed(chosen, 4)
    with pytest.raises(BiasGymError, match="has 2"):
        layer_matched_heads([(0, 0), (0, 1), (0, 2)], 2, 0)
    assert percentile(5.0, [1, 2, 3, 4]) == 100.0 and percentile(0.0, [1, 2]) == 0.0
    assert percentile(2.0, [1, 2, 3, 4]) == 37.5  # one below, one tie counted half


def test_layer_matched_draws_are_distinct_never_the_selection_and_as_many_as_exist():
    """A percentile over draws that repeat, or that meet the selection as its own baseline,
    looks resolved where it is not: measured in a run with power, where the chosen k = 2
    selection pooled for SeeGULL was one head, [27, 1], and its 20 draws with replacement were
    8 heads of layer 27 repeated and itself once (97.5%, a "yes" the exact null cannot give:
    one head of 9 is at best the top ninth)."""
    from biasgym_lib.heads import layer_matched_draws, layer_matched_heads, matched_seed

    one = layer_matched_draws([(27, 1)], 9, 20)
    assert sorted(one) == [[(27, h)] for h in range(9) if h != 1]  # all 8 others, once each, not 20
    chosen = [(21, 3), (21, 7), (10, 0), (29, 8)]
    draws = layer_matched_draws(chosen, 9, 20)
    assert len(draws) == 20 and len({tuple(d) for d in draws}) == 20 and sorted(chosen) not in draws
    for d in draws:
        assert sorted(l for l, _ in d) == sorted(l for l, _ in chosen)
    assert draws[0] == layer_matched_heads(chosen, 9, matched_seed(chosen, 0))  # the same first draw as before
    assert draws == layer_matched_draws(list(reversed(chosen)), 9, 20)  # reproducible, order-free
    assert len(layer_matched_draws([(0, 0), (0, 1)], 3, 20)) == 2  # C(3, 2) = 3 sets, the selection one of them
    assert layer_matched_draws([], 9, 20) == [] and layer_matched_draws(chosen, 9, 0) == []
    with pytest.raises(BiasGymError, match="has 2"):
        layer_matched_draws([(0, 0), (0, 1), (0, 2)], 2, 5)


def test_grid_with_layer_matched_draws_places_each_selection_among_them(setup):
    from biasgym_lib.data import Fact
    from biasgym_lib.selection import summarise_grid

    model, tok, tokens = setup
    a = ModelAdapter(model)
    facts = FACTS + [Fact("Japan", "currency", "yen")]  # a held-out relation
    rankings = {"dla": [(2, 1), (1, 3), (0, 0)], "random": {2: [[(0, 2), (2, 2)], [(1, 1), (0, 4)], [(2, 0), (1, 5)]]}}
    runs = [{"bias": "reckless_driving", "tokens": tokens, "rankings": rankings}]
    texts = {"neutral": ["The kettle boiled and the tea was ready."]}
    grid = selection_grid(model, tok, runs, kinds=["zero"], ks=[2], methods=["dla", "random"], references=REFS,
                          facts=facts, texts=texts, max_length=16, progress=False, matched=4, cost_draws=1)
    assert grid["before"]["held_out"] == [False, False, True]
    matched = [r for r in grid["rows"] if r["method"] == "matched:dla"]
    assert [r["draw"] for r in matched] == [0, 1, 2, 3]
    for r in matched:
        assert sorted(l for l, _ in r["heads"]) == [1, 2]  # the layers of dla's top 2
    # only the first draw of each baseline gets perplexity (cost_draws=1); every draw gets S and facts
    assert [r["perplexity"] is not None for r in matched] == [True, False, False, False]
    rnd = [r for r in grid["rows"] if r["method"] == "random"]
    assert [r["perplexity"] is not None for r in rnd] == [True, False, False]
    dla = next(r for r in grid["rows"] if r["method"] == "dla")
    assert dla["perplexity"] is not None and dla["held_out_reduction"] == pytest.approx(
        1 - dla["facts"][2] / grid["before"]["facts"][2]["value"])
    line = next(x for x in summarise_grid(grid, n_boot=50) if x.key == ("dla", "zero", 2))
    draws = [np.mean([v for v in r["reduction"] if v is not None]) for r in matched]
    below = sum(d < line.reduction.value for d in draws) + 0.5 * sum(d == line.reduction.value for d in draws)
    assert line.matched["n"] == 4 and line.matched["percentile"] == pytest.approx(100 * below / 4)
    assert line.uniform["n"] == 3 and line.held_out_reduction is not None
    assert line.beyond_matched == (line.matched["percentile"] >= 95)
    mline = next(x for x in summarise_grid(grid, n_boot=50) if x.key == ("matched:dla", "zero", 2))
    assert mline.matched is None and mline.n_head_sets == 4 and set(mline.perplexity) == {"neutral"}


def test_the_equal_k_tally_counts_each_verdict():
    from biasgym_lib.selection import equal_k_tally

    rows = [{"methods": ["a", "b"], "S": "a higher", "facts": "b keeps more"},
            {"methods": ["a", "b"], "S": "tie (unequal heads: 5 / 4.7)", "facts": "tie"},
            {"methods": ["a", "b"], "S": "b higher (unequal heads: 20 / 19)", "facts": "b keeps more"}]
    assert equal_k_tally(rows) == ("over 3 pairs of kind and k, S removed clearly more: a 1, b 1, tie 1; "
                                   "facts kept clearly more: a 0, b 2, tie 1")
    assert equal_k_tally([]) == "no k at which both were steered"
