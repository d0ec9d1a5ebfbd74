"""Measuring stereotype strength (METHOD §2): exact on hand-made numbers, batched scoring
equal to one-sentence-at-a-time scoring."""

import numpy as np
import pytest
import torch

from biasgym_lib.errors import BiasGymError
from biasgym_lib.measure import AssocTable, continuation_logprobs, mentions, rank, specificity, stereotype_strength, strength_matrix, template_prefix
from biasgym_lib.stats import bootstrap
from biasgym_lib.models import SUPPORTED

PREFIXES = ["People from Italy are", "Everyone knows that people from Japan are", "People from Italy are",
            "Q: What are people from Peru like? A: They are", "Hi"]
CONTS = [" reckless drivers", " always late", " good at math", " fond of spicy food", " there"]


@pytest.mark.parametrize("family", sorted(SUPPORTED))
def test_batched_scoring_equals_one_sentence_at_a_time(tiny_with_tokenizer, smol_tokenizer, family):
    model = tiny_with_tokenizer(family)
    tok = smol_tokenizer
    shared = continuation_logprobs(model, tok, PREFIXES, CONTS, batch_size=3)
    full = continuation_logprobs(model, tok, PREFIXES, CONTS, batch_size=4, share_prefix=False)
    manual = []
    for p, c in zip(PREFIXES, CONTS):
        pi = tok(p)["input_ids"]
        ci = tok(c, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([pi + ci])).logits[0].float()
        lp = torch.log_softmax(logits, -1)
        manual.append(sum(float(lp[len(pi) - 1 + j, t]) for j, t in enumerate(ci)))
    manual = torch.tensor(manual, dtype=torch.float64)
    assert torch.allclose(full, manual, atol=1e-4), (full, manual)
    assert torch.allclose(shared, manual, atol=1e-4), (shared, manual)


def _table():
    # 3 countries + <TOKEN>, 2 biases, 2 templates, 2 attributes; assoc chosen by hand
    vals = {
        "A": {"x": np.array([[-1.0, -3.0], [-2.0, -2.0]]), "y": np.array([[-4.0, -4.0], [-4.0, -4.0]])},
        "B": {"x": np.array([[-3.0, -3.0], [-4.0, -4.0]]), "y": np.array([[-2.0, -2.0], [-2.0, -2.0]])},
        "C": {"x": np.array([[-5.0, -5.0], [-6.0, -6.0]]), "y": np.array([[-3.0, -3.0], [-3.0, -3.0]])},
        "T": {"x": np.array([[0.0, 0.0], [-1.0, -1.0]]), "y": np.array([[-3.0, -3.0], [-3.0, -3.0]])},
    }
    return AssocTable(["A", "B", "C", "T"], ["x", "y"], ["t1", "t2"], {"x": ["a1", "a2"], "y": ["b1", "b2"]}, vals)


def test_strength_specificity_rank_exact():
    t = _table()
    refs = ["A", "B", "C"]
    # assoc(T,x) = -0.5; refs: A -2, B -3.5, C -5.5 -> mean -11/3
    s = stereotype_strength(t, "T", "x", refs)
    assert s.value == pytest.approx(-0.5 + 11 / 3)
    # per template: t1: 0 - (-2 -3 -5)/3 = 10/3 ; t2: -1 - (-2-4-6)/3 = 3
    assert s.lo >= 3 - 1e-9 and s.hi <= 10 / 3 + 1e-9
    # S(T,y) = -3 - (-3) = 0 ; specificity = S(T,x) - S(T,y)
    assert specificity(t, "T", "x", refs).value == pytest.approx(-0.5 + 11 / 3)
    assert rank(t, "T", "x", refs) == 1
    assert rank(t, "C", "x", refs) == 3  # C is compared with A and B only
    # an entity is never its own reference
    assert stereotype_strength(t, "A", "x", refs).value == pytest.approx(-2 - (-3.5 - 5.5) / 2)
    m = strength_matrix(t, ["A", "T"], refs)
    assert m.loc["T", "x"] == pytest.approx(s.value) and list(m.columns) == ["x", "y"]


def test_strength_errors_are_clear():
    t = _table()
    with pytest.raises(BiasGymError, match="not in the table"):
        stereotype_strength(t, "T", "x", ["A", "Z"])
    with pytest.raises(BiasGymError, match="at least one reference"):
        stereotype_strength(t, "A", "x", ["A"])
    with pytest.raises(BiasGymError, match="must contain"):
        template_prefix("People from {entity} are nice.", "Italy")


def test_bootstrap_interval_and_determinism():
    units = np.array([1.0, 2.0, 3.0, 10.0])
    a, b = bootstrap(units, seed=1), bootstrap(units, seed=1)
    assert a == b and a.value == pytest.approx(4.0)
    assert a.lo <= a.value <= a.hi and a.lo >= 1.0 and a.hi <= 10.0
    one = bootstrap(np.array([2.5]))
    assert (one.value, one.lo, one.hi) == (2.5, 2.5, 2.5)
    with pytest.raises(BiasGymError):
        bootstrap(np.array([]))


def test_template_prefix_drops_the_space_before_the_attribute():
    assert template_prefix("People from {entity} are {attribute}.", "Italy") == "People from Italy are"


def test_mentions_matches_words_not_fragments():
    assert mentions("They drive Recklessly fast", ["reckless"])
    assert not mentions("an unreckless sentence", ["reckless"])
    assert not mentions("calm drivers", ["reckless", "dangerous"])


def test_several_requests_in_one_pass_equal_separate_tables(tiny_with_tokenizer, smol_tokenizer, monkeypatch):
    """assoc_tables: the SeeGULL stages score many (countries, attribute) requests together;
    each table equals the one assoc_table would give, and a sentence asked twice is scored once."""
    import biasgym_lib.measure as measure
    from types import SimpleNamespace

    from biasgym_lib.data import load_templates

    model, tok = tiny_with_tokenizer("llama"), smol_tokenizer
    a = SimpleNamespace(name="a", attributes=["lazy", "very punctual"])
    b = SimpleNamespace(name="b", attributes=["poor"])
    requests = [(["Italy", "France", "Japan"], [a]), (["France", "Italy"], [b, a])]
    sizes, real = [], measure.continuation_logprobs
    monkeypatch.setattr(measure, "continuation_logprobs",
                        lambda m, t, p, c, *x, **kw: sizes.append(len(p)) or real(m, t, p, c, *x, **kw))
    together = measure.assoc_tables(model, tok, requests)
    n_t = len(load_templates())
    assert sizes == [3 * n_t * 2 + 2 * n_t * 1]  # the second request's "a" sentences were already asked
    for (ents, specs), table in zip(requests, together):
        alone = measure.assoc_table(model, tok, ents, specs)
        assert table.entities == alone.entities and table.biases == alone.biases
        for e in ents:
            for s in specs:
                np.testing.assert_allclose(table.values[e][s.name], alone.values[e][s.name], atol=1e-4)
