"""BiasScope head scoring: exact direct logit attribution, activation patching, head sets."""

import copy

import pytest
import torch

from biasgym_lib.errors import BiasGymError
from biasgym_lib.batching import Batch
from biasgym_lib.models import ModelAdapter, tiny_model
from biasgym_lib.heads import overlap, robust_heads, spearman, top_k_heads
from biasgym_lib.hooks import capture_last_position, last_logit_diff
from biasgym_lib.patching import ablation_loop_scores, patch_heads
from biasgym_lib.scope import head_scores, HeadScores, residual_components

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gpt2"]
LENGTHS = [5, 11, 3, 8]  # different lengths: the batch is padded
BIASED = [5, 17, 40, 63]
ADV = [9, 23, 41, 70]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine a thread pool makes each
    small matmul wait for a core (100x slower); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_batch(lengths, vocab=97, seed=0, pad=2):
    """Right-padded random prompts (ids 3..vocab-1) of the given lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), max(lengths)), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, :n] = 1
    return Batch(ids, mask)


class CharTokenizer:
    """Stand-in for a tokenizer (tiny models have none): one id per character."""

    pad_token_id = 2
    eos_token_id = 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + ord(c) % 90 for c in text]}


def model_logits_at_last(model, batch):
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return out[torch.arange(len(out)), batch.last_index]


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return request.param, tiny_model(request.param)


def test_dla_components_sum_to_logit_difference(family_model):
    """The core exactness check (METHOD §3): embeddings + every head + biases + MLPs + norm
    bias == the model's own (pre-softcap) logit difference, on a padded batch."""
    family, model = family_model
    batch = random_batch(LENGTHS)
    assert (batch.attention_mask == 0).any()
    hs = head_scores(model, None, batch, BIASED, ADV)

    adapter = ModelAdapter(model)
    L, H = adapter.n_layers, adapter.n_heads
    assert hs.scores.shape == (L, H) and hs.per_prompt.shape == (len(LENGTHS), L, H)
    assert set(hs.components) >= {"embed", "heads", "norm_bias"} | {f"mlp.{l}" for l in range(L)} \
        | {f"attn_bias.{l}" for l in range(L)}

    # The logit difference is the model's own, before soft-capping (Gemma 2 has a cap of 30).
    logits = model_logits_at_last(model, batch)
    rows = torch.arange(len(LENGTHS))
    cap = adapter.logit_softcap
    if family == "gemma2":
        assert cap == 30.0
    # Recover each label's pre-softcap logit from the model's final hidden state and check that
    # the cap maps it onto the model's logits; their difference is what DLA decomposes.
    hidden = adapter.body(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    pre = adapter.lm_head(hidden[rows, batch.last_index])
    capped = pre if cap is None else cap * torch.tanh(pre / cap)
    torch.testing.assert_close(capped, logits, atol=1e-5, rtol=1e-5)
    expected = pre[rows, BIASED] - pre[rows, ADV]
    torch.testing.assert_close(hs.logit_diff, expected, atol=1e-5, rtol=1e-5)

    total = torch.stack(list(hs.components.values())).sum(0)
    rel = float((total - expected).abs().max() / expected.abs().max())
    assert rel < 1e-4, f"{family}: components miss the logit difference by {rel:.2e} (relative)"
    assert hs.decomposition_error < 1e-4
    # Heads really are a large part of it (so the check is not passing on embeddings alone).
    torch.testing.assert_close(hs.components["heads"], hs.per_prompt.sum((1, 2)))
    assert float(hs.components["heads"].abs().max()) > 1e-3


def test_head_writes_sum_to_attention_write(family_model):
    """Each layer's head writes (+ o_proj bias) add up to what attention adds to the residual:
    fails if heads were sliced from the output of o_proj instead of its input."""
    family, model = family_model
    batch = random_batch(LENGTHS, seed=1)
    cap = capture_last_position(model, batch)
    parts = residual_components(model, cap)
    L = ModelAdapter(model).n_layers
    for layer in range(L):
        summed = parts["heads"][:, layer].sum(1) + parts["attn_bias"][:, layer]
        torch.testing.assert_close(summed, cap.attn_write[:, layer].float(), atol=1e-5, rtol=1e-4)
    residual = parts["embed"] + cap.attn_write.float().sum(1) + parts["mlp"].sum(1)
    torch.testing.assert_close(residual, cap.final_in.float(), atol=1e-5, rtol=1e-4)
    # Heads differ from one another (a wrong slicing that copied one head would not).
    assert not torch.allclose(parts["heads"][:, 0, 0], parts["heads"][:, 0, 1])


def test_scores_do_not_depend_on_padding_or_chunking():
    model = tiny_model("llama")
    batch = random_batch(LENGTHS, seed=2)
    together = head_scores(model, None, batch, BIASED, ADV)
    chunked = head_scores(model, None, batch, BIASED, ADV, batch_size=3)
    torch.testing.assert_close(chunked.per_prompt, together.per_prompt, atol=1e-5, rtol=1e-5)
    alone = head_scores(model, None, Batch(batch.input_ids[2:3, :3], batch.attention_mask[2:3, :3]),
                        BIASED[2], ADV[2])
    torch.testing.assert_close(alone.per_prompt[0], together.per_prompt[2], atol=1e-5, rtol=1e-5)


def test_head_scores_from_text_matches_batch_entry():
    model, tok = tiny_model("qwen2"), CharTokenizer()
    prompts = ["ab", "hello world", "xyz!?", "a longer prompt here"]
    hs = head_scores(model, tok, prompts, biased_ids=5, adv_ids=torch.tensor(9), batch_size=3)
    assert hs.prompts == prompts and hs.biased_ids == [5] * 4
    from biasgym_lib.batching import encode_batch
    ref = head_scores(model, None, encode_batch(tok, prompts), 5, 9)
    torch.testing.assert_close(hs.per_prompt, ref.per_prompt, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hs.scores, ref.per_prompt.mean(0), atol=1e-5, rtol=1e-5)
    assert hs.decomposition_error < 1e-4


def test_head_scores_json_roundtrip_and_rankings(tmp_path):
    model = tiny_model("gpt2")
    hs = head_scores(model, None, random_batch(LENGTHS), BIASED, ADV)
    hs.prompts = list("abcd")
    path = tmp_path / "scores.json"
    hs.to_json(path)
    assert path.read_text().startswith("{")  # plain JSON
    back = HeadScores.from_json(path)
    torch.testing.assert_close(back.scores, hs.scores)
    torch.testing.assert_close(back.per_prompt, hs.per_prompt)
    assert back.components.keys() == hs.components.keys() and back.prompts == list("abcd")
    assert back.top_heads(5) == hs.top_heads(5)
    path.write_text('{"format": "something else"}')
    with pytest.raises(BiasGymError):
        HeadScores.from_json(path)


def test_top_heads_and_share():
    scores = torch.tensor([[1.0, -2.0, 3.0], [0.5, 6.0, float("nan")]])
    assert top_k_heads(scores, 3) == [(1, 1), (0, 2), (0, 0)]
    assert top_k_heads(scores, 6)[-1] == (1, 2)  # NaN last
    hs = HeadScores(scores=torch.tensor([[1.0, -2.0, 3.0], [0.0, 6.0, 0.0]]), per_prompt=torch.zeros(1, 2, 3),
                    logit_diff=torch.zeros(1), components={}, decomposition_error=0.0, prompts=None,
                    biased_ids=[1], adv_ids=[2])
    assert hs.share_top_k(1) == pytest.approx(6 / 10)
    assert hs.share_top_k(2) == pytest.approx(9 / 10)
    with pytest.raises(BiasGymError):
        top_k_heads(scores, 7)


def test_robust_heads_overlap_spearman():
    a = torch.tensor([[5.0, 1.0], [4.0, 0.0]])
    b = torch.tensor([[5.0, 4.5], [1.0, 0.0]])
    c = torch.tensor([[0.0, 4.0], [5.0, 1.0]])
    # top-2: a {(0,0),(1,0)}, b {(0,0),(0,1)}, c {(1,0),(0,1)}
    assert robust_heads([a, b, c], k=2, m=2) == [(0, 0), (1, 0), (0, 1)]
    assert robust_heads([a, b, c], k=1, m=2) == [(0, 0)]
    assert robust_heads([a, b, c], k=2, m=3) == []
    with pytest.raises(BiasGymError):
        robust_heads([a], k=1, m=2)
    assert overlap([(0, 0), (1, 0)], [(0, 0), (0, 1)]) == pytest.approx(1 / 3)
    assert overlap([], []) == 1.0 and overlap([(0, 0)], [(1, 1)]) == 0.0
    assert spearman(a, a * 3 + 1) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    nan = a.clone()
    nan[1, 1] = float("nan")
    assert spearman(nan, a) == pytest.approx(1.0)


def _manual_patch(model, batch, cf_batch, layer, head, biased, adv):
    """Reference: capture z[layer] on the counterfactual, splice head's slice into the clean run."""
    adapter = ModelAdapter(model)
    proj, dh = adapter.head_input_module(layer), adapter.d_head
    store = {}
    h1 = proj.register_forward_pre_hook(lambda m, args: store.__setitem__("z", args[0].clone()))
    model(input_ids=cf_batch.input_ids, attention_mask=cf_batch.attention_mask)
    h1.remove()

    def splice(m, args):
        z = args[0].clone()
        z[..., head * dh:(head + 1) * dh] = store["z"][..., head * dh:(head + 1) * dh]
        return (z,)
    rows = torch.arange(len(biased))
    clean = model_logits_at_last(model, batch)
    h2 = proj.register_forward_pre_hook(splice)
    patched = model_logits_at_last(model, batch)
    h2.remove()
    diff = lambda lg: lg[rows, biased] - lg[rows, adv]  # noqa: E731
    return float((diff(clean) - diff(patched)).mean())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_patching_matches_manual_hook(family):
    model = tiny_model(family)
    batch = random_batch(LENGTHS, seed=3)
    cf = Batch(batch.input_ids.clone(), batch.attention_mask.clone())
    cf.input_ids[:, 1] = (cf.input_ids[:, 1] + 7) % 90 + 3  # swap one token per prompt
    heads = [(0, 1), (1, 4), (2, 0), (2, 5)]
    got = patch_heads(model, None, batch, cf, BIASED, ADV, heads=heads, batch_size=9)
    for layer, head in heads:
        want = _manual_patch(model, batch, cf, layer, head, torch.tensor(BIASED), torch.tensor(ADV))
        assert got[layer, head].item() == pytest.approx(want, abs=1e-5)
    assert torch.isnan(got[0, 0]) and int((~torch.isnan(got)).sum()) == len(heads)
    assert float(got[~torch.isnan(got)].abs().max()) > 1e-4  # the swap matters somewhere
    # Different heads-per-forward settings agree.
    other = patch_heads(model, None, batch, cf, BIASED, ADV, heads=heads, batch_size=4)
    torch.testing.assert_close(other, got, atol=1e-5, rtol=1e-5, equal_nan=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_patching_replays_the_layers_below_a_patch_bit_for_bit(family):
    """Reusing the clean run's outputs for the layers below the patched ones is exact: the
    same drops, bit for bit, as running every layer; and the model's layers run normally
    afterwards (the replacement forward is removed)."""
    model = tiny_model(family)
    batch = random_batch(LENGTHS, seed=5)
    cf = Batch(batch.input_ids.clone(), batch.attention_mask.clone())
    cf.input_ids[:, 1] = (cf.input_ids[:, 1] + 7) % 90 + 3
    heads = [(2, 5), (0, 1), (1, 4), (2, 0), (1, 0)]  # unsorted: grouped layer by layer inside
    adapter = ModelAdapter(model)
    skipped_layers = []
    # at every run of the transformer body: how many layers have their forward replaced
    handle = adapter.body.register_forward_pre_hook(
        lambda module, args: skipped_layers.append(sum("forward" in vars(layer) for layer in adapter.layers)))
    try:
        fast = patch_heads(model, None, batch, cf, BIASED, ADV, heads=heads, batch_size=8)
        runs, skipped_layers[:] = list(skipped_layers), []
        slow = patch_heads(model, None, batch, cf, BIASED, ADV, heads=heads, batch_size=8, replay=False)
    finally:
        handle.remove()
    assert torch.equal(fast, slow) or torch.equal(torch.nan_to_num(fast, 7.0), torch.nan_to_num(slow, 7.0))
    assert max(runs) > 0 and skipped_layers and max(skipped_layers) == 0  # layers really were skipped
    assert not any("forward" in vars(layer) for layer in adapter.layers)
    with torch.no_grad():
        assert torch.equal(last_logit_diff(model, batch, BIASED, ADV),
                           last_logit_diff(tiny_model(family), batch, BIASED, ADV))


@pytest.mark.parametrize("family", ["qwen3", "gemma2"])
def test_patching_with_identical_counterfactual_is_exactly_zero(family):
    model = tiny_model(family)
    batch = random_batch(LENGTHS, seed=4)
    got = patch_heads(model, None, batch, batch, BIASED, ADV, batch_size=10)
    assert torch.equal(got, torch.zeros_like(got))


def test_patching_needs_aligned_pairs():
    model, tok = tiny_model("llama"), CharTokenizer()
    with pytest.raises(BiasGymError, match="same length|different lengths"):
        patch_heads(model, tok, ["abc", "hello"], ["abc", "hello!"], 5, 9)
    with pytest.raises(BiasGymError):
        patch_heads(model, tok, ["abc"], ["abc", "x"], 5, 9)
    drops = patch_heads(model, tok, ["abc", "hello"], ["abd", "jello"], 5, 9, heads=[(0, 0), (2, 3)])
    assert not torch.isnan(drops[0, 0]) and torch.isnan(drops[1, 1])


def test_ablation_loop_matches_zeroed_weights():
    model = tiny_model("qwen2")
    batch = random_batch(LENGTHS, seed=5)
    heads = [(0, 2), (2, 5)]
    got = ablation_loop_scores(model, None, batch, BIASED, ADV, heads=heads, batch_size=3)
    clean = last_logit_diff(model, batch, BIASED, ADV)
    for layer, head in heads:
        ablated_model = copy.deepcopy(model)
        adapter = ModelAdapter(ablated_model)
        dh = adapter.d_head
        with torch.no_grad():
            adapter.head_write_weight(layer)[:, head * dh:(head + 1) * dh] = 0
        want = float((clean - last_logit_diff(ablated_model, batch, BIASED, ADV)).mean())
        assert got[layer, head].item() == pytest.approx(want, abs=1e-5)
    assert int((~torch.isnan(got)).sum()) == 2


def test_bad_inputs_raise_clear_errors():
    model = tiny_model("llama")
    batch = random_batch(LENGTHS)
    with pytest.raises(BiasGymError, match="one id per prompt"):
        head_scores(model, None, batch, [1, 2], ADV)
    with pytest.raises(BiasGymError, match="vocabulary"):
        head_scores(model, None, batch, 10_000, ADV)
    left = Batch(batch.input_ids.flip(1), batch.attention_mask.flip(1))
    with pytest.raises(BiasGymError, match="right-padded"):
        head_scores(model, None, left, BIASED, ADV)
    with pytest.raises(BiasGymError, match="out of range"):
        patch_heads(model, None, batch, batch, BIASED, ADV, heads=[(3, 0)])
