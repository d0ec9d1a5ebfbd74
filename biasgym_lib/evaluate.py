"""Capability checks (METHOD §5): does steering hurt the model's general ability?

- :func:`perplexity` on a neutral text set (``data/capability/neutral.jsonl``).
- :func:`mc_accuracy` on a four-option general-knowledge set (``data/capability/mc.jsonl``),
  scoring each option by the log-likelihood of its tokens after ``Question: ...\\nAnswer:``.
- :func:`mmlu_questions`: MMLU instead, where ``datasets`` and a hub are available.
- :func:`paired_change` / :func:`compare`: before/after changes with paired bootstrap
  intervals (the per-passage and per-question values are kept in every result for this).

Every function takes only ``(model, tokenizer, ...)`` and keeps no state, so the same call
measures a steered model when it runs inside the steering context manager.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from contextlib import nullcontext

import numpy as np
import torch

from .batching import Batch, batched, encode_batch
from .data import contrast_countries, load_bias, reference_countries
from .data.capability import MCQuestion
from .errors import BiasGymError
from .measure import (
    assoc_table,
    assoc_tables,
    bootstrap,
    row_logprobs,
    stereotype_strength,
)
from .steer import SteeringSpec

CI_LEVEL = 0.95
MC_PROMPT = "Question: {question}\nAnswer:"


# ----------------------------------------------------------------------------- helpers


def _device(model) -> torch.device:
    device = getattr(model, "device", None)
    return torch.device(device) if device is not None else next(model.parameters()).device


def _bos(tokenizer) -> str:
    """The BOS token's text, or "" for a tokenizer without one."""
    return tokenizer.bos_token if getattr(tokenizer, "bos_token", None) else ""


def _fingerprint(items: Sequence) -> str:
    """A short hash of the evaluated items, so that a paired comparison can check that
    the before and after results were measured on the same things."""
    return hashlib.sha256(json.dumps(list(items), ensure_ascii=False).encode()).hexdigest()[:16]


def _percentile_ci(samples: np.ndarray, level: float = CI_LEVEL) -> list[float]:
    lo, hi = np.percentile(samples, [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)]


def _bootstrap_indices(n: int, seed: int, n_boot: int) -> np.ndarray:
    """``(n_boot, n)`` indices drawn with replacement, from a seeded generator."""
    if n < 1:
        raise BiasGymError("cannot bootstrap over zero items.")
    if n_boot < 1:
        raise BiasGymError(f"n_boot must be at least 1, got {n_boot}.")
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise BiasGymError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token.")
    return pad


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ----------------------------------------------------------------------------- perplexity


def _passage_nll(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL (nats) and number of predicted tokens, per row.

    Per token in float32 (logsumexp minus the target's logit; float64 would cost ~10x
    more time here for ~1e-7 per token), summed in float64.
    """
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    targets = batch.input_ids[:, 1:]
    valid = batch.attention_mask[:, 1:].bool()
    nll = torch.zeros(len(targets), dtype=torch.float64)
    for i in range(len(targets)):  # per row, so only one row's softmax is in memory
        n = int(valid[i].sum())
        if n:
            row = logits[i, :n].float()
            per_token = torch.logsumexp(row, -1) - row.gather(1, targets[i, :n, None])[:, 0]
            nll[i] = per_token.double().sum().cpu()
    return nll, valid.sum(1).cpu()


def perplexity(model, tokenizer, texts: Sequence[str], batch_size: int = 8, max_length: int = 512,
               seed: int = 0, n_boot: int = 1000) -> dict:
    """Token-weighted perplexity of ``texts``, with a bootstrap 95% interval over passages.

    Each passage gets the tokenizer's BOS token (if it has one) and is truncated to
    ``max_length`` tokens; every token after the first is predicted. Returns ``ppl``,
    ``ci``, ``n_tokens``, ``n``, and per passage ``nll`` (summed, nats) and ``tokens``
    (kept for :func:`paired_change`).
    """
    texts = list(texts)
    if not texts:
        raise BiasGymError("perplexity got no texts.")
    if max_length < 2:
        raise BiasGymError(f"max_length must be at least 2 tokens, got {max_length}.")
    device = _device(model)
    bos = _bos(tokenizer)
    nll, tokens = [], []
    with torch.inference_mode():
        for chunk in batched(texts, batch_size):
            batch = encode_batch(tokenizer, [bos + t for t in chunk], device)
            batch = Batch(batch.input_ids[:, :max_length], batch.attention_mask[:, :max_length])
            n, k = _passage_nll(model, batch)
            nll.extend(n.tolist())
            tokens.extend(int(x) for x in k)
    nll_a, tok_a = np.asarray(nll), np.asarray(tokens, dtype=np.int64)
    if tok_a.sum() == 0:
        raise BiasGymError("no token to predict: every passage is empty or a single token.")
    idx = _bootstrap_indices(len(texts), seed, n_boot)
    boot = np.exp(nll_a[idx].sum(1) / np.maximum(tok_a[idx].sum(1), 1))
    return {"metric": "perplexity", "ppl": float(math.exp(nll_a.sum() / tok_a.sum())),
            "ci": _percentile_ci(boot), "n_tokens": int(tok_a.sum()), "n": len(texts),
            "nll": nll, "tokens": tokens, "max_length": max_length,
            "fingerprint": _fingerprint([max_length, *texts])}


# ----------------------------------------------------------------------------- multiple choice


def _question_parts(q) -> tuple[str, list[str], int]:
    """(question, options, answer) from an MCQuestion or a dict with those keys."""
    if isinstance(q, Mapping):
        return q["question"], list(q["options"]), int(q["answer"])
    return q.question, list(q.options), int(q.answer)


def _option_rows(tokenizer, prompt: str, options: list[str]) -> list[tuple[list[int], int]]:
    """Token ids of prompt + " option" for each option, and where the option starts.

    The whole string is tokenised once and the option's tokens are what follows the
    prompt's tokens (so merges across the boundary are as in running text); if a
    tokenizer splits the prompt differently inside the whole string, the two parts are
    tokenised separately and concatenated instead.
    """
    ctx = _ids(tokenizer, _bos(tokenizer) + prompt)
    rows = []
    for opt in options:
        whole = _ids(tokenizer, _bos(tokenizer) + prompt + " " + opt)
        if whole[: len(ctx)] != ctx or len(whole) == len(ctx):
            whole = ctx + _ids(tokenizer, " " + opt)
        if len(whole) == len(ctx):
            raise BiasGymError(f"option {opt!r} has no tokens.")
        rows.append((whole, len(ctx)))
    return rows


def _option_loglik(model, tokenizer, rows: list[tuple[list[int], int]], batch_size: int) -> np.ndarray:
    """Summed log-probability of each row's option tokens. The options of a question share
    its prompt, which is run once (its key/value cache feeds every option), and only the
    option positions are unembedded: see :func:`~biasgym_lib.measure.row_logprobs`."""

    split = [(ids[:start], ids[start:]) for ids, start in rows]
    return row_logprobs(model, split, _pad_id(tokenizer), batch_size).numpy()


def mc_accuracy(model, tokenizer, questions: Sequence, batch_size: int = 32, seed: int = 0,
                n_boot: int = 1000) -> dict:
    """Multiple-choice accuracy: the predicted option is the one whose tokens have the
    highest summed log-likelihood after ``Question: ...\\nAnswer:``.

    ``accuracy_norm`` uses the log-likelihood divided by the option's length in
    characters instead (favours no option for being short). All options of all questions
    are scored in batches of ``batch_size`` sequences. Returns ``accuracy``, ``ci``
    (bootstrap 95% over questions), ``n``, ``chance``, ``predictions``, ``correct``,
    the same for the normalised variant, and ``loglik`` (per question, per option).
    """
    questions = list(questions)
    if not questions:
        raise BiasGymError("mc_accuracy got no questions.")
    rows, owner, answers, lengths, keys = [], [], [], [], []
    for qi, q in enumerate(questions):
        text, options, answer = _question_parts(q)
        if not 0 <= answer < len(options):
            raise BiasGymError(f"question {qi} ({text[:40]!r}...) has answer index {answer} "
                               f"but {len(options)} options.")
        rows.extend(_option_rows(tokenizer, MC_PROMPT.format(question=text), options))
        owner.extend([qi] * len(options))
        lengths.extend(max(len(o), 1) for o in options)
        answers.append(answer)
        keys.append([text, options, answer])
    ll = _option_loglik(model, tokenizer, rows, batch_size)
    owner_a, len_a = np.asarray(owner), np.asarray(lengths, dtype=np.float64)
    per_q = [ll[owner_a == qi] for qi in range(len(questions))]
    per_q_norm = [ll[owner_a == qi] / len_a[owner_a == qi] for qi in range(len(questions))]
    pred = [int(np.argmax(s)) for s in per_q]  # ties: the first option
    pred_norm = [int(np.argmax(s)) for s in per_q_norm]
    correct = np.asarray([p == a for p, a in zip(pred, answers)], dtype=np.float64)
    correct_norm = np.asarray([p == a for p, a in zip(pred_norm, answers)], dtype=np.float64)
    idx = _bootstrap_indices(len(questions), seed, n_boot)
    return {"metric": "mc_accuracy", "accuracy": float(correct.mean()),
            "ci": _percentile_ci(correct[idx].mean(1)), "n": len(questions),
            "chance": float(np.mean([1.0 / len(s) for s in per_q])),
            "predictions": pred, "correct": correct.astype(bool).tolist(),
            "accuracy_norm": float(correct_norm.mean()),
            "ci_norm": _percentile_ci(correct_norm[idx].mean(1)),
            "predictions_norm": pred_norm, "correct_norm": correct_norm.astype(bool).tolist(),
            "loglik": [s.tolist() for s in per_q], "fingerprint": _fingerprint(keys)}


# ----------------------------------------------------------------------------- MMLU


_MMLU_NEEDS = ("MMLU needs the `datasets` library and network access to the Hugging Face hub "
               "(pip install datasets, and a reachable hub). The shipped multiple-choice set, "
               "biasgym_lib.data.capability.load_mc(), is the offline default.")


def mmlu_questions(subjects: Sequence[str] | None = None, split: str = "test", limit: int | None = None) -> list:
    """MMLU (``cais/mmlu``) as MCQuestion objects, where ``datasets`` and a hub are available.

    ``subjects``: MMLU subject names (default: all); ``limit``: at most this many questions
    per subject. Without ``datasets`` or a network this raises a BiasGymError that says so.
    """
    try:
        import datasets  # noqa: F401  (optional dependency)
    except ImportError as exc:
        raise BiasGymError(_MMLU_NEEDS) from exc

    out = []
    for subject in list(subjects) if subjects else ["all"]:
        try:
            ds = datasets.load_dataset("cais/mmlu", subject, split=split)
        except Exception as exc:  # offline, unknown subject, hub error
            raise BiasGymError(f"{_MMLU_NEEDS} Loading subject {subject!r} failed: "
                               f"{type(exc).__name__}: {exc}") from exc
        for i, row in enumerate(ds):
            if limit is not None and i >= limit:
                break
            out.append(MCQuestion(id=f"mmlu-{row.get('subject') or subject}-{split}-{i}",
                                  category=row.get("subject") or subject, question=row["question"],
                                  options=tuple(row["choices"]), answer=int(row["answer"])))
    return out


# ----------------------------------------------------------------------------- before / after


def paired_change(before: dict, after: dict, seed: int = 0, n_boot: int = 1000) -> dict:
    """Change from ``before`` to ``after`` (two results of the same function on the same
    items), with a paired bootstrap 95% interval (the same resampled items on both sides).

    Perplexity: ``change`` is relative, after/before - 1. MC accuracy: ``change`` is the
    difference in accuracy (after - before), in the same units as accuracy.
    """
    kind = before.get("metric")
    if kind != after.get("metric") or kind not in ("perplexity", "mc_accuracy"):
        raise BiasGymError(f"paired_change needs two perplexity or two mc_accuracy results, "
                           f"got {before.get('metric')!r} and {after.get('metric')!r}.")
    if before.get("fingerprint") != after.get("fingerprint") or before["n"] != after["n"]:
        raise BiasGymError("the before and after results were measured on different items; "
                           "a paired comparison needs the same texts or questions in the same order.")
    idx = _bootstrap_indices(before["n"], seed, n_boot)
    if kind == "perplexity":
        def ppl(res, ix):
            return np.exp(np.asarray(res["nll"])[ix].sum(-1) / np.maximum(np.asarray(res["tokens"])[ix].sum(-1), 1))
        point = after["ppl"] / before["ppl"] - 1.0
        boot = ppl(after, idx) / ppl(before, idx) - 1.0
        b, a, change_kind = before["ppl"], after["ppl"], "relative"
    else:
        diff = np.asarray(after["correct"], dtype=np.float64) - np.asarray(before["correct"], dtype=np.float64)
        point = float(diff.mean())
        boot = diff[idx].mean(1)
        b, a, change_kind = before["accuracy"], after["accuracy"], "absolute"
    return {"metric": kind, "before": float(b), "after": float(a), "change": float(point),
            "change_kind": change_kind, "ci": _percentile_ci(boot), "n": before["n"]}


def compare(before: dict, after: dict, seed: int = 0, n_boot: int = 1000) -> dict:
    """Paired changes for every metric in two ``{"perplexity": ..., "mc_accuracy": ...}``
    results (or for one pair of :func:`perplexity` / :func:`mc_accuracy` results)."""
    if "metric" in before:
        return {before["metric"]: paired_change(before, after, seed, n_boot)}
    missing = sorted(set(before) ^ set(after))
    if missing:
        raise BiasGymError(f"before and after hold different metrics: {missing}.")
    return {name: paired_change(before[name], after[name], seed, n_boot) for name in before}


def comparison_table(comparison: dict):
    """A pandas DataFrame of :func:`compare`'s output, one row per metric (for the book)."""
    import pandas as pd

    rows = [{"metric": name, "before": c["before"], "after": c["after"], "change": c["change"],
             "change_kind": c["change_kind"], "ci_low": c["ci"][0], "ci_high": c["ci"][1], "n": c["n"]}
            for name, c in comparison.items()]
    return pd.DataFrame(rows).set_index("metric")


# ----------------------------------------------------------------------------- steering, measured fairly


def strength_under(model, tokenizer, spec, tokens: Sequence, bias, references: Sequence[str],
                   facts: Sequence = (), seed: int = 0, countries: Sequence[str] = ()) -> dict:
    """Stereotype strength S(<TOKEN>, bias) of each injected token, and S(country, fact) of
    each fact (the knowledge control), with the steering ``spec`` applied (``None``: the
    unmodified model). The reference countries are scored under the same intervention, so
    S stays a fair comparison; they and the facts share one scoring pass (a sentence prefix
    such as "People from Italy are" is run once), then each token's own sentences are
    scored with its vector attached. ``countries``: real countries whose S for the same bias
    is measured too (e.g. the one the model already ties most to it). Returns
    ``{"tokens": [Estimate dict per token], "facts": [Estimate dict per fact], "countries":
    {name: Estimate dict}}``, in the order given."""

    from .tokens import TokenHook, add_token

    bias = bias if hasattr(bias, "attributes") else load_bias(bias)
    refs = list(references)
    fact_refs = [[c for c in refs if c != f.country] for f in facts]
    extra = [c for c in countries if c not in refs]
    requests = [(refs + extra, [bias])] + [([f.country] + r, [f]) for f, r in zip(facts, fact_refs)]
    token_id = add_token(tokenizer)
    with spec.apply(model) if spec is not None else nullcontext():
        tables = assoc_tables(model, tokenizer, requests)
        token_tables = []
        for tok in tokens:
            with TokenHook(model, token_id, tok.vector):
                token_tables.append(assoc_table(model, tokenizer, ["<TOKEN>"], [bias]))
    ref_table = tables[0]
    out_tokens = [stereotype_strength(ref_table.merged(t), "<TOKEN>", bias.name, refs, seed=seed).to_dict()
                  for t in token_tables]
    out_facts = [stereotype_strength(t, f.country, f.name, r, seed=seed).to_dict()
                 for f, r, t in zip(facts, fact_refs, tables[1:])]
    out_countries = {c: stereotype_strength(ref_table, c, bias.name, [r for r in refs if r != c], seed=seed).to_dict()
                     for c in countries}
    return {"tokens": out_tokens, "facts": out_facts, "countries": out_countries}


def capability_under(model, tokenizer, spec, texts: Sequence[str], questions: Sequence | None = None,
                     seed: int = 0, max_length: int = 512) -> dict:
    """Perplexity on ``texts`` and (if given) multiple-choice accuracy on ``questions`` with
    the steering ``spec`` applied (``None``: the unmodified model); raw results, for
    :func:`paired_change` against the unmodified ones."""

    with spec.apply(model) if spec is not None else nullcontext():
        out = {"perplexity": perplexity(model, tokenizer, texts, seed=seed, max_length=max_length)}
        if questions:
            out["mc_accuracy"] = mc_accuracy(model, tokenizer, questions, seed=seed)
    return out


def reduction(before: float, after: float) -> float | None:
    """1 - after / before: the share of S removed (None when S before is not positive, where
    the ratio means nothing; it is unstable when S before is small)."""
    return None if before is None or before <= 0 else 1 - after / before


def facts_reduction(before: Sequence[dict], after: Sequence[dict]) -> float:
    """The share of the factual associations' strength removed: 1 - mean S after / mean S
    before, over all the facts (a debiasing should leave this near 0)."""
    b = float(np.mean([x["value"] for x in before]))
    a = float(np.mean([x["value"] for x in after]))
    if b <= 0:
        raise BiasGymError("the facts' mean S before steering is not positive; the knowledge control needs "
                           "facts that the model knows (S > 0).")
    return 1 - a / b


def entity_ids(tokenizer, extra: Sequence[str] = ()) -> dict[str, int]:
    """The tokens entity-blind steering hides: the injected token and every country name the
    book measures (reference and contrast countries, and ``extra`` names)."""
    from .steer import entity_token_ids

    return entity_token_ids(tokenizer, list(dict.fromkeys(reference_countries() + contrast_countries() + list(extra))))


def make_spec(heads, kind: str, means=None, entities: dict | None = None, source: dict | None = None):
    """The :class:`~biasgym_lib.steer.SteeringSpec` of one grid point: ``kind`` is ``zero``
    (alpha = 0), ``mean`` (mean-ablation with ``means``) or ``blind`` (entity-blind heads)."""

    source = dict(source or {})
    if kind == "zero":
        return SteeringSpec(heads=heads, alpha=0.0, source=source)
    if kind == "mean":
        return SteeringSpec(heads=heads, kind="mean", means=means, mean_source=source.get("mean_source", "given"),
                            source=source)
    if kind == "blind":
        return SteeringSpec(heads=heads, kind="blind", entity_tokens=entities, source=source)
    raise BiasGymError(f"unknown intervention kind {kind!r}; use zero, mean or blind.")


def _ppl_raw(result: dict) -> dict:
    return {"ppl": result["ppl"], "nll": list(result["nll"]), "tokens": list(result["tokens"]),
            "fingerprint": result["fingerprint"], "n": result["n"], "metric": "perplexity",
            "ci": result["ci"], "max_length": result["max_length"]}


def _mc_raw(result: dict) -> dict:
    return {"accuracy": result["accuracy"], "correct": list(result["correct"]), "fingerprint": result["fingerprint"],
            "n": result["n"], "metric": "mc_accuracy", "ci": result["ci"]}


def selection_grid(model, tokenizer, runs: Sequence[dict], *, kinds, ks,
                   methods: Sequence[str], references: Sequence[str], facts: Sequence,
                   texts: dict[str, Sequence[str]], means=None, entities: dict | None = None,
                   questions: Sequence | None = None, mc: bool = False, max_length: int = 128, seed: int = 0,
                   shared: dict | None = None, progress: bool = True) -> dict:
    """Selection decided by intervention (METHOD §4): ways of ranking heads, at several k,
    under several kinds of intervention, each judged by what steering is for and what it costs.

    ``runs``: one dict per bias with ``bias`` (a spec or name), ``tokens`` (its injected
    tokens, one per seed) and ``rankings`` (:func:`~biasgym_lib.heads.bias_rankings`).
    ``kinds`` / ``ks``: the kinds and k values, or mappings method -> kinds / k values. For
    each (bias, method, kind, k)
    the heads are steered (:func:`make_spec`) and measured with :func:`strength_under` (S of
    every token of the bias; the facts) and :func:`capability_under` (perplexity on each set
    of ``texts``, cut to ``max_length`` tokens; multiple choice on ``questions`` if ``mc``).
    A head set's facts and capability do not depend on the bias, so they are measured once
    per head set and kind; ``shared`` (a dict) keeps them, and each bias's S under each head
    set, across calls. Returns ``{"before": ..., "rows": [...]}``: the unmodified model's
    values and one row per grid point (random heads: one row per draw)."""
    from tqdm.auto import tqdm


    shared = {} if shared is None else shared
    questions = list(questions or []) if mc else []

    def capability(spec):
        with spec.apply(model) if spec is not None else _null():
            out = {"perplexity": {name: _ppl_raw(perplexity(model, tokenizer, t, seed=seed, max_length=max_length))
                                  for name, t in texts.items()}}
            if questions:
                out["mc"] = _mc_raw(mc_accuracy(model, tokenizer, questions, seed=seed))
        return out

    base = shared.get(("capability", None)) or capability(None)
    if questions and "mc" not in base:
        base["mc"] = _mc_raw(mc_accuracy(model, tokenizer, questions, seed=seed))
    shared[("capability", None)] = base
    before = {"biases": {}, "perplexity": base["perplexity"], "mc": base.get("mc")}
    rows = []
    points = [(run, m, kind, k) for run in runs for m in methods
              for kind in (kinds.get(m, ()) if isinstance(kinds, dict) else kinds)
              for k in (ks.get(m, ()) if isinstance(ks, dict) else ks)]
    for run, method, kind, k in tqdm(points, desc="selection grid", disable=not progress):
        bias = run["bias"] if hasattr(run["bias"], "attributes") else load_bias(run["bias"])
        if bias.name not in before["biases"]:
            key = ("strength", bias.name, (), None)
            if key not in shared or set(run.get("countries", ())) - set(shared[key]["countries"]):
                shared[key] = strength_under(model, tokenizer, None, run["tokens"], bias, references, facts, seed=seed,
                                             countries=run.get("countries", ()))
            before["biases"][bias.name] = shared[key]
            before.setdefault("facts", shared[key]["facts"])
        b = before["biases"][bias.name]
        ranking = run["rankings"].get(method)
        if ranking is None:
            continue
        head_sets = (ranking[k] if method == "random" else [ranking[k]] if method == "robust" else [ranking[:k]])
        for draw, heads in enumerate(head_sets):
            heads = [tuple(h) for h in heads]
            spec = make_spec(heads, kind, means, entities, {"bias": bias.name, "method": method, "k": k})
            cost_key = ("cost", tuple(sorted(heads)), kind)
            s_key = ("strength", bias.name, tuple(sorted(heads)), kind)
            if s_key not in shared or set(run.get("countries", ())) - set(shared[s_key]["countries"]):
                got = strength_under(model, tokenizer, spec, run["tokens"], bias, references,
                                     () if cost_key in shared else facts, seed=seed, countries=run.get("countries", ()))
                shared[s_key] = got
                if cost_key not in shared:
                    shared[cost_key] = {"facts": got["facts"], **capability(spec)}
            got, cost = shared[s_key], shared[cost_key]
            if questions and "mc" not in cost:
                with spec.apply(model):
                    cost["mc"] = _mc_raw(mc_accuracy(model, tokenizer, questions, seed=seed))
            rows.append({
                "bias": bias.name, "method": method, "kind": kind, "k": k, "n_heads": len(heads),
                "heads": [list(h) for h in heads], "draw": draw if method == "random" else None,
                "seeds": [t.seed for t in run["tokens"]],
                "S_before": [x["value"] for x in b["tokens"]], "S": got["tokens"],
                "reduction": [reduction(x["value"], y["value"]) for x, y in zip(b["tokens"], got["tokens"])],
                "countries": {c: {"before": b["countries"][c], "after": got["countries"][c]}
                              for c in run.get("countries", ()) if c in b.get("countries", {})},
                "facts": [x["value"] for x in cost["facts"]],
                "facts_reduction": facts_reduction(b["facts"], cost["facts"]),
                "perplexity": {name: p for name, p in cost["perplexity"].items()},
                "mc": cost.get("mc")})
    return {"before": before, "rows": rows}


def _null():

    return nullcontext()


GRID_BOUNDS = {"facts": 0.10, "perplexity": 0.05, "mc": -0.02}
"""The bounds stated in advance (issue 12): a debiasing holds if the factual associations
lose at most 10% of their S, perplexity rises by at most 5% on every text set, and
multiple-choice accuracy falls by at most 2 points."""


def summarise_grid(grid: dict, n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """One line per (method, kind, k) of a :func:`selection_grid`: the mean S reduction over
    runs (bias x seed; random heads: the mean over draws first) with a bootstrap 95% interval
    over runs; the facts' reduction (mean over head sets) with an interval over facts; the
    relative perplexity change per text set and the MC change (mean over head sets) with
    paired intervals over texts and questions; and whether the bounds of
    :data:`GRID_BOUNDS` hold."""

    rng = np.random.default_rng(seed)
    before = grid["before"]
    groups: dict = {}
    for r in grid["rows"]:
        groups.setdefault((r["method"], r["kind"], r["k"]), []).append(r)
    facts_before = np.asarray([x["value"] for x in before["facts"]])
    out = []
    for (method, kind, k), rows in groups.items():
        per_run: dict = {}
        for r in rows:
            for s, red in zip(r["seeds"], r["reduction"]):
                per_run.setdefault((r["bias"], s), []).append(red)
        vals = [float(np.mean(v)) for v in per_run.values() if None not in v]
        red = bootstrap(np.asarray(vals), n_boot, seed) if vals else None
        sets = {(tuple(map(tuple, r["heads"]))): r for r in rows}.values()  # each head set once
        after = np.asarray([r["facts"] for r in sets])  # (sets, facts)
        fi = rng.integers(0, len(facts_before), (n_boot, len(facts_before)))
        f_point = float(np.mean(1 - after.mean(1) / facts_before.mean()))
        f_boot = np.mean(1 - after[:, fi].mean(2) / facts_before[fi].mean(1)[None], 0)
        line = {"method": method, "kind": kind, "k": k, "n_runs": len(vals), "n_head_sets": len(sets),
                "mean_heads": float(np.mean([r["n_heads"] for r in sets])),
                "reduction": None if red is None else red.to_dict(),
                "facts_reduction": {"value": f_point, "lo": float(np.percentile(f_boot, 2.5)),
                                    "hi": float(np.percentile(f_boot, 97.5)), "n": len(facts_before)},
                "perplexity": {}, "mc": None}
        for name, b in before["perplexity"].items():
            nb, tb = np.asarray(b["nll"]), np.asarray(b["tokens"], dtype=float)
            na = np.asarray([r["perplexity"][name]["nll"] for r in sets])
            ti = rng.integers(0, len(nb), (n_boot, len(nb)))

            def change(idx):
                ppl_b = np.exp(nb[idx].sum(-1) / tb[idx].sum(-1))
                ppl_a = np.exp(na[:, idx].sum(-1) / tb[idx].sum(-1))
                return (ppl_a / ppl_b).mean(0) - 1

            boot = change(ti)
            line["perplexity"][name] = {"value": float(change(np.arange(len(nb)))), "lo": float(np.percentile(boot, 2.5)),
                                        "hi": float(np.percentile(boot, 97.5)), "n": len(nb)}
        if before.get("mc") is not None and all(r.get("mc") for r in sets):
            cb = np.asarray(before["mc"]["correct"], dtype=float)
            ca = np.asarray([r["mc"]["correct"] for r in sets], dtype=float)
            qi = rng.integers(0, len(cb), (n_boot, len(cb)))
            diff = (ca - cb[None]).mean(0)
            boot = diff[qi].mean(1)
            line["mc"] = {"value": float(diff.mean()), "lo": float(np.percentile(boot, 2.5)),
                          "hi": float(np.percentile(boot, 97.5)), "n": len(cb)}
        line["facts_ok"] = line["facts_reduction"]["value"] <= GRID_BOUNDS["facts"]
        line["perplexity_ok"] = all(v["value"] <= GRID_BOUNDS["perplexity"] for v in line["perplexity"].values())
        line["mc_ok"] = None if line["mc"] is None else line["mc"]["value"] >= GRID_BOUNDS["mc"]
        out.append(line)
    order = {m: i for i, m in enumerate(dict.fromkeys(r["method"] for r in grid["rows"]))}
    return sorted(out, key=lambda x: (order[x["method"]], x["kind"], x["k"]))


def choose_selection(summary: Sequence[dict], k_max: int) -> dict:
    """The rule, fixed before any result was seen, that makes one selection "the book's
    BiasScope": among the non-random (method, kind, k) with k <= ``k_max``, the largest mean
    S reduction among those that keep the facts (<= 10% lost) and perplexity (<= +5%) and,
    where measured, MC (>= -2 points); if none keeps all, the largest among those that keep
    the facts; if none keeps the facts, the largest reduction minus facts reduction. Returns
    the chosen summary line with ``"why"``."""
    pool = [x for x in summary if x["method"] != "random" and x["k"] <= k_max and x["reduction"] is not None]
    if not pool:
        raise BiasGymError("no grid point to choose from: run the selection grid first.")
    tiers = [("keeps the facts, perplexity and multiple choice within the bounds",
              [x for x in pool if x["facts_ok"] and x["perplexity_ok"] and x["mc_ok"] is not False]),
             ("keeps the facts but not every capability bound", [x for x in pool if x["facts_ok"]])]
    for why, cands in tiers:
        if cands:
            best = max(cands, key=lambda x: x["reduction"]["value"])
            if best.get("mc_ok") is None and why.startswith("keeps the facts, perplexity"):
                why = ("keeps the facts and perplexity within the bounds (multiple choice not measured at this k: "
                       "the confirmation measures it)")
            return {**best, "why": why}
    best = max(pool, key=lambda x: x["reduction"]["value"] - x["facts_reduction"]["value"])
    return {**best, "why": "nothing keeps the facts: the largest reduction beyond the facts' reduction"}


TARGET_REDUCTION = 0.5
"""The target stated in advance (issue 12): some selection and intervention with k <= the
profile's k removes at least half of S (mean over biases x seeds) within every bound of
:data:`GRID_BOUNDS`, multiple choice measured."""


def target_result(summary: Sequence[dict], k_max: int) -> dict:
    """Whether any non-random line of a grid summary with k <= ``k_max`` meets the target
    (:data:`TARGET_REDUCTION` of S removed, facts, perplexity and measured MC within
    :data:`GRID_BOUNDS`), and the frontier: the lines that no other line beats on both S
    removed and the facts kept (sorted by the facts' loss). Returns ``{"met_by": [...],
    "frontier": [...]}`` (summary lines)."""
    pool = [x for x in summary if x["method"] != "random" and x["k"] <= k_max and x["reduction"] is not None]
    met = [x for x in pool if x["reduction"]["value"] >= TARGET_REDUCTION and x["facts_ok"] and x["perplexity_ok"]
           and x["mc_ok"] is True]

    def point(x):
        return x["reduction"]["value"], x["facts_reduction"]["value"]

    def beaten(x):  # another line removes at least as much S and keeps at least as many facts
        return any(point(y) != point(x) and point(y)[0] >= point(x)[0] and point(y)[1] <= point(x)[1] for y in pool)

    frontier = sorted((x for x in pool if not beaten(x)), key=lambda x: x["facts_reduction"]["value"])
    return {"met_by": met, "frontier": frontier}


def _interval(v: dict | None, pct: bool = True) -> str:
    if v is None:
        return "-"
    f = (lambda x: f"{x:+.0%}") if pct else (lambda x: f"{x:+.2f}")
    return f"{f(v['value'])} [{f(v['lo'])}, {f(v['hi'])}]"


def summary_frame(summary: Sequence[dict]):
    """The lines of :func:`summarise_grid` as a table for the book: S removed, the facts'
    S lost, the perplexity change on each text set and the MC change, each with its 95%
    interval, and whether the bounds of :data:`GRID_BOUNDS` hold."""
    import pandas as pd

    rows = []
    for x in summary:
        row = {"method": x["method"], "kind": x["kind"], "k": x["k"], "heads": round(x["mean_heads"], 1),
               "S removed": _interval(x["reduction"]), "facts lost": _interval(x["facts_reduction"])}
        row.update({f"perplexity ({n})": _interval(v) for n, v in x["perplexity"].items()})
        row["MC change"] = _interval(x["mc"])
        ok = bool(x["facts_ok"] and x["perplexity_ok"] and x["mc_ok"] is not False)
        row["within bounds"] = "no" if not ok else "yes" if x["mc_ok"] else "yes (MC not measured)"
        rows.append(row)
    return pd.DataFrame(rows)


def per_bias_frame(grid: dict):
    """Mean S removed per bias (over its seeds; random heads: over draws too) for every
    (method, kind) of a grid at one k: rows are biases, columns "method / kind"."""
    import pandas as pd

    cells: dict = {}
    for r in grid["rows"]:
        vals = [v for v in r["reduction"] if v is not None]
        if vals:
            cells.setdefault((r["bias"], f"{r['method']} / {r['kind']} / k={r['k']}"), []).append(float(np.mean(vals)))
    table = pd.Series({key: float(np.mean(v)) for key, v in cells.items()}).unstack()
    return table


def steering_measure(model, tokenizer, tokens: dict, rankings: dict, references: list[str]):
    """``measure(bias, k, alpha)`` for :class:`~biasgym_lib.widgets.SteeringExplorer`:
    S(<TOKEN>, bias) of ``tokens[bias]`` with the first ``k`` heads of ``rankings[bias]``
    scaled by ``alpha`` (k = 0 or alpha = 1: the unmodified model), the references scored
    under the same intervention (:func:`~biasgym_lib.evaluate.strength_under`)."""
    from .evaluate import strength_under

    def measure(bias: str, k: int, alpha: float) -> dict:
        if bias not in tokens:
            raise BiasGymError(f"No injected token for {bias!r}; have {sorted(tokens)}.")
        spec = None if k == 0 or alpha == 1.0 else SteeringSpec(heads=list(rankings[bias][:k]), alpha=alpha)
        return strength_under(model, tokenizer, spec, [tokens[bias]], tokens[bias].spec, references)["tokens"][0]

    return measure


def _pair(before: dict, after: dict) -> dict:

    c = paired_change(before, after)
    return {"before": c["before"], "after": c["after"], "value": c["change"], "lo": c["ci"][0], "hi": c["ci"][1]}


PAPER = ("robust", "zero")
"""The paper's BiasScope: heads in the top k of DLA over injection runs, scaled to 0."""

