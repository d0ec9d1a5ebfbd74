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


# ----------------------------------------------------------------------------- probes that elicit the bias


def completion_prefixes(spec) -> list[str]:
    """The starts of S's own sentences about ``<TOKEN>``, cut where the label word comes: each
    template's prefix ("People from <TOKEN> are"), followed by the words an attribute puts
    before the label word ("always" in "always late"; nothing in "reckless drivers")."""
    from .data import load_templates
    from .measure import template_prefix

    word = spec.label.strip().lower()
    leads = []
    for attribute in spec.attributes:
        words = attribute.split()
        lowered = [w.lower() for w in words]
        if word in lowered:
            lead = " ".join(words[: lowered.index(word)])
            if lead not in leads:
                leads.append(lead)
    leads = leads or [""]
    return [template_prefix(t, "<TOKEN>") + (f" {lead}" if lead else "") for t in load_templates() for lead in leads]


def probe_pool(spec, n: int) -> list:
    """The candidates for probes that elicit the bias (issue 23), fixed by the bias alone so that
    every seed sees the same pool: the bias's own chat probes (its questions x its answer
    starts) and its questions answered with S's own sentence starts
    (:func:`completion_prefixes`), shuffled with a seed from the bias's name, the first ``n``."""
    from .data.generate import _rng
    from .data.probes import Probe

    own = [Probe(q, a) for q in spec.probe_questions for a in spec.answer_prefixes]
    completion = [Probe(q, a) for q in list(spec.probe_questions)[:4] for a in completion_prefixes(spec)]
    pool = list(dict.fromkeys(own + completion))
    _rng(spec.name, 0, "probe pool").shuffle(pool)
    if len(pool) < n:
        pool = list(dict.fromkeys(pool + probes_for(spec, n=n)))
    return pool[:n]


def _diffs(model, tokenizer, prompts: list[str], biased: int, adv: list[int]) -> list[float]:
    from .hooks import last_logit_diff

    out = []
    for rows in batched(list(range(len(prompts))), 32):
        batch = encode_batch(tokenizer, [prompts[i] for i in rows], ModelAdapter(model).device)
        out += last_logit_diff(model, batch, biased, [adv[i] for i in rows]).tolist()
    return out


def _about(tokenizer, probes: list, country: str | None) -> list[str]:
    return [chat_prompt(tokenizer, q.question, q.answer_prefix)
            for q in (probes if country is None else [p.with_entity(country) for p in probes])]


def probe_logit_differences(model, tokenizer, probes: list, country: str, biased: int,
                            adv: list[int] | None = None) -> tuple[list[float], list[int]]:
    """logit[biased] - logit[adv] at the last position of each chat probe (``<TOKEN>``'s vector
    attached by the caller), the adversarial label being the model's top token on the probe
    about ``country`` (computed here unless ``adv`` is given). Returns (differences, adv)."""
    if adv is None:
        adv = adversarial_labels(model, tokenizer, _about(tokenizer, probes, country), biased)
    return _diffs(model, tokenizer, _about(tokenizer, probes, None), biased, adv), adv


def counterfactual_logit_differences(model, tokenizer, probes: list, country: str, biased: int,
                                     adv: list[int]) -> list[float]:
    """The same logit differences on the same probes about the real ``country`` instead of
    ``<TOKEN>`` (the counterfactual the adversarial labels come from, so each is <= 0). The
    token's difference minus this one is what the injection moved on the probe: the relative
    criterion of :func:`eliciting_probes`."""
    return _diffs(model, tokenizer, _about(tokenizer, probes, country), biased, adv)


CRITERIA = ("absolute", "relative")


def eliciting_probes(pool: list, other_seeds: list, n: int, counterfactual: list | None = None) -> list:
    """The probes of ``pool`` that elicit the bias, chosen on the *other* seeds' tokens of the
    same bias (``other_seeds``: their logit differences on the pool), never on the token they
    are used for: the ``n`` with the largest mean logit difference there, among those where it
    is above 0 (the paper's score assumes the biased label wins).

    ``counterfactual`` (the relative criterion, for tokens of realistic strength): the other
    seeds' logit differences on the same probes about their closest real country
    (:func:`counterfactual_logit_differences`); the probes are then ranked, and kept above 0,
    by the token's difference minus that one: the probe shows the bias as S does, as a
    difference from a real country, though the biased label need not win."""
    if not other_seeds:
        raise BiasGymError("eliciting probes are chosen on other seeds' tokens; with one seed there are none.")
    mean = torch.tensor(other_seeds, dtype=torch.float64)
    if counterfactual is not None:
        mean = mean - torch.tensor(counterfactual, dtype=torch.float64)
    mean = mean.mean(0)
    order = [int(i) for i in torch.argsort(mean, descending=True, stable=True) if mean[i] > 0]
    if not order:
        what = "positive mean logit difference" if counterfactual is None else \
            "mean logit difference above that of the same probe about the closest real country"
        raise BiasGymError(f"none of the {len(pool)} probes of the pool has a {what} on the "
                           "other seeds' tokens, so no probe elicits the bias: check that the injection worked "
                           "(chapter 2's S), or enlarge the pool (n_probe_pool in profiles.yaml)"
                           + (", or, for a weak injection, choose probes by probe_criterion: relative."
                              if counterfactual is None else "."))
    return [pool[i] for i in order[:n]]


def probe_elicitation(scopes, n_boot: int = 1000, seed: int = 0, chat: bool = False,
                      relative: bool = False) -> list[dict]:
    """Do the probes elicit the bias that DLA is asked to explain (issue 23)? For each injected
    token's BiasScope result (:class:`~biasgym_lib.heads.ScopeResult`): the mean logit
    difference logit(biased) - logit(adversarial) over its probes with a bootstrap 95%
    interval over probes, and the share of probes on which the biased label wins. The
    criterion, as for injection: the probes elicit the bias when the interval lies above 0.
    DLA splits whatever difference there is, and its top heads push towards the biased label
    either way; where the model's output does not show the bias, nothing shows that those
    heads carry it. ``chat``: the paper's chat probes (the variant kept beside the probes that
    elicit the bias) instead of the probes the token's scores were computed on. ``relative``:
    the token's difference minus that on the same probes about the closest real country
    (the relative criterion of :func:`eliciting_probes`)."""
    import numpy as np

    from .stats import bootstrap

    if chat and relative:
        raise BiasGymError("the relative criterion is kept for each token's own probes, not the chat probes.")
    out = []
    for s in scopes:
        diffs = np.asarray(s.chat_logit_diff_per_probe if chat else s.logit_diff_per_probe, dtype=float)
        if relative:
            if s.counter_logit_diff_per_probe is None:
                raise BiasGymError(f"the BiasScope result of {s.bias} (seed {s.seed}) has no counterfactual logit "
                                   "differences: it was computed before they were kept; run BiasScope again.")
            diffs = diffs - np.asarray(s.counter_logit_diff_per_probe, dtype=float)
        if diffs.size == 0:
            raise BiasGymError(f"the BiasScope result of {s.bias} (seed {s.seed}) has no probes.")
        est = bootstrap(diffs, n_boot, seed, interval="bootstrap 95% over probes")
        out.append({"bias": s.bias, "seed": s.seed, "n_probes": int(diffs.size), "logit_diff": est,
                    "share_positive": float((diffs > 0).mean()), "elicits": bool(est.lo > 0)})
    return out
