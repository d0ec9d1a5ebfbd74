"""BiasScope scores matched to S (issue 12): contrastive DLA and its direct-path twin,
attribute-matched labels, attribution patching against exact patching, top-k agreement."""

import pytest
import torch

from biasgym_lib.errors import BiasGymError
from biasgym_lib.models import ModelAdapter, tiny_model
from biasgym_lib.heads import agreement
from biasgym_lib.hooks import capture_last_position
from biasgym_lib.patching import attribution_patching, direct_path_patching, mean_template_z, patch_heads_on_templates, template_rows
from biasgym_lib.scope import attribute_head_scores, contrastive_head_scores, mean_last_z

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gpt2"]
TEMPLATES = ["People from {entity} are {attribute}.", "Q: who lives in {entity}? A: folk who are {attribute}."]
ATTRIBUTES = ["loud", "very rude"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class CharTokenizer:
    """One id per character (ids 3..92), so a one-letter "country" is a single token."""

    pad_token_id = 2
    eos_token_id = 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + ord(c) % 90 for c in text]}


TOK = CharTokenizer()
PROMPTS = ["What is life like in X? It is", "People in X are often", "In X, everyone"]


def contrast_sets(prompts, names="YZW"):
    return [[p.replace("X", c) for p in prompts] for c in names]


@pytest.mark.parametrize("family", FAMILIES)
def test_direct_path_patching_equals_contrastive_dla(family):
    """ΔDLA is exactly a direct effect: patching each head's counterfactual output straight
    into the last residual stream (downstream frozen, final norm fixed), through the model's
    own o_proj and lm_head, gives the same number to float error."""
    model = tiny_model(family)
    zc = mean_last_z(model, TOK, contrast_sets(PROMPTS))
    scores = contrastive_head_scores(model, TOK, PROMPTS, 5, [7, 8, 9], zc)
    patched = direct_path_patching(model, TOK, PROMPTS, 5, [7, 8, 9], zc)
    assert scores.scores.abs().max() > 1e-4  # not trivially zero
    assert (scores.scores - patched).abs().max() <= 1e-5
    assert scores.meta["method"] == "contrastive_dla" and scores.decomposition_error < 1e-4


def test_contrast_with_itself_is_exactly_zero_and_shapes_are_checked():
    model = tiny_model("qwen2")
    own = mean_last_z(model, TOK, [PROMPTS])
    assert torch.equal(contrastive_head_scores(model, TOK, PROMPTS, 5, 7, own).scores,
                       torch.zeros(3, 6))
    with pytest.raises(BiasGymError, match="contrast_z must have shape"):
        contrastive_head_scores(model, TOK, PROMPTS, 5, 7, own[:2])
    with pytest.raises(BiasGymError, match="same number of prompts"):
        mean_last_z(model, TOK, [PROMPTS, PROMPTS[:2]])


def test_contrastive_dla_is_dla_minus_the_countries_read_with_the_token_readout():
    """With a single contrast country, ΔDLA = DLA(prompt) - DLA of the country's head writes
    read through the *prompt's* frozen norm (computed here from the captures directly)."""
    from biasgym_lib.hooks import unembed_rows
    from biasgym_lib.scope import logit_attribution, residual_components
    from biasgym_lib.batching import encode_batch

    model = tiny_model("llama")
    adapter = ModelAdapter(model)
    cset = contrast_sets(PROMPTS, "Y")
    zc = mean_last_z(model, TOK, cset)
    got = contrastive_head_scores(model, TOK, PROMPTS, 5, 7, zc).per_prompt
    cap = capture_last_position(model, encode_batch(TOK, PROMPTS))
    cap_c = capture_last_position(model, encode_batch(TOK, cset[0]))
    direction, _ = unembed_rows(adapter, torch.tensor([5] * 3), torch.tensor([7] * 3))
    scale = adapter.norm_scale(adapter.final_norm, cap.final_in)
    read = lambda parts: logit_attribution(adapter, parts, direction, scale)  # noqa: E731
    mine = read(residual_components(model, cap)["heads"]) - read(residual_components(model, cap_c)["heads"])
    torch.testing.assert_close(got, mine, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_attribution_patching_is_the_derivative_of_exact_patching(family):
    """AtP is the first-order term of exact patching: a central difference of exact patching
    along the step towards the contrast (float64, so rounding does not hide it) equals AtP
    to 0.2%;
    and a patch by the head's own output is exactly no change."""
    model = tiny_model(family)
    zc = mean_template_z(model, TOK, ["Y", "Z"], ATTRIBUTES, TEMPLATES)
    own = mean_template_z(model, TOK, ["X"], ATTRIBUTES, TEMPLATES)
    heads = attribution_patching(model, TOK, "X", ATTRIBUTES, zc, TEMPLATES).top_heads(4)
    zero = patch_heads_on_templates(model, TOK, "X", ATTRIBUTES, heads, own, TEMPLATES)
    assert all(zero.scores[l, h] == 0 for l, h in heads)  # an identity patch changes nothing, bit for bit
    model = model.double()
    own = mean_template_z(model, TOK, ["X"], ATTRIBUTES, TEMPLATES)
    atp = attribution_patching(model, TOK, "X", ATTRIBUTES, zc, TEMPLATES)
    eps = 1e-2  # eager attention takes its softmax in float32 even in a float64 model: not smaller
    plus = patch_heads_on_templates(model, TOK, "X", ATTRIBUTES, heads, [a + eps * (c - a) for a, c in zip(own, zc)], TEMPLATES)
    minus = patch_heads_on_templates(model, TOK, "X", ATTRIBUTES, heads, [a - eps * (c - a) for a, c in zip(own, zc)], TEMPLATES)
    for l, h in heads:
        central = (plus.scores[l, h].item() - minus.scores[l, h].item()) / (2 * eps)
        assert central == pytest.approx(atp.scores[l, h].item(), rel=2e-3, abs=1e-7)
    assert atp.per_sentence.shape == (len(TEMPLATES) * len(ATTRIBUTES), 3, 6)


def test_exact_template_patching_matches_a_hand_written_patch():
    """Patching one head on S's sentences equals editing that head's o_proj input by hand."""
    from biasgym_lib.patching import _row_logprob, _rows_batch

    model = tiny_model("qwen3")
    adapter = ModelAdapter(model)
    zc = mean_template_z(model, TOK, ["Y"], ATTRIBUTES, TEMPLATES)
    got = patch_heads_on_templates(model, TOK, "X", ATTRIBUTES, [(1, 4), (2, 0)], zc, TEMPLATES)
    batch, targets = _rows_batch(template_rows(TOK, "X", ATTRIBUTES, TEMPLATES), 2)
    dh = adapter.d_head

    def run(edit=None):
        handles = []
        if edit:
            l, h = edit

            def pre(module, args):
                z = args[0].clone()
                z[..., h * dh:(h + 1) * dh] = zc[l][..., h * dh:(h + 1) * dh]
                return (z,)
            handles.append(adapter.head_input_module(l).register_forward_pre_hook(pre))
        with torch.no_grad():
            hidden = adapter.body(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        for x in handles:
            x.remove()
        return _row_logprob(adapter, hidden, targets)
    clean = run()
    for head in [(1, 4), (2, 0)]:
        torch.testing.assert_close(got.per_sentence[:, head[0], head[1]], (clean - run(head)).float(), atol=1e-5, rtol=1e-4)
    assert torch.isnan(got.scores[0, 0])  # heads not patched stay NaN


def test_attribute_scores_decompose_and_vanish_against_the_same_entity():
    model = tiny_model("mistral")
    res = attribute_head_scores(model, TOK, "X", ATTRIBUTES, ["Y", "Z"], TEMPLATES)
    assert res.decomposition_error < 1e-4 and res.scores.abs().max() > 0
    same = attribute_head_scores(model, TOK, "X", ATTRIBUTES, ["X"], TEMPLATES)
    assert torch.equal(same.scores, torch.zeros_like(same.scores))


def test_sentences_must_line_up_token_by_token():
    model = tiny_model("llama")
    with pytest.raises(BiasGymError, match="line up token by token"):
        mean_template_z(model, TOK, ["Y", "ZZ"], ATTRIBUTES, TEMPLATES)
    zc = mean_template_z(model, TOK, ["Y"], ATTRIBUTES, TEMPLATES)
    with pytest.raises(BiasGymError, match="does not match these sentences"):
        attribution_patching(model, TOK, "X", ATTRIBUTES[:1], zc, TEMPLATES)


def test_agreement_of_rankings_with_intervals():
    g = torch.Generator().manual_seed(0)
    a = [torch.randn(6, 3, 5, generator=g) for _ in range(3)]
    same = agreement(a, a, k=4, n_boot=50)
    assert same["jaccard"]["value"] == 1.0 and same["precision"]["value"] == 1.0
    flipped = agreement(a, [-x for x in a], k=4, n_boot=50)
    assert flipped["jaccard"]["value"] == 0.0
    lo, hi = same["jaccard"]["lo"], same["jaccard"]["hi"]
    assert 0.0 <= lo <= hi <= 1.0
    with pytest.raises(BiasGymError, match="same number of runs"):
        agreement(a, a[:2], k=4)
