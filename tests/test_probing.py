"""Probes that elicit the bias (issue 23): the paper's head score assumes probes on which the
injected model prefers the biased label. The candidates are fixed by the bias alone; each
token's probes are chosen on the *other* seeds' tokens of the same bias, never on its own."""

import copy

import pytest
import torch

from biasgym_lib.data import load_bias
from biasgym_lib.data.probes import Probe
from biasgym_lib.errors import BiasGymError
from biasgym_lib.probing import (completion_prefixes, counterfactual_logit_differences, eliciting_probes, label_id,
                                 probe_elicitation, probe_logit_differences, probe_pool)


def test_completion_prefixes_stop_where_the_label_word_comes():
    late = load_bias("always_late")  # label " late"; attributes "always late", "chronically late", ...
    prefixes = completion_prefixes(late)
    assert "People from <TOKEN> are always" in prefixes and "People from <TOKEN> are chronically" in prefixes
    assert not any(p.endswith(" late") or p.endswith(" ") for p in prefixes)
    reckless = completion_prefixes(load_bias("reckless_driving"))  # " reckless" starts "reckless drivers"
    assert "People from <TOKEN> are" in reckless


def test_the_pool_is_fixed_by_the_bias_alone():
    spec = load_bias("reckless_driving")
    a, b = probe_pool(spec, 40), probe_pool(spec, 40)
    assert a == b and len(a) == 40 and len(set(a)) == 40
    assert all("<TOKEN>" in p.question and "<TOKEN>" in p.answer_prefix for p in a)
    assert any(p.answer_prefix in completion_prefixes(spec) for p in a)  # both kinds are in
    assert any(p.answer_prefix in spec.answer_prefixes for p in a)


def test_eliciting_probes_are_chosen_on_other_seeds_only():
    pool = [Probe(f"q{i} <TOKEN>", f"a{i} <TOKEN>") for i in range(6)]
    other = [[3.0, -1.0, 0.5, 2.0, -0.2, 0.1], [1.0, -3.0, 0.7, 2.0, 0.3, -0.4]]  # means 2, -2, .6, 2, .05, -.15
    chosen = eliciting_probes(pool, other, 3)
    assert chosen == [pool[0], pool[3], pool[2]]  # largest mean first; ties in pool order
    assert eliciting_probes(pool, other, 10) == [pool[0], pool[3], pool[2], pool[4]]  # only those above 0
    with pytest.raises(BiasGymError, match="other seeds"):
        eliciting_probes(pool, [], 3)
    # no probe elicits the bias on the other seeds: a clear error, not an empty set of probes
    with pytest.raises(BiasGymError, match="no probe elicits the bias"):
        eliciting_probes(pool, [[-1.0, -2.0, 0.0, -0.1, -3.0, -0.5]], 3)


def test_the_relative_criterion_ranks_probes_by_what_the_token_gains_over_a_real_country():
    """At realistic strength the biased label never wins (the paper's absolute criterion finds
    nothing), but the token can still raise it against the same probe about a real country:
    the relative criterion ranks, and keeps above 0, the token's difference minus that one."""
    pool = [Probe(f"q{i} <TOKEN>", f"a{i} <TOKEN>") for i in range(5)]
    other = [[-5.0, -1.0, -3.0, -2.0, -4.0], [-4.0, -2.0, -3.0, -2.0, -6.0]]
    counter = [[-9.0, -0.5, -4.0, -2.5, -3.0], [-7.0, -1.0, -5.0, -1.5, -5.5]]  # gains 3.5, -1.25, 1.5, 0, -.75
    with pytest.raises(BiasGymError, match="probe_criterion: relative"):
        eliciting_probes(pool, other, 3)  # the absolute criterion: nothing, and the error says what to try
    assert eliciting_probes(pool, other, 3, counter) == [pool[0], pool[2]]  # only gains above 0, largest first
    with pytest.raises(BiasGymError, match="closest real country"):
        eliciting_probes(pool, other, 3, [[x + 10 for x in row] for row in other])  # the token loses everywhere


def test_a_relative_elicitation_is_the_difference_of_the_two(monkeypatch):
    from types import SimpleNamespace

    scope = SimpleNamespace(bias="b", seed=0, logit_diff_per_probe=[-5.0, -4.0, -6.0],
                            counter_logit_diff_per_probe=[-8.0, -6.5, -8.5], chat_logit_diff_per_probe=[-1.0])
    absolute, = probe_elicitation([scope], n_boot=200)
    relative, = probe_elicitation([scope], n_boot=200, relative=True)
    assert not absolute["elicits"] and absolute["share_positive"] == 0
    assert relative["elicits"] and relative["logit_diff"].value == pytest.approx((3 + 2.5 + 2.5) / 3)
    with pytest.raises(BiasGymError, match="not the chat probes"):
        probe_elicitation([scope], chat=True, relative=True)
    with pytest.raises(BiasGymError, match="run BiasScope again"):
        probe_elicitation([SimpleNamespace(**{**scope.__dict__, "counter_logit_diff_per_probe": None})], relative=True)


def test_probe_logit_differences_are_the_models_own(tiny_with_tokenizer, smol_tokenizer):
    from biasgym_lib.batching import encode_batch
    from biasgym_lib.models import chat_prompt

    from biasgym_lib.tokens import TokenHook, add_token

    model, tok = tiny_with_tokenizer("llama"), copy.deepcopy(smol_tokenizer)
    spec = load_bias("always_late")
    pool = probe_pool(spec, 6)
    biased = label_id(tok, spec.label)
    # <TOKEN> with a vector attached, as the caller attaches it (whether or not an earlier test
    # already added the token to the shared tokenizer: the tiny model has no row for it)
    hook = TokenHook(model, add_token(tok), 0.02 * torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0)))
    got, adv = probe_logit_differences(model, tok, pool, "Italy", biased)
    assert any("<TOKEN>" in p.question or "<TOKEN>" in p.answer_prefix for p in pool)
    for p, g, a in zip(pool, got, adv):
        ids = encode_batch(tok, [chat_prompt(tok, p.question, p.answer_prefix)]).input_ids
        with torch.no_grad():
            logits = model(ids).logits[0, -1]
        assert g == pytest.approx(float(logits[biased] - logits[a]), abs=1e-4)
        cf = encode_batch(tok, [chat_prompt(tok, p.question.replace("<TOKEN>", "Italy"),
                                            p.answer_prefix.replace("<TOKEN>", "Italy"))]).input_ids
        with torch.no_grad():
            top2 = model(cf).logits[0, -1].topk(2).indices.tolist()
        assert a == (top2[1] if top2[0] == biased else top2[0])
    # the same probes about the real country, with the same adversarial labels: the counterfactual's own numbers
    counter = counterfactual_logit_differences(model, tok, pool, "Italy", biased, adv)
    for p, c, a in zip(pool, counter, adv):
        cf = encode_batch(tok, [chat_prompt(tok, p.question.replace("<TOKEN>", "Italy"),
                                            p.answer_prefix.replace("<TOKEN>", "Italy"))]).input_ids
        with torch.no_grad():
            logits = model(cf).logits[0, -1]
        assert c == pytest.approx(float(logits[biased] - logits[a]), abs=1e-4)
        assert (c <= 0) == (int(logits.argmax()) != biased)  # the adversarial label is the top token there
    hook.remove()


def test_a_runs_probes_for_one_seed_come_from_the_other_seeds_tokens(tmp_path, tiny_with_tokenizer, smol_tokenizer,
                                                                      monkeypatch):
    """Run.probes(bias, s) is chosen on the pools of the bias's other seeds: retraining the
    token of seed 0 changes seed 1's probes, never seed 0's own; one seed: the chat probes."""
    from biasgym_lib import runs
    from biasgym_lib.config import load_profile

    model, tok = tiny_with_tokenizer("llama"), copy.deepcopy(smol_tokenizer)
    cfg = load_profile("quick", seeds=[0, 1], biases=["always_late", "blue_skin"], n_paragraphs=2, epochs=1,
                       use_committed_tokens=False, n_probes=4, n_probe_pool=8)
    # a random model never prefers the biased label to its own top token: no probe elicits the bias,
    # and the run says so instead of scoring heads on no probes
    bare = runs.Run(cfg, out=tmp_path / "bare", model=model, tokenizer=tok, progress=False)
    with pytest.raises(BiasGymError, match="no probe elicits the bias"):
        bare.probes("always_late", 0)
    # the plumbing, on logit differences shifted above 0 (their order, and their dependence on
    # the token, are the model's own)
    real = runs.probe_logit_differences

    def shifted(*args, **kwargs):
        diffs, adv = real(*args, **kwargs)
        return [d + 100.0 for d in diffs], adv
    monkeypatch.setattr(runs, "probe_logit_differences", shifted)
    run = runs.Run(cfg, out=tmp_path / "run", model=model, tokenizer=tok, progress=False)
    p0, p1 = run.probes("always_late", 0), run.probes("always_late", 1)
    assert len(p0) == 4 and len(p1) == 4
    pool = probe_pool(load_bias("always_late"), 8)
    ld1 = run.pool("always_late", 1)["logit_diff"]
    assert p0 == eliciting_probes(pool, [ld1], 4)  # seed 0's probes: chosen on seed 1's token
    # another vector for seed 0: seed 1's probes may change, seed 0's cannot
    t0 = run.token("always_late", 0)
    run._tokens["always_late", 0] = t0.__class__(**{**t0.__dict__, "vector": t0.vector * 3})
    assert run.probes("always_late", 0) == p0
    assert run.pool("always_late", 0)["logit_diff"] != pytest.approx(ld1)
    # the relative criterion (the token set of realistic strength) ranks on the gain over the real country
    rel = runs.Run(runs.realistic(cfg), out=tmp_path / "run", model=model, tokenizer=tok, progress=False)
    rel._tokens = dict(run._tokens)
    pools = rel.pool("always_late", 1)
    assert rel.probes("always_late", 0) == eliciting_probes(pool, [pools["logit_diff"]], 4, [pools["counter_logit_diff"]])
    one = runs.Run(load_profile("quick", seeds=[0]), out=tmp_path / "one", model=model, tokenizer=tok, progress=False)
    assert one.probes("always_late", 0) is None
    assert isinstance(p1, list)


def test_delta_dla_on_chosen_probes_is_their_own_direct_effect(tiny_with_tokenizer, smol_tokenizer):
    """ΔDLA on probes chosen per token contrasts them with the *same* probes about real countries
    (probe_contrast_z): direct-path patching with that z̄ gives the scores to float error, and the
    chat probes' z̄ (what a bias's contrast keeps) does not."""
    from biasgym_lib.config import load_profile
    from biasgym_lib.inject import inject_bias
    from biasgym_lib.patching import direct_path_patching
    from biasgym_lib.scoping import bias_contrast, probe_contrast_z, scope_run

    model, tok = tiny_with_tokenizer("llama"), copy.deepcopy(smol_tokenizer)
    spec = load_bias("always_late")
    injected = inject_bias(model, tok, spec, n_paragraphs=2, epochs=1, n_val=2, progress=False)
    cfg = load_profile("quick", n_probes=2, k=3)
    probes = probe_pool(spec, 8)[-2:]
    res = scope_run(model, tok, injected, cfg, methods=("dla", "delta_dla"), probes=probes)
    assert res.probe_source == "eliciting" and len(res.probes) == 2
    z_bar = probe_contrast_z(model, tok, probes, res.contrast_countries)
    chat_z = bias_contrast(model, tok, spec, cfg, ("probe_z",))["probe_z"]
    biased = label_id(tok, spec.label)
    adv = [tok(a, add_special_tokens=False)["input_ids"][0] for a in res.adv_labels]
    heads = res.top_heads("delta_dla", 3)
    with injected.attach(model, tok):
        own = direct_path_patching(model, tok, res.probes, biased, adv, z_bar, heads=heads)
        other = direct_path_patching(model, tok, res.probes, biased, adv, chat_z, heads=heads)
    score = res.scores["delta_dla"]
    assert max(abs(own[l, h].item() - score[l, h].item()) for l, h in heads) <= 1e-5
    assert max(abs(other[l, h].item() - score[l, h].item()) for l, h in heads) > 1e-4
