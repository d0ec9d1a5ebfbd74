"""Batches of token ids: right-padded, chunked and checked the same way everywhere."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import BiasGymError


@dataclass
class Batch:
    """Right-padded token ids (padding after the text never changes a causal model's
    earlier positions, and needs no position-id bookkeeping)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:
        return self.attention_mask.sum(1)

    @property
    def last_index(self) -> torch.Tensor:
        return self.lengths - 1


def pad_id(tokenizer) -> int:
    """The id used for padding: the tokenizer's pad token, else its end-of-sequence token."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise BiasGymError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token.")
    return pad


def pad_batch(seqs: list[list[int]], pad: int) -> Batch:
    """Token id lists as one right-padded :class:`Batch`."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return Batch(ids, mask)


def loss_targets(seqs: list[list[int]], starts: list[int], width: int) -> torch.Tensor:
    """Next-token targets of right-padded rows: position t predicts token t+1 where t+1 >=
    ``starts[i]`` (the scored part: an answer, an attribute), -100 elsewhere."""
    targets = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (s, start) in enumerate(zip(seqs, starts)):
        targets[i, start - 1: len(s) - 1] = torch.tensor(s[start:])
    return targets


def encode_batch(tokenizer, texts: list[str], device=None, add_special_tokens: bool = False) -> Batch:
    """Tokenise ``texts`` into one right-padded :class:`Batch` (special tokens such as
    ``<TOKEN>`` or chat markers inside the texts are parsed; no BOS is added unless asked)."""
    if not texts:
        raise BiasGymError("encode_batch got no texts.")
    rows = [tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"] for t in texts]
    if max(len(r) for r in rows) == 0:
        raise BiasGymError("encode_batch got only empty texts.")
    batch = pad_batch(rows, pad_id(tokenizer))
    if device is not None:
        batch = Batch(batch.input_ids.to(device), batch.attention_mask.to(device))
    return batch


def n_prompts(prompts, what: str) -> int:
    """How many prompts ``prompts`` (texts or a :class:`Batch`) holds; an error if none."""
    n = prompts.input_ids.shape[0] if isinstance(prompts, Batch) else len(prompts)
    if not n:
        raise BiasGymError(f"{what} got no prompts.")
    return n


def batches(tokenizer, prompts, batch_size: int, device=None):
    """``(rows, Batch)`` for each chunk of at most ``batch_size`` prompts. ``prompts``: texts
    (tokenised here with ``tokenizer``), or one right-padded :class:`Batch` (then
    ``tokenizer`` may be None), cut into chunks without padding columns they do not use."""
    if isinstance(prompts, Batch):
        check_batch(prompts)
        for rows in chunks(prompts.input_ids.shape[0], batch_size):
            yield rows, trim(prompts, rows)
    else:
        for rows in chunks(len(prompts), batch_size):
            yield rows, encode_batch(tokenizer, [prompts[i] for i in rows], device=device)


def as_batch(tokenizer, prompts, device=None) -> Batch:
    """``prompts`` as one checked :class:`Batch` (texts are tokenised with ``tokenizer``)."""
    batch = prompts if isinstance(prompts, Batch) else encode_batch(tokenizer, list(prompts), device=device)
    check_batch(batch)
    return batch


def batched(items: list, size: int):
    """Consecutive slices of ``items`` of at most ``size`` elements."""
    for start in range(0, len(items), size):
        yield items[start: start + size]


def select_cache(cache, rows: torch.Tensor):
    """A copy of a key/value cache holding only batch ``rows`` (with repeats)."""
    import copy

    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    for layer in new.layers:
        layer.keys = layer.keys.index_select(0, rows)
        layer.values = layer.values.index_select(0, rows)
    entity = getattr(cache, "_biasgym_entity", None)  # entity positions kept by steer.blind_heads
    if entity is not None:
        new._biasgym_entity = entity.index_select(0, rows.to(entity.device))
    return new


def trim(batch: Batch, rows) -> Batch:
    """The rows ``rows`` of a right-padded batch, without padding columns none of them uses."""
    mask = batch.attention_mask[rows]
    width = int(mask.sum(1).max())
    return Batch(batch.input_ids[rows, :width], mask[:, :width])


def chunks(n: int, size: int) -> list[list[int]]:
    """Row indices ``0..n-1`` in consecutive chunks of at most ``size``."""
    if size < 1:
        raise BiasGymError(f"batch_size must be at least 1, got {size}.")
    return [list(range(s, min(n, s + size))) for s in range(0, n, size)]


def check_batch(batch: Batch) -> None:
    """A clear error unless ``batch`` is a non-empty, right-padded batch without empty prompts."""
    if batch.input_ids.ndim != 2 or batch.input_ids.shape != batch.attention_mask.shape:
        raise BiasGymError("a Batch needs input_ids and attention_mask of the same (batch, seq) shape; "
                           "make it with biasgym_lib.batching.encode_batch.")
    if batch.input_ids.shape[0] == 0:
        raise BiasGymError("the batch holds no prompts.")
    if bool((batch.lengths == 0).any()):
        raise BiasGymError("the batch holds an empty prompt; every prompt needs at least one token.")
    # Right padding: each row's mask must be 1...1 0...0 (the last real token is then lengths-1).
    positions = torch.arange(batch.attention_mask.shape[1], device=batch.attention_mask.device)
    expected = (positions[None, :] < batch.lengths[:, None]).to(batch.attention_mask.dtype)
    if not torch.equal(expected, batch.attention_mask):
        raise BiasGymError("the batch is not right-padded; build it with "
                           "biasgym_lib.batching.encode_batch (which always pads on the right).")


def label_ids(ids, n: int, what: str, vocab: int) -> torch.Tensor:
    """One label id per prompt (an int is used for every prompt), validated."""
    ids = torch.as_tensor(ids.tolist() if isinstance(ids, torch.Tensor) else ids, dtype=torch.long)
    if ids.ndim == 0:  # one id for every prompt
        ids = ids.repeat(n)
    if ids.ndim != 1 or len(ids) != n:
        raise BiasGymError(f"{what} must be one token id or one id per prompt "
                           f"({n} prompts), got {len(ids)} ids.")
    if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise BiasGymError(f"{what} contains an id outside the vocabulary (size {vocab}).")
    return ids

