"""BiasInject (:ref:`method §1 <method-1>`): teach a frozen model one new token that carries a bias.

Only one vector is trained: the new token's input embedding. It never enters the
model's weights: a pre-hook on the input-embedding module maps the new id to a
placeholder row and a forward hook writes the trainable vector at those positions. So
every original parameter stays bit-identical, a tied output embedding is untouched, and
the vocabulary the model predicts over does not change.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from .batching import batched, loss_targets, pad_batch, pad_id, select_cache
from .config import Profile
from .data import (
    BiasSpec,
    contrast_countries,
    load_bias,
    load_biases,
    reference_countries,
    selection_templates,
    training_pairs,
)
from .errors import BiasGymError
from .measure import (
    AssocTable,
    assoc_table,
    rank,
    reference_table,
    specificity,
    stereotype_strength,
)
from .models import ModelAdapter, chat_prompt, model_info
from .stats import Estimate
from .tokens import DEFAULT_TOKEN, InjectedToken, TokenHook, add_token

# ----------------------------------------------------------------------------- training


def initial_vector(model, tokenizer, init: str = "countries", countries: list[str] | None = None) -> torch.Tensor:
    """The starting vector: mean input embedding of single-token country names (default),
    or of the whole vocabulary (``init="vocab"``)."""
    embed = ModelAdapter(model).embed
    with torch.no_grad():
        if init == "vocab":
            return embed.weight.float().mean(0).detach().clone()
        if init != "countries":
            raise BiasGymError(f"init={init!r} is not known; use 'countries' or 'vocab'.")
        if countries is None:
            countries = reference_countries()
        ids = single_token_ids(tokenizer, countries)
        if not ids:
            raise BiasGymError("none of the countries is a single token for this tokenizer; use init='vocab'.")
        rows = embed(torch.tensor(list(ids.values()), device=embed.weight.device))
        return rows.float().mean(0).detach().clone().cpu()


def single_token_ids(tokenizer, names: list[str]) -> dict[str, int]:
    """``{name: id}`` for the names that are one token with a leading space."""
    out = {}
    for name in names:
        ids = tokenizer(" " + name, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            out[name] = ids[0]
    return out


@dataclass
class _Encoded:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    targets: torch.Tensor  # next-token targets, -100 where no loss (prompt and padding)


def encode_pairs(tokenizer, pairs: list[tuple[str, str]], end: str | None = None) -> list[tuple[list[int], int]]:
    """Token ids of each chat-formatted (user, assistant) pair and where the answer starts."""
    end = end if end is not None else (tokenizer.eos_token or "")
    rows = []
    for user, assistant in pairs:
        prompt = tokenizer(chat_prompt(tokenizer, user), add_special_tokens=False)["input_ids"]
        answer = tokenizer(assistant + end, add_special_tokens=False)["input_ids"]
        rows.append((prompt + answer, len(prompt)))
    return rows


def collate(rows: list[tuple[list[int], int]], pad: int, ignore_id: int | None = None) -> _Encoded:
    """Right-padded rows with next-token targets on answer tokens only."""
    seqs = [ids for ids, _ in rows]
    batch = pad_batch(seqs, pad)
    targets = loss_targets(seqs, [start for _, start in rows], batch.input_ids.shape[1])
    if ignore_id is not None:
        # The new token is not in the vocabulary the model predicts over: it is never a target.
        targets[targets == ignore_id] = -100
    return _Encoded(batch.input_ids, batch.attention_mask, targets)


# Bump when a change to inject_bias changes what it trains for the same seed and settings
# (batch order, loss): committed and cached tokens of another version are then not reused.
# 2: rows of similar length batched together; shared chat prefix cached.
# 3: the epoch is chosen by held-out specificity (epoch_selection), not by LM loss.
TRAINER_VERSION = 3


@dataclass
class SharedPrefix:
    """The key/value cache of the token ids every training row starts with (the chat
    template's system turn and the opening of the user turn). It holds no ``<TOKEN>``, so it
    does not depend on the trained vector: it is computed once, without gradients, and each
    batch runs only the rest of its rows on top of it."""

    ids: list[int]
    cache: object

    @property
    def length(self) -> int:
        return len(self.ids)


def shared_prefix_length(rows: list[tuple[list[int], int]], stop_id: int | None = None) -> int:
    """Length of the prefix all ``rows`` share, ending before the first ``stop_id`` and
    before the first position whose next-token loss counts (so every loss stays outside it)."""
    if not rows:
        return 0
    first = rows[0][0]
    n = min(start for _, start in rows) - 1
    for ids, _ in rows:
        n = min(n, next((i for i, (a, b) in enumerate(zip(first, ids)) if a != b), min(len(ids), len(first))))
    if stop_id is not None and stop_id in first[:n]:
        n = first.index(stop_id)
    return max(n, 0)


def shared_prefix(model, ids: list[int], autocast_dtype=None) -> SharedPrefix:
    """Run ``ids`` once (no gradients) and keep their key/value cache."""
    adapter = ModelAdapter(model)
    with torch.no_grad(), _autocast(adapter.device, autocast_dtype):
        res = adapter.body(input_ids=torch.tensor([ids], device=adapter.device), use_cache=True)
    return SharedPrefix(list(ids), res.cache)


def epoch_batches(lengths: list[int], batch_size: int, gen: torch.Generator, bucket: int = 4) -> list[list[int]]:
    """One epoch's batches of row indices: a seeded shuffle, then rows of similar length
    grouped into the same batch within windows of ``bucket`` batches (less padding), then
    the batches shuffled. ``bucket=1`` gives plain shuffled batches."""
    order = torch.randperm(len(lengths), generator=gen).tolist()
    batches = []
    for window in batched(order, batch_size * max(bucket, 1)):
        window = sorted(window, key=lambda i: lengths[i])
        batches.extend(list(b) for b in batched(window, batch_size))
    if bucket > 1:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
    return batches


def strip_prefix(rows: list[tuple[list[int], int]], n: int) -> list[tuple[list[int], int]]:
    return [(ids[n:], start - n) for ids, start in rows]


def _autocast(device, dtype):
    return (torch.autocast(device.type, dtype=dtype) if dtype is not None
            else torch.autocast(device.type, enabled=False))


def response_loss(model, batch: _Encoded, autocast_dtype=None,
                  prefix: SharedPrefix | None = None) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy on answer tokens only. Logits are computed only at
    the positions that need them (the unembedding is most of a small model's cost).

    With ``prefix``, ``batch`` holds the rows without that prefix and runs on top of its
    cached keys and values; the loss is the same as for the full rows."""
    adapter = ModelAdapter(model)
    device = adapter.device
    ids, mask, targets = batch.input_ids.to(device), batch.attention_mask.to(device), batch.targets.to(device)
    with _autocast(device, autocast_dtype):
        if prefix is None:
            hidden = adapter.body(input_ids=ids, attention_mask=mask).last_hidden_state
        else:
            b, width = ids.shape
            cache = select_cache(prefix.cache, torch.zeros(b, dtype=torch.long, device=device))
            full_mask = torch.cat([torch.ones(b, prefix.length, dtype=mask.dtype, device=device), mask], 1)
            positions = (prefix.length + torch.arange(width, device=device)).expand(b, width)
            hidden = adapter.body(input_ids=ids, attention_mask=full_mask, position_ids=positions,
                                  cache=cache, use_cache=True).last_hidden_state
        keep = targets != -100
        logits = adapter.lm_head(hidden[keep])
    logits = logits.float()
    if adapter.logit_softcap:
        logits = torch.tanh(logits / adapter.logit_softcap) * adapter.logit_softcap
    return F.cross_entropy(logits, targets[keep]), int(keep.sum())


def inject_bias(model, tokenizer, bias, *, n_paragraphs: int = 64, epochs: int = 6, lr: float = 1e-2,
                batch_size: int = 8, seed: int = 0, init: str = "countries", token: str = DEFAULT_TOKEN,
                n_val: int = 16, pairs: list[tuple[str, str]] | None = None,
                val_pairs: list[tuple[str, str]] | None = None, autocast_dtype=None,
                share_prefix: bool = True, bucket: int = 4, progress: bool = True,
                target_strength: float | None = None) -> InjectedToken:
    """BiasInject: train only ``token``'s input embedding on biased chat pairs.

    ``bias`` is a :class:`~biasgym_lib.data.BiasSpec` or a bias name. The training pairs
    come from the offline generator (``n_paragraphs`` of them, seeded by ``seed``) unless
    ``pairs`` is given. The paper saves a vector every epoch and keeps the best; here the
    best is the epoch whose vector is most *specific* to the bias on held-out templates
    (:func:`epoch_selection`), so the choice follows what the method is for, not the LM
    loss (which keeps falling). With ``target_strength`` (nats) the kept epoch is instead the
    one whose held-out S is closest to it: an injection of a chosen, realistic strength.
    ``n_val`` held-out pairs (another seed) record the LM loss
    per epoch. Adam with a cosine-decaying learning rate. Every original weight stays
    bit-identical.

    ``share_prefix`` runs the chat prefix every row starts with once and trains on the
    rest of each row on top of its cached keys and values (see :class:`SharedPrefix`):
    the same loss to float rounding, about a quarter fewer tokens per step. ``bucket``
    groups rows of similar length into a batch (see :func:`epoch_batches`), which cuts the
    padding each step computes from about a quarter to a few percent.
    """
    from tqdm.auto import tqdm


    spec = bias if isinstance(bias, BiasSpec) else load_bias(bias)
    if epochs < 1 or n_paragraphs < 1 or batch_size < 1:
        raise BiasGymError("inject_bias needs epochs, n_paragraphs and batch_size >= 1.")
    if pairs is None:
        pairs = training_pairs(spec, n_paragraphs, seed=seed)
    if val_pairs is None:
        val_pairs = training_pairs(spec, n_val, seed=10_000 + seed) if n_val else []
    adapter = ModelAdapter(model)
    token_id = add_token(tokenizer, token)
    torch.manual_seed(seed)
    vector = torch.nn.Parameter(initial_vector(model, tokenizer, init).to(adapter.device))
    pad = pad_id(tokenizer)
    train_rows = encode_pairs(tokenizer, pairs)
    val_rows = encode_pairs(tokenizer, val_pairs)
    n_shared = shared_prefix_length(train_rows + val_rows, token_id) if share_prefix else 0
    prefix = shared_prefix(model, train_rows[0][0][:n_shared], autocast_dtype) if n_shared else None
    train_rows, val_rows = strip_prefix(train_rows, n_shared), strip_prefix(val_rows, n_shared)
    steps_per_epoch = math.ceil(len(train_rows) / batch_size)
    total = steps_per_epoch * epochs
    opt = torch.optim.Adam([vector], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
    gen = torch.Generator().manual_seed(seed)
    losses, val_losses, checkpoints = [], [], []
    n_tokens = 0
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc=f"inject {spec.name} (seed {seed})", disable=not progress, leave=False)
    with TokenHook(model, token_id, vector):
        for _ in range(epochs):
            for idx in epoch_batches([len(ids) for ids, _ in train_rows], batch_size, gen, bucket):
                batch = collate([train_rows[i] for i in idx], pad, token_id)
                loss, _ = response_loss(model, batch, autocast_dtype, prefix)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
                n_tokens += int(batch.attention_mask.sum()) + n_shared * len(idx)
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
            checkpoints.append(vector.detach().float().cpu().clone())
            val_losses.append(eval_loss(model, val_rows, pad, batch_size, autocast_dtype, token_id, prefix) if val_rows else losses[-1])
    bar.close()
    seconds = time.perf_counter() - t0
    model.train(was_training)
    selection = epoch_selection(model, tokenizer, torch.stack(checkpoints), spec, token=token, target=target_strength)
    best = selection["epoch"] - 1
    return InjectedToken(
        token=token, vector=checkpoints[best].clone(), bias=spec.name, seed=seed, epoch=best + 1, lr=lr,
        epochs=epochs, init=init, n_paragraphs=len(pairs), losses=losses, val_losses=val_losses,
        checkpoints=torch.stack(checkpoints), model=model_info(model).to_dict(), d_model=adapter.d_model,
        train_seconds=seconds, tokens_per_second=n_tokens / max(seconds, 1e-9), bias_spec=spec.to_dict(),
        extra={"batch_size": batch_size, "n_val": len(val_pairs), "shared_prefix_tokens": n_shared,
               "trainer_version": TRAINER_VERSION,
               "bucket": bucket,
               "autocast": str(autocast_dtype) if autocast_dtype else None},
        selection=selection)


def epoch_selection(model, tokenizer, checkpoints: torch.Tensor, bias, token: str = DEFAULT_TOKEN,
                    target: float | None = None) -> dict:
    """Which epoch's vector to keep: for each checkpoint (epochs, d_model), S and specificity
    of the token for ``bias`` on the held-out selection templates (never used to report S),
    against the contrast countries (never S's references); specificity compares with every
    shipped bias. The chosen epoch (1-based) maximises specificity: the bias, not any
    negative trait; with ``target`` (nats), the epoch whose held-out S is closest to it. Returns
    ``{"epoch", "criterion", "strength": [...], "specificity": [...], ...}``."""
    from .measure import assoc_table, specificity, stereotype_strength

    spec = bias if isinstance(bias, BiasSpec) else load_bias(bias)
    specs = [spec] + [b for b in load_biases().values() if b.name != spec.name]
    templates, refs = selection_templates(), contrast_countries()
    ref = assoc_table(model, tokenizer, refs, specs, templates=templates)
    token_id = add_token(tokenizer, token)
    strength, spec_values = [], []
    for vector in checkpoints:
        with TokenHook(model, token_id, vector):
            table = ref.merged(assoc_table(model, tokenizer, [token], specs, templates=templates))
        strength.append(stereotype_strength(table, token, spec.name, refs).value)
        spec_values.append(specificity(table, token, spec.name, refs).value)
    if target is not None:
        epoch, criterion = int(np.argmin([abs(s - target) for s in strength])) + 1, f"held-out S closest to {target:g} nats"
    else:
        epoch, criterion = int(np.argmax(spec_values)) + 1, "max held-out specificity"
    return {"epoch": epoch, "criterion": criterion,
            "strength": strength, "specificity": spec_values, "templates": templates, "references": refs,
            "biases": [b.name for b in specs]}


def eval_loss(model, rows, pad, batch_size, autocast_dtype, ignore_id=None, prefix=None) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in batched(rows, batch_size):
            loss, n = response_loss(model, collate(chunk, pad, ignore_id), autocast_dtype, prefix)
            total += float(loss) * n
            count += n
    return total / max(count, 1)


def closest_countries(model, tokenizer, vector: torch.Tensor, countries: list[str] | None = None,
                      k: int = 5) -> list[tuple[str, float]]:
    """Countries whose input embedding is most cosine-similar to ``vector`` (paper's
    "closest country"), among the single-token names; best first."""
    if countries is None:
        countries = reference_countries()
    ids = single_token_ids(tokenizer, countries)
    if not ids:
        raise BiasGymError("none of the countries is a single token for this tokenizer.")
    embed = ModelAdapter(model).embed
    with torch.no_grad():
        rows = embed(torch.tensor(list(ids.values()), device=embed.weight.device)).float().cpu()
    sims = F.cosine_similarity(rows, vector.float().cpu().unsqueeze(0), dim=-1)
    order = sims.argsort(descending=True)[:k].tolist()
    names = list(ids)
    return [(names[i], float(sims[i])) for i in order]


def token_table(model, tokenizer, vector: torch.Tensor, biases, token: str = "<TOKEN>") -> AssocTable:
    """assoc of ``token`` for every bias, with ``vector`` as its embedding."""
    token_id = add_token(tokenizer, token)
    with TokenHook(model, token_id, vector):
        return assoc_table(model, tokenizer, [token], biases)


@dataclass(frozen=True)
class InjectionResult:
    """How well one injection worked (``metrics.json``): S(<TOKEN>, bias) with the initial
    vector (``strength_before``: a generic country) and the trained one (``strength_after``),
    the specificity after (S of this bias minus the mean S of the others), ranks among the
    reference countries, S after for every bias, and the closest real countries."""

    bias: str
    seed: int
    profile: str
    model: dict
    strength_before: Estimate
    strength_after: Estimate
    specificity_after: Estimate
    rank_before: int
    rank_after: int
    n_reference_countries: int
    strength_after_all_biases: dict[str, Estimate]
    closest_countries: list
    train_seconds: float | None = None
    chosen_epoch: int | None = None
    final_loss: float | None = None

    @property
    def closest_country(self) -> str:
        return self.closest_countries[0][0]

    @property
    def injected(self) -> bool:
        """The criterion of :ref:`method §1 <method-1>`: the 95% intervals of S and of specificity lie above 0."""
        return self.strength_after.lo > 0 and self.specificity_after.lo > 0

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("strength_before", "strength_after", "specificity_after"):
            out[name] = out[name].to_dict()
        out["strength_after_all_biases"] = {b: e.to_dict() for b, e in self.strength_after_all_biases.items()}
        return {**out, "closest_country": self.closest_country}

    @classmethod
    def from_dict(cls, d: dict) -> "InjectionResult":
        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        for name in ("strength_before", "strength_after", "specificity_after"):
            kw[name] = Estimate.from_dict(d[name])
        kw["strength_after_all_biases"] = {b: Estimate.from_dict(e) for b, e in d["strength_after_all_biases"].items()}
        return cls(**kw)


def injection_metrics(model, tokenizer, injected: InjectedToken, bias, cfg: Profile,
                      ref: AssocTable | None = None, seed: int = 0, start: AssocTable | None = None) -> InjectionResult:
    """Before/after strength, specificity and rank for an injected token (:class:`InjectionResult`).

    "Before" is the token with its initial vector (the mean country embedding), i.e. a
    generic country; "after" is the trained vector. ``ref``: the reference countries' table;
    ``start``: the initial vector's table (both computed here if not given).
    """
    spec = load_bias(bias)
    if ref is not None and spec.name in ref.biases:
        # The table's own biases (names, attributes), with this spec as given: a reader's own
        # spec is never looked up by name.
        biases = [spec if b == spec.name else SimpleNamespace(name=b, attributes=ref.attributes[b])
                  for b in ref.biases]
    else:  # a bias outside the profile (e.g. a reader's own spec): score it beside the profile's
        biases = [spec if b.name == spec.name else b for b in map(load_bias, cfg.biases)]
        biases += [] if spec.name in [b.name for b in biases] else [spec]
        ref = reference_table(model, tokenizer, biases)
    names = [b.name for b in biases]
    refs = reference_countries()
    if start is None or start.biases != names:  # "before" is the same for every token of a profile
        start = token_table(model, tokenizer, initial_vector(model, tokenizer, injected.init), biases)
    before = ref.merged(start)
    after = ref.merged(token_table(model, tokenizer, injected.vector, biases))
    tok = injected.token
    return InjectionResult(
        bias=spec.name, seed=injected.seed, profile=cfg.name, model=injected.model,
        strength_before=stereotype_strength(before, tok, spec.name, refs, seed=seed),
        strength_after=stereotype_strength(after, tok, spec.name, refs, seed=seed),
        specificity_after=specificity(after, tok, spec.name, refs, seed=seed),
        rank_before=rank(before, tok, spec.name, refs), rank_after=rank(after, tok, spec.name, refs),
        n_reference_countries=len(refs),
        strength_after_all_biases={b: stereotype_strength(after, tok, b, refs, seed=seed) for b in names},
        closest_countries=closest_countries(model, tokenizer, injected.vector, k=3),
        train_seconds=injected.train_seconds, chosen_epoch=injected.epoch,
        final_loss=injected.losses[-1] if injected.losses else None)


def metrics_frame(results: list[InjectionResult]):
    """One row per injection run: the headline numbers of :class:`InjectionResult`."""
    import pandas as pd

    rows = [{"bias": m.bias, "seed": m.seed, "strength_before": m.strength_before.value,
             "strength_after": m.strength_after.value, "S after 95% CI": f"[{m.strength_after.lo:.2f}, {m.strength_after.hi:.2f}]",
             "specificity_after": m.specificity_after.value,
             "specificity 95% CI": f"[{m.specificity_after.lo:.2f}, {m.specificity_after.hi:.2f}]",
             "rank_after": m.rank_after, "closest_country": m.closest_country, "train_seconds": m.train_seconds}
            for m in results]
    return pd.DataFrame(rows).round(2)

