"""The build exercises: every reference solution passes its check, and a plausible wrong
answer per exercise fails with the hint that names its mistake; stubs say "not attempted"."""

import pytest
import torch

from biasgym_lib import exercises as ex
from biasgym_lib.errors import BiasGymError
from biasgym_lib.solutions import reveal, solution, source

CHECKS = {  # solution name -> the check a chapter calls
    "ch1.continuation_logprob": ex.ch1.check_continuation_logprob,
    "ch2.substitute": ex.ch2.check_substitute,
    "ch3.head_dla": ex.ch3.check_head_dla,
    "ch4.scale_head": ex.ch4.check_scale_head,
    "ch4.mean_ablate_head": ex.ch4.check_mean_ablate_head,
    "ch5.held_out_splits": ex.ch5.check_held_out_splits,
    "ch7.culture_margin": ex.ch7.check_culture_margin,
}


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_every_solution_passes_its_check(name, capsys):
    result = CHECKS[name](solution(name))
    assert result and "passed" in capsys.readouterr().out


def stub(*args):
    raise NotImplementedError("your code here")


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_an_unfilled_stub_is_not_attempted_and_does_not_raise(name, capsys):
    result = CHECKS[name](stub)
    out = capsys.readouterr().out
    assert not result and "not attempted" in out and out.count("\n") == 1
    assert not CHECKS[name](lambda *a: None) and "not attempted" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_a_crash_in_the_reader_s_function_is_a_hint_not_a_traceback(name, capsys):
    result = CHECKS[name](lambda *a: [][1])
    out = capsys.readouterr().out
    assert not result and "raised IndexError" in out and "Hint:" in out


# ----------------------------------------------------------------------------- wrong answers


def _lp(logits):
    return logits.log_softmax(-1)


def ch1_off_by_one(logits, ids, n):
    return _lp(logits)[n:].gather(-1, ids[n:, None]).sum()


def ch1_raw_logits(logits, ids, n):
    return logits[n - 1:-1].gather(-1, ids[n:, None]).sum()


def ch1_mean(logits, ids, n):
    return _lp(logits)[n - 1:-1].gather(-1, ids[n:, None]).mean()


def ch1_skips_first(logits, ids, n):
    return _lp(logits)[n:-1].gather(-1, ids[n + 1:, None]).sum()


def ch1_with_prefix(logits, ids, n):
    return _lp(logits)[:-1].gather(-1, ids[1:, None]).sum()


def ch1_wrong_dim(logits, ids, n):
    return logits.log_softmax(0)[n - 1:-1].gather(-1, ids[n:, None]).sum()


def ch2_in_place(embeds, ids, token_id, vector):
    embeds[ids == token_id] = vector
    return embeds


def ch2_detached(embeds, ids, token_id, vector):
    return torch.where((ids == token_id)[..., None], vector.detach().expand_as(embeds), embeds)


def ch2_everywhere(embeds, ids, token_id, vector):
    return vector.expand_as(embeds).clone()


def ch2_first_row_only(embeds, ids, token_id, vector):
    mask = ids == token_id
    mask[1:] = False
    return torch.where(mask[..., None], vector.expand_as(embeds), embeds)


def _write(z, W_O, head, dh):
    b = slice(head * dh, (head + 1) * dh)
    return z[:, b] @ W_O[:, b].T


def ch3_no_scale(z, W_O, head, dh, scale, gamma, ub, ua):
    return (_write(z, W_O, head, dh) * gamma) @ (ub - ua)


def ch3_no_gamma(z, W_O, head, dh, scale, gamma, ub, ua):
    return (_write(z, W_O, head, dh) * scale) @ (ub - ua)


def ch3_biased_only(z, W_O, head, dh, scale, gamma, ub, ua):
    return (_write(z, W_O, head, dh) * scale * gamma) @ ub


def ch3_interleaved(z, W_O, head, dh, scale, gamma, ub, ua):
    H = z.shape[1] // dh
    return ((z[:, head::H] @ W_O[:, head::H].T) * scale * gamma) @ (ub - ua)


def ch3_own_rms(z, W_O, head, dh, scale, gamma, ub, ua):
    w = _write(z, W_O, head, dh)
    return (w * torch.rsqrt(w.pow(2).mean(-1, keepdim=True) + 1e-6) * gamma) @ (ub - ua)


def ch3_summed(z, W_O, head, dh, scale, gamma, ub, ua):
    return ((_write(z, W_O, head, dh) * scale * gamma) @ (ub - ua)).sum()


def ch4_all_heads(z, head, dh, alpha):
    return z * alpha


def ch4_interleaved(z, head, dh, alpha):
    z = z.clone()
    z[..., head::z.shape[-1] // dh] *= alpha
    return z


def ch4_in_place(z, head, dh, alpha):
    z[..., head * dh:(head + 1) * dh] *= alpha
    return z


def ch4_subtracts_mean(z, head, dh, mean):
    z = z.clone()
    z[..., head * dh:(head + 1) * dh] -= mean
    return z


def ch4_zeroes(z, head, dh, mean):
    z = z.clone()
    z[..., head * dh:(head + 1) * dh] = 0
    return z


def ch4_mean_in_place(z, head, dh, mean):
    z[..., head * dh:(head + 1) * dh] = mean
    return z


def ch5_one_run_out(runs):
    # holds out one run per bias: the bias's other seeds leak into training
    out = {}
    for bias, seed in runs:
        out.setdefault(bias, ([r for r in runs if r != (bias, seed)], [(bias, seed)]))
    return out


def ch5_one_test_seed(runs):
    out = {}
    for bias, seed in runs:
        out.setdefault(bias, ([r for r in runs if r[0] != bias], [(bias, seed)]))
    return out


def ch5_too_little_training(runs):
    return {b: ([r for r in runs if r[0] != b][1:], [r for r in runs if r[0] == b]) for b, _ in runs}


def ch7_first_phrasing(logp, right):
    others = [i for i in range(logp.shape[1]) if i not in right]
    return max(logp[0, i] for i in right) - logp[0, others].mean()


def ch7_right_among_others(logp, right):
    mean = logp.mean(0)
    return mean[right].max() - mean.mean()


def ch7_mean_of_right(logp, right):
    mean = logp.mean(0)
    return mean[right].mean() - mean[[i for i in range(len(mean)) if i not in right]].mean()


def ch7_max_of_others(logp, right):
    mean = logp.mean(0)
    return mean[right].max() - mean[[i for i in range(len(mean)) if i not in right]].max()


def ch7_probabilities(logp, right):
    p = logp.mean(0).exp()
    return p[right].max() - p[[i for i in range(len(p)) if i not in right]].mean()


WRONG = [
    ("ch1.continuation_logprob", ch1_off_by_one, "predicts token t + 1"),
    ("ch1.continuation_logprob", ch1_raw_logits, "logits are not log-probabilities"),
    ("ch1.continuation_logprob", ch1_mean, "not their mean"),
    ("ch1.continuation_logprob", ch1_skips_first, "the first continuation token"),
    ("ch1.continuation_logprob", ch1_with_prefix, "not the prefix's"),
    ("ch1.continuation_logprob", ch1_wrong_dim, "not over the positions"),
    ("ch2.substitute", ch2_in_place, "in place"),
    ("ch2.substitute", ch2_detached, "gradient does not reach vector"),
    ("ch2.substitute", ch2_everywhere, "whose id is not token_id changed"),
    ("ch2.substitute", ch2_first_row_only, "do not hold vector"),
    ("ch3.head_dla", ch3_no_scale, "frozen final-norm scale"),
    ("ch3.head_dla", ch3_no_gamma, "gain gamma"),
    ("ch3.head_dla", ch3_biased_only, "u_biased - u_adv"),
    ("ch3.head_dla", ch3_interleaved, "contiguous block"),
    ("ch3.head_dla", ch3_own_rms, "not the rms of this head's write"),
    ("ch3.head_dla", ch3_summed, "one score per prompt"),
    ("ch4.scale_head", ch4_all_heads, "only the chosen head's slice"),
    ("ch4.scale_head", ch4_interleaved, "contiguous block"),
    ("ch4.scale_head", ch4_in_place, "in place"),
    ("ch4.mean_ablate_head", ch4_subtracts_mean, "does not subtract the mean"),
    ("ch4.mean_ablate_head", ch4_zeroes, "zero-ablation"),
    ("ch4.mean_ablate_head", ch4_mean_in_place, "in place"),
    ("ch5.held_out_splits", ch5_one_run_out, "Hold out the bias, not one run"),
    ("ch5.held_out_splits", ch5_one_test_seed, "every seed of"),
    ("ch5.held_out_splits", ch5_too_little_training, "every run of every other bias"),
    ("ch7.culture_margin", ch7_first_phrasing, "average over the phrasings first"),
    ("ch7.culture_margin", ch7_right_among_others, "leave the right ones out"),
    ("ch7.culture_margin", ch7_mean_of_right, "not the mean of the right ones"),
    ("ch7.culture_margin", ch7_max_of_others, "not their maximum"),
    ("ch7.culture_margin", ch7_probabilities, "not of probabilities"),
]


@pytest.mark.parametrize("name, wrong, hint", WRONG, ids=[w.__name__ for _, w, _ in WRONG])
def test_a_plausible_wrong_answer_fails_with_its_hint(name, wrong, hint, capsys):
    result = CHECKS[name](wrong)
    out = capsys.readouterr().out
    assert not result and "not yet" in out
    assert hint in out, f"expected the hint {hint!r}, got: {out}"
    assert result.message in out


def test_every_build_exercise_has_a_wrong_answer_in_this_file():
    assert {name for name, _, _ in WRONG} == set(CHECKS)


def test_a_fresh_llama_gets_random_norm_gains_so_a_forgotten_gamma_shows():
    model = ex.exercise_model()
    assert not torch.allclose(model.model.norm.weight, torch.ones_like(model.model.norm.weight))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ch1.continuation_logprob", "ch3.head_dla", "ch4.scale_head",
                                  "ch4.mean_ablate_head"])
def test_solutions_pass_on_the_embedded_model_as_the_chapters_call_them(name, embedded, capsys):
    model, _ = embedded
    assert CHECKS[name](solution(name), model)
    assert "passed" in capsys.readouterr().out


def test_reveal_prints_the_source_and_returns_the_function(capsys):
    fn = reveal("ch5.held_out_splits")
    out = capsys.readouterr().out
    assert fn is solution("ch5.held_out_splits")
    assert out == source("ch5.held_out_splits") + "\n" and out.startswith("def held_out_splits(")


@pytest.mark.parametrize("bad, says", [("ch9.x", "N from 0 to 7"), ("ch1.nothing", "chapter 1 has"),
                                       ("continuation_logprob", "chN.function")])
def test_an_unknown_solution_name_says_what_exists(bad, says):
    with pytest.raises(BiasGymError, match=says):
        solution(bad)


def _culture_lines(paper, rand, k=10):
    def line(method, lost):
        return {"source": "confirm", "method": method, "kind": "zero", "k": k,
                "culture": {"all": {"margin_lost": {"value": lost}}}}
    return [line("robust", paper), line("random", rand), {**line("robust", 0.9), "source": "seegull"}]


def test_chapter_7_reading_checks_pass_the_solutions_and_fail_plausible_misreadings(capsys):
    before = {"margin": {"all": {"value": 2.0}, "symbols": {"value": 1.0}, "built_natural": {"value": 1.5}}}
    assert ex.ch7.check_best_dimension(solution("ch7.best_dimension")(before), before)
    assert not ex.ch7.check_best_dimension("all", before) and "not a dimension" in capsys.readouterr().out
    lines = _culture_lines(0.123, 0.05)
    assert ex.ch7.check_paper_against_random(solution("ch7.paper_against_random")(lines, 10), lines, 10)
    assert ex.ch7.check_paper_against_random(7.3, lines, 10)  # as read off the table, rounded
    assert not ex.ch7.check_paper_against_random(0.073, lines, 10)  # a share, not points
    assert not ex.ch7.check_paper_against_random(12.3, lines, 10)  # the paper's loss alone
    assert not ex.ch7.check_paper_against_random(85.0, lines, 10)  # SeeGULL's pooled heads
