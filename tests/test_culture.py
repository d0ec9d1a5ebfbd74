"""Chapter 7's stage (issue 24): cultural knowledge per item and per dimension, the shared-prefix
scorer pinned to a sentence-by-sentence reference, and what steering does to it."""

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from biasgym_lib.culture import (PHRASINGS, country_logprobs, culture_change, culture_knowledge, item_scores,
                                 keeps_culture, question_prefix)
from biasgym_lib.data.culture import load_culture
from biasgym_lib.errors import BiasGymError


def _item(i, countries, dimension="performing_arts"):
    return SimpleNamespace(id=f"x{i}", countries=tuple(countries), dimension=dimension,
                           description=f"A photo of thing number {i}.")


def test_scores_per_item_are_exact():
    countries = ["Italy", "Japan", "Brazil", "Kenya"]
    items = [_item(0, ["Japan"]), _item(1, ["Brazil", "Kenya"]), _item(2, ["Italy"])]
    logp = np.zeros((3, 2, 4))
    logp[0] = [[-3, -1, -2, -4], [-3, -1, -2, -4]]       # Japan on top
    logp[1] = [[-1, -2, -3, -2.5], [-1, -2, -3, -2.5]]   # Italy on top; best right is Kenya (-2.5), rank 3
    logp[2] = [[-2, -1, -3, -5], [-4, -1, -3, -5]]       # mean over phrasings: Italy -3, Japan -1: rank 2
    s = item_scores(logp, items, countries)
    assert s["correct"] == [True, False, False]
    assert s["rank"] == [1, 3, 2]
    assert s["margin"][0] == pytest.approx(-1 - np.mean([-3, -2, -4]))
    assert s["margin"][1] == pytest.approx(-2.5 - np.mean([-1, -2]))  # the other right country is no "other"
    assert s["margin"][2] == pytest.approx(-3 - np.mean([-1, -3, -5]))
    with pytest.raises(BiasGymError, match="none of"):
        item_scores(logp[:1], [_item(9, ["Peru"])], countries)


def test_the_question_names_nothing_but_the_photo():
    item = load_culture()[0]
    for p in PHRASINGS:
        prefix = question_prefix(p, item.description)
        assert prefix.startswith(item.description) and not prefix.endswith(" ") and item.country not in prefix


def test_shared_prefix_scoring_equals_each_sentence_alone(tiny_with_tokenizer, smol_tokenizer):
    model, tok = tiny_with_tokenizer("llama"), copy.deepcopy(smol_tokenizer)
    items, countries = load_culture()[:3], ["Italy", "Japan", "Brazil", "Kenya", "Mexico"]
    fast = country_logprobs(model, tok, items, countries)
    full = country_logprobs(model, tok, items, countries, share_prefix=False)
    assert fast.shape == (3, len(PHRASINGS), 5) and np.abs(fast - full).max() < 1e-4
    # the slow reference: one sentence at a time, log-softmax of the model's own logits
    item, p, c = items[1], PHRASINGS[2], "Brazil"
    pre = tok(question_prefix(p, item.description))["input_ids"]
    cont = tok(" " + c, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([pre + cont])).logits[0].double().log_softmax(-1)
    ref = sum(float(logits[len(pre) - 1 + j, t]) for j, t in enumerate(cont))
    assert fast[1, 2, 2] == pytest.approx(ref, abs=1e-4)


def test_knowledge_and_its_change_per_dimension(tiny_with_tokenizer, smol_tokenizer):
    from biasgym_lib.steer import SteeringSpec
    from biasgym_lib.culture import culture_under

    model, tok = tiny_with_tokenizer("llama"), copy.deepcopy(smol_tokenizer)
    from biasgym_lib.data import reference_countries

    items = [it for it in load_culture() if it.dimension == "symbols"][:2] + \
        [it for it in load_culture() if it.dimension == "everyday"][:2]
    countries = reference_countries()
    before = culture_knowledge(model, tok, items, countries, n_boot=100)
    assert set(before["accuracy"]) == {"all", "symbols", "everyday"} and before["chance"]["all"] == pytest.approx(
        np.mean([len(set(it.countries) & set(countries)) / len(countries) for it in items]))
    same = culture_under(model, tok, SteeringSpec([(1, 0)], 1.0), items, countries, n_boot=100)
    change = culture_change(before, same, n_boot=100)
    assert all(v["margin_lost"]["value"] == 0 and v["accuracy_change"]["value"] == 0 for v in change.values())
    assert keeps_culture(change)
    zeroed = culture_under(model, tok, SteeringSpec([(0, h) for h in range(6)] + [(1, h) for h in range(6)], 0.0),
                           items, countries, n_boot=100)
    assert zeroed["scores"]["margin"] != before["scores"]["margin"]


class _Run:
    """What culture_steering reads of a Run: the confirmation's, the grid's and SeeGULL's rows,
    the setting's means and entities, and a memo that computes."""

    def __init__(self, model, tok, rows, seeg_rows, grid_rows=()):
        from biasgym_lib.evaluate import entity_ids
        from biasgym_lib.steer import head_means

        self.model, self.tokenizer, self.biases = model, tok, ["heavy_drinking", "spicy_food"]
        self.cfg = SimpleNamespace(culture_per_dimension=0, k=2, n_cost_draws=1)
        self._rows, self.seeg_rows, self.grid_rows = rows, seeg_rows, list(grid_rows)
        self.setting = {"means": head_means(model, tok, ["A plain sentence about the weather."]),
                        "entities": entity_ids(tok)}

    def confirm(self):
        return {"rows": self._rows, "best": {"method": "atp", "kind": "zero", "k": 2}}

    def grid(self):
        return {"rows": self.grid_rows}

    def _fingerprint(self, biases):
        return "f"

    def _best_key(self):
        return "-b"

    def memo(self, name, compute, fingerprint=None):
        return compute()


def _row(bias, method, kind, heads, draw=None, red=(0.5, 0.3)):
    return {"bias": bias, "method": method, "kind": kind, "k": len(heads), "draw": draw, "heads": heads,
            "reduction": list(red), "facts_reduction": 0.01}


def test_culture_under_every_steered_head_set_once_resumed_and_exact(tiny_with_tokenizer, smol_tokenizer, monkeypatch):
    """Each distinct (kind, heads) is measured once; every row equals the plain measurement
    under its own spec bit for bit (the resumed pass changes nothing); twins and the summary
    against random heads of the same source, kind and k."""
    import biasgym_lib.culture as culture
    import biasgym_lib.generalise as generalise
    from biasgym_lib.data import reference_countries
    from biasgym_lib.evaluate import make_spec

    model, tok = tiny_with_tokenizer("llama"), copy.deepcopy(smol_tokenizer)
    rows = [_row("heavy_drinking", "atp", "zero", [[1, 2], [1, 3]]),
            _row("spicy_food", "atp", "zero", [[1, 2], [1, 3]], red=(0.2, None)),
            _row("heavy_drinking", "random", "zero", [[0, 1], [1, 5]], draw=0),
            _row("spicy_food", "random", "zero", [[0, 1], [1, 5]], draw=0),
            _row("heavy_drinking", "atp", "mean", [[1, 0]]),
            _row("heavy_drinking", "matched:atp", "zero", [[1, 0], [1, 4]], draw=0),
            _row("heavy_drinking", "matched:atp", "zero", [[1, 1], [1, 5]], draw=1)]  # past n_cost_draws: left out
    # SeeGULL's rows hold the pairs' S; the reduction is 1 - mean after / mean before (0.2 here)
    seeg = {"before": {"S": [{"value": v} for v in (1.0, 2.0, 3.0)]},
            "rows": [{"method": "atp", "kind": "zero", "k": 2, "draw": None, "heads": [[1, 2], [1, 3]],
                      "S": [{"value": v} for v in (0.8, 1.6, 2.4)], "facts_reduction": 0.02}]}
    grid = [_row("heavy_drinking", "atp", "zero", [[1, 2], [1, 3]]),  # the confirmation's set: not measured again
            _row("heavy_drinking", "atp", "blind", [[1, 2], [1, 3]]),  # another kind the grid knows
            _row("heavy_drinking", "robust", "zero", [[0, 3], [1, 4]]),  # the paper's ranking at the same k
            _row("heavy_drinking", "random", "blind", [[0, 1], [1, 5]], draw=0),
            _row("heavy_drinking", "dla", "zero", [[0, 0], [1, 1]]),  # neither compared ranking: left out
            _row("heavy_drinking", "atp", "zero", [[1, 2], [1, 3], [0, 2]])]  # not the profile's k: left out
    run = _Run(model, tok, rows, seeg, grid)
    monkeypatch.setattr(generalise, "seegull_steering", lambda r: r.seeg_rows)
    calls = []
    plain = culture.culture_under
    monkeypatch.setattr(culture, "culture_under", lambda m, t, spec, *a, **kw: (calls.append(spec), plain(m, t, spec, *a, **kw))[1])
    got = culture.culture_steering(run, n_boot=50)
    # before, four distinct (kind, heads) in the confirmation (the second matched draw is past n_cost_draws)
    # and three more in the grid; the seegull set is the confirm's
    assert len(calls) == 1 + 4 + 3
    assert [r["source"] for r in got["rows"]] == ["confirm"] * 6 + ["grid"] * 4 + ["seegull"]
    got["rows"] = got["rows"][:5] + got["rows"][6:]  # below, the rows as they were before the matched draw
    assert [(r["method"], r["kind"]) for r in got["rows"][5:9]] == [("atp", "zero"), ("atp", "blind"), ("robust", "zero"),
                                                                    ("random", "blind")]
    assert got["rows"][1]["reduction"] == 0.2 and got["rows"][9]["reduction"] == pytest.approx(0.2)
    assert got["rows"][5]["scores"] == got["rows"][0]["scores"]  # one set, one measurement
    items = culture.culture_items(0, reference_countries())
    assert got["before"]["items"] == [it.id for it in items] == [it.id for it in load_culture()]
    for r in (got["rows"][0], got["rows"][4], got["rows"][6]):  # the zero, the mean and the blind kind
        spec = make_spec([tuple(h) for h in r["heads"]], r["kind"], run.setting["means"], run.setting["entities"])
        want = plain(model, tok, spec, items, reference_countries(), n_boot=50)
        assert r["scores"] == want["scores"]  # bit for bit
    twins = [i for i, it in enumerate(items) if it.twin_of == "heavy_drinking"]
    first = got["rows"][0]
    assert twins and first["twins"]["items"] == [items[i].id for i in twins]
    assert first["twins"]["margin_after"] == [first["scores"]["margin"][i] for i in twins]
    assert first["twins"]["margin_before"] == [got["before"]["scores"]["margin"][i] for i in twins]
    assert "twins" not in got["rows"][9]  # SeeGULL's pooled heads belong to no one bias
    lines = {(x["source"], x["method"], x["kind"], x["k"]): x for x in culture.culture_summary(got, n_boot=50)}
    atp = lines[("confirm", "atp", "zero", 2)]
    assert atp["n_rows"] == 2 and atp["reduction"] == pytest.approx(np.mean([0.4, 0.2]))
    assert atp["culture"]["all"]["margin_lost"]["value"] == pytest.approx(
        culture.culture_change(got["before"], [{"items": got["before"]["items"], "scores": r["scores"]}
                                               for r in got["rows"][:2]])["all"]["margin_lost"]["value"])
    rand = lines[("confirm", "random", "zero", 2)]["culture"]
    assert atp["keeps"] == culture.keeps_culture(atp["culture"], rand)
    assert atp["keeps_as_stated"] == culture.keeps_culture(atp["culture"], rand, per_dimension=True)
    assert atp["against"] == "random"
    # with its layer-matched draw, a selection is compared with that instead of the uniform draws
    full = culture.culture_steering(run, n_boot=50)
    lines = {(x["source"], x["method"], x["kind"], x["k"]): x for x in culture.culture_summary(full, n_boot=50)}
    atp, matched = lines[("confirm", "atp", "zero", 2)], lines[("confirm", "matched:atp", "zero", 2)]
    assert atp["against"] == "matched:atp" and matched["n_rows"] == 1 and matched["against"] is None
    assert atp["keeps"] == culture.keeps_culture(atp["culture"], matched["culture"])
    grid_atp = lines[("grid", "atp", "blind", 2)]  # judged against the grid's random heads of its kind and k
    assert grid_atp["keeps"] == culture.keeps_culture(grid_atp["culture"], lines[("grid", "random", "blind", 2)]["culture"])
    assert ("confirm", "atp", "mean", 1) in lines and lines[("confirm", "atp", "mean", 1)]["keeps"] == \
        culture.keeps_culture(lines[("confirm", "atp", "mean", 1)]["culture"])  # no random heads of that kind and k


def test_keeping_culture_needs_the_bounds_and_no_more_loss_than_random_heads():
    def change(lost, lo, acc, hi, dim_acc=0.0):
        e = lambda v, a, b: {"value": v, "lo": a, "hi": b, "n": 10, "interval": "x"}  # noqa: E731
        return {"all": {"margin_lost": e(lost, lo, lost + 0.05), "accuracy_change": e(acc, acc - 0.02, hi)},
                "symbols": {"margin_lost": e(lost, lo - 1, lost + 1), "accuracy_change": e(dim_acc, -0.5, 0.5)}}
    ok = change(0.05, 0.01, -0.01, 0.0)
    assert culture_keeps(ok) and culture_keeps(ok, change(0.02, 0.0, 0.0, 0.01))
    assert not culture_keeps(change(0.12, 0.08, 0.0, 0.01))           # margin bound
    assert not culture_keeps(change(0.05, 0.01, -0.04, -0.02))        # accuracy bound
    assert not culture_keeps(ok, change(0.0, -0.02, 0.0, 0.01))       # clearly more than random heads lose
    assert not culture_keeps(ok, change(0.02, 0.0, 0.02, 0.03))       # accuracy clearly below random heads'
    one_item = change(0.05, 0.01, -0.01, 0.0, dim_acc=-1 / 8)          # one of a dimension's 8 items flipped
    assert culture_keeps(one_item) and not keeps_culture(one_item, per_dimension=True)  # judged on all items only


def culture_keeps(change, random=None):
    return keeps_culture(change, random)


def test_culture_items_keep_only_answerable_items_and_a_subset_per_dimension():
    from biasgym_lib.culture import culture_items

    some = culture_items(2, ["Italy", "Japan", "Mexico", "India"])
    assert some and all(set(it.countries) & {"Italy", "Japan", "Mexico", "India"} for it in some)
    per = {}
    for it in some:
        per[it.dimension] = per.get(it.dimension, 0) + 1
    assert max(per.values()) <= 2
    assert len(culture_items()) == len(load_culture())
    with pytest.raises(BiasGymError, match="no culture item"):
        culture_items(0, ["Atlantis"])
