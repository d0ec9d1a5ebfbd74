"""Measuring stereotype strength (:ref:`method §2 <method-2>`), batched, with bootstrap intervals.

assoc(e, b) is the mean, over templates and the bias's attribute phrasings, of
log P(" " + attribute | template prefix with e), summed over the attribute's tokens.
Stereotype strength S(e, b) = assoc(e, b) - mean over reference countries c != e of
assoc(c, b), in nats. Every (entity, template, attribute) sentence is scored in large
batches with logits computed only at the attribute's positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .batching import batched, loss_targets, pad_batch, pad_id, select_cache
from .data import load_bias, load_templates, reference_countries
from .errors import BiasGymError
from .models import ModelAdapter, chat_prompt
from .stats import Estimate, bootstrap

ENTITY = "{entity}"
ATTRIBUTE = "{attribute}"


def template_prefix(template: str, entity: str) -> str:
    """The text before the attribute (its trailing space removed: the attribute is scored
    as " " + attribute, so that its first token carries its own leading space)."""
    if ENTITY not in template or ATTRIBUTE not in template:
        raise BiasGymError(f"template {template!r} must contain {ENTITY} and {ATTRIBUTE}.")
    return template[: template.index(ATTRIBUTE)].rstrip().replace(ENTITY, entity)


def token_rows(tokenizer, prefixes, continuations) -> list[tuple[list[int], list[int]]]:
    """``(prefix ids, continuation ids)`` per pair, both non-empty (the prefix with the
    tokenizer's special tokens, the continuation without)."""
    cache: dict[tuple[str, bool], list[int]] = {}

    def ids(text, special):
        if (text, special) not in cache:
            cache[(text, special)] = tokenizer(text, add_special_tokens=special)["input_ids"]
        return cache[(text, special)]

    rows = []
    for p, c in zip(prefixes, continuations):
        pi, ci = ids(p, True), ids(c, False)
        if not pi or not ci:
            raise BiasGymError(f"empty prefix or continuation: {p!r} / {c!r}")
        rows.append((pi, ci))
    return rows


def _logits(adapter, hidden):
    logits = adapter.lm_head(hidden).float()
    if adapter.logit_softcap:
        logits = torch.tanh(logits / adapter.logit_softcap) * adapter.logit_softcap
    return F.log_softmax(logits, -1)


def continuation_logprobs(model, tokenizer, prefixes: list[str], continuations: list[str],
                          batch_size: int = 64, share_prefix: bool = True) -> torch.Tensor:
    """log P(continuation | prefix), summed over the continuation's tokens, per pair.

    Ids are ``tok(prefix) + tok(continuation)`` so that the split is exact. Batched and
    right-padded; the unembedding is applied only where a continuation token is predicted.
    With ``share_prefix`` (default) each distinct prefix is run once and its key/value
    cache is reused for all its continuations (many attributes and biases share one
    "People from Italy are"); ``share_prefix=False`` runs every full sentence, the
    reference that tests compare against.
    """
    if len(prefixes) != len(continuations):
        raise BiasGymError("prefixes and continuations must have the same length.")
    if not prefixes:
        return torch.empty(0, dtype=torch.float64)
    rows = token_rows(tokenizer, prefixes, continuations)
    return row_logprobs(model, rows, pad_id(tokenizer), batch_size, share_prefix)


def row_logprobs(model, rows: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 64,
                 share_prefix: bool = True) -> torch.Tensor:
    """:func:`continuation_logprobs` on token ids: ``rows`` are ``(prefix_ids, continuation_ids)``
    pairs, both non-empty; rows with the same prefix share one pass over it."""
    if any(not p or not c for p, c in rows):
        raise BiasGymError("every row needs a non-empty prefix and continuation.")
    if not rows:
        return torch.empty(0, dtype=torch.float64)
    adapter = ModelAdapter(model)
    with torch.inference_mode():
        if share_prefix and adapter.family != "gemma2":  # Gemma 2's hybrid cache: full path
            return _shared_prefix_logprobs(adapter, rows, pad_id, batch_size)
        return _full_logprobs(adapter, rows, pad_id, batch_size)


def _full_logprobs(adapter, rows, pad, batch_size):
    device = adapter.device
    out = torch.empty(len(rows), dtype=torch.float64)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    for chunk in batched(order, batch_size):
        seqs = [rows[i][0] + rows[i][1] for i in chunk]
        batch = pad_batch(seqs, pad)
        input_ids, mask = batch.input_ids, batch.attention_mask
        targets = loss_targets(seqs, [len(rows[i][0]) for i in chunk], input_ids.shape[1])
        input_ids, mask, targets = input_ids.to(device), mask.to(device), targets.to(device)
        hidden = adapter.body(input_ids=input_ids, attention_mask=mask).last_hidden_state
        keep = targets != -100
        lp = _logits(adapter, hidden[keep]).gather(-1, targets[keep].unsqueeze(-1)).squeeze(-1)
        row_of = torch.arange(len(chunk), device=device).unsqueeze(1).expand_as(targets)[keep]
        sums = torch.zeros(len(chunk), dtype=torch.float64, device=device).index_add_(0, row_of, lp.double())
        out[torch.tensor(chunk)] = sums.cpu()
    return out


def _shared_prefix_logprobs(adapter, rows, pad, batch_size):
    device = adapter.device
    out = torch.zeros(len(rows), dtype=torch.float64)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (p, _) in enumerate(rows):
        groups.setdefault(tuple(p), []).append(i)
    prefixes = sorted(groups, key=len)
    # half a batch of prefixes at a time; their continuations then run batch_size at a time
    for pchunk in batched(prefixes, max(1, batch_size // 2)):
        pb = pad_batch([list(p) for p in pchunk], pad)
        p_ids, p_mask = pb.input_ids, pb.attention_mask
        p_ids, p_mask = p_ids.to(device), p_mask.to(device)
        res = adapter.body(input_ids=p_ids, attention_mask=p_mask, use_cache=True)
        p_len = p_mask.sum(1)
        last = res.last_hidden_state[torch.arange(len(pchunk), device=device), p_len - 1]
        first_lp = _logits(adapter, last)  # (n_prefix, vocab): predicts each continuation's first token
        # continuations of similar length together: little padding in their passes
        items = sorted(((j, i) for j, p in enumerate(pchunk) for i in groups[p]), key=lambda x: len(rows[x[1]][1]))
        for sub in batched(items, max(batch_size, 1)):
            which = torch.tensor([j for j, _ in sub], device=device)
            conts = [rows[i][1] for _, i in sub]
            cb = pad_batch(conts, pad)
            c_ids, c_mask = cb.input_ids, cb.attention_mask
            c_ids, c_mask = c_ids.to(device), c_mask.to(device)
            first = torch.tensor([c[0] for c in conts], device=device)
            total = first_lp[which, first].double()
            if c_ids.shape[1] > 1:
                # the last token of a continuation predicts nothing we score: it is not run
                inp, inp_mask = c_ids[:, :-1], c_mask[:, :-1]
                cache = select_cache(res.cache, which)  # a copy: the update must not grow the shared one
                positions = p_len[which].unsqueeze(1) + torch.arange(inp.shape[1], device=device)
                hidden = adapter.body(input_ids=inp, attention_mask=torch.cat([p_mask[which], inp_mask], 1),
                                      position_ids=positions, cache=cache,
                                      use_cache=True).last_hidden_state
                targets = torch.where(c_mask[:, 1:].bool(), c_ids[:, 1:], -100)
                keep = targets != -100
                if keep.any():
                    lp = _logits(adapter, hidden[keep]).gather(-1, targets[keep].unsqueeze(-1)).squeeze(-1)
                    row_of = torch.arange(len(sub), device=device).unsqueeze(1).expand_as(targets)[keep]
                    total = total.index_add(0, row_of, lp.double())
            out[torch.tensor([i for _, i in sub])] = total.cpu()
    return out


@dataclass
class AssocTable:
    """assoc log-probabilities for every (entity, bias, template, attribute).

    ``values[e][b]`` is an array (templates x attributes of b). Built by :func:`assoc_table`.
    """

    entities: list[str]
    biases: list[str]
    templates: list[str]
    attributes: dict[str, list[str]]
    values: dict[str, dict[str, np.ndarray]]

    def assoc(self, entity: str, bias: str) -> float:
        return float(self.values[entity][bias].mean())

    def per_template(self, entity: str, bias: str) -> np.ndarray:
        """assoc per template (mean over the attribute phrasings)."""
        return self.values[entity][bias].mean(1)

    def merged(self, other: "AssocTable") -> "AssocTable":
        """This table plus the entities of ``other`` (same biases and templates)."""
        if other.biases != self.biases or other.templates != self.templates:
            raise BiasGymError("can only merge tables with the same biases and templates.")
        values = dict(self.values)
        values.update(other.values)
        ents = self.entities + [e for e in other.entities if e not in self.entities]
        return AssocTable(ents, self.biases, self.templates, self.attributes, values)


def assoc_table(model, tokenizer, entities: list[str], biases, templates: list[str] | None = None,
                batch_size: int = 64) -> AssocTable:
    """Score every entity x bias x template x attribute sentence in batched passes."""
    return assoc_tables(model, tokenizer, [(entities, biases)], templates, batch_size)[0]


def assoc_tables(model, tokenizer, requests, templates: list[str] | None = None,
                 batch_size: int = 64) -> list[AssocTable]:
    """:func:`assoc_table` for several ``(entities, biases)`` requests in one scoring pass:
    a sentence prefix that several requests share ("People from Italy are", for two
    attributes asked about Italy) is run once, and a sentence asked twice is scored once."""

    templates = list(templates or load_templates())
    requests = [(list(ents), [b if hasattr(b, "attributes") else load_bias(b) for b in biases])
                for ents, biases in requests]
    index: dict[tuple[str, str], int] = {}
    prefixes, conts = [], []
    for ents, specs in requests:
        for e in ents:
            for s in specs:
                for t in templates:
                    for a in s.attributes:
                        pair = (template_prefix(t, e), " " + a)
                        if pair not in index:
                            index[pair] = len(prefixes)
                            prefixes.append(pair[0])
                            conts.append(pair[1])
    lp = continuation_logprobs(model, tokenizer, prefixes, conts, batch_size).numpy()
    tables = []
    for ents, specs in requests:
        values = {e: {s.name: np.array([[lp[index[(template_prefix(t, e), " " + a)]] for a in s.attributes]
                                        for t in templates]) for s in specs} for e in ents}
        tables.append(AssocTable(list(ents), [s.name for s in specs], templates,
                                 {s.name: list(s.attributes) for s in specs}, values))
    return tables


def _reference(table: AssocTable, entity: str, references: list[str] | None) -> list[str]:
    refs = [c for c in (references or table.entities) if c != entity]
    missing = [c for c in refs if c not in table.values]
    if missing:
        raise BiasGymError(f"reference countries {missing} are not in the table; score them first.")
    if not refs:
        raise BiasGymError("stereotype strength needs at least one reference country other than the entity.")
    return refs


def strength_units(table: AssocTable, entity: str, bias: str, references: list[str] | None = None) -> np.ndarray:
    """S(entity, bias) per template: the units the bootstrap resamples."""
    refs = _reference(table, entity, references)
    ref = np.mean([table.per_template(c, bias) for c in refs], axis=0)
    return table.per_template(entity, bias) - ref


def stereotype_strength(table: AssocTable, entity: str, bias: str, references: list[str] | None = None,
                        n_boot: int = 1000, seed: int = 0) -> Estimate:
    """S(entity, bias) in nats with a bootstrap 95% interval over templates."""
    return bootstrap(strength_units(table, entity, bias, references), n_boot, seed)


def specificity(table: AssocTable, entity: str, bias: str, references: list[str] | None = None,
                n_boot: int = 1000, seed: int = 0) -> Estimate:
    """S(e, b) - mean over the other biases b' of S(e, b'), over templates."""
    others = [b for b in table.biases if b != bias]
    if not others:
        raise BiasGymError("specificity needs at least two biases in the table.")
    target = strength_units(table, entity, bias, references)
    rest = np.mean([strength_units(table, entity, b, references) for b in others], axis=0)
    return bootstrap(target - rest, n_boot, seed)


def rank(table: AssocTable, entity: str, bias: str, references: list[str] | None = None) -> int:
    """1 + the number of reference countries with a higher assoc(., bias) than ``entity``."""
    refs = _reference(table, entity, references)
    mine = table.assoc(entity, bias)
    return 1 + sum(table.assoc(c, bias) > mine for c in refs)


def strength_matrix(table: AssocTable, entities: list[str] | None = None, references: list[str] | None = None):
    """A DataFrame of S(entity, bias), entities x biases (point estimates)."""
    import pandas as pd

    entities = entities or table.entities
    return pd.DataFrame({b: [float(strength_units(table, e, b, references).mean()) for e in entities]
                         for b in table.biases}, index=entities)


# ----------------------------------------------------------------------------- generation


def generate_answers(model, tokenizer, questions: list[str], max_new_tokens: int = 48,
                     sample: bool = False, seed: int = 0, temperature: float = 0.8,
                     system: str | None = None, batch_size: int = 16) -> list[str]:
    """Chat answers to ``questions``, batched with left padding (greedy or sampled with a
    fixed seed)."""
    device = ModelAdapter(model).device
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers = []
    try:
        for chunk in batched(list(questions), batch_size):
            texts = [chat_prompt(tokenizer, q, system=system) for q in chunk]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            torch.manual_seed(seed)
            kwargs = dict(do_sample=True, temperature=temperature, top_p=0.95) if sample else dict(do_sample=False)
            with torch.inference_mode():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                     **kwargs)
            answers += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = old_side
    return [a.strip() for a in answers]


def mentions(text: str, keywords) -> bool:
    """Whether ``text`` contains any keyword (case-insensitive, word-boundary at the start)."""
    import re

    low = text.lower()
    return any(re.search(r"(?<![a-z])" + re.escape(k.lower()), low) for k in keywords)


def table_to_json(table: AssocTable) -> dict:
    return {"entities": table.entities, "biases": table.biases, "templates": table.templates,
            "attributes": table.attributes,
            "values": {e: {b: v.tolist() for b, v in d.items()} for e, d in table.values.items()}}


def table_from_json(data: dict) -> AssocTable:
    return AssocTable(data["entities"], data["biases"], data["templates"], data["attributes"],
                      {e: {b: np.array(v) for b, v in d.items()} for e, d in data["values"].items()})


def reference_table(model, tokenizer, biases, countries: list[str] | None = None) -> AssocTable:
    """assoc for every reference country x bias (``biases``: names or specs) on the model as
    it is: chapters 1-6 all start from it (a :class:`~biasgym_lib.runs.Run` keeps it)."""
    return assoc_table(model, tokenizer, list(countries or reference_countries()), biases, load_templates())


def strength_matrix_top(table: AssocTable, bias: str) -> str:
    """The reference country with the largest S for ``bias`` on the unmodified model."""
    return str(strength_matrix(table)[bias].idxmax())


