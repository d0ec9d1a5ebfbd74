"""BiasScope for one injected token (:ref:`method §3 <method-3>`): every head score of
:data:`~biasgym_lib.scope.METHODS` that is computed per token, on probes that elicit the bias
(:func:`~biasgym_lib.probing.eliciting_probes`) and, as the paper's variant, on its chat
probes; what every token of a bias is contrasted with (:func:`bias_contrast`). The scores
themselves are :mod:`~biasgym_lib.scope`'s and :mod:`~biasgym_lib.patching`'s."""

from __future__ import annotations

import time

from .config import Profile
from .data import contrast_countries, probes_for
from .errors import BiasGymError
from .heads import SCORE_METHODS, ScopeResult, attention_to_entity
from .inject import closest_countries
from .batching import encode_batch
from .hooks import last_logit_diff
from .models import ModelAdapter, chat_prompt
from .patching import attribution_patching, mean_template_z
from .probing import adversarial_labels, counterfactual_logit_differences, label_id, probe_prompts
from .scope import attribute_head_scores, contrastive_head_scores, head_scores, mean_last_z
from .tokens import InjectedToken


def bias_contrast(model, tokenizer, spec, cfg: Profile, parts=("probe_z", "template_z"),
                  contrast: dict | None = None) -> dict:
    """What every token of a bias is contrasted with (it holds no <TOKEN>, so it is computed
    once per bias): the heads' mean output over the contrast countries on the probes
    (``probe_z``: last token, for ΔDLA) and on S's sentences (``template_z``: every position,
    for attribution patching and exact patching). Only the ``parts`` asked for are computed;
    given an earlier ``contrast`` of the same bias, the missing ones are added to it."""

    contrast = contrast if contrast is not None else {"countries": contrast_countries()}
    countries = contrast["countries"]
    if "probe_z" in parts and "probe_z" not in contrast:
        sets = [probe_prompts(tokenizer, spec, cfg.n_probes, c)[1] for c in countries]  # the chat probes
        contrast["probe_z"] = mean_last_z(model, tokenizer, sets)
    if "template_z" in parts and "template_z" not in contrast:
        contrast["template_z"] = mean_template_z(model, tokenizer, countries, spec.attributes)
    return contrast


CONTRAST_NEEDS = {"delta_dla": ("probe_z",), "atp": ("template_z",)}
"""The parts of :func:`bias_contrast` each per-token score needs."""


def probe_contrast_z(model, tokenizer, probes, countries) -> torch.Tensor:
    """z̄_c of ΔDLA on ``probes``: every head's last-position output on the same probes about each
    contrast country, averaged (:func:`~biasgym_lib.scope.mean_last_z`). The chat probes' is kept
    in a bias's contrast (``probe_z``); probes chosen per token need their own, and a check of
    ΔDLA (direct-path patching) must use the same one."""
    return mean_last_z(model, tokenizer, [[chat_prompt(tokenizer, q.question, q.answer_prefix)
                                           for q in (p.with_entity(c) for p in probes)] for c in countries])


def _labelled(model, tokenizer, contrast: dict, probes, country: str, biased: int) -> tuple[list[str], list[int]]:
    """Chat prompts of ``probes`` and their adversarial labels (the model's top token on the
    probe about ``country``). The counterfactuals hold no <TOKEN>, so their labels are the
    same for every seed with the same closest country: a bias's contrast keeps them."""
    prompts = [chat_prompt(tokenizer, p.question, p.answer_prefix) for p in probes]
    counter = [chat_prompt(tokenizer, q.question, q.answer_prefix) for q in (p.with_entity(country) for p in probes)]
    known = contrast.setdefault("adv_labels", {})
    key = (country, hash(tuple(counter)))
    if key not in known:
        known[key] = adversarial_labels(model, tokenizer, counter, biased)
    return prompts, known[key]


def scope_run(model, tokenizer, injected: InjectedToken, cfg: Profile, contrast: dict | None = None,
              methods=SCORE_METHODS, probes=None) -> ScopeResult:
    """BiasScope for one injected token: the head scores of ``methods`` (by default every
    score of :data:`METHODS` computed per token: DLA, ΔDLA, attribute-matched ΔDLA,
    attribution patching of S, attention to the entity, and the paper's DLA on the chat
    probes as a variant; the paper's DLA always), the total logit difference and the
    decomposition error. ``probes``: probes that elicit the bias
    (:func:`~biasgym_lib.probing.eliciting_probes`, chosen on the bias's other seeds); without
    them the chat probes (:func:`~biasgym_lib.probing.probe_prompts`) are used for every score.
    ``contrast``: :func:`bias_contrast` of the token's bias (computed here, or completed, as
    the methods need). Returns a :class:`~biasgym_lib.heads.ScopeResult` (``head_scores.json``)."""
    spec = injected.spec
    unknown = sorted(set(methods) - set(SCORE_METHODS))
    if unknown:
        raise BiasGymError(f"scope_run computes {list(SCORE_METHODS)}; not {unknown}.")
    methods = {"dla", *methods}
    chat = probes_for(spec, n=cfg.n_probes)
    parts = [p for m in methods for p in CONTRAST_NEEDS.get(m, ())] if probes is None else \
        [p for m in methods - {"delta_dla"} for p in CONTRAST_NEEDS.get(m, ())]
    contrast = bias_contrast(model, tokenizer, spec, cfg, parts, contrast)
    seconds, t0 = {}, time.perf_counter()

    def lap(name):
        nonlocal t0
        seconds[name] = time.perf_counter() - t0
        t0 = time.perf_counter()

    scores, units = {}, {}
    attr = atp = None
    used = chat if probes is None else list(probes)
    with injected.attach(model, tokenizer) as hook:
        country = closest_countries(model, tokenizer, injected.vector, k=1)[0][0]
        biased = label_id(tokenizer, spec.label)
        prompts, adv = _labelled(model, tokenizer, contrast, used, country, biased)
        counter_ld = counterfactual_logit_differences(model, tokenizer, used, country, biased, adv)
        if "delta_dla" in methods:
            probe_z = contrast["probe_z"] if probes is None else probe_contrast_z(model, tokenizer, used,
                                                                                  contrast["countries"])
            delta = contrastive_head_scores(model, tokenizer, prompts, biased, adv, probe_z)
            hs = delta.meta["dla"]  # the paper's DLA, from the same forward pass
            scores["delta_dla"], units["delta_dla"] = delta.scores, delta.per_prompt
        else:
            hs = head_scores(model, tokenizer, prompts, biased, adv)
        scores["dla"], units["dla"] = hs.scores, hs.per_prompt
        lap("dla_and_delta_dla" if "delta_dla" in methods else "dla")
        if probes is None:
            chat_hs, chat_ld = hs, hs.logit_diff.tolist()
        else:  # the paper's chat probes, as a variant: their logit difference always, their DLA if asked
            chat_prompts, chat_adv = _labelled(model, tokenizer, contrast, chat, country, biased)
            if "dla_chat" in methods:
                chat_hs = head_scores(model, tokenizer, chat_prompts, biased, chat_adv)
                chat_ld = chat_hs.logit_diff.tolist()
            else:
                batch = encode_batch(tokenizer, chat_prompts, ModelAdapter(model).device)
                chat_ld = last_logit_diff(model, batch, biased, chat_adv).tolist()
        if "dla_chat" in methods:
            scores["dla_chat"], units["dla_chat"] = chat_hs.scores, chat_hs.per_prompt
        lap("chat probes")
        if "attr" in methods:
            attr = attribute_head_scores(model, tokenizer, injected.token, spec.attributes, contrast["countries"])
            scores["attr"], units["attr"] = attr.scores, attr.per_prompt
            lap("attr")
        if "atp" in methods:
            atp = attribution_patching(model, tokenizer, injected.token, spec.attributes, contrast["template_z"],
                                       contrast=contrast["countries"])
            scores["atp"], units["atp"] = atp.scores, atp.per_sentence
            lap("atp")
        if "attention" in methods:
            scores["attention"] = attention_to_entity(model, tokenizer, prompts, hook.token_id)
            lap("attention")
    return ScopeResult(
        bias=spec.name, seed=injected.seed, model=injected.model, profile=cfg.name, k=cfg.k,
        scores={m: scores[m] for m in SCORE_METHODS if m in scores}, units=units,
        logit_diff_total=float(hs.logit_diff.mean()), logit_diff_per_probe=hs.logit_diff.tolist(),
        decomposition_error=float(hs.decomposition_error),
        attr_decomposition_error=None if attr is None else float(attr.decomposition_error),
        share_top_k=float(hs.share_top_k(cfg.k)), counterfactual_country=country,
        contrast_countries=list(contrast["countries"]), probes=list(prompts), biased_label=tokenizer.decode([biased]),
        adv_labels=[tokenizer.decode([a]) for a in adv], assoc_on_templates=None if atp is None else atp.assoc,
        components=_component_summary(hs.components), seconds=seconds,
        probe_source="chat" if probes is None else
        "eliciting" if cfg.probe_criterion == "absolute" else f"eliciting-{cfg.probe_criterion}",
        chat_logit_diff_per_probe=chat_ld, counter_logit_diff_per_probe=counter_ld)


def _component_summary(components: dict) -> dict:
    """Mean contribution over probes, grouped: embeddings, all heads, all MLPs, biases."""
    groups: dict[str, float] = {}
    for name, values in components.items():
        group = name.split(".")[0]
        groups[group] = groups.get(group, 0.0) + float(values.float().mean())
    return groups
