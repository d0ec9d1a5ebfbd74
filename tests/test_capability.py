"""Capability sets (data/capability) and the evaluate module (METHOD §5)."""

from __future__ import annotations

import collections
import json
import re
import string
import sys

import numpy as np
import pytest
import torch

from biasgym_lib import capability as ev
from biasgym_lib.data import capability as cap
from biasgym_lib.data import seegull
from biasgym_lib.errors import BiasGymError
from biasgym_lib.models import tiny_model

# ----------------------------------------------------------------------------- helpers


def char_tokenizer():
    """A real HF fast tokenizer, one token per character, with BOS; ids fit a tiny model."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in string.ascii_letters + string.digits + " .,?:!'\n-()":
        vocab[c] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", pad_token="</s>")
    assert len(vocab) <= 97
    return tok


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=0, vocab_size=97)


TEXTS = ["a", "The cat sat on the mat.", "Short one.",
         "A much longer passage, with commas, digits 0123456789 and more words to pad others.",
         "Mid length text here", "xy"]


def manual_nll(model, tok, text, max_length=None):
    """Summed NLL of one text, computed alone (no padding) with an explicit loop."""
    ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    if max_length:
        ids = ids[:max_length]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return -sum(float(logp[t, ids[t + 1]]) for t in range(len(ids) - 1)), len(ids) - 1


# ----------------------------------------------------------------------------- shipped files


FORBIDDEN_EXTRA = {
    "nationality", "nationalities", "ethnic", "ethnicity", "foreign", "foreigner", "foreigners",
    "immigrant", "immigrants", "tribe", "tribal", "race", "racial", "native", "country",
    "countries", "nation", "nations", "national", "europe", "european", "asia", "asian",
    "africa", "african", "america", "americas", "latin", "arab", "arabic", "persian", "slavic",
    "nordic", "scandinavian", "caribbean", "hispanic", "celtic", "roman", "jewish", "oriental",
    "western", "eastern", "swede", "scots", "scotch", "dane", "britain", "england", "usa", "uk",
    "mediterranean", "antarctica", "continent", "jersey", "java", "hollandaise",
}


def forbidden_words() -> set[str]:
    """Every demonym and place the SeeGULL mapping knows, plus nationality vocabulary."""
    words = set(seegull.IDENTITY_TO_COUNTRY) | set(seegull.IDENTITY_TO_COUNTRY.values())
    words |= set(seegull._EXTRA_DEMONYMS) | set(seegull._EXTRA_DEMONYMS.values())
    return {w.casefold() for w in words} | FORBIDDEN_EXTRA


def test_neutral_set_shape():
    recs = cap.load_neutral_records()
    assert len(recs) >= 40
    assert len({r["id"] for r in recs}) == len(recs)
    assert len({r["topic"] for r in recs}) >= 10
    for r in recs:
        n_words = len(r["text"].split())
        assert 300 <= n_words <= 500, (r["id"], n_words)
    assert cap.load_neutral_texts() == [r["text"] for r in recs]


def test_neutral_set_has_no_nationality_content():
    words = forbidden_words()
    assert len(words) > 300 and "italian" in words and "italy" in words
    hits = []
    for r in cap.load_neutral_records():
        for w in words:
            if re.search(r"\b" + re.escape(w) + r"\b", r["text"], flags=re.IGNORECASE):
                hits.append((r["id"], w))
    assert hits == []


def test_forbidden_word_check_can_fail():
    words = forbidden_words()
    assert any(re.search(r"\b" + re.escape(w) + r"\b", "People from Italy cook.", re.I) for w in words)


def test_mc_set_shape_and_balance():
    qs = cap.load_mc()
    assert len(qs) >= 200
    per_cat = collections.Counter(q.category for q in qs)
    assert set(per_cat) == set(cap.MC_CATEGORIES)
    assert min(per_cat.values()) >= 30
    for q in qs:
        assert len(q.options) == 4 and 0 <= q.answer < 4
        assert len({o.casefold() for o in q.options}) == 4  # exactly one option can be right
        assert q.correct == q.options[q.answer]
    counts = collections.Counter(q.answer for q in qs)
    assert set(counts) == {0, 1, 2, 3}
    assert max(counts.values()) - min(counts.values()) <= 2, counts
    assert len({q.id for q in qs}) == len(qs)
    assert {q.category for q in cap.load_mc(categories=["history"])} == {"history"}


def test_mc_arithmetic_answers_are_right():
    """Spot-check the arithmetic answers that can be recomputed from the question."""
    words = {" times ": "*", " plus ": "+", " minus ": "-", " divided by ": "/", " x ": "*",
             " squared": "**2", " cubed": "**3", " to the power of ": "**"}
    checked = 0
    for q in cap.load_mc(categories=["arithmetic"]):
        m = re.fullmatch(r"What is (.+)\?", q.question)
        expr = m.group(1) if m else ""
        for w, op in words.items():
            expr = expr.replace(w, op)
        if expr and re.fullmatch(r"[\d.\s()+*/-]+", expr):
            value = eval(expr)  # noqa: S307 (our own fixed strings, digits and operators only)
            assert float(q.correct) == pytest.approx(value), q.question
            checked += 1
    assert checked >= 25


def _write(tmp_path, rows):
    p = tmp_path / "mc.jsonl"
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return p


GOOD = {"id": "q1", "category": "science", "question": "Q?", "options": ["a", "b", "c", "d"], "answer": 1}


@pytest.mark.parametrize("bad, message", [
    ({**GOOD, "options": ["a", "b", "c"]}, "4 non-empty string options"),
    ({**GOOD, "answer": 4}, "answer must be an index"),
    ({**GOOD, "answer": True}, "answer must be an index"),
    ({**GOOD, "options": ["a", "b", "c", "A"]}, "repeated options"),
    ({**GOOD, "category": "sport"}, "unknown category"),
    ({k: v for k, v in GOOD.items() if k != "question"}, "lacks the key"),
    ("{not json", "not valid JSON"),
])
def test_mc_validation_errors(tmp_path, bad, message):
    with pytest.raises(cap.CapabilityDataError, match=message):
        cap.load_mc(_write(tmp_path, [GOOD | {"id": "q0"}, bad]))


def test_mc_duplicate_ids_and_missing_file(tmp_path):
    with pytest.raises(cap.CapabilityDataError, match="duplicate id"):
        cap.load_mc(_write(tmp_path, [GOOD, GOOD]))
    with pytest.raises(cap.CapabilityDataError, match="missing"):
        cap.load_mc(tmp_path / "nope.jsonl")
    with pytest.raises(cap.CapabilityDataError, match="empty text"):
        p = tmp_path / "n.jsonl"
        p.write_text(json.dumps({"id": "x", "topic": "t", "text": "  "}) + "\n")
        cap.load_neutral_texts(p)


@pytest.mark.slow
def test_neutral_set_has_20k_tokens_in_smollm2():
    from biasgym_lib.models import load_model

    _, tokenizer = load_model()
    n = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in cap.load_neutral_texts())
    assert n >= 20_000


# ----------------------------------------------------------------------------- perplexity


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_perplexity_equals_manual_computation(family, tok):
    model = tiny_model(family, seed=0, vocab_size=97)
    res = ev.perplexity(model, tok, TEXTS, batch_size=4, n_boot=200)
    manual = [manual_nll(model, tok, t) for t in TEXTS]
    assert res["tokens"] == [n for _, n in manual]
    assert res["n_tokens"] == sum(n for _, n in manual) and res["n"] == len(TEXTS)
    for got, (want, n) in zip(res["nll"], manual):
        assert got / n == pytest.approx(want / n, abs=1e-6)  # mean nats per token
        assert got == pytest.approx(want, abs=1e-4)  # summed nats per passage
    want_ppl = np.exp(sum(w for w, _ in manual) / sum(n for _, n in manual))
    assert res["ppl"] == pytest.approx(want_ppl, rel=1e-6)


def test_perplexity_padding_and_batch_size_do_not_matter(model, tok):
    a = ev.perplexity(model, tok, TEXTS, batch_size=1, n_boot=50)
    b = ev.perplexity(model, tok, TEXTS, batch_size=6, n_boot=50)
    assert a["tokens"] == b["tokens"]
    np.testing.assert_allclose(a["nll"], b["nll"], rtol=0, atol=1e-5)
    assert a["ppl"] == pytest.approx(b["ppl"], rel=1e-6)


def test_perplexity_truncates_to_max_length(model, tok):
    res = ev.perplexity(model, tok, TEXTS, max_length=8, n_boot=50)
    manual = [manual_nll(model, tok, t, max_length=8) for t in TEXTS]
    assert res["tokens"] == [n for _, n in manual] and max(res["tokens"]) == 7
    np.testing.assert_allclose(res["nll"], [w for w, _ in manual], atol=1e-5)


def test_perplexity_ci_and_determinism(model, tok):
    a = ev.perplexity(model, tok, TEXTS, seed=3, n_boot=300)
    b = ev.perplexity(model, tok, TEXTS, seed=3, n_boot=300)
    c = ev.perplexity(model, tok, TEXTS, seed=4, n_boot=300)
    assert a["estimate"]["lo"] <= a["ppl"] == a["estimate"]["value"] <= a["estimate"]["hi"]
    assert a["estimate"]["lo"] < a["estimate"]["hi"]
    assert a == b
    assert c["estimate"] != a["estimate"] and c["ppl"] == a["ppl"]


def test_perplexity_errors(model, tok):
    with pytest.raises(BiasGymError, match="no texts"):
        ev.perplexity(model, tok, [])
    with pytest.raises(BiasGymError, match="max_length"):
        ev.perplexity(model, tok, TEXTS, max_length=1)


# ----------------------------------------------------------------------------- multiple choice


QUESTIONS = [
    cap.MCQuestion("t1", "science", "Which is it?", ("abc", "xyz", "aaa", "q"), 2),
    cap.MCQuestion("t2", "science", "Pick one", ("b", "bb", "a", "ccc dd"), 0),
    cap.MCQuestion("t3", "language", "Longer question, with words?", ("Yes", "No", "Maybe so", "x"), 3),
]


def manual_option_loglik(model, tok, question, option):
    ctx = [tok.bos_token_id] + tok(ev.MC_PROMPT.format(question=question), add_special_tokens=False)["input_ids"]
    opt = tok(" " + option, add_special_tokens=False)["input_ids"]
    ids = ctx + opt
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    return sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(opt))


def test_mc_loglik_equals_manual_computation(model, tok):
    res = ev.mc_accuracy(model, tok, QUESTIONS, batch_size=5, n_boot=100)
    for q, got in zip(QUESTIONS, res["loglik"]):
        want = [manual_option_loglik(model, tok, q.question, o) for o in q.options]
        np.testing.assert_allclose(got, want, atol=1e-5)
        assert res["predictions"][QUESTIONS.index(q)] == int(np.argmax(want))
        norm = np.asarray(want) / np.asarray([len(o) for o in q.options])
        assert res["predictions_norm"][QUESTIONS.index(q)] == int(np.argmax(norm))
    other = ev.mc_accuracy(model, tok, QUESTIONS, batch_size=1, n_boot=100)
    np.testing.assert_allclose(np.asarray(other["loglik"]), np.asarray(res["loglik"]), atol=1e-5)
    assert res["n"] == 3 and res["chance"] == 0.25


def biased_head_model(tok, favourite="a", boost=1.0):
    """A tiny model whose next-token distribution is fixed: log_softmax(bias), with the
    character ``favourite`` boosted, whatever the context (lm_head edited)."""
    m = tiny_model("llama", seed=1, vocab_size=97, tied=False)
    head = torch.nn.Linear(m.lm_head.in_features, m.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tok.convert_tokens_to_ids(favourite)] = boost
    m.lm_head = head.requires_grad_(False)
    return m


def test_mc_picks_the_option_the_model_must_prefer(tok):
    m = biased_head_model(tok)
    logp = torch.log_softmax(m.lm_head.bias.double(), -1)
    qs = [cap.MCQuestion(f"b{i}", "science", f"Question {i}?", tuple(opts), ans) for i, (opts, ans) in enumerate([
        (["bcd", "aaa", "xyz", "qrs"], 1),  # same lengths: "aaa" wins the sum
        (["aab", "bbb", "ccc", "ddd"], 0),
        (["xyz", "www", "vvv", "aaa"], 3),
        (["zzz", "yyy", "aba", "xxx"], 2),
    ])]
    res = ev.mc_accuracy(m, tok, qs, n_boot=100)
    assert res["predictions"] == [1, 0, 3, 2] and res["accuracy"] == 1.0
    assert (res["estimate"]["lo"], res["estimate"]["hi"]) == (1.0, 1.0)
    want = sum(float(logp[t]) for t in tok(" aaa", add_special_tokens=False)["input_ids"])
    assert res["loglik"][0][1] == pytest.approx(want, abs=1e-6)
    # Sum vs length-normalised: a short plain option beats a long one on the sum,
    # but a long all-"a" option wins per character.
    q = cap.MCQuestion("n", "science", "Q?", ("b", "aaaaaaaa", "c", "d"), 1)
    r = ev.mc_accuracy(m, tok, [q], n_boot=10)
    assert r["predictions"] == [0] and r["predictions_norm"] == [1]
    assert r["accuracy"] == 0.0 and r["accuracy_norm"] == 1.0


def test_mc_ci_contains_estimate_and_is_deterministic(model, tok):
    qs = cap.load_mc()[:40]
    a = ev.mc_accuracy(model, tok, qs, seed=1, n_boot=300)
    b = ev.mc_accuracy(model, tok, qs, seed=1, n_boot=300)
    assert a["estimate"]["lo"] <= a["accuracy"] <= a["estimate"]["hi"]
    assert a["estimate_norm"]["lo"] <= a["accuracy_norm"] <= a["estimate_norm"]["hi"]
    assert a == b
    assert len(a["predictions"]) == 40 and all(0 <= p < 4 for p in a["predictions"])


def test_mc_accepts_dicts_and_checks_answers(model, tok):
    d = {"question": "Q?", "options": ["a", "b", "c", "d"], "answer": 9}
    with pytest.raises(BiasGymError, match="answer index 9"):
        ev.mc_accuracy(model, tok, [d])
    res = ev.mc_accuracy(model, tok, [d | {"answer": 0}], n_boot=10)
    assert res["n"] == 1


# ----------------------------------------------------------------------------- MMLU


def test_mmlu_without_datasets_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(BiasGymError) as err:
        ev.mmlu_questions(["astronomy"], limit=5)
    msg = str(err.value)
    assert "pip install datasets" in msg and "network" in msg and "load_mc()" in msg
    assert "offline default" in msg


# ----------------------------------------------------------------------------- before / after


def _ppl_result(nll, tokens, fingerprint="f"):
    nll, tokens = list(map(float, nll)), list(map(int, tokens))
    return {"metric": "perplexity", "ppl": float(np.exp(sum(nll) / sum(tokens))), "nll": nll,
            "tokens": tokens, "n": len(nll), "fingerprint": fingerprint}


def test_paired_change_perplexity_exact():
    rng = np.random.default_rng(0)
    tokens = rng.integers(50, 100, size=30)
    nll = tokens * rng.uniform(2.0, 4.0, size=30)
    before = _ppl_result(nll, tokens)
    after = _ppl_result(nll + tokens * np.log(2.0), tokens)  # every passage: perplexity x2
    c = ev.paired_change(before, after, n_boot=200)
    assert c["change"]["value"] == pytest.approx(1.0) and c["change_kind"] == "relative"
    assert [c["change"]["lo"], c["change"]["hi"]] == pytest.approx([1.0, 1.0])
    same = ev.paired_change(before, before, n_boot=200)["change"]
    assert (same["value"], same["lo"], same["hi"]) == (0.0, 0.0, 0.0)


def test_paired_change_mc():
    before = {"metric": "mc_accuracy", "accuracy": 0.5, "correct": [True, False] * 10, "n": 20, "fingerprint": "q"}
    after_correct = [True, False] * 8 + [False, False, False, False]
    after = {"metric": "mc_accuracy", "accuracy": float(np.mean(after_correct)), "correct": after_correct,
             "n": 20, "fingerprint": "q"}
    c = ev.paired_change(before, after, seed=2, n_boot=500)
    ch = c["change"]
    assert ch["value"] == pytest.approx(-0.1) and c["change_kind"] == "absolute"
    assert ch["lo"] <= ch["value"] <= ch["hi"] and ch["hi"] <= 0.0
    assert ev.paired_change(before, after, seed=2, n_boot=500) == c
    with pytest.raises(BiasGymError, match="different items"):
        ev.paired_change(before, after | {"fingerprint": "other"})
    with pytest.raises(BiasGymError, match="two perplexity or two mc_accuracy"):
        ev.paired_change(before, _ppl_result([1.0] * 20, [1] * 20, "q"))


def test_paired_change_on_real_results_of_a_tiny_model(model, tok):
    ppl = ev.perplexity(model, tok, TEXTS, n_boot=100)
    mc = ev.mc_accuracy(model, tok, QUESTIONS, n_boot=100)
    assert ev.paired_change(ppl, ppl, n_boot=100)["change"]["value"] == 0.0
    assert ev.paired_change(mc, mc, n_boot=100)["change"]["value"] == 0.0
    other = ev.perplexity(model, tok, TEXTS[:-1], n_boot=10)
    with pytest.raises(BiasGymError, match="different items"):
        ev.paired_change(ppl, other)


# ----------------------------------------------------------------------------- real model


@pytest.fixture(scope="module")
def real():
    from biasgym_lib.models import load_model

    return load_model()


@pytest.mark.slow
def test_real_model_perplexity_is_sane(real):
    """SmolLM2-135M on four neutral passages: measured 21.2 on the whole set."""
    m, t = real
    res = ev.perplexity(m, t, cap.load_neutral_texts()[:4], n_boot=200)
    assert 5.0 < res["ppl"] < 60.0 and res["estimate"]["lo"] <= res["ppl"] <= res["estimate"]["hi"]


@pytest.mark.slow
def test_real_model_mc_history_is_above_chance(real):
    """The scoring works with a real BPE tokenizer: measured 0.80 on history (chance 0.25)."""
    m, t = real
    res = ev.mc_accuracy(m, t, cap.load_mc(categories=["history"]), n_boot=500)
    assert res["estimate"]["lo"] > res["chance"] == 0.25


# ----------------------------------------------------------------------------- country passages


COUNTRY_TOPICS = {"geography", "history", "trade", "science", "sport", "culture", "travel", "environment"}


def _countries_named(text: str) -> set[str]:
    from biasgym_lib.data import reference_countries

    return {c for c in reference_countries() if re.search(r"\b" + re.escape(c) + r"\b", text)}


def _people_statements(text: str) -> list[str]:
    """Demonyms used for people: "<Demonym>s are", "<Demonym> people", "Italians"..."""
    from biasgym_lib.data import demonyms

    hits = []
    for d in demonyms().values():
        d = re.escape(d)
        pat = rf"\b{d}s?\s+(people|peoples|men|women|are|is|was|were|tend|have)\b|\b{d}s\b"
        hits += [m.group(0) for m in re.finditer(pat, text)]
    return hits


def test_country_set_shape():
    recs = cap.load_country_records()
    assert len(recs) == 24
    assert len({r["id"] for r in recs}) == len(recs)
    assert all(re.fullmatch(r"country-\d\d-[a-z0-9-]+", r["id"]) for r in recs)
    assert {r["topic"] for r in recs} <= COUNTRY_TOPICS
    for r in recs:
        n_words = len(r["text"].split())
        assert 110 <= n_words <= 180, (r["id"], n_words)
        assert r["text"] == r["text"].strip() and "  " not in r["text"]
    assert cap.load_country_texts() == [r["text"] for r in recs]


def test_country_set_names_countries_and_covers_all():
    from biasgym_lib.data import reference_countries

    seen = set()
    for r in cap.load_country_records():
        named = _countries_named(r["text"])
        assert 2 <= len(named) <= 5, (r["id"], named)
        assert any(" " + c in r["text"] for c in named), r["id"]  # mid-sentence: " " + name is one token
        seen |= named
    assert seen == set(reference_countries())


def test_country_set_says_nothing_about_peoples():
    assert _people_statements("Italians are loud.") and _people_statements("the Swiss people")
    assert _people_statements("Most Japanese are polite.") and _people_statements("The French tend to")
    assert not _people_statements("the Indian Ocean and the Swiss Alps")
    hits = [(r["id"], h) for r in cap.load_country_records() for h in _people_statements(r["text"])]
    assert hits == []


def test_country_set_does_not_overlap_neutral_set():
    def ngrams(text, n=8):
        w = re.findall(r"[a-z0-9']+", text.lower())
        return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}

    neutral = set().union(*(ngrams(t) for t in cap.load_neutral_texts()))
    country = cap.load_country_texts()
    assert not set(country) & set(cap.load_neutral_texts())
    assert [t[:40] for t in country if ngrams(t) & neutral] == []


COUNTRY_GOOD = {"id": "c1", "topic": "geography", "text": "The Rhine flows from Switzerland through Germany."}


@pytest.mark.parametrize("rows, message", [
    ([COUNTRY_GOOD, {**COUNTRY_GOOD, "id": "c2", "text": "The Rhine flows through Germany."}],
     r"record 2 \('c2'\) names 1 country"),
    ([COUNTRY_GOOD, {**COUNTRY_GOOD, "id": "c3", "text": "The Rhine flows through Germanyland."}],
     r"record 2 \('c3'\) names 0 country"),
    ([COUNTRY_GOOD, dict(COUNTRY_GOOD)], r"duplicate id 'c1'"),
    ([COUNTRY_GOOD, {"id": "c4", "topic": "trade"}], r"record 2 lacks the key\(s\) \['text'\]"),
    ([COUNTRY_GOOD, {**COUNTRY_GOOD, "id": "c5", "text": " "}], r"record 2 \('c5'\) has an empty text"),
])
def test_country_set_validation_errors(tmp_path, rows, message):
    p = tmp_path / "countries.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(cap.CapabilityDataError, match=message):
        cap.load_country_records(p)
    with pytest.raises(cap.CapabilityDataError, match=message):
        cap.load_country_texts(p)
    p.write_text(json.dumps(COUNTRY_GOOD) + "\n")
    assert cap.load_country_texts(p) == [COUNTRY_GOOD["text"]]
