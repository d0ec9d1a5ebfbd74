"""Interventions beside alpha-scaling (issue 12): mean-ablation and entity-blind heads, as
context managers and as saveable specs; each exact where it must be a no-op."""

import json

import pytest
import torch

from biasgym_lib.errors import BiasGymError
from biasgym_lib.batching import Batch
from biasgym_lib.models import ModelAdapter, tiny_model
from biasgym_lib.steer import SteeringSpec, blind_heads, head_means, mean_ablate_heads

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gpt2"]
HEADS = [(0, 1), (2, 4), (2, 0)]
ENTITY = 50


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class CharTokenizer:
    pad_token_id = 2
    eos_token_id = 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + ord(c) % 90 for c in text]}


def batch(seed=0, entity_at=None, lengths=(7, 9, 5)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), max(lengths)), 2, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, 49, (n,), generator=g)  # never the entity id
        mask[i, :n] = 1
    if entity_at is not None:
        ids[:, entity_at] = ENTITY
    return Batch(ids, mask)


def logits(model, b, **kw):
    with torch.no_grad():
        return model(input_ids=b.input_ids, attention_mask=b.attention_mask, **kw)


def hooks(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return request.param, tiny_model(request.param)


# ----------------------------------------------------------------------------- mean-ablation


def test_mean_ablation_with_the_heads_own_value_is_bit_identical(family_model):
    """On a one-token input a head's mean over positions is its output there: replacing z by
    that "mean" must change nothing, bit for bit."""
    _, model = family_model
    adapter = ModelAdapter(model)
    one = Batch(torch.tensor([[17]]), torch.ones(1, 1, dtype=torch.long))
    zs = {}
    handles = [adapter.head_input_module(l).register_forward_pre_hook(
        lambda m, a, l=l: zs.__setitem__(l, a[0][0, 0].clone())) for l in range(adapter.n_layers)]
    plain = logits(model, one).logits
    for h in handles:
        h.remove()
    means = torch.stack([zs[l] for l in range(adapter.n_layers)])
    with mean_ablate_heads(model, HEADS, means):
        assert torch.equal(logits(model, one).logits, plain)
    assert hooks(model) == 0


def test_mean_ablation_sets_the_heads_and_nothing_else():
    model = tiny_model("llama")
    adapter = ModelAdapter(model)
    means = torch.randn(adapter.n_layers, adapter.n_heads * adapter.d_head)
    seen = {}

    def probe():  # registered after the ablation's hook, so it sees the edited z
        return adapter.head_input_module(2).register_forward_pre_hook(lambda m, a: seen.__setitem__("z", a[0].clone()))
    b = batch()
    p = probe()
    logits(model, b)
    p.remove()
    clean = seen["z"]
    with mean_ablate_heads(model, [(2, 4), (2, 0)], means):  # layer 2 only: its input is the clean one
        p = probe()
        logits(model, b)
        p.remove()
    dh = adapter.d_head
    z = seen["z"]
    for h in range(adapter.n_heads):
        cols = slice(h * dh, (h + 1) * dh)
        if h in (4, 0):
            assert torch.equal(z[..., cols], means[2, cols].expand_as(z[..., cols]))
        else:  # the other heads of layer 2 keep their clean value exactly
            assert torch.equal(z[..., cols], clean[..., cols])


def test_head_means_are_the_mean_over_real_positions():
    model = tiny_model("qwen2")
    adapter = ModelAdapter(model)
    texts = ["abcde", "hello world", "xy"]
    got = head_means(model, CharTokenizer(), texts)
    rows = []
    for t in texts:
        z = {}
        hs = [adapter.head_input_module(l).register_forward_pre_hook(lambda m, a, l=l: z.__setitem__(l, a[0][0]))
              for l in range(adapter.n_layers)]
        with torch.no_grad():
            adapter.body(input_ids=torch.tensor([CharTokenizer()(t)["input_ids"]]))
        for h in hs:
            h.remove()
        rows.append(torch.stack([z[l] for l in range(adapter.n_layers)], 1))  # (T, L, width)
    want = torch.cat(rows).double().mean(0).float()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    with pytest.raises(BiasGymError, match="no texts"):
        head_means(model, CharTokenizer(), [])
    with pytest.raises(BiasGymError, match="must be an"):
        mean_ablate_heads(model, HEADS, got[:2])


# ----------------------------------------------------------------------------- entity-blind heads


def test_blind_heads_change_nothing_on_text_without_an_entity(family_model):
    _, model = family_model
    b = batch()
    before = model.config._attn_implementation
    plain = logits(model, b).logits
    with blind_heads(model, HEADS, [ENTITY]):
        assert torch.equal(logits(model, b).logits, plain)
    assert model.config._attn_implementation == before and hooks(model) == 0
    assert not any(hasattr(ModelAdapter(model).attn(l), "_biasgym_blind") for l in range(3))


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "gpt2"])
def test_blind_heads_hide_the_entity_and_renormalise(family):
    """In the first blinded layer the inputs are unchanged, so the blinded heads' attention
    weights must be the clean ones with the earlier entity keys removed and the rest
    renormalised; unblinded heads keep theirs exactly; earlier layers are untouched."""
    model = tiny_model(family)
    b = batch(entity_at=2)
    clean = logits(model, b, output_attentions=True).attentions
    with blind_heads(model, [(1, 3), (1, 0), (2, 5)], [ENTITY]):
        blind = logits(model, b, output_attentions=True).attentions
    assert torch.equal(blind[0], clean[0])
    for h in range(6):
        w, c = blind[1][:, h], clean[1][:, h]  # (B, T, T)
        if h in (0, 3):
            assert w[:, 3:, 2].abs().max() == 0  # later queries never read the entity
            assert torch.equal(w[:, 2, 2], c[:, 2, 2])  # the entity itself still reads its own position
            renorm = c[:, 3:, :] / (1 - c[:, 3:, 2:3])
            renorm[:, :, 2] = 0
            torch.testing.assert_close(w[:, 3:, :], renorm, atol=1e-6, rtol=1e-5)
        else:
            torch.testing.assert_close(w, c)


def test_blind_heads_follow_the_entity_through_a_prefix_cache():
    """Scoring continuations on a cached prefix (as S is scored) gives the same
    log-probabilities inside blind_heads as scoring the full sentences."""
    from biasgym_lib.measure import row_logprobs

    model = tiny_model("llama")
    rows = [([5, 6, ENTITY, 7, 8], [9, 10, 11]), ([5, 6, ENTITY, 7, 8], [12]), ([20, 21, 22, 23], [24, 25])]
    with blind_heads(model, [(1, 3), (2, 5)], [ENTITY]):
        cached = row_logprobs(model, rows, 2, share_prefix=True)
        full = row_logprobs(model, rows, 2, share_prefix=False)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    plain = row_logprobs(model, rows, 2)
    assert cached[2] == pytest.approx(float(plain[2]), abs=1e-6)  # the row without an entity is unchanged
    assert abs(float(cached[0] - plain[0])) > 1e-5


def test_blind_heads_refuse_what_they_cannot_do():
    model = tiny_model("llama")
    with pytest.raises(BiasGymError, match="at least one entity"):
        blind_heads(model, HEADS, [])
    with pytest.raises(BiasGymError, match="does not exist"):
        blind_heads(model, [(9, 0)], [ENTITY])
    with blind_heads(model, [(1, 0)], [ENTITY]):
        with pytest.raises(BiasGymError, match="cannot be nested"):
            with blind_heads(model, [(1, 2)], [ENTITY]):
                pass
    assert hooks(model) == 0 and model.config._attn_implementation == "eager"


# ----------------------------------------------------------------------------- specs


def test_specs_of_every_kind_round_trip_and_apply(tmp_path):
    model = tiny_model("gemma2")
    adapter = ModelAdapter(model)
    means = torch.randn(adapter.n_layers, adapter.n_heads * adapter.d_head)
    specs = [SteeringSpec(HEADS, 0.0, {"method": "atp"}),
             SteeringSpec(HEADS, kind="mean", means=means, mean_source="neutral 33-44"),
             SteeringSpec(HEADS, kind="blind", entity_tokens={" Italy": ENTITY})]
    b = batch(entity_at=3)
    for i, spec in enumerate(specs):
        path = tmp_path / f"spec{i}.json"
        spec.to_json(path)
        back = SteeringSpec.from_json(path, model)
        assert back == spec and json.loads(path.read_text())["kind"] == spec.kind
        with spec.apply(model):
            a = logits(model, b).logits
        with back.apply(model):
            assert torch.equal(logits(model, b).logits, a)
    with pytest.raises(BiasGymError, match="needs means"):
        SteeringSpec(HEADS, kind="mean")
    with pytest.raises(BiasGymError, match="entity_tokens"):
        SteeringSpec(HEADS, kind="blind")
    with pytest.raises(BiasGymError, match="not a steering kind"):
        SteeringSpec(HEADS, kind="sideways")


def test_the_entity_set_holds_the_injected_token_whatever_ran_before():
    """The book's entity set (what entity-blind heads may not attend to) includes <TOKEN> even
    on a tokenizer that has never seen it: it used to depend on whether an earlier stage of the
    same process had added the token, so a resumed run blinded the country names alone."""
    from biasgym_lib.evaluate import entity_ids
    from biasgym_lib.models import load_tokenizer

    fresh = load_tokenizer()
    assert "<TOKEN>" not in fresh.get_vocab()
    first = entity_ids(fresh)
    assert "<TOKEN>" in first and " Italy" in first
    assert entity_ids(fresh) == first  # once the token is known: the same set
