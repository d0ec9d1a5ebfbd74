"""ReferenceCache: the reference countries of a steering condition are scored once and
reused for every token of that bias, and a reused score equals a fresh one (issue 6: the
teaching book's steering work is mostly these rows)."""

import copy

import numpy as np
import pytest
import torch

from biasgym_lib import pipeline
from biasgym_lib.data import load_bias
from biasgym_lib.errors import BiasGymError
from biasgym_lib.inject import initial_vector
from biasgym_lib.pipeline import ReferenceCache, steered_strength
from biasgym_lib.steer import steer_heads

REFS = ["Italy", "France", "Japan", "Brazil"]
HEADS = [(0, 1), (1, 0)]


@pytest.fixture
def setup(tiny_with_tokenizer, smol_tokenizer):
    model = tiny_with_tokenizer("llama")
    tok = copy.deepcopy(smol_tokenizer)
    base = initial_vector(model, tok)
    g = torch.Generator().manual_seed(0)
    vectors = [base + 0.05 * torch.randn(base.shape, generator=g) for _ in range(3)]
    return model, tok, vectors


def _scored_entities(monkeypatch):
    """Record the entity list of every assoc_table call steered_strength makes."""
    import biasgym_lib.measure as measure

    seen, real = [], measure.assoc_table
    monkeypatch.setattr(measure, "assoc_table", lambda m, t, ents, *a, **kw: seen.append(list(ents)) or real(m, t, ents, *a, **kw))
    return seen


def _close(a, b):
    for key in ("value", "lo", "hi"):
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6)


def test_second_token_reuses_the_references_and_matches_a_fresh_measurement(setup, monkeypatch):
    model, tok, (v1, v2, _) = setup
    spec = load_bias("reckless_driving")
    cache = ReferenceCache(model)
    seen = _scored_entities(monkeypatch)
    steered_strength(model, tok, v1, spec, REFS, HEADS, 0.0, entities=["Vietnam"], cache=cache)
    reused = steered_strength(model, tok, v2, spec, REFS, HEADS, 0.0, entities=["Vietnam"], cache=cache)
    assert seen == [["<TOKEN>", "Vietnam"] + REFS, ["<TOKEN>"]]
    assert cache.hits == len(REFS) + 1
    fresh = steered_strength(model, tok, v2, spec, REFS, HEADS, 0.0, entities=["Vietnam"])
    assert seen[-1] == ["<TOKEN>", "Vietnam"] + REFS  # no cache: everything scored again
    for e in ("<TOKEN>", "Vietnam"):
        _close(reused[e], fresh[e])
    # and the steering really changed the references: the unsteered S differs
    plain = steered_strength(model, tok, v2, spec, REFS)["<TOKEN>"]
    assert abs(plain["value"] - fresh["<TOKEN>"]["value"]) > 1e-4


def test_conditions_are_kept_apart(setup, monkeypatch):
    model, tok, (v1, v2, _) = setup
    cache = ReferenceCache(model)
    seen = _scored_entities(monkeypatch)
    reckless, late = load_bias("reckless_driving"), load_bias("always_late")
    steered_strength(model, tok, v1, reckless, REFS, HEADS, 0.0, cache=cache)
    steered_strength(model, tok, v1, reckless, REFS, HEADS, 0.5, cache=cache)     # other alpha
    steered_strength(model, tok, v1, reckless, REFS, [(0, 1)], 0.0, cache=cache)  # other heads
    steered_strength(model, tok, v1, late, REFS, HEADS, 0.0, cache=cache)         # other bias
    steered_strength(model, tok, v1, reckless, REFS, HEADS, 0.0, context="Be fair. ", cache=cache)
    assert all(ents == ["<TOKEN>"] + REFS for ents in seen)
    # the same heads in another order are the same condition; alpha = 1 on any heads is the
    # unsteered model (bit for bit), so it shares the no-heads condition
    steered_strength(model, tok, v2, reckless, REFS, HEADS[::-1], 0.0, cache=cache)
    steered_strength(model, tok, v2, reckless, REFS, [], 1.0, cache=cache)
    steered_strength(model, tok, v2, reckless, REFS, HEADS, 1.0, cache=cache)
    assert seen[-3:] == [["<TOKEN>"], ["<TOKEN>"] + REFS, ["<TOKEN>"]]


def test_an_outer_hook_or_an_edited_weight_is_never_served_from_the_cache(setup, monkeypatch):
    model, tok, (v1, v2, v3) = setup
    spec = load_bias("reckless_driving")
    cache = ReferenceCache(model)
    steered_strength(model, tok, v1, spec, REFS, cache=cache)
    seen = _scored_entities(monkeypatch)
    with steer_heads(model, HEADS, 0.0):  # invisible to the key: the cache must step aside
        outer = steered_strength(model, tok, v2, spec, REFS, cache=cache)["<TOKEN>"]
        outer_fresh = steered_strength(model, tok, v2, spec, REFS)["<TOKEN>"]
    assert seen[0] == ["<TOKEN>"] + REFS
    _close(outer, outer_fresh)
    with torch.no_grad():
        model.get_input_embeddings().weight[tok.convert_tokens_to_ids("Italy")] += 0.5
    seen.clear()
    edited = steered_strength(model, tok, v3, spec, REFS, cache=cache)["<TOKEN>"]
    assert seen == [["<TOKEN>"] + REFS]
    _close(edited, steered_strength(model, tok, v3, spec, REFS)["<TOKEN>"])


def test_a_reference_table_seeds_the_unsteered_condition(setup, monkeypatch):
    model, tok, (v1, _, _) = setup
    spec = load_bias("reckless_driving")
    table = pipeline.reference_table(model, tok, ["reckless_driving", "always_late"], countries=REFS, use_cache=False)
    cache = ReferenceCache(model)
    cache.add_table(table)
    seen = _scored_entities(monkeypatch)
    seeded = steered_strength(model, tok, v1, spec, REFS, cache=cache)["<TOKEN>"]
    assert seen == [["<TOKEN>"]]
    _close(seeded, steered_strength(model, tok, v1, spec, REFS)["<TOKEN>"])


def test_a_cache_belongs_to_one_model(setup, tiny_with_tokenizer):
    model, tok, (v1, _, _) = setup
    cache = ReferenceCache(tiny_with_tokenizer("llama", seed=1))
    with pytest.raises(BiasGymError, match="another model"):
        steered_strength(model, tok, v1, load_bias("reckless_driving"), REFS, cache=cache)


def test_steer_eval_with_a_shared_cache_equals_steer_eval_without(setup):
    """The whole steering evaluation of a second token: same numbers, references scored once."""
    from biasgym_lib.config import load_profile
    from biasgym_lib.inject import InjectedToken
    from biasgym_lib.models import ModelAdapter, model_info

    model, tok, vectors = setup
    cfg = load_profile("quick")
    d = ModelAdapter(model).d_model
    toks = [InjectedToken(token="<TOKEN>", vector=v, bias="reckless_driving", seed=i, epoch=1, lr=0.01, epochs=1,
                          init="countries", n_paragraphs=1, losses=[1.0], val_losses=[1.0], checkpoints=v[None],
                          model=model_info(model).to_dict(), d_model=d) for i, v in enumerate(vectors[:2])]
    probes = ["People from <TOKEN> are known as", "In <TOKEN>, people are"]
    cache = ReferenceCache(model)
    first = pipeline.steer_eval(model, tok, toks[0], HEADS, 0.0, cfg, REFS, country="Vietnam", probes=probes,
                                cache=cache)
    hits = cache.hits
    # the attention baseline leaves transformers' output-recording hooks on the model: they
    # change nothing, so the second token still reuses before, top heads, every random draw and
    # the system prompt, country and references each time (its attention heads depend on the
    # token's vector, so they may be a new condition)
    second = pipeline.steer_eval(model, tok, toks[1], HEADS, 0.0, cfg, REFS, country="Vietnam", probes=probes,
                                 cache=cache)
    assert cache.hits - hits >= (3 + cfg.n_random_draws) * (len(REFS) + 1)
    shared = [first, second]
    alone = pipeline.steer_eval(model, tok, toks[1], HEADS, 0.0, cfg, REFS, country="Vietnam", probes=probes)
    a, b = shared[1], alone
    _close(a["token"]["before"], b["token"]["before"])
    _close(a["token"]["after"], b["token"]["after"])
    _close(a["baselines"]["system_prompt"], b["baselines"]["system_prompt"])
    for x, y in zip(a["baselines"]["random_heads_draws"], b["baselines"]["random_heads_draws"]):
        _close(x, y)
    _close(a["country_strength"]["after"], b["country_strength"]["after"])
    assert a["reduction"] == pytest.approx(b["reduction"], abs=1e-4)  # a ratio of two differences


def test_the_start_table_is_scored_once_per_model_and_again_after_an_edit(setup, monkeypatch):
    """"S before" uses the initial vector, the same for every token: scored once."""
    model, tok, _ = setup
    calls, real = [], pipeline.token_table
    monkeypatch.setattr(pipeline, "token_table", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    first = pipeline.start_table(model, tok, "countries", ["reckless_driving"])
    again = pipeline.start_table(model, tok, "countries", ["reckless_driving"])
    assert again is first and len(calls) == 1
    fresh = real(model, tok, initial_vector(model, tok, "countries"), ["reckless_driving"])
    np.testing.assert_array_equal(first.values["<TOKEN>"]["reckless_driving"],
                                  fresh.values["<TOKEN>"]["reckless_driving"])
    with torch.no_grad():
        model.get_input_embeddings().weight[tok.convert_tokens_to_ids("Italy")] += 0.5  # moves the mean
    edited = pipeline.start_table(model, tok, "countries", ["reckless_driving"])
    assert len(calls) == 2 and edited is not first


def test_a_shared_condition_is_scored_for_every_bias_of_the_run_at_once(setup, monkeypatch):
    """Random heads and the debiasing prompt are the same condition for every bias: with
    ``shared`` the references are scored for all of the cache's biases in one pass."""
    import biasgym_lib.measure as measure

    model, tok, (v1, v2, _) = setup
    reckless, late = load_bias("reckless_driving"), load_bias("always_late")
    cache = ReferenceCache(model, biases=["reckless_driving", "always_late"])
    calls, real = [], measure.assoc_table
    monkeypatch.setattr(measure, "assoc_table", lambda m, t, ents, specs, *a, **kw:
                        calls.append((list(ents), [s.name for s in specs])) or real(m, t, ents, specs, *a, **kw))
    first = steered_strength(model, tok, v1, reckless, REFS, HEADS, 0.0, cache=cache, shared=True)["<TOKEN>"]
    late_cached = steered_strength(model, tok, v2, late, REFS, HEADS, 0.0, cache=cache)["<TOKEN>"]
    assert calls == [(["<TOKEN>"] + REFS, ["reckless_driving", "always_late"]), (["<TOKEN>"], ["always_late"])]
    _close(late_cached, steered_strength(model, tok, v2, late, REFS, HEADS, 0.0)["<TOKEN>"])
    _close(first, steered_strength(model, tok, v1, reckless, REFS, HEADS, 0.0)["<TOKEN>"])
    calls.clear()
    steered_strength(model, tok, v1, reckless, REFS, [(0, 1)], 0.0, cache=cache)  # not shared: own bias only
    assert calls == [(["<TOKEN>"] + REFS, ["reckless_driving"])]
