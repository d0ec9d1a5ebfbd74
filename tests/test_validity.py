"""Issue 23, part 1: comparisons of rankings at equal kind and k with a tie rule, whether the
probes elicit the bias, the "few heads" claim with the patching agreement it promises, and
what an injection does to the other biases."""

from types import SimpleNamespace

import numpy as np
import pytest

from biasgym_lib.claims import equal_k_json, few_heads_holds, patching_agrees
from biasgym_lib.errors import BiasGymError
from biasgym_lib.selection import SteeringResult, at_equal_k, compare, equal_k_frame, equal_k_text
from biasgym_lib.probing import probe_elicitation
from biasgym_lib.stats import Estimate


def _e(v, lo=None, hi=None):
    return Estimate(v, v if lo is None else lo, v if hi is None else hi, 3)


def _line(method, kind, k, red, facts, heads=None):
    return SteeringResult(method, kind, k, 3, 1, float(k if heads is None else heads), red, facts,
                          {"neutral": _e(0.0)}, None)


def test_the_tie_rule_reads_the_intervals_not_the_points():
    names = ("a", "b")
    assert compare(_e(0.30, 0.25, 0.35), _e(0.20, 0.15, 0.26), names) == "tie"  # overlap at 0.25-0.26
    assert compare(_e(0.30, 0.27, 0.35), _e(0.20, 0.15, 0.26), names) == "a higher"
    assert compare(_e(0.10, 0.05, 0.12), _e(0.20, 0.15, 0.26), names) == "b higher"
    assert compare(_e(0.10), _e(0.10), names) == "tie"
    assert compare(None, _e(0.1), names) == "not measured"


def test_rankings_are_compared_only_where_both_were_steered_at_the_same_kind_and_k():
    summary = [
        _line("atp_selective", "zero", 2, _e(0.077, 0.053, 0.093), _e(0.091, 0.078, 0.104)),
        _line("robust", "zero", 2, _e(0.076, 0.072, 0.080), _e(0.0, -0.008, 0.008)),
        _line("atp_selective", "zero", 20, _e(0.66, 0.62, 0.73), _e(0.13, 0.09, 0.17)),
        _line("robust", "zero", 20, _e(0.44, 0.40, 0.48), _e(0.70, 0.66, 0.74), heads=18),
        _line("robust", "zero", 10, _e(0.33, 0.30, 0.36), _e(0.69, 0.65, 0.74)),  # no atp_selective at (zero, 10)
        _line("atp_selective", "mean", 10, _e(0.34, 0.31, 0.37), _e(0.11, 0.08, 0.14)),  # no robust at (mean, 10)
        _line("random", "zero", 20, _e(0.2, 0.1, 0.3), _e(0.0, -0.01, 0.01)),
    ]
    rows = at_equal_k(summary, ("atp_selective", "robust"))
    assert [(r["kind"], r["k"]) for r in rows] == [("zero", 2), ("zero", 20)]
    k2, k20 = rows
    assert k2["S"] == "tie" and k2["facts"] == "robust keeps more"
    assert k20["S"] == "atp_selective higher (unequal heads: 20 / 18)" and k20["facts"] == "atp_selective keeps more"
    assert k2["random_reduction"] is None and k20["random_reduction"].value == 0.2
    assert k20["heads"] == [20.0, 18.0]  # the robust set can hold fewer than k heads: shown, not hidden
    # the same from claims.json's dicts, and back to JSON
    again = at_equal_k([x.to_dict() for x in summary], ("atp_selective", "robust"))
    assert [(r["S"], r["facts"]) for r in again] == [(r["S"], r["facts"]) for r in rows]
    js = equal_k_json(rows)
    assert js[0]["reduction"][0] == summary[0].reduction.to_dict() and js[0]["random_reduction"] is None
    text = equal_k_text(rows)
    assert "k = 2 (zero): S removed 8% vs 8%, tie; facts lost 9% vs 0%, robust keeps more" in text
    table = equal_k_frame(rows)
    assert list(table["S: verdict"]) == ["tie", "atp_selective higher (unequal heads: 20 / 18)"]
    assert list(table["heads (atp_selective / robust)"]) == ["2 / 2", "20 / 18"]
    assert equal_k_text([]) == "no k at which both were steered"
    assert at_equal_k(summary, ("robust", "robust")) == []  # the rule chose the paper's ranking: nothing to compare
    unmeasured = [_line("a", "zero", 2, None, _e(0.1)), _line("b", "zero", 2, _e(0.2, 0.1, 0.3), _e(0.0))]
    row = at_equal_k(unmeasured, ("a", "b"))[0]
    assert row["S"] == "not measured" and "S removed not measured vs 20%" in equal_k_text([row])
    # a facts loss of -0.3% (the heads slightly *raise* the facts) rounds to "0%", never "-0%"
    tiny = at_equal_k([_line("a", "zero", 2, _e(0.1), _e(-0.003)), _line("b", "zero", 2, _e(0.1), _e(-0.12))], ("a", "b"))
    assert "facts lost 0% vs -12%" in equal_k_text(tiny) and "-0%" not in equal_k_text(tiny)


def _scope(bias, seed, diffs, chat=None):
    return SimpleNamespace(bias=bias, seed=seed, logit_diff_per_probe=list(diffs),
                           chat_logit_diff_per_probe=None if chat is None else list(chat))


def test_probes_elicit_the_bias_only_when_the_interval_lies_above_zero():
    rng = np.random.default_rng(0)
    rows = probe_elicitation([_scope("a", 0, 2.0 + 0.1 * rng.standard_normal(24)),  # clearly above 0
                              _scope("b", 0, -0.5 + 0.1 * rng.standard_normal(24)),  # the adversarial label wins
                              _scope("c", 1, [3.0, -2.9, 2.8, -3.1, 0.8, -0.2])])  # mean > 0, interval across 0
    assert [r["elicits"] for r in rows] == [True, False, False]
    assert rows[2]["logit_diff"].value == pytest.approx(np.mean([3.0, -2.9, 2.8, -3.1, 0.8, -0.2]))
    assert rows[2]["logit_diff"].value > 0 > rows[2]["logit_diff"].lo
    assert rows[1]["share_positive"] == 0.0 and rows[0]["share_positive"] == 1.0
    assert (rows[2]["bias"], rows[2]["seed"], rows[2]["n_probes"]) == ("c", 1, 6)
    with pytest.raises(BiasGymError, match="has no probes"):
        probe_elicitation([_scope("d", 0, [])])
    # the paper's chat probes, kept beside the probes that elicit the bias, are read on request
    both = _scope("e", 2, [1.0, 1.2, 0.9, 1.1], chat=[-1.0, -0.8, -1.2, -0.9])
    assert probe_elicitation([both])[0]["elicits"] and not probe_elicitation([both], chat=True)[0]["elicits"]
    assert probe_elicitation([both], chat=True)[0]["logit_diff"].value == pytest.approx(-0.975)


def test_few_heads_needs_the_patching_agreement_it_promises():
    # 28 heads patched, k = 10: ten heads drawn from the union match patching's top 10 at 10/28 by chance
    chance, ok = patching_agrees({"value": 0.40, "lo": 0.30, "hi": 0.50}, 28, 10)
    assert chance == pytest.approx(10 / 28) and not ok
    assert patching_agrees({"value": 0.9, "lo": 0.6, "hi": 1.0}, 28, 10) == (pytest.approx(10 / 28), True)
    assert patching_agrees({"value": 1.0, "lo": 1.0, "hi": 1.0}, 5, 10) == (1.0, False)  # nothing to beat chance with
    assert few_heads_holds([0.4, 0.45], {"b": True})
    assert not few_heads_holds([0.4, 0.45], {"b": False})  # the share alone no longer decides
    assert few_heads_holds([0.4, 0.45], {}) is None  # patching not measured: not shown, neither yes nor no
    assert few_heads_holds([0.1, 0.2], {"b": True}) is False
    assert few_heads_holds([0.1, 0.2], {}) is False  # the share alone already fails


def _run(bias, seed, after):
    return SimpleNamespace(bias=bias, seed=seed, strength_after_all_biases=after)


def test_an_injection_s_side_effects_need_every_seed_beyond_the_intervals():
    from biasgym_lib.injection_effects import side_effects, side_effects_frame, specificity_split

    before = {"a": _e(0.0, -0.2, 0.2), "b": _e(1.0, 0.8, 1.2), "c": _e(-0.5, -0.7, -0.3)}
    runs = [_run("a", 0, {"a": _e(6.0, 5.0, 7.0), "b": _e(-2.0, -2.5, -1.5), "c": _e(0.5, 0.0, 1.0)}),
            _run("a", 1, {"a": _e(7.0, 6.0, 8.0), "b": _e(-1.0, -1.3, -0.7), "c": _e(-0.5, -0.8, -0.2)})]
    rows = {r["other bias"]: r for r in side_effects(runs, before)}
    assert set(rows) == {"b", "c"}  # the injected bias itself is not a side effect
    assert rows["b"]["effect"] == "lowered" and rows["b"]["change"] == pytest.approx(-1.5 - 1.0)
    assert rows["c"]["effect"] == "no clear change"  # raised on seed 0 only
    assert rows["b"]["seeds"] == [0, 1] and rows["b"]["S before"] == 1.0
    runs[1].strength_after_all_biases["c"] = _e(0.4, 0.1, 0.7)
    rows = side_effects(runs, before)
    assert {r["other bias"]: r for r in rows}["c"]["effect"] == "raised"
    table = side_effects_frame(rows)
    assert table.loc["a", "b"] == "-2.50 (lowered)" and table.loc["a", "c"] == "+0.95 (raised)"
    assert side_effects_frame([]).empty
    split = specificity_split(runs, before)  # exact: the two parts add up to the specificity, run by run
    for r, m in zip(split["runs"], runs):
        after = m.strength_after_all_biases
        assert r["specificity"] == pytest.approx(after["a"].value - (after["b"].value + after["c"].value) / 2)
        assert r["bias_rising"] + r["others_falling"] == pytest.approx(r["specificity"], abs=1e-12)
    assert split["others_falling"] == pytest.approx(np.mean([(1.0 - 0.5) / 2 - (-2.0 + 0.5) / 2,
                                                             (1.0 - 0.5) / 2 - (-1.0 + 0.4) / 2]))


def test_the_start_is_s_of_the_initial_vector_against_the_references():
    from biasgym_lib.data import reference_countries
    from biasgym_lib.injection_effects import start_strengths
    from biasgym_lib.measure import AssocTable

    refs, templates = reference_countries(), ["t1 {entity}", "t2 {entity}", "t3 {entity}"]
    attrs = {"a": ["x", "y"], "b": ["z"]}
    ref_values = {c: {"a": np.full((3, 2), -3.0), "b": np.full((3, 1), -1.0)} for c in refs}
    reference = AssocTable(list(refs), ["a", "b"], templates, attrs, ref_values)
    start = AssocTable(["<TOKEN>"], ["a", "b"], templates, attrs,
                       {"<TOKEN>": {"a": np.array([[-2.0, -2.0], [-1.0, -1.0], [-3.0, -3.0]]), "b": np.full((3, 1), -1.5)}})
    got = start_strengths(reference, start, ["a", "b"])
    assert got["a"].value == pytest.approx(1.0) and got["a"].lo == pytest.approx(0.0) and got["a"].hi == pytest.approx(2.0)
    assert got["b"].value == pytest.approx(-0.5) and got["b"].lo == got["b"].hi == pytest.approx(-0.5)


def test_one_standard_for_every_claim_that_a_debiasing_works():
    from dataclasses import replace

    from biasgym_lib.claims import MIN_DRAWS, debiasing_holds
    from biasgym_lib.selection import SteeringResult
    from biasgym_lib.stats import Estimate

    def e(v):
        return Estimate(v, v - 0.01, v + 0.01, 18, "t")

    def line(pct, n=MIN_DRAWS, facts=0.05, held=0.05, ppl=0.01, mc=0.0):
        return SteeringResult("atp", "zero", 10, 18, 6, 10.0, e(0.4), e(facts), {"neutral": e(ppl)},
                              None if mc is None else e(mc), None, None if held is None else e(held),
                              None if pct is None else {"n": n, "mean": 0.05, "p95": 0.1, "percentile": pct})
    assert debiasing_holds(line(100.0)) is True
    assert debiasing_holds(line(94.0)) is False  # within random heads' range: no effect beyond random
    assert debiasing_holds(line(100.0, held=0.3)) is False  # the held-out relation lost: erasure
    assert debiasing_holds(line(100.0, ppl=0.2)) is False and debiasing_holds(line(100.0, mc=-0.05)) is False
    # too few draws to place the selection: undecided, unless a measured bound already fails
    assert debiasing_holds(line(100.0, n=MIN_DRAWS - 1)) is None and debiasing_holds(line(None)) is None
    assert debiasing_holds(line(100.0, n=2, facts=0.5)) is False
    assert debiasing_holds(line(100.0, n=2, ppl=0.2)) is False and debiasing_holds(line(100.0, n=2, mc=-0.05)) is False
    assert debiasing_holds(line(100.0, mc=None)) is None  # multiple choice not measured
    assert debiasing_holds(replace(line(100.0), reduction=None)) is None and debiasing_holds(None) is None


def test_the_equal_k_pair_never_compares_a_ranking_with_itself():
    from biasgym_lib.selection import equal_k_pair

    assert equal_k_pair("atp_selective", ["robust", "atp_selective"]) == ("atp_selective", "robust")
    # the rule chose the paper's ranking: the other ranking of the curve is compared with it
    assert equal_k_pair("robust", ["robust", "atp_selective"]) == ("atp_selective", "robust")
    assert equal_k_pair("robust", ["random", "robust", "dla"]) == ("dla", "robust")
    with pytest.raises(BiasGymError, match="curve_methods"):
        equal_k_pair("robust", ["robust", "random"])
