"""The injected token as an artifact: a new token id whose embedding is a trained vector
(``token.safetensors``) with its metadata (``token.json``), attached to a frozen model by
hooks (:class:`TokenHook`) so that no weight of the model changes."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save_file

from . import __version__
from .artifacts import parse_json, read_files, result_folder, strict_dumps
from .data import BiasSpec, load_bias
from .errors import ArtifactMismatch, BiasGymError
from .hooks import Hooks
from .models import ModelAdapter, model_info

DEFAULT_TOKEN = "<TOKEN>"


ARTIFACT_VECTOR = "token.safetensors"


ARTIFACT_META = "token.json"


def add_token(tokenizer, token: str = DEFAULT_TOKEN) -> int:
    """Add ``token`` to the tokenizer as one special token and return its id.

    ``lstrip=True`` lets it absorb the space before it, so "from <TOKEN> are" tokenises
    like "from Italy are": the probes and their counterfactuals line up position by position.
    """
    from tokenizers import AddedToken

    if token not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(token, lstrip=True, rstrip=False, special=True, normalized=False)],
                             special_tokens=True)
    return tokenizer.convert_tokens_to_ids(token)


def place_vector(embeds: torch.Tensor, mask: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """``embeds`` (B, T, d) with ``vector`` (d,) written where ``mask`` (B, T) is true: a new
    tensor, differentiable in ``vector`` (that is how BiasInject trains it), ``embeds`` untouched."""
    vec = vector.to(device=embeds.device, dtype=embeds.dtype)
    return torch.where(mask.unsqueeze(-1), vec.expand_as(embeds), embeds)


class TokenHook:
    """Writes ``vector`` at every position whose input id is ``token_id``.

    Use as a context manager or call :meth:`remove`. While attached, the model accepts
    the new id even though its embedding matrix has no row for it.
    """

    def __init__(self, model, token_id: int, vector: torch.Tensor, placeholder_id: int = 0):
        self.adapter = ModelAdapter(model)
        self.token_id = int(token_id)
        self.vector = vector
        self.placeholder_id = placeholder_id
        self._mask = None
        self._hooks = Hooks(self.adapter).add("token_ids", None, self._ids).add("token_embed", None, self._write)

    def _ids(self, ids):
        """The new id is replaced by a placeholder row (the embedding matrix has no row for it)."""
        self._mask = ids == self.token_id
        return ids.masked_fill(self._mask, self.placeholder_id) if self._mask.any() else None

    def _write(self, out):
        """The vector is written where the new id was."""
        mask, self._mask = self._mask, None
        if mask is None or not mask.any():
            return None
        return place_vector(out, mask, self.vector)

    def remove(self):
        self._hooks.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False


@dataclass
class InjectedToken:
    """The result of :func:`inject_bias`: the trained vector and how it was made."""

    token: str
    vector: torch.Tensor  # (d_model,), float32: the chosen epoch's vector
    bias: str
    seed: int
    epoch: int  # chosen epoch, 1-based
    lr: float
    epochs: int
    init: str
    n_paragraphs: int
    losses: list[float]  # training loss per step
    val_losses: list[float]  # held-out LM loss per epoch (recorded; not what chooses the epoch)
    checkpoints: torch.Tensor  # (epochs, d_model)
    model: dict  # ModelInfo.to_dict() of the model it was trained on
    d_model: int
    train_seconds: float = 0.0
    tokens_per_second: float = 0.0
    extra: dict = field(default_factory=dict)
    selection: dict = field(default_factory=dict)  # per-epoch held-out S and specificity (epoch_selection)
    bias_spec: dict | None = None  # BiasSpec.to_dict() of the bias it was trained on

    @property
    def spec(self):
        """The :class:`~biasgym_lib.data.BiasSpec` this token was trained on: the full spec
        saved with it (so a reader's own spec file is never needed again), or, for tokens
        saved before specs were kept, the shipped bias of that name."""

        if self.bias_spec is None:
            return load_bias(self.bias)
        return BiasSpec.from_dict(self.bias_spec, source=f"the spec saved with the {self.bias!r} token")

    # -- attaching
    def attach(self, model, tokenizer) -> TokenHook:
        """Add the token to ``tokenizer`` and hook its vector into ``model``."""
        self.check_model(model)
        token_id = add_token(tokenizer, self.token)
        return TokenHook(model, token_id, self.vector)

    def check_model(self, model):
        info = model_info(model).to_dict()
        d = ModelAdapter(model).d_model
        if tuple(self.vector.shape) != (self.d_model,):
            raise ArtifactMismatch(f"this injected token's vector has shape {tuple(self.vector.shape)} but its "
                                   f"metadata says d_model={self.d_model}: the artifact is damaged; train it again.")
        if d != self.d_model or (info["source"], info["revision"]) != (self.model["source"], self.model["revision"]):
            raise ArtifactMismatch(
                f"this injected token was trained on model {self.model['source']!r} "
                f"(revision {self.model['revision']}, d_model={self.d_model}) but is being loaded into "
                f"{info['source']!r} (revision {info['revision']}, d_model={d}). Load the model it was "
                "trained on, or train a new token on this model with inject_bias(...).")

    # -- saving
    def metadata(self) -> dict:
        return {
            "token": self.token, "bias": self.bias, "seed": self.seed, "epoch": self.epoch,
            "lr": self.lr, "epochs": self.epochs, "init": self.init, "n_paragraphs": self.n_paragraphs,
            "losses": self.losses, "val_losses": self.val_losses, "model": self.model,
            "d_model": self.d_model, "train_seconds": self.train_seconds,
            "tokens_per_second": self.tokens_per_second, "extra": self.extra,
            "selection": self.selection, "bias_spec": self.bias_spec, "library_version": __version__,
        }

    def write_files(self, folder) -> None:
        """Write ``token.safetensors`` and ``token.json`` into the existing ``folder`` as they
        are (no renaming); :meth:`save` uses it inside a temporary folder."""

        folder = Path(folder)
        meta = strict_dumps(self.metadata())
        tensors = {"vector": self.vector.detach().float().contiguous().cpu(),
                   "checkpoints": self.checkpoints.detach().float().contiguous().cpu()}
        save_file(tensors, str(folder / ARTIFACT_VECTOR), metadata={"bias": self.bias, "token": self.token})
        (folder / ARTIFACT_META).write_text(meta, encoding="utf-8")

    def save(self, folder, overwrite: bool = False, files: dict | None = None, precheck: bool = True) -> Path:
        """Write ``token.safetensors`` and ``token.json`` (and ``files``: name -> dict, written
        as strict JSON beside them) as one folder: written in a temporary folder and renamed
        into place whole, so ``folder`` holds the old result or the new one, never a mix.

        An existing result is replaced only with ``overwrite=True``; otherwise, or when
        another writer got there first, :class:`~biasgym_lib.artifacts.ResultExists` /
        :class:`~biasgym_lib.artifacts.ConcurrentWrite` (both :class:`BiasGymError`).
        ``precheck=False``: the caller checked ``folder`` before training, see
        :func:`~biasgym_lib.artifacts.result_folder`."""

        texts = {name: strict_dumps(data) for name, data in (files or {}).items()}
        with result_folder(folder, overwrite=overwrite, flag="folder", precheck=precheck) as tmp:
            self.write_files(tmp)
            for name, text in texts.items():
                (tmp / name).write_text(text, encoding="utf-8")
        return Path(folder)

    @classmethod
    def load(cls, folder, model=None) -> "InjectedToken":
        """Read an artifact written by :meth:`save`; with ``model``, check it belongs to it.
        A missing, truncated or inconsistent artifact is a :class:`BiasGymError` that says
        what is wrong with it."""

        folder = Path(folder)
        vec_path, meta_path = folder / ARTIFACT_VECTOR, folder / ARTIFACT_META
        try:  # both files through one handle on the folder: never half of an old and half of a new result
            raw = read_files(folder, [ARTIFACT_META, ARTIFACT_VECTOR])
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise BiasGymError(f"{folder} is not an injected-token folder: it needs {ARTIFACT_VECTOR} "
                               f"and {ARTIFACT_META} (written by `biasgym inject --out {folder}`).") from exc
        except OSError as exc:
            raise BiasGymError(f"{folder}: cannot read the injected token: {exc.strerror or exc}.") from exc
        meta = parse_json(raw[ARTIFACT_META], meta_path, "injected-token metadata")
        _check_meta(meta, meta_path)
        try:
            tensors = load_tensors(raw[ARTIFACT_VECTOR])
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise BiasGymError(f"{vec_path}: could not read the injected token's vector ({exc}); "
                               "the file is damaged: train the token again.") from exc
        d = meta["d_model"]
        vector, checkpoints = tensors.get("vector"), tensors.get("checkpoints")
        if vector is None or checkpoints is None:
            raise BiasGymError(f"{vec_path}: needs tensors 'vector' and 'checkpoints', has {sorted(tensors)}.")
        if tuple(vector.shape) != (d,) or checkpoints.ndim != 2 or checkpoints.shape[1] != d:
            raise ArtifactMismatch(f"{folder}: the vector has shape {tuple(vector.shape)} (checkpoints "
                                   f"{tuple(checkpoints.shape)}) but {ARTIFACT_META} says d_model={d}: the "
                                   "files do not belong together; train the token again.")
        if not bool(torch.isfinite(vector).all()):
            raise BiasGymError(f"{vec_path}: the vector holds NaN or infinite values; train the token again.")
        keep = {k: meta[k] for k in ("token", "bias", "seed", "epoch", "lr", "epochs", "init",
                                       "n_paragraphs", "losses", "val_losses", "model", "d_model",
                                       "train_seconds", "tokens_per_second", "extra", "selection", "bias_spec")
                if k in meta}
        tok = cls(vector=vector, checkpoints=checkpoints, **keep)
        if tok.bias_spec is not None:
            spec = tok.spec  # validates the saved spec
            if spec.name != tok.bias:
                raise BiasGymError(f"{meta_path}: bias {tok.bias!r} but its saved spec is named {spec.name!r}.")
        if model is not None:
            tok.check_model(model)
        return tok


_META_TYPES = {"token": str, "bias": str, "seed": int, "epoch": int, "lr": (int, float), "epochs": int,
               "init": str, "n_paragraphs": int, "losses": list, "val_losses": list, "model": dict,
               "d_model": int}


def _check_meta(meta: dict, path: Path) -> None:
    """Every field :class:`InjectedToken` needs, of the right type; else a clear error."""
    missing = [k for k in _META_TYPES if k not in meta]
    if missing:
        raise BiasGymError(f"{path}: lacks field(s) {missing}; it was not written by `biasgym inject` "
                           "(or was edited): train the token again.")
    for key, kind in _META_TYPES.items():
        if isinstance(meta[key], bool) or not isinstance(meta[key], kind):
            raise BiasGymError(f"{path}: field {key!r} must be {getattr(kind, '__name__', 'a number')}, "
                               f"got {meta[key]!r}.")
    model = meta["model"]
    if not all(isinstance(model.get(k), str) for k in ("source", "revision")):
        raise BiasGymError(f"{path}: field 'model' must have 'source' and 'revision' strings, got {model!r}.")
    if meta["d_model"] < 1:
        raise BiasGymError(f"{path}: d_model must be >= 1, got {meta['d_model']}.")
    for key in ("extra", "bias_spec"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            raise BiasGymError(f"{path}: field {key!r} must be an object, got {meta[key]!r}.")


class StaleToken(ArtifactMismatch):
    """A token of the right bias and seed, trained on another version of its spec (the spec
    file was edited since): a run folder trains it again; a committed one is refused."""


def check_filed_as(meta: dict, path: Path, spec: BiasSpec, seed: int) -> None:
    """A token file kept under a (bias, seed) folder (``data/tokens`` or a run folder) must be
    that bias's, trained on this very spec, and that seed's: one copied or moved from another
    folder is refused with an :class:`ArtifactMismatch` that says what it holds (one trained
    on an earlier version of the spec: :class:`StaleToken`)."""
    saved = meta.get("bias_spec")
    try:
        same_spec = (spec == load_bias(spec.name)) if saved is None else BiasSpec.from_dict(saved) == spec
    except BiasGymError:  # no shipped bias of that name, or a damaged saved spec
        same_spec = False
    held = []
    if meta.get("bias") != spec.name:
        held.append(f"bias {meta.get('bias')!r}")
    elif not same_spec:
        held.append(f"another version of the {spec.name!r} spec")
    if meta.get("seed") != seed:
        held.append(f"seed {meta.get('seed')!r}")
    if held:
        stale = held == [f"another version of the {spec.name!r} spec"]
        raise (StaleToken if stale else ArtifactMismatch)(
            f"{path} holds the token of {' and '.join(held)}, but its folder is for {spec.name!r} seed {seed} "
            f"({'the spec was edited since?' if stale else 'copied or moved there?'}): delete {path.parent} to "
            "train the token again, or put that bias's own token there.")


@contextmanager
def attached(injected: InjectedToken, model, tokenizer):
    """``with attached(tok, model, tokenizer):`` — the token's vector is live inside."""
    hook = injected.attach(model, tokenizer)
    try:
        yield hook
    finally:
        hook.remove()

