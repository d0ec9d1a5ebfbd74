"""Steering heads: exact scaling, exact restoration, specs as data, baselines."""

import copy
import json

import pytest
import torch

from biasgym_lib.errors import BiasGymError
from biasgym_lib.batching import Batch
from biasgym_lib.models import ModelAdapter, tiny_model
from biasgym_lib.heads import attention_heads, attention_to_entity, random_heads
from biasgym_lib.steer import SteeringSpec, steer_heads

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gpt2"]
HEADS = [(0, 1), (2, 4), (2, 0)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine a thread pool makes each
    small matmul wait for a core (100x slower); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_batch(lengths=(6, 10, 4), vocab=97, seed=0, pad=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), max(lengths)), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, :n] = 1
    return Batch(ids, mask)


class CharTokenizer:
    pad_token_id = 2
    eos_token_id = 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + ord(c) % 90 for c in text]}


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


def scaled_copy(model, alphas):
    """Reference: a copy of the model whose W_O columns of each head are scaled by its alpha."""
    ref = copy.deepcopy(model)
    adapter = ModelAdapter(ref)
    dh = adapter.d_head
    with torch.no_grad():
        for (layer, head), a in alphas.items():
            adapter.head_write_weight(layer)[:, head * dh:(head + 1) * dh] *= a
    return ref


def hook_count(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return request.param, tiny_model(request.param)


def test_alpha_one_is_bit_identical(family_model):
    _, model = family_model
    batch = random_batch()
    before = logits(model, batch)
    with steer_heads(model, HEADS, alpha=1.0):
        assert hook_count(model) > 0
        steered = logits(model, batch)
    assert torch.equal(steered, before)


def test_alpha_zero_equals_zeroed_output_columns(family_model):
    _, model = family_model
    batch = random_batch()
    before = logits(model, batch)
    with steer_heads(model, HEADS, alpha=0.0):
        steered = logits(model, batch)
    want = logits(scaled_copy(model, {h: 0.0 for h in HEADS}), batch)
    torch.testing.assert_close(steered, want, atol=1e-5, rtol=1e-5)
    assert float((steered - before).abs().max()) > 1e-3  # removing heads does change the output


def test_exit_restores_exactly_even_after_an_exception(family_model):
    _, model = family_model
    batch = random_batch(seed=1)
    before, hooks = logits(model, batch), hook_count(model)
    with steer_heads(model, HEADS, alpha=0.0):
        pass
    assert hook_count(model) == hooks
    assert torch.equal(logits(model, batch), before)
    with pytest.raises(RuntimeError, match="boom"):
        with steer_heads(model, HEADS, alpha=-2.0):
            logits(model, batch)
            raise RuntimeError("boom")
    assert hook_count(model) == hooks
    assert torch.equal(logits(model, batch), before)


def test_per_head_alpha_and_nesting():
    model = tiny_model("gpt2")
    batch = random_batch(seed=2)
    alphas = {(0, 1): 0.5, (2, 4): 2.0, (1, 3): -1.0}
    with steer_heads(model, list(alphas), alpha=alphas):
        got = logits(model, batch)
    torch.testing.assert_close(got, logits(scaled_copy(model, alphas), batch), atol=1e-5, rtol=1e-5)
    # Nested contexts compose: 0.5 inside 0.5 is 0.25 (exact in binary), different heads add up.
    with steer_heads(model, [(1, 2)], alpha=0.25):
        single = logits(model, batch)
    with steer_heads(model, [(1, 2)], alpha=0.5), steer_heads(model, [(1, 2)], alpha=0.5):
        nested = logits(model, batch)
    torch.testing.assert_close(nested, single, atol=1e-6, rtol=1e-6)
    with steer_heads(model, [(0, 0)], alpha=0.0):
        with steer_heads(model, [(2, 2)], alpha=0.0):
            both = logits(model, batch)
        outer_only = logits(model, batch)
    torch.testing.assert_close(both, logits(scaled_copy(model, {(0, 0): 0.0, (2, 2): 0.0}), batch),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outer_only, logits(scaled_copy(model, {(0, 0): 0.0}), batch),
                               atol=1e-5, rtol=1e-5)
    assert hook_count(model) == 0


def test_bad_steering_arguments():
    model = tiny_model("llama")
    with pytest.raises(BiasGymError, match="does not exist"):
        steer_heads(model, [(3, 0)], 0.0)
    with pytest.raises(BiasGymError, match="does not exist"):
        steer_heads(model, [(0, 6)], 0.0)
    with pytest.raises(BiasGymError, match="duplicates"):
        steer_heads(model, [(0, 1), (0, 1)], 0.0)
    with pytest.raises(BiasGymError, match="missing"):
        steer_heads(model, [(0, 1), (0, 2)], {(0, 1): 0.0})
    with pytest.raises(BiasGymError, match="finite"):
        steer_heads(model, [(0, 1)], float("nan"))
    ctx = steer_heads(model, [(0, 1)], 0.0)
    with ctx:
        with pytest.raises(BiasGymError, match="already active"):
            ctx.__enter__()
    assert hook_count(model) == 0


def test_steering_spec_roundtrip_and_validation(tmp_path):
    model = tiny_model("qwen3")
    batch = random_batch(seed=3)
    spec = SteeringSpec(heads=HEADS, alpha=0.0, source={"bias": "blue_skin", "seeds": [0, 1, 2],
                                                          "method": "dla", "k": 3})
    path = tmp_path / "spec.json"
    spec.to_json(path)
    data = json.loads(path.read_text())
    assert data["heads"] == [list(h) for h in HEADS] and data["source"]["k"] == 3
    back = SteeringSpec.from_json(path, model=model)
    assert back == spec
    with back.apply(model):
        via_spec = logits(model, batch)
    with steer_heads(model, HEADS, 0.0):
        direct = logits(model, batch)
    assert torch.equal(via_spec, direct)

    per_head = SteeringSpec(heads=[(1, 1), (0, 5)], alpha={(1, 1): 0.5, (0, 5): 0.0})
    per_head.to_json(path)
    assert SteeringSpec.from_json(path) == per_head

    big = SteeringSpec(heads=[(29, 8)], alpha=0.0, source={"model": "another one"})
    big.to_json(path)
    with pytest.raises(BiasGymError, match="does not exist"):
        SteeringSpec.from_json(path, model=model)
    with pytest.raises(BiasGymError, match="does not exist"):
        SteeringSpec.from_json(path).apply(model)
    path.write_text('{"heads": []}')
    with pytest.raises(BiasGymError, match="not a steering spec"):
        SteeringSpec.from_json(path)


def test_random_heads():
    a = random_heads(30, 9, 10, seed=0)
    assert a == random_heads(30, 9, 10, seed=0)
    assert a != random_heads(30, 9, 10, seed=1)
    assert len(set(a)) == 10 and a == sorted(a)
    assert all(0 <= l < 30 and 0 <= h < 9 for l, h in a)
    assert len(random_heads(2, 3, 6, seed=5)) == 6
    with pytest.raises(BiasGymError):
        random_heads(2, 3, 7, seed=0)


def test_attention_heads_baseline_and_restores_attention_implementation():
    model = tiny_model("llama")
    model.set_attn_implementation("sdpa")
    tok = CharTokenizer()
    entity = tok("Z")["input_ids"][0]
    prompts = ["Z is nice", "people of Z are", "hello Z"]
    from biasgym_lib.batching import encode_batch
    batch = encode_batch(tok, prompts)
    mean = attention_to_entity(model, None, batch, entity)
    assert model.config._attn_implementation == "sdpa"
    # Reference: eager attention weights read directly.
    model.set_attn_implementation("eager")
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_attentions=True)
    model.set_attn_implementation("sdpa")
    ref = torch.zeros(3, 6)
    for l, a in enumerate(out.attentions):
        for i, last in enumerate(batch.last_index.tolist()):
            pos = (batch.input_ids[i] == entity).nonzero().flatten()
            ref[l] += a[i, :, last, pos].sum(-1) / 3
    torch.testing.assert_close(mean, ref, atol=1e-6, rtol=1e-5)
    top = attention_heads(model, tok, prompts, entity, k=4, batch_size=2)
    order = ref.flatten().argsort(descending=True)[:4].tolist()
    assert top == [(i // 6, i % 6) for i in order]
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(BiasGymError, match="does not contain the entity"):
        attention_heads(model, tok, ["no entity here"], entity, k=2)
