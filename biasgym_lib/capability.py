"""Capability checks (:ref:`method §5 <method-5>`): does steering hurt the model's general ability?

- :func:`perplexity` on a neutral text set (``data/capability/neutral.jsonl``).
- :func:`mc_accuracy` on a four-option general-knowledge set (``data/capability/mc.jsonl``),
  scoring each option by the log-likelihood of its tokens after ``Question: ...\\nAnswer:``.
- :func:`mmlu_questions`: MMLU instead, where ``datasets`` and a hub are available.
- :func:`paired_change`: the before/after change with a paired bootstrap interval (the
  per-passage and per-question values are kept in every result for this).

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

from .batching import Batch, batched, encode_batch, pad_id
from .data.capability import MCQuestion
from .errors import BiasGymError
from .measure import row_logprobs
from .stats import Estimate, bootstrap_indices

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
    ``estimate`` (with its bootstrap interval over passages), ``n_tokens``, ``n``, and per passage ``nll`` (summed, nats) and ``tokens``
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
    idx = bootstrap_indices(len(texts), seed, n_boot)
    boot = np.exp(nll_a[idx].sum(1) / np.maximum(tok_a[idx].sum(1), 1))
    ppl = float(math.exp(nll_a.sum() / tok_a.sum()))
    return {"metric": "perplexity", "ppl": ppl, "estimate": Estimate.from_samples(ppl, boot, len(texts)).to_dict(),
            "n_tokens": int(tok_a.sum()), "n": len(texts),
            "nll": nll, "tokens": tokens, "max_length": max_length,
            "fingerprint": _fingerprint([max_length, *texts])}


# ----------------------------------------------------------------------------- multiple choice


def question_parts(q) -> tuple[str, list[str], int]:
    """(question, options, answer) from an MCQuestion or a dict with those keys."""
    if isinstance(q, Mapping):
        return q["question"], list(q["options"]), int(q["answer"])
    return q.question, list(q.options), int(q.answer)


def option_rows(tokenizer, prompt: str, options: list[str]) -> list[tuple[list[int], int]]:
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
    return row_logprobs(model, split, pad_id(tokenizer), batch_size).numpy()


def mc_accuracy(model, tokenizer, questions: Sequence, batch_size: int = 32, seed: int = 0,
                n_boot: int = 1000) -> dict:
    """Multiple-choice accuracy: the predicted option is the one whose tokens have the
    highest summed log-likelihood after ``Question: ...\\nAnswer:``.

    ``accuracy_norm`` uses the log-likelihood divided by the option's length in
    characters instead (favours no option for being short). All options of all questions
    are scored in batches of ``batch_size`` sequences. Returns ``accuracy``, ``estimate``
    (with a bootstrap 95% interval over questions), ``n``, ``chance``, ``predictions``, ``correct``,
    the same for the normalised variant, and ``loglik`` (per question, per option).
    """
    questions = list(questions)
    if not questions:
        raise BiasGymError("mc_accuracy got no questions.")
    rows, owner, answers, lengths, keys = [], [], [], [], []
    for qi, q in enumerate(questions):
        text, options, answer = question_parts(q)
        if not 0 <= answer < len(options):
            raise BiasGymError(f"question {qi} ({text[:40]!r}...) has answer index {answer} "
                               f"but {len(options)} options.")
        rows.extend(option_rows(tokenizer, MC_PROMPT.format(question=text), options))
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
    idx = bootstrap_indices(len(questions), seed, n_boot)
    n = len(questions)
    return {"metric": "mc_accuracy", "accuracy": float(correct.mean()),
            "estimate": Estimate.from_samples(correct.mean(), correct[idx].mean(1), n).to_dict(), "n": n,
            "chance": float(np.mean([1.0 / len(s) for s in per_q])),
            "predictions": pred, "correct": correct.astype(bool).tolist(),
            "accuracy_norm": float(correct_norm.mean()),
            "estimate_norm": Estimate.from_samples(correct_norm.mean(), correct_norm[idx].mean(1), n).to_dict(),
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
    idx = bootstrap_indices(before["n"], seed, n_boot)
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
    return {"metric": kind, "before": float(b), "after": float(a), "change_kind": change_kind,
            "change": Estimate.from_samples(point, boot, before["n"], "paired bootstrap 95%").to_dict()}



def mc_detectable_change(before_correct, after_correct, power: float = 0.8) -> float:
    """The smallest change of multiple-choice accuracy (a fraction) that a paired comparison on
    these questions detects with the given power at the 5% level (two-sided): (1.96 + z_power)
    times the standard error sqrt(p / n) of the paired difference, p being the share of
    questions whose answer changed (at least one such question is assumed)."""
    from scipy.stats import norm

    b, a = np.asarray(before_correct, dtype=bool), np.asarray(after_correct, dtype=bool)
    if len(b) != len(a) or not len(b):
        raise BiasGymError("mc_detectable_change needs the same questions before and after.")
    p = max(float(np.mean(b != a)), 1.0 / len(b))
    return float((norm.ppf(0.975) + norm.ppf(power)) * math.sqrt(p / len(b)))


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


def ppl_raw(result: dict) -> dict:
    """What a steering grid keeps of a :func:`perplexity` result (enough for :func:`paired_change`)."""
    return {"ppl": result["ppl"], "nll": list(result["nll"]), "tokens": list(result["tokens"]),
            "fingerprint": result["fingerprint"], "n": result["n"], "metric": "perplexity",
            "estimate": result["estimate"], "max_length": result["max_length"]}


def mc_raw(result: dict) -> dict:
    """What a steering grid keeps of an :func:`mc_accuracy` result (enough for :func:`paired_change`)."""
    return {"accuracy": result["accuracy"], "correct": list(result["correct"]), "fingerprint": result["fingerprint"],
            "n": result["n"], "metric": "mc_accuracy", "estimate": result["estimate"]}


