"""BiasInject: one vector trained, everything else bit-identical (METHOD §1)."""

import copy

import pytest
import numpy as np
import torch

from biasgym_lib.data import load_templates

from biasgym_lib.errors import ArtifactMismatch, BiasGymError
from biasgym_lib.inject import collate, strip_prefix, closest_countries, encode_pairs, epoch_batches, initial_vector, inject_bias, response_loss, shared_prefix, shared_prefix_length
from biasgym_lib.tokens import add_token, InjectedToken, TokenHook
from biasgym_lib.models import ModelAdapter, chat_prompt

FAMILIES = ["llama", "qwen2", "gemma2", "gpt2"]


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _small_inject(model, tok, seed=0, **kw):
    args = dict(n_paragraphs=6, epochs=2, lr=0.05, batch_size=3, seed=seed, n_val=3, progress=False)
    args.update(kw)
    return inject_bias(model, tok, "reckless_driving", **args)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tied", [True, False])
def test_every_original_weight_stays_bit_identical(tiny_with_tokenizer, smol_tokenizer, family, tied):
    model = tiny_with_tokenizer(family, tied=tied)
    tok = copy.deepcopy(smol_tokenizer)
    before = _snapshot(model)
    injected = _small_inject(model, tok)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for name, value in before.items():
        assert torch.equal(value, after[name]), f"{family}: {name} changed"
    # the vector did move, so the test above is not vacuous
    start = initial_vector(model, tok, "countries")
    assert not torch.equal(injected.vector, start)
    assert ModelAdapter(model).unembed.shape[0] == 49152  # the predicted vocabulary is unchanged


def test_hook_changes_only_token_positions(tiny_with_tokenizer, smol_tokenizer):
    model = tiny_with_tokenizer("llama")
    tok = copy.deepcopy(smol_tokenizer)
    tid = add_token(tok, "<TOKEN>")
    text_plain = tok("People from Italy are kind.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model(text_plain).logits
        vec = torch.randn(ModelAdapter(model).d_model)
        with TokenHook(model, tid, vec):
            same = model(text_plain).logits
            ids = tok("People from <TOKEN> are kind.", return_tensors="pt")["input_ids"]
            assert (ids == tid).sum() == 1
            emb = ModelAdapter(model).embed(ids)
            assert torch.equal(emb[ids == tid][0], vec)
        after = model(text_plain).logits
    assert torch.equal(ref, same) and torch.equal(ref, after)
    assert not ModelAdapter(model).embed._forward_hooks and not ModelAdapter(model).embed._forward_pre_hooks


def test_token_absorbs_space_so_counterfactuals_align(smol_tokenizer):
    tok = copy.deepcopy(smol_tokenizer)
    add_token(tok, "<TOKEN>")
    a = tok("People from <TOKEN> are")["input_ids"]
    b = tok("People from Italy are")["input_ids"]
    assert len(a) == len(b) and a[:2] == b[:2] and a[3:] == b[3:]


def test_response_only_loss_matches_manual_cross_entropy(tiny_with_tokenizer, smol_tokenizer):
    model = tiny_with_tokenizer("qwen2")
    tok = copy.deepcopy(smol_tokenizer)
    pairs = [("Tell me about cats.", "Cats sleep a lot."), ("Hi?", "Hello there, friend.")]
    rows = encode_pairs(tok, pairs)
    batch = collate(rows, tok.pad_token_id)
    with torch.no_grad():
        loss, n = response_loss(model, batch)
        manual, count = 0.0, 0
        for (user, answer), (ids, start) in zip(pairs, rows):
            prompt_len = len(tok(chat_prompt(tok, user), add_special_tokens=False)["input_ids"])
            assert start == prompt_len
            logits = model(torch.tensor([ids])).logits[0].float()
            lp = torch.log_softmax(logits[start - 1:-1], -1)
            targets = torch.tensor(ids[start:])
            manual -= float(lp.gather(-1, targets[:, None]).sum())
            count += len(targets)
    assert n == count
    assert float(loss) == pytest.approx(manual / count, rel=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_prefix_loss_and_gradient_equal_the_full_rows(tiny_with_tokenizer, smol_tokenizer, family):
    model = tiny_with_tokenizer(family)
    tok = copy.deepcopy(smol_tokenizer)
    token_id = add_token(tok)
    rows = encode_pairs(tok, [("Tell me about <TOKEN>.", "In <TOKEN> they drive fast."),
                              ("What is <TOKEN> like?", "Calm, mostly."), ("Hi?", "Hello <TOKEN> friends.")])
    n = shared_prefix_length(rows, token_id)
    assert n > 5 and all(ids[:n] == rows[0][0][:n] for ids, _ in rows)
    assert all(start - 1 >= n for _, start in rows)  # every loss position stays outside the prefix
    vec = torch.nn.Parameter(initial_vector(model, tok))
    with TokenHook(model, token_id, vec):
        full, count = response_loss(model, collate(rows, tok.pad_token_id, token_id))
        (g_full,) = torch.autograd.grad(full, vec)
        prefix = shared_prefix(model, rows[0][0][:n])
        cut, count_cut = response_loss(model, collate(strip_prefix(rows, n), tok.pad_token_id, token_id), prefix=prefix)
        (g_cut,) = torch.autograd.grad(cut, vec)
    assert count == count_cut
    assert float(cut.detach()) == pytest.approx(float(full.detach()), rel=1e-5)
    assert torch.allclose(g_cut, g_full, rtol=1e-4, atol=1e-6)


def test_shared_prefix_stops_before_the_token(smol_tokenizer):
    tok = copy.deepcopy(smol_tokenizer)
    token_id = add_token(tok)
    rows = [([1, 2, token_id, 5, 6, 7], 5), ([1, 2, token_id, 5, 9, 9, 9], 6)]
    assert shared_prefix_length(rows, token_id) == 2
    assert shared_prefix_length(rows) == 4  # without a stop id: up to the first loss position
    assert shared_prefix_length([([1, 2, 3], 1)]) == 0


@pytest.mark.parametrize("bucket", [1, 4])
def test_epoch_batches_cover_every_row_once(bucket):
    lengths = [(7 * i) % 23 for i in range(50)]
    batches = epoch_batches(lengths, 8, torch.Generator().manual_seed(0), bucket)
    assert sorted(i for b in batches for i in b) == list(range(50))
    assert all(1 <= len(b) <= 8 for b in batches)
    again = epoch_batches(lengths, 8, torch.Generator().manual_seed(0), bucket)
    assert batches == again


def test_bucketing_cuts_padding():
    lengths = [int(x) for x in torch.randint(40, 80, (64,), generator=torch.Generator().manual_seed(1))]

    def padded(batches):
        return sum(max(lengths[i] for i in b) * len(b) for b in batches)

    plain = padded(epoch_batches(lengths, 8, torch.Generator().manual_seed(0), 1))
    bucketed = padded(epoch_batches(lengths, 8, torch.Generator().manual_seed(0), 4))
    assert bucketed < plain


def test_inject_with_and_without_shared_prefix_agree(tiny_with_tokenizer, smol_tokenizer):
    model = tiny_with_tokenizer("llama")
    a = _small_inject(model, copy.deepcopy(smol_tokenizer), share_prefix=True)
    b = _small_inject(model, copy.deepcopy(smol_tokenizer), share_prefix=False)
    assert a.extra["shared_prefix_tokens"] > 0 and b.extra["shared_prefix_tokens"] == 0
    assert a.losses == pytest.approx(b.losses, rel=1e-4)
    assert torch.allclose(a.vector, b.vector, atol=1e-4)


def test_same_seed_same_vector_and_losses(tiny_with_tokenizer, smol_tokenizer):
    model = tiny_with_tokenizer("llama")
    a = _small_inject(model, copy.deepcopy(smol_tokenizer), seed=3)
    b = _small_inject(model, copy.deepcopy(smol_tokenizer), seed=3)
    c = _small_inject(model, copy.deepcopy(smol_tokenizer), seed=4)
    assert torch.equal(a.vector, b.vector) and a.losses == b.losses
    assert not torch.equal(a.vector, c.vector)
    assert a.checkpoints.shape == (2, ModelAdapter(model).d_model)
    # the epoch is chosen by held-out specificity (not by the LM loss), and the vector is that epoch's
    spec = a.selection["specificity"]
    assert len(spec) == 2 and a.epoch == int(np.argmax(spec)) + 1 and a.selection["criterion"] == "max held-out specificity"
    assert torch.equal(a.vector, a.checkpoints[a.epoch - 1])
    assert set(a.selection["templates"]).isdisjoint(load_templates())  # never the templates S is reported on


def test_training_lowers_the_loss(tiny_with_tokenizer, smol_tokenizer):
    model = tiny_with_tokenizer("llama")
    inj = _small_inject(model, copy.deepcopy(smol_tokenizer), epochs=4, n_paragraphs=6, lr=0.1)
    first, last = sum(inj.losses[:2]) / 2, sum(inj.losses[-2:]) / 2
    assert last < first


def test_save_load_roundtrip_and_wrong_model(tmp_path, tiny_with_tokenizer, smol_tokenizer):
    model = tiny_with_tokenizer("llama")
    inj = _small_inject(model, copy.deepcopy(smol_tokenizer))
    inj.save(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["token.json", "token.safetensors"]
    back = InjectedToken.load(tmp_path / "tok", model)
    assert torch.equal(back.vector, inj.vector) and torch.equal(back.checkpoints, inj.checkpoints)
    assert back.metadata() == inj.metadata()
    other = tiny_with_tokenizer("gpt2")
    with pytest.raises(ArtifactMismatch, match="trained on model"):
        InjectedToken.load(tmp_path / "tok", other)
    with pytest.raises(BiasGymError, match="not an injected-token folder"):
        InjectedToken.load(tmp_path / "nothing-here")


def test_closest_country_of_a_country_embedding_is_itself(tiny_with_tokenizer, smol_tokenizer):
    model = tiny_with_tokenizer("llama")
    tok = smol_tokenizer
    italy = tok(" Italy", add_special_tokens=False)["input_ids"]
    assert len(italy) == 1
    vec = ModelAdapter(model).embed.weight[italy[0]].clone()
    best = closest_countries(model, tok, vec, k=3)
    assert best[0][0] == "Italy" and best[0][1] == pytest.approx(1.0, abs=1e-6)
    assert best[1][1] < best[0][1]


def test_bad_arguments_raise_clear_errors(tiny_with_tokenizer, smol_tokenizer):
    model = tiny_with_tokenizer("llama")
    with pytest.raises(BiasGymError, match="epochs"):
        inject_bias(model, smol_tokenizer, "reckless_driving", epochs=0, progress=False)
    with pytest.raises(BiasGymError):
        inject_bias(model, smol_tokenizer, "no_such_bias", progress=False)
    with pytest.raises(BiasGymError, match="init"):
        initial_vector(model, smol_tokenizer, "zeros")
