"""Chapter 1's build exercise: the log-probability of a continuation, from the model's logits.

``continuation_logprob(logits, ids, n_prefix)`` gets the logits ``(T, V)`` of one sentence
``ids`` ``(T,)`` whose first ``n_prefix`` tokens are the prefix ("People from Italy are") and
returns log P(continuation | prefix) summed over the continuation's tokens: the number
``measure.continuation_logprobs`` computes in batches, and assoc's building block.
"""

from __future__ import annotations

import torch

from ..measure import row_logprobs, stereotype_strength
from ..models import ModelAdapter
from . import Checked, as_tensor, call, check, diagnose, exercise_model, judge

NAME = "Exercise 1 (continuation_logprob)"


def check_continuation_logprob(fn, model=None) -> Checked:
    """Run ``fn`` on the logits of random sentences through ``model`` (default: a tiny random
    model) and compare it with :func:`biasgym_lib.measure.row_logprobs`, the library's
    implementation, on the same tokens."""
    model = exercise_model() if model is None else model
    adapter = ModelAdapter(model)
    vocab = adapter.unembed.shape[0]

    def trial(seed: int) -> str | None:
        g = torch.Generator().manual_seed(1000 + seed)
        n_prefix, n_cont = 2 + seed % 3, 2 + seed
        ids = torch.randint(3, vocab, (n_prefix + n_cont,), generator=g)
        with torch.inference_mode():
            logits = model(ids[None].to(adapter.device)).logits[0].float().cpu()
        want = float(row_logprobs(model, [(ids[:n_prefix].tolist(), ids[n_prefix:].tolist())], pad_id=0,
                                  share_prefix=False)[0])
        got = as_tensor(call(fn, logits.clone(), ids.clone(), n_prefix)).reshape(-1)
        if got.numel() != 1:
            return (f"return one number for the sentence (the sum over its continuation tokens); "
                    f"yours has {got.numel()} numbers.")
        got = got.reshape(())
        lp, raw = logits.double().log_softmax(-1), logits.double()
        cont = range(n_prefix, len(ids))

        def total(table, positions, shift=1):
            return sum(float(table[t - shift, ids[t]]) for t in positions)
        mistakes = {
            "position t of the logits predicts token t + 1: score token ids[t] with logits[t - 1], "
            "not logits[t].": total(lp, cont, shift=0),
            "logits are not log-probabilities: apply log_softmax over the vocabulary (the last "
            "dimension) first.": total(raw, cont),
            "normalise over the vocabulary (dim=-1), not over the positions (dim=0).":
                total(logits.double().log_softmax(0), cont),
            "a sentence's log-probability is the sum of its tokens' log-probabilities, not their "
            "mean.": want / n_cont,
            "score only the continuation's tokens, ids[n_prefix:], not the prefix's.": total(lp, range(1, len(ids))),
            "the first continuation token, ids[n_prefix], counts too: logits[n_prefix - 1] predicts it.":
                total(lp, range(n_prefix + 1, len(ids))),
            "return the log-probability, not the probability (exp of it): the book adds log-probabilities.":
                torch.tensor(want).exp().item(),
        }
        return diagnose(got, want, mistakes, atol=1e-3, rtol=1e-4, fallback=(
            f"expected {want:.4f}, got {float(got):.4f}. Take log_softmax of the logits over the "
            "vocabulary, then for each continuation token t add the log-probability that position "
            "t - 1 gives to ids[t]."))
    return judge(NAME, trial, on_error="logits is (T, V), ids is (T,), n_prefix an int; index logits[t - 1, ids[t]].")


def check_strength(answer, table, country: str, bias: str, countries: list[str]) -> Checked:
    """Exercise 2: S(country, bias) computed by hand from ``table.assoc``."""
    return check("Exercise 2", answer, stereotype_strength(table, country, bias, countries).value, tol=1e-6,
                 hint="compute it from table.assoc (not from the rounded table): the country's assoc minus the "
                      "mean assoc of the OTHER countries")
