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
