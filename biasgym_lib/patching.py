"""BiasScope's checks by intervention: activation patching of head outputs (exact, on the
probes or on S's sentences), attribution patching (its first-order estimate), direct-path
patching (the check that ΔDLA is a direct effect) and the naive ablation loop."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .batching import (
    Batch,
    as_batch,
    chunks,
    label_ids,
    loss_targets,
    n_prompts,
    pad_batch,
    pad_id,
    trim,
)
from .data import contrast_countries, load_templates, selection_facts
from .errors import BiasGymError
from .heads import Head, heads_or_all, nan_to_none, top_k_heads
from .hooks import (
    capture_last_position,
    capture_z,
    gather_last,
    logit_diff_from_hidden,
    record_layers,
    run,
)
from .measure import template_prefix, token_rows
from .models import ModelAdapter
from .tokens import InjectedToken


@torch.no_grad()
def direct_path_patching(model: nn.Module, tokenizer, prompts: list[str], biased_ids, adv_ids,
                         counterfactual_z: torch.Tensor, heads: Iterable | None = None) -> torch.Tensor:
    """Direct-path patching (:ref:`method §3 <method-3>`): for each head, put its counterfactual output
    ``counterfactual_z`` (P, L, H*dh, at the last token) through its own output projection
    *straight into the final residual stream*, with every later layer frozen and the final
    norm's scale fixed from the clean pass; return the (L, H) mean drop of the logit
    difference. It runs the model's own modules (``o_proj``, the post-attention norm where
    there is one, ``lm_head``), not the DLA algebra, and equals
    :func:`~biasgym_lib.scope.contrastive_head_scores` to float error: the check that ΔDLA
    is a direct effect.
    """
    adapter = ModelAdapter(model)
    batch = as_batch(tokenizer, prompts, device=adapter.device)
    n = batch.input_ids.shape[0]
    vocab = int(adapter.unembed.shape[0])
    biased = label_ids(biased_ids, n, "biased_ids", vocab)
    adv = label_ids(adv_ids, n, "adv_ids", vocab)
    cap = capture_last_position(adapter, batch)
    norm = adapter.final_norm
    scale = adapter.norm_scale(norm, cap.final_in)

    def frozen_norm(x):
        out = adapter.apply_norm_linear(norm, x, scale)
        nb = adapter.norm_bias(norm)
        return out if nb is None else out + nb

    def logit_diff(final_in):
        return logit_diff_from_hidden(adapter, frozen_norm(final_in).to(adapter.unembed.dtype), biased, adv).double()

    clean = logit_diff(cap.final_in.float())
    dh = adapter.d_head
    out = torch.full((adapter.n_layers, adapter.n_heads), float("nan"))
    for layer, head in heads_or_all(adapter, heads):
        proj = adapter.head_input_module(layer)
        z = cap.z[:, layer].clone()
        patched_z = z.clone()
        cols = slice(head * dh, (head + 1) * dh)
        patched_z[:, cols] = counterfactual_z[:, layer, cols].to(z.dtype)
        delta = (proj(patched_z) - proj(z)).float()  # what the head's new output adds, via o_proj itself
        post = adapter.post_attn_norm(layer)
        if post is not None:  # Gemma 2: the post-attention norm, frozen at the clean attention output
            delta = adapter.apply_norm_linear(post, delta, adapter.norm_scale(post, cap.attn_out[:, layer]))
        out[layer, head] = float((clean - logit_diff(cap.final_in.float() + delta)).mean())
    return out


def _repeat(batch: Batch, times: int) -> Batch:
    return Batch(batch.input_ids.repeat(times, 1), batch.attention_mask.repeat(times, 1))


def _z_edits(adapter: ModelAdapter, edits: dict[int, list]) -> dict:
    """Hooks that edit z in place per layer: ``edits[l]`` = list of ``(row_slice, head, source)``:
    rows ``row_slice`` of z[l] get head ``head``'s slice from ``source`` (a (rows, T, H*dh)
    tensor), or zero if ``source`` is None."""
    dh = adapter.d_head

    def make(layer):
        def fn(z):
            z = z.clone()
            for rows, head, source in edits[layer]:
                cols = slice(head * dh, (head + 1) * dh)
                if source is None:
                    z[rows, :, cols] = 0
                else:
                    z[rows, :, cols] = source[:, : z.shape[1], cols].to(z.dtype)
            return z
        return fn
    return {("z", layer): make(layer) for layer in edits}


def _hidden_with_z_edits(adapter: ModelAdapter, batch: Batch, edits: dict[int, list],
                         record: list | None = None, replay: list | None = None) -> torch.Tensor:
    """The final-norm output (B, T, d) of ``batch`` after editing z (see :func:`_z_edits`).

    ``record`` (a list) receives every decoder layer's output. ``replay`` (such a list, from a
    run of this same batch) makes every layer below the first edited one return its recorded
    output instead of computing it: an edit at layer l cannot change what layers < l compute,
    and the recorded outputs are exactly what they would compute, so the result is the same
    bit for bit, for a fraction of the work.
    """
    hooks = _z_edits(adapter, edits)
    if record is not None:
        hooks.update(record_layers(record, adapter.n_layers))
    return run(adapter, batch, hooks, replay=replay if edits else None, below=min(edits, default=0))


def _run_with_z_edits(adapter: ModelAdapter, batch: Batch, edits: dict[int, list], biased: torch.Tensor,
                      adv: torch.Tensor, record: list | None = None, replay: list | None = None) -> torch.Tensor:
    """Logit difference per row of ``batch`` after editing z (see :func:`_hidden_with_z_edits`)."""
    hidden = _hidden_with_z_edits(adapter, batch, edits, record, replay)
    with torch.no_grad():
        return logit_diff_from_hidden(adapter, gather_last(hidden, batch.last_index), biased, adv).cpu()


def patch_heads(model: nn.Module, tokenizer, prompts, counterfactual_prompts, biased_ids, adv_ids,
                heads: Iterable | None = None, batch_size: int = 64, replay: bool = True) -> torch.Tensor:
    """Activation patching (:ref:`method §3 <method-3>`): for each head, replace z[l, h] on the prompt (every
    position) by its value on the counterfactual prompt, and record the mean drop
    ``clean - patched`` of the pre-softcap logit difference. Returns an (L, H) tensor, NaN
    for heads not in ``heads``. ``prompts`` / ``counterfactual_prompts``: texts, or two
    tokenised :class:`~biasgym_lib.batching.Batch` es (then ``tokenizer`` may be None); each
    prompt and its counterfactual must tokenise to the same length.

    ``batch_size`` bounds the rows of one forward: a chunk of prompts is repeated once per
    head patched in that forward, and heads are grouped layer by layer. With ``replay``
    (default) the layers below a group's first patched layer are not run again: their
    outputs from the clean run are reused, which is exact (``replay=False`` is the
    reference the tests compare with)."""
    n = n_prompts(prompts, "patch_heads")
    if n != n_prompts(counterfactual_prompts, "patch_heads"):
        raise BiasGymError(f"{n} prompts but {n_prompts(counterfactual_prompts, 'patch_heads')} counterfactuals; "
                           "give one counterfactual per prompt.")
    adapter = ModelAdapter(model)
    batch = as_batch(tokenizer, prompts, device=adapter.device)
    counterfactual = as_batch(tokenizer, counterfactual_prompts, device=adapter.device)
    bad = (batch.lengths.cpu() != counterfactual.lengths.cpu()).nonzero().flatten().tolist()
    if bad:
        i = bad[0]
        raise BiasGymError(
            f"prompt {i} and its counterfactual tokenise to different lengths "
            f"({int(batch.lengths[i])} vs {int(counterfactual.lengths[i])} tokens; {len(bad)} pairs differ). "
            "Patching replaces head outputs position by position, so each pair must align: pick a "
            "counterfactual entity that is one token, like the injected token.")
    vocab = int(adapter.unembed.shape[0])
    biased = label_ids(biased_ids, n, "biased_ids", vocab)
    adv = label_ids(adv_ids, n, "adv_ids", vocab)
    heads = sorted(heads_or_all(adapter, heads))  # layer by layer: a group skips the layers below it
    if batch_size < 1:
        raise BiasGymError(f"batch_size must be at least 1, got {batch_size}.")
    totals = torch.zeros(len(heads), dtype=torch.float64)
    for rows in chunks(n, batch_size):
        sub, sub_cf = trim(batch, rows), trim(counterfactual, rows)
        pc = len(rows)
        per_forward = max(1, min(len(heads), batch_size // pc))
        big = _repeat(sub, per_forward)
        # Counterfactual z taken from a forward of the same shape as the patched ones, and
        # row block j feeds replica j: so that a counterfactual equal to the prompt is an
        # exact identity (kernels may round differently for different batch sizes).
        cf_z = capture_z(adapter, _repeat(sub_cf, per_forward))
        b_rep, a_rep = biased[rows].repeat(per_forward), adv[rows].repeat(per_forward)
        # The clean reference has exactly the shape of the patched runs, so that an identity
        # patch gives an exact zero whatever the kernels do with different batch sizes.
        outputs: list = []
        clean = _run_with_z_edits(adapter, big, {}, b_rep, a_rep, record=outputs if replay else None).double()
        for start in range(0, len(heads), per_forward):
            group = heads[start: start + per_forward]
            edits: dict[int, list] = {}
            for j, (l, h) in enumerate(group):
                block = slice(j * pc, (j + 1) * pc)
                edits.setdefault(l, []).append((block, h, cf_z[l][block]))
            patched = _run_with_z_edits(adapter, big, edits, b_rep, a_rep,
                                        replay=outputs if replay else None).double()
            drop = (clean - patched).reshape(per_forward, pc)
            totals[start: start + len(group)] += drop[: len(group)].sum(1)
    out = torch.full((adapter.n_layers, adapter.n_heads), float("nan"))
    for (l, h), v in zip(heads, totals / n):
        out[l, h] = float(v)
    return out


@dataclass
class TemplateScores:
    """Head scores measured on stereotype strength's own sentences (:ref:`method §2 <method-2>` templates x
    the bias's attributes): ``scores`` (L, H), the mean over sentences of ``per_sentence``
    (N, L, H); NaN for heads not scored. ``assoc``: the entity's assoc on these sentences."""

    scores: torch.Tensor
    per_sentence: torch.Tensor
    method: str
    entity: str
    contrast: list[str]
    assoc: float

    def top_heads(self, k: int) -> list[Head]:
        return top_k_heads(self.scores, k)

    def to_dict(self) -> dict:
        return {"method": self.method, "entity": self.entity, "contrast": list(self.contrast),
                "assoc": self.assoc, "scores": self.scores.tolist(), "per_sentence": self.per_sentence.tolist()}

    @classmethod
    def from_dict(cls, data: dict) -> "TemplateScores":
        return cls(scores=torch.tensor(data["scores"]), per_sentence=torch.tensor(data["per_sentence"]),
                   method=data["method"], entity=data["entity"], contrast=list(data["contrast"]),
                   assoc=float(data["assoc"]))


def template_rows(tokenizer, entity: str, attributes: Sequence[str], templates: Sequence[str] | None = None):
    """``(prefix ids, attribute ids)`` of every template x attribute sentence about ``entity``,
    template-major: exactly the sentences whose log-probabilities assoc(entity, b) averages."""
    templates = list(templates or load_templates())
    prefixes = [template_prefix(t, entity) for t in templates for _ in attributes]
    return token_rows(tokenizer, prefixes, [" " + a for _ in templates for a in attributes])


def _rows_batch(rows, pad: int) -> tuple[Batch, torch.Tensor]:
    """A right-padded batch of prefix + attribute rows and its next-token targets (-100 where
    nothing is scored)."""
    seqs = [p + c for p, c in rows]
    batch = pad_batch(seqs, pad)
    return batch, loss_targets(seqs, [len(p) for p, _ in rows], batch.input_ids.shape[1])


def _row_logprob(adapter: ModelAdapter, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each row's targets, from final-norm outputs (B, T, d)."""
    targets = targets.to(hidden.device)
    keep = targets != -100
    logits = adapter.lm_head(hidden[keep])
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float64 models stay float64
    if adapter.logit_softcap:
        logits = torch.tanh(logits / adapter.logit_softcap) * adapter.logit_softcap
    lp = torch.log_softmax(logits, -1).gather(-1, targets[keep][:, None])[:, 0]
    rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None].expand_as(targets)[keep]
    return torch.zeros(hidden.shape[0], dtype=lp.dtype, device=hidden.device).index_add(0, rows, lp)


def _aligned(rows, other, what: str) -> None:
    bad = [i for i, (a, b) in enumerate(zip(rows, other)) if (len(a[0]), a[1]) != (len(b[0]), b[1])]
    if len(rows) != len(other) or bad:
        raise BiasGymError(f"the sentences about {what} do not line up token by token with the entity's "
                           "(each country must be a single token, like the injected token).")


@torch.no_grad()
def mean_template_z(model: nn.Module, tokenizer, countries: Sequence[str], attributes: Sequence[str],
                    templates: Sequence[str] | None = None) -> list[torch.Tensor]:
    """Every head's output z at every position of the template sentences, averaged over
    ``countries`` (single-token names, so that positions line up): one (N, T, H*dh) tensor
    per layer. The counterfactual of :func:`attribution_patching` and
    :func:`patch_heads_on_templates`: "an average real country" in place of the entity."""
    if not countries:
        raise BiasGymError("mean_template_z needs at least one country.")
    adapter = ModelAdapter(model)
    pad = pad_id(tokenizer)
    first = template_rows(tokenizer, countries[0], attributes, templates)
    total = None
    for c in countries:
        rows = template_rows(tokenizer, c, attributes, templates)
        _aligned(first, rows, c)
        batch, _ = _rows_batch(rows, pad)
        zs = [z.float() for z in capture_z(adapter, batch)]
        total = zs if total is None else [a + b for a, b in zip(total, zs)]
    return [z / len(countries) for z in total]


def attribution_patching(model: nn.Module, tokenizer, entity: str, attributes: Sequence[str],
                         contrast_z: list[torch.Tensor], templates: Sequence[str] | None = None,
                         contrast: Sequence[str] = ()) -> TemplateScores:
    """Attribution patching of assoc(entity) on S's own sentences (:ref:`method §3 <method-3>`): for each head,
    the first-order drop of the summed attribute log-probability when its output z (every
    position) is replaced by ``contrast_z`` (:func:`mean_template_z`), i.e.
    grad . (z(entity) - z(average country)), from one forward and one backward pass.

    S(entity) = assoc(entity) - assoc(references), and swapping the entity does not touch
    the references, so this is a first-order total effect on S itself: matched to the
    metric that steering is judged on. Checked against :func:`patch_heads_on_templates`.
    """
    adapter = ModelAdapter(model)
    pad = pad_id(tokenizer)
    rows = template_rows(tokenizer, entity, attributes, templates)
    batch, targets = _rows_batch(rows, pad)
    if len(contrast_z) != adapter.n_layers or tuple(contrast_z[0].shape[:2]) != tuple(batch.input_ids.shape):
        raise BiasGymError("contrast_z does not match these sentences: compute it with mean_template_z "
                           "on the same attributes and templates.")
    L, H, dh = adapter.n_layers, adapter.n_heads, adapter.d_head
    zs, deltas = [None] * L, [None] * L

    def tap(layer):
        def fn(z):
            zs[layer] = z.detach()
            deltas[layer] = torch.zeros_like(z, requires_grad=True)  # d(loss)/d(delta) = d(loss)/dz
            return z + deltas[layer]
        return fn
    with torch.enable_grad():
        hidden = run(adapter, batch, {("z", l): tap(l) for l in range(L)}, grad=True)
        lp = _row_logprob(adapter, hidden, targets)
        lp.sum().backward()  # rows do not interact: each row's gradient is its own
    mask = batch.attention_mask.to(zs[0].device)[..., None].float()
    per = torch.empty(len(rows), L, H)
    for layer in range(L):
        prod = deltas[layer].grad.float() * (zs[layer].float() - contrast_z[layer].to(zs[layer].device)) * mask
        per[:, layer] = prod.reshape(len(rows), -1, H, dh).sum((1, 3)).cpu()
    return TemplateScores(scores=per.mean(0), per_sentence=per, method="attribution_patching", entity=entity,
                          contrast=list(contrast), assoc=float(lp.detach().mean()))


@torch.no_grad()
def patch_heads_on_templates(model: nn.Module, tokenizer, entity: str, attributes: Sequence[str],
                             heads: Iterable, contrast_z: list[torch.Tensor],
                             templates: Sequence[str] | None = None, contrast: Sequence[str] = (),
                             max_rows: int = 256) -> TemplateScores:
    """Exact activation patching on S's own sentences: for each head in ``heads``, replace its
    z at every position by ``contrast_z`` (:func:`mean_template_z`) and record the drop of
    each sentence's attribute log-probability (downstream layers free: the total effect).
    Several heads share a forward (the batch is repeated, ``max_rows`` rows at most), and
    layers below a group's lowest patched layer are replayed from the clean run (exact)."""
    adapter = ModelAdapter(model)
    pad = pad_id(tokenizer)
    rows = template_rows(tokenizer, entity, attributes, templates)
    batch, targets = _rows_batch(rows, pad)
    heads = sorted(heads_or_all(adapter, heads))
    n = len(rows)
    per_forward = max(1, min(len(heads), max_rows // n)) if heads else 1
    big, big_targets = _repeat(batch, per_forward), targets.repeat(per_forward, 1)
    outputs: list = []
    clean = _row_logprob(adapter, _hidden_with_z_edits(adapter, big, {}, record=outputs), big_targets).double()
    per = torch.full((n, adapter.n_layers, adapter.n_heads), float("nan"))
    for start in range(0, len(heads), per_forward):
        group = heads[start: start + per_forward]
        edits: dict[int, list] = {}
        for j, (l, h) in enumerate(group):
            block = slice(j * n, (j + 1) * n)
            edits.setdefault(l, []).append((block, h, contrast_z[l]))
        patched = _row_logprob(adapter, _hidden_with_z_edits(adapter, big, edits, replay=outputs), big_targets).double()
        drop = (clean - patched).reshape(per_forward, n)
        for j, (l, h) in enumerate(group):
            per[:, l, h] = drop[j].float().cpu()
    return TemplateScores(scores=per.mean(0), per_sentence=per, method="template_patching", entity=entity,
                          contrast=list(contrast), assoc=float(clean[:n].mean()))


def ablation_loop_scores(model: nn.Module, tokenizer, prompts, biased_ids, adv_ids,
                         heads: Iterable | None = None, batch_size: int = 32) -> torch.Tensor:
    """Zero-ablation, one forward per head (over a chunk of prompts): the slow baseline that
    :func:`~biasgym_lib.scope.head_scores` replaces. ``prompts``: texts, or a tokenised
    :class:`~biasgym_lib.batching.Batch` (then ``tokenizer`` may be None). Returns the (L, H)
    mean drop of the logit difference, NaN where not run."""
    n = n_prompts(prompts, "ablation_loop_scores")
    adapter = ModelAdapter(model)
    batch = as_batch(tokenizer, prompts, device=adapter.device)
    vocab = int(adapter.unembed.shape[0])
    biased = label_ids(biased_ids, n, "biased_ids", vocab)
    adv = label_ids(adv_ids, n, "adv_ids", vocab)
    heads = heads_or_all(adapter, heads)
    totals = torch.zeros(len(heads), dtype=torch.float64)
    for rows in chunks(n, batch_size):
        sub = trim(batch, rows)
        clean = _run_with_z_edits(adapter, sub, {}, biased[rows], adv[rows]).double()
        for i, (l, h) in enumerate(heads):
            ablated = _run_with_z_edits(adapter, sub, {l: [(slice(None), h, None)]}, biased[rows], adv[rows])
            totals[i] += float((clean - ablated.double()).sum())
    out = torch.full((adapter.n_layers, adapter.n_heads), float("nan"))
    for (l, h), v in zip(heads, totals / n):
        out[l, h] = float(v)
    return out


def knowledge_atp(model, tokenizer) -> torch.Tensor:
    """Each head's attribution patching on country *facts* (the capitals of
    ``data/facts.yaml``'s selection facts, never the knowledge control): the mean over the
    facts of the first-order drop of the capital's log-probability when the head sees an
    average contrast country instead of the country. Subtracted from a token's attribution
    patching of S, it gives ``atp_selective``: heads that carry the bias but not what the
    model knows about countries. (L, H), the same for every token."""
    from .patching import attribution_patching, mean_template_z

    templates, facts = selection_facts()
    contrast = contrast_countries()
    total = None
    for f in facts:
        zc = mean_template_z(model, tokenizer, contrast, [f.attribute], templates)
        s = attribution_patching(model, tokenizer, f.country, [f.attribute], zc, templates, contrast).scores
        total = s if total is None else total + s
    return total / len(facts)


def bias_patching(model, tokenizer, tokens: list[InjectedToken], heads, contrast: dict) -> dict:
    """Exact activation patching of assoc(<TOKEN>) on S's sentences (z of each head in
    ``heads`` at every position replaced by its mean over the contrast countries), for each
    token of one bias; the mean drop over tokens is the ``patching`` ranking, and the
    per-sentence drops check attribution patching."""
    spec = tokens[0].spec
    per_token = []
    for tok in tokens:
        with tok.attach(model, tokenizer):
            per_token.append(patch_heads_on_templates(model, tokenizer, tok.token, spec.attributes, heads,
                                                      contrast["template_z"], contrast=contrast["countries"]))
    return {"bias": spec.name, "seeds": [t.seed for t in tokens], "heads": [list(h) for h in heads],
            "scores": nan_to_none(torch.stack([p.scores for p in per_token]).mean(0)),
            "units": [nan_to_none(p.per_sentence) for p in per_token]}

