"""``biasgym bench``: each fast path measured side by side with the naive way, in one run.

Figures are ratios against the naive way on the embedded model. Where the naive way would
take many minutes (one forward pass per head, or per sentence, for everything), it is
timed on a subset and extrapolated linearly; the JSON says so next to each figure.
"""

from __future__ import annotations

import os
import resource
import tempfile
import time

import torch


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(fn, repeat: int = 1):
    best = float("inf")
    out = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def matmul_gflops(dtype=torch.float32, n: int = 1024, reps: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


def bench_load() -> dict:
    from ..models import load_model

    old = os.environ.get("BIASGYM_CACHE")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["BIASGYM_CACHE"] = tmp
        try:
            convert, _ = _timed(lambda: load_model())
            cached, _ = _timed(lambda: load_model(), repeat=2)
        finally:
            if old is None:
                os.environ.pop("BIASGYM_CACHE", None)
            else:
                os.environ["BIASGYM_CACHE"] = old
    return {"gguf_conversion_s": convert, "cached_load_s": cached, "speedup": convert / cached}


def bench_scoring(model, tok, n_loop: int = 40) -> dict:
    from ..data import load_biases, load_templates, reference_countries
    from ..measure import continuation_logprobs, template_prefix

    countries, templates = reference_countries()[:30], load_templates()
    prefixes, conts = [], []
    for spec in list(load_biases().values())[:6]:
        for c in countries:
            for t in templates:
                prefixes.append(template_prefix(t, c))
                conts.append(" " + spec.attributes[0])
    batched_s, fast = _timed(lambda: continuation_logprobs(model, tok, prefixes, conts))
    full_s, full = _timed(lambda: continuation_logprobs(model, tok, prefixes, conts, share_prefix=False))
    idx = list(range(0, len(prefixes), max(1, len(prefixes) // n_loop)))[:n_loop]
    loop_s, loop = _timed(lambda: [continuation_logprobs(model, tok, [prefixes[i]], [conts[i]], share_prefix=False)
                                   for i in idx])
    per_sentence_total = loop_s / len(idx) * len(prefixes)
    agree = max(abs(float(fast[i]) - float(v[0])) for i, v in zip(idx, loop))
    return {"sentences": len(prefixes), "batched_shared_prefix_s": batched_s, "batched_full_s": full_s,
            "per_sentence_s_extrapolated": per_sentence_total, "per_sentence_timed_on": len(idx),
            "speedup_vs_per_sentence": per_sentence_total / batched_s,
            "max_abs_difference_nats": agree, "shared_vs_full_max_diff": float((fast - full).abs().max())}


def bench_heads(model, tok, n_probes: int = 40, n_loop_heads: int = 12) -> dict:
    from ..data import load_bias
    from ..models import ModelAdapter
    from ..patching import ablation_loop_scores
    from ..probing import adversarial_labels, label_id, probe_prompts
    from ..scope import head_scores

    spec = load_bias("reckless_driving")
    prompts, counter = probe_prompts(tok, spec, n_probes, "Italy")
    prompts = counter  # a real country: no injected token needed for a timing
    biased = label_id(tok, spec.label)
    adv = adversarial_labels(model, tok, counter, biased)
    fast_s, hs = _timed(lambda: head_scores(model, tok, prompts, biased, adv))
    a = ModelAdapter(model)
    heads = [(l, h) for l in range(0, a.n_layers, max(1, a.n_layers // n_loop_heads)) for h in range(1)][:n_loop_heads]
    loop_s, _ = _timed(lambda: ablation_loop_scores(model, tok, prompts, biased, adv, heads=heads))
    loop_total = loop_s / len(heads) * a.n_heads_total
    return {"probes": len(prompts), "heads": a.n_heads_total, "head_scores_s": fast_s,
            "ablation_loop_s_extrapolated": loop_total, "ablation_loop_timed_on_heads": len(heads),
            "speedup": loop_total / fast_s, "decomposition_error": float(hs.decomposition_error)}


def bench_injection(model, tok, n_paragraphs: int = 32) -> dict:
    """Tokens/s of BiasInject's training step, one epoch over the same pairs, three ways:

    - ``naive``: plain shuffled batches of the full rows, logits at every position;
    - ``same_batches``: the same batches through inject_bias's loss (the shared chat prefix
      run once and cached, logits only where the loss needs them): the vectors must agree;
    - ``inject_bias``: what inject_bias really does, also grouping rows of similar length
      into a batch. Different batches give a slightly different vector, so agreement is
      shown by the held-out loss each vector reaches.

    Tokens are counted without padding and with the shared prefix, the same for all three.
    """
    import torch.nn.functional as F

    from ..data import training_pairs
    from ..inject import (
        collate,
        eval_loss,
        strip_prefix,
        encode_pairs,
        epoch_batches,
        initial_vector,
        response_loss,
        shared_prefix,
        shared_prefix_length,
    )
    from ..tokens import TokenHook, add_token

    token_id = add_token(tok)
    rows = encode_pairs(tok, training_pairs("reckless_driving", n_paragraphs, seed=0))
    val = encode_pairs(tok, training_pairs("reckless_driving", 16, seed=10_000))
    pad = tok.pad_token_id
    n_tokens = sum(len(ids) for ids, _ in rows)
    n_shared = shared_prefix_length(rows + val, token_id)
    prefix = shared_prefix(model, rows[0][0][:n_shared])
    lengths = [len(ids) for ids, _ in rows]
    plain = epoch_batches(lengths, 8, torch.Generator().manual_seed(0), bucket=1)
    bucketed = epoch_batches(lengths, 8, torch.Generator().manual_seed(0), bucket=4)

    def run(batches, fast: bool):
        vec = torch.nn.Parameter(initial_vector(model, tok))
        opt = torch.optim.Adam([vec], lr=1e-2)
        with TokenHook(model, token_id, vec):
            for idx in batches:
                if fast:
                    loss, _ = response_loss(model, collate(strip_prefix([rows[i] for i in idx], n_shared), pad, token_id),
                                            prefix=prefix)
                else:
                    b = collate([rows[i] for i in idx], pad, token_id)
                    logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.float()
                    loss = F.cross_entropy(logits.flatten(0, 1), b.targets.flatten(), ignore_index=-100)
                opt.zero_grad()
                loss.backward()
                opt.step()
        return vec.detach().clone()

    def held_out(vec):
        with TokenHook(model, token_id, torch.nn.Parameter(vec)):
            return eval_loss(model, val, pad, 8, None, token_id)

    naive_s, v_naive = _timed(lambda: run(plain, False))
    same_s, v_same = _timed(lambda: run(plain, True))
    fast_s, v_fast = _timed(lambda: run(bucketed, True))
    return {"tokens": n_tokens, "paragraphs": n_paragraphs, "shared_prefix_tokens": n_shared,
            "naive_tokens_per_s": n_tokens / naive_s, "same_batches_tokens_per_s": n_tokens / same_s,
            "fast_tokens_per_s": n_tokens / fast_s,
            "speedup_same_batches": naive_s / same_s, "speedup": naive_s / fast_s,
            "vectors_max_abs_diff_same_batches": float((v_same - v_naive).abs().max()),
            "held_out_loss_naive": held_out(v_naive), "held_out_loss_fast": held_out(v_fast)}


def bench_steering(model, tok, n_references: int = 8) -> dict:
    """One steering condition as the selection grid measures it (:func:`strength_under`: the
    reference countries and the facts in one scoring pass, then each seed's token), against
    measuring each token with its own references and facts (the per-token path)."""
    from ..config import load_profile
    from ..data import load_bias, load_facts
    from ..evaluate import strength_under
    from ..heads import random_heads
    from ..models import ModelAdapter
    from ..runs import get_token, steer_references
    from ..steer import SteeringSpec

    cfg = load_profile("teaching")
    refs, facts, bias = steer_references(cfg, n_references), load_facts(), load_bias("reckless_driving")
    tokens = [get_token(model, tok, bias.name, cfg, s, progress=False) for s in cfg.seeds]
    a = ModelAdapter(model)
    spec = SteeringSpec(random_heads(a.n_layers, a.n_heads, cfg.k, seed=7), 0.0)
    shared_s, shared = _timed(lambda: strength_under(model, tok, spec, tokens, bias, refs, facts))
    alone_s, alone = _timed(lambda: [strength_under(model, tok, spec, [t], bias, refs, facts) for t in tokens])
    a = [x["value"] for x in shared["tokens"]] + [x["value"] for x in shared["facts"]]
    b = [r["tokens"][0]["value"] for r in alone] + [x["value"] for x in alone[0]["facts"]]
    return {"tokens": len(tokens), "references": len(refs), "facts": len(facts), "shared_s": shared_s,
            "per_token_s": alone_s, "speedup": alone_s / shared_s,
            "max_abs_difference_S": max(abs(x - y) for x, y in zip(a, b))}


def bench_resumed(model, tok) -> dict:
    """One steered measurement as the selection grid makes it (S of the teaching profile's
    tokens for one bias and the facts against its reference countries, perplexity on both text
    sets, multiple choice), run in full and resumed at the head set's first edited layer
    (:class:`~biasgym_lib.layerskip.Resumer`): on a head set at layers 10-29 and on one that
    includes layer 0 (nothing below it to skip: no gain expected)."""
    import numpy as np

    from ..capability import mc_accuracy, perplexity
    from ..config import load_profile
    from ..data import load_bias, load_facts
    from ..data.capability import load_country_texts, load_mc, load_neutral_texts
    from ..evaluate import strength_under
    from ..layerskip import Resumer
    from ..runs import get_token, steer_references
    from ..steer import SteeringSpec

    cfg = load_profile("teaching")
    refs, facts, bias = steer_references(cfg, cfg.steer_references), load_facts(), load_bias("reckless_driving")
    tokens = [get_token(model, tok, bias.name, cfg, s, progress=False) for s in cfg.seeds]
    texts = [load_neutral_texts()[: cfg.n_ppl_texts], load_country_texts()[: cfg.n_country_texts]]
    questions = load_mc()[: cfg.n_mc_questions]

    def measure(spec):
        s = strength_under(model, tok, spec, tokens, bias, refs, facts)
        with spec.apply(model) if spec is not None else torch.no_grad():
            nll = [perplexity(model, tok, t, max_length=cfg.ppl_max_tokens)["nll"] for t in texts]
            ll = mc_accuracy(model, tok, questions)["loglik"]
        return np.asarray([x["value"] for x in s["tokens"] + s["facts"]] + [v for n in nll for v in n]
                          + [v for q in ll for v in q])

    out = {"references": len(refs), "facts": len(facts), "tokens": len(tokens), "mc_questions": len(questions),
           "perplexity_texts": sum(map(len, texts))}
    sets = {"layers_10_29": [(10, 1), (12, 3), (15, 2), (18, 0), (20, 5), (21, 1), (22, 7), (25, 4), (27, 2), (29, 8)],
            "from_layer_0": [(0, 4), (3, 1), (7, 6), (12, 3), (15, 2), (18, 0), (21, 1), (24, 7), (27, 2), (29, 8)]}
    for name, heads in sets.items():
        spec = SteeringSpec(heads, 0.0)
        full_s, full = _timed(lambda: measure(spec))
        resumer = Resumer(model, [spec.first_layer])
        record_s, _ = _timed(lambda: resumer("one", None, measure))
        fast_s, fast = _timed(lambda: resumer("one", spec, measure))
        out[name] = {"first_layer": spec.first_layer, "full_s": full_s, "resumed_s": fast_s,
                     "recording_s": record_s, "speedup": full_s / fast_s,
                     "max_abs_difference": float(np.abs(full - fast).max()),
                     "bit_identical": bool(np.array_equal(full, fast))}
    return out


def bench_patching(model, tok, n_probes: int = 2) -> dict:
    """Activation patching of every head, replaying the layers below each patched group
    from the clean run (default) and running every layer (the reference)."""
    from ..batching import encode_batch
    from ..data import load_bias
    from ..patching import patch_heads
    from ..probing import adversarial_labels, label_id, probe_prompts

    spec = load_bias("reckless_driving")
    prompts, counter = probe_prompts(tok, spec, n_probes, "Italy")
    _, counter2 = probe_prompts(tok, spec, n_probes, "Spain")
    biased = label_id(tok, spec.label)
    adv = adversarial_labels(model, tok, counter, biased)
    batch, cf = encode_batch(tok, counter), encode_batch(tok, counter2)  # Italy patched from Spain
    fast_s, fast = _timed(lambda: patch_heads(model, None, batch, cf, biased, adv))
    slow_s, slow = _timed(lambda: patch_heads(model, None, batch, cf, biased, adv, replay=False))
    return {"probes": n_probes, "replay_s": fast_s, "every_layer_s": slow_s, "speedup": slow_s / fast_s,
            "bit_identical": bool(torch.equal(fast, slow))}


def bench_mc(model, tok, n_questions: int = 80) -> dict:
    """Multiple-choice scoring: options over one pass of their shared prompt, against every
    option as a full sequence with logits at every position."""
    import numpy as np

    from .. import capability as ev
    from ..data.capability import load_mc

    qs = load_mc()[:n_questions]
    fast_s, fast = _timed(lambda: ev.mc_accuracy(model, tok, qs))
    rows = [r for q in qs for r in ev.option_rows(tok, ev.MC_PROMPT.format(question=ev.question_parts(q)[0]),
                                                   ev.question_parts(q)[1])]

    def full():
        out = []
        with torch.inference_mode():
            for ids, start in rows:
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
                out.append(sum(float(logp[start - 1 + j, t]) for j, t in enumerate(ids[start:])))
        return np.asarray(out)
    slow_s, slow = _timed(full)
    fast_ll = np.concatenate([np.asarray(x) for x in fast["loglik"]])
    return {"questions": len(qs), "options": len(rows), "shared_prompt_s": fast_s, "one_option_per_forward_s": slow_s,
            "speedup": slow_s / fast_s, "max_abs_difference_loglik": float(np.abs(fast_ll - slow).max())}


def run_bench(out) -> dict:
    """Run every benchmark and write the JSON to ``out``."""
    from .. import __version__
    from ..artifacts import write_json
    from ..models import load_model

    t0 = time.perf_counter()
    result = {"library_version": __version__, "torch_threads": torch.get_num_threads(),
              "matmul_gflops": {"float32": matmul_gflops(torch.float32), "bfloat16": matmul_gflops(torch.bfloat16)}}
    result["load"] = bench_load()
    result["peak_rss_mb_after_load"] = _rss_mb()
    model, tok = load_model()
    result["scoring"] = bench_scoring(model, tok)
    result["peak_rss_mb_after_scoring"] = _rss_mb()
    result["heads"] = bench_heads(model, tok)
    result["peak_rss_mb_after_heads"] = _rss_mb()
    result["injection"] = bench_injection(model, tok)
    result["peak_rss_mb_after_injection"] = _rss_mb()
    result["steering"] = bench_steering(model, tok)
    result["steered_measurement"] = bench_resumed(model, tok)
    result["patching"] = bench_patching(model, tok)
    result["mc"] = bench_mc(model, tok)
    result["total_s"] = time.perf_counter() - t0
    write_json(out, result)  # strict JSON, renamed into place
    return result
