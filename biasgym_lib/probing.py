"""Probes and labels for BiasScope (:ref:`method §3 <method-3>`): the chat probes about ``<TOKEN>``
with their counterfactuals about a real country, the biased label (the first token of the
bias keyword) and the adversarial label (the model's own top token on the counterfactual)."""

from __future__ import annotations

import torch

from .batching import batched, encode_batch
from .data import probes_for
from .errors import BiasGymError
from .models import ModelAdapter, chat_prompt


def label_id(tokenizer, label: str) -> int:
    """The biased label (:ref:`method §3 <method-3>`): the first token of the bias keyword, e.g. " reckless".
    It must be exactly one token of ``tokenizer`` (see :func:`~biasgym_lib.data.specs.check_label`)."""
    ids = tokenizer(label, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise BiasGymError(f"label {label!r} is {len(ids)} tokens {[tokenizer.decode([i]) for i in ids]} for "
                           "this tokenizer; the biased label must be exactly one token.")
    return ids[0]


def probe_prompts(tokenizer, spec, n: int, country: str, seed: int = 0) -> tuple[list[str], list[str]]:
    """Chat-formatted probes with ``<TOKEN>`` and their counterfactuals with ``country``."""
    probes = probes_for(spec, n=n, seed=seed)
    prompts = [chat_prompt(tokenizer, p.question, p.answer_prefix) for p in probes]
    counter = [chat_prompt(tokenizer, q.question, q.answer_prefix) for q in (p.with_entity(country) for p in probes)]
    return prompts, counter


def adversarial_labels(model, tokenizer, counterfactuals: list[str], biased: int, batch_size: int = 32) -> list[int]:
    """The model's top next token on each counterfactual probe (:ref:`method §3 <method-3>`); if that is the
    biased label itself, the runner-up, so that the logit difference is never 0 by definition."""

    adapter = ModelAdapter(model)
    out = []
    with torch.inference_mode():
        for chunk in batched(counterfactuals, batch_size):
            batch = encode_batch(tokenizer, chunk, adapter.device)
            hidden = adapter.body(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
            logits = adapter.lm_head(hidden[torch.arange(len(chunk)), batch.last_index])
            top2 = logits.topk(2, dim=-1).indices.tolist()
            out += [b if a == biased else a for a, b in top2]
    return out


def probe_elicitation(scopes, n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """Do the probes elicit the bias that DLA is asked to explain (issue 23)? For each injected
    token's BiasScope result (:class:`~biasgym_lib.heads.ScopeResult`): the mean logit
    difference logit(biased) - logit(adversarial) over its probes with a bootstrap 95%
    interval over probes, and the share of probes on which the biased label wins. The
    criterion, as for injection: the probes elicit the bias when the interval lies above 0.
    DLA splits whatever difference there is, and its top heads push towards the biased label
    either way; where the model's output does not show the bias, nothing shows that those
    heads carry it."""
    import numpy as np

    from .stats import bootstrap

    out = []
    for s in scopes:
        diffs = np.asarray(s.logit_diff_per_probe, dtype=float)
        if diffs.size == 0:
            raise BiasGymError(f"the BiasScope result of {s.bias} (seed {s.seed}) has no probes.")
        est = bootstrap(diffs, n_boot, seed, interval="bootstrap 95% over probes")
        out.append({"bias": s.bias, "seed": s.seed, "n_probes": int(diffs.size), "logit_diff": est,
                    "share_positive": float((diffs > 0).mean()), "elicits": bool(est.lo > 0)})
    return out
