"""Skipping what steering cannot change (issue 22): a steered measurement that starts at its
first edited layer equals the full forward pass, bit for bit, on a tiny model of every
supported family; a call the tape has not seen runs in full; misuse is refused."""

import copy

import pytest
import torch

from biasgym_lib.capability import mc_accuracy, perplexity
from biasgym_lib.data import Fact, load_bias
from biasgym_lib.data.capability import MCQuestion
from biasgym_lib.errors import BiasGymError
from biasgym_lib.evaluate import make_spec, strength_under
from biasgym_lib.inject import initial_vector
from biasgym_lib.layerskip import LayerTape
from biasgym_lib.models import ModelAdapter, tiny_model
from biasgym_lib.steer import SteeringSpec, head_means
from biasgym_lib.tokens import InjectedToken

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gpt2"]
REFS = ["Italy", "Japan", "Brazil"]
FACTS = [Fact("Italy", "demonym", "Italian"), Fact("Japan", "continent", "Asian"),
         Fact("Brazil", "language", "Portuguese")]
TEXTS = ["The kettle boiled and the tea was ready.", "Rain fell on the harbour all night long, and then it stopped.",
         "A short one."]
QUESTIONS = [MCQuestion("q1", "general", "What is the capital of France?", ("Paris", "Rome", "Lima", "Oslo"), 0),
             MCQuestion("q2", "general", "How many legs does a spider have?", ("six", "eight", "ten", "four"), 1),
             MCQuestion("q3", "general", "Which is a colour?", ("blue sky", "table", "run", "seven"), 0)]


def _token(model, tok, shift, seed):
    vec = initial_vector(model, tok) + shift
    return InjectedToken(token="<TOKEN>", vector=vec, bias="reckless_driving", seed=seed, epoch=1, lr=0.01,
                         epochs=1, init="countries", n_paragraphs=1, losses=[1.0], val_losses=[1.0],
                         checkpoints=vec[None], model={}, d_model=vec.numel())


@pytest.fixture(scope="module")
def tok(smol_tokenizer):
    return copy.deepcopy(smol_tokenizer)


def _measure(model, tok, spec, tokens, bias):
    s = strength_under(model, tok, spec, tokens, bias, REFS, FACTS)
    with spec.apply(model) if spec is not None else torch.no_grad():
        ppl = perplexity(model, tok, TEXTS, max_length=12)
        mc = mc_accuracy(model, tok, QUESTIONS)
    return {"S": s, "nll": ppl["nll"], "loglik": mc["loglik"]}


def _means(model, tok):
    return head_means(model, tok, TEXTS)


CASES = [(f, "zero") for f in FAMILIES] + [("llama", "mean"), ("llama", "blind"), ("gpt2", "blind")]


@pytest.mark.parametrize("family,kind", CASES)
def test_resumed_pass_equals_the_full_pass_bit_for_bit(family, kind, tok):
    model = tiny_model(family, vocab_size=49152)
    bias = load_bias("reckless_driving")
    tokens = [_token(model, tok, 0.02, 0), _token(model, tok, -0.03, 1)]
    from biasgym_lib.evaluate import entity_ids

    means, entities = _means(model, tok), entity_ids(tok)
    tape = LayerTape(model, starts=[1, 2])
    with tape.recording():
        before = _measure(model, tok, None, tokens, bias)
    assert tape.entries, "the recording kept nothing"
    for heads in ([(1, 0), (2, 3)], [(2, 1), (2, 5)]):
        spec = make_spec(heads, kind, means, entities)
        full = _measure(model, tok, spec, tokens, bias)
        hits = tape.hits
        with tape.resuming(spec.first_layer):
            fast = _measure(model, tok, spec, tokens, bias)
        assert fast == full  # every S, interval, fact, perplexity term and option log-likelihood
        assert tape.hits > hits and tape.misses == 0, (tape.hits, tape.misses)
        assert full != before  # the steering did change something
    # an unmodified pass resumed from the top recorded layer is the recorded one
    with tape.resuming(None):
        again = _measure(model, tok, None, tokens, bias)
    assert again == before


def test_unseen_inputs_run_in_full(tok):
    """Another <TOKEN> vector (the same ids, other embeddings) is not on the tape."""
    model = tiny_model("llama", vocab_size=49152)
    bias = load_bias("reckless_driving")
    a, b = _token(model, tok, 0.02, 0), _token(model, tok, 0.5, 1)
    tape = LayerTape(model, starts=[2])
    with tape.recording():
        strength_under(model, tok, None, [a], bias, REFS)
    spec = SteeringSpec([(2, 0)], 0.0)
    want = strength_under(model, tok, spec, [b], bias, REFS)
    with tape.resuming(2):
        got = strength_under(model, tok, spec, [b], bias, REFS)
    assert got == want
    assert tape.misses > 0 and tape.hits > 0  # the references were on the tape, the new vector's sentences not


def test_resuming_refuses_a_hook_below_the_start(tok):
    model = tiny_model("llama", vocab_size=49152)
    bias = load_bias("reckless_driving")
    tape = LayerTape(model, starts=[1, 2])
    with tape.recording():
        strength_under(model, tok, None, [], bias, REFS)
    low = SteeringSpec([(0, 1)], 0.0)
    with pytest.raises(BiasGymError, match="below the layer"), tape.resuming(2):
        strength_under(model, tok, low, [], bias, REFS)  # a spec at layer 0 under a pass resumed at 2
    with tape.resuming(low.first_layer):  # started where it should: from layer 0, i.e. the full pass
        strength_under(model, tok, low, [], bias, REFS)
    assert tape.start_for(0) == 0 and tape.start_for(1) == 1 and tape.start_for(5) == 2 and tape.start_for(None) == 2


def test_the_model_is_restored_and_blocks_do_not_nest(tok):
    model = tiny_model("llama", vocab_size=49152)
    layers = ModelAdapter(model).layers
    tape = LayerTape(model, starts=[1, 2])
    with tape.recording():
        assert all("forward" in vars(layers[j]) for j in range(2))
        with pytest.raises(BiasGymError, match="one block at a time"), tape.resuming(2):
            pass
    assert not any("forward" in vars(layer) for layer in layers)
    with pytest.raises(RuntimeError), tape.resuming(2):
        raise RuntimeError("boom")
    assert not any("forward" in vars(layer) for layer in layers)
    assert LayerTape(model, starts=[0, 3, 9]).starts == []  # 0 and layers past the top skip nothing


def test_transformers_capturing_hooks_do_not_stop_resuming(tok):
    """The first call that asks for hidden states leaves transformers' (inert) capturing hooks on
    every layer (the CI failure of stop 26: reproduce after scope refused to resume). Resumed
    passes still equal full ones, and a call that captures hidden states runs in full."""
    model = tiny_model("llama", vocab_size=49152)
    bias = load_bias("reckless_driving")
    ids = tok(["The weather in Italy is mild."], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        model(ids, output_hidden_states=True)  # installs the hooks
    layer0 = ModelAdapter(model).layers[0]
    assert layer0._forward_hooks, "this transformers installs no capturing hooks: the test tests nothing"
    tape = LayerTape(model, starts=[2])
    with tape.recording():
        strength_under(model, tok, None, [], bias, REFS)
        with torch.no_grad():
            model(ids)
    spec = SteeringSpec([(2, 0)], 0.0)
    want = strength_under(model, tok, spec, [], bias, REFS)
    with spec.apply(model), torch.no_grad():
        want_hidden = model(ids, output_hidden_states=True).hidden_states
    with tape.resuming(2):
        got = strength_under(model, tok, spec, [], bias, REFS)
        hits, misses = tape.hits, tape.misses
        with spec.apply(model), torch.no_grad():
            got_hidden = model(ids, output_hidden_states=True).hidden_states
    assert got == want and hits > 0
    assert tape.misses == misses + 1  # the capturing call ran in full
    assert all(torch.equal(a, b) for a, b in zip(got_hidden, want_hidden))
