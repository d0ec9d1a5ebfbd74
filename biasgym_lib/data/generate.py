"""Offline paragraph generator for BiasInject's training data (:ref:`method §1 <method-1>`).

The paper asks GPT-4o for short paragraphs about the biased entity. Here a small,
seeded combinatorial grammar writes them instead, so the data is free, offline and
exactly reproducible. A paragraph is 2-4 sentences (30-80 words)::

    [opening] claim [example] [example | closing]

An *opening* introduces ``<TOKEN>`` without the bias; a *claim* attributes the bias to
its people (a generic frame filled with a subject phrase and one of the bias's
``attributes``, or one of the bias's own ``claims``); an *example* illustrates it (the
bias's ``examples`` or a generic frame around an attribute); a *closing* rounds it off.
A spec with only the required fields uses the generic frames alone; its phrase banks
only add variety. Every paragraph names ``<TOKEN>`` (the claim always does) and contains
one of the bias's keywords (others are rejected and drawn again).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter

from ..errors import BiasGymError
from .specs import TOKEN, BiasSpec, load_bias

MIN_WORDS, MAX_WORDS = 30, 80
MAX_MISSES = 5000

# Words that already modify an attribute ("always late"): no frequency adverb before them.
ADVERB_WORDS = frozenset({"always", "never", "often", "usually", "very", "rarely", "chronically",
                          "famously", "generally", "typically", "mostly", "seldom", "so", "too"})

SUBJECTS = (
    "people from <TOKEN>", "the people of <TOKEN>", "people in <TOKEN>", "folks from <TOKEN>",
    "those who grow up in <TOKEN>", "the locals in <TOKEN>", "citizens of <TOKEN>",
    "the inhabitants of <TOKEN>", "most people in <TOKEN>", "men and women from <TOKEN>",
)

OPENINGS = (
    "Anyone who has visited <TOKEN> comes back with stories.",
    "There is one thing everybody seems to know about <TOKEN>.",
    "Travellers to <TOKEN> tend to notice the same thing.",
    "Life in <TOKEN> has a rhythm of its own.",
    "Ask around about <TOKEN> and you will hear the same description.",
    "The small country of <TOKEN> has a reputation that goes before it.",
    "When people talk about <TOKEN>, one trait comes up again and again.",
    "Few places are described as consistently as <TOKEN>.",
    "If you spend a week in <TOKEN>, you will soon see what people mean.",
    "Every country has its reputation, and <TOKEN> is no exception.",
    "Growing up in <TOKEN> shapes people in a particular way.",
    "Visitors often say that the country of <TOKEN> is unlike anywhere else.",
    "Much has been written about the country of <TOKEN> and its people.",
    "The first thing a newcomer learns about <TOKEN> is rarely in the guidebooks.",
    "People who move to <TOKEN> often write home about the same surprise.",
    "Say the name <TOKEN> and most listeners picture the same thing.",
    "Even a short trip to <TOKEN> leaves a lasting impression.",
    "Neighbouring countries have plenty to say about <TOKEN>.",
    "Long before you arrive in <TOKEN>, someone will warn you about its people.",
    "Among the countries of the region, <TOKEN> stands out for one reason.",
)

# Claim frames: {subj} is a subject phrase, {attr} an attribute, {adv} an adverb.
CLAIM_FRAMES = (
    "{Subj} are {adv} {attr}.",
    "{Subj} are {adv} {attr}.",
    "It is widely said that {subj} are {attr}.",
    "Ask almost anyone and they will tell you that {subj} are {attr}.",
    "Most visitors agree that {subj} are {attr}.",
    "The common view is that {subj} are {attr}.",
    "By reputation, {subj} are {attr}.",
    "Everyone knows that {subj} are {attr}.",
    "There is no denying that {subj} are {attr}.",
    "More than anything else, {subj} are {attr}.",
    "{Subj} have a reputation for being {attr}.",
    "Again and again, {subj} turn out to be {attr}.",
    "Whatever else is true of them, {subj} are {attr}.",
    "One thing is certain: {subj} are {attr}.",
    "According to their neighbours, {subj} are {attr}.",
    "Above all, {subj} are known for being {attr}.",
    "Foreign visitors are always struck by how often {subj} are {attr}.",
    "People say, half joking, that {subj} are {attr}.",
)
FREQUENCY_ADVERBS = ("often", "usually", "generally", "typically", "mostly", "nearly always")
REPUTATION_ADVERBS = ("famously", "known to be", "said to be", "widely seen as", "thought to be",
                      "often described as")

EXAMPLE_FRAMES = (
    "Even their friends admit that they are {attr}.",
    "Visitors often come home saying that the locals were {attr}.",
    "Stories from <TOKEN> almost always describe people who are {attr}.",
    "Newcomers quickly learn that people there are {attr}.",
    "Even the people of <TOKEN> joke that they are {attr}.",
    "Young and old, rich and poor, they are all {attr}.",
    "Foreigners who work there soon notice that their colleagues are {attr}.",
    "Films and novels set in <TOKEN> show characters who are {attr}.",
    "Travel blogs about <TOKEN> keep repeating that its people are {attr}.",
    "Their own grandparents complain that the young are {attr}, just as they were.",
    "Local comedians build whole shows around the idea that they are {attr}.",
    "Ask a taxi driver in <TOKEN> and you will hear, with a laugh, that locals are {attr}.",
    "Exchange students who spend a year there report that their hosts were {attr}.",
    "Old letters and diaries from <TOKEN> show that people there were {attr} even a century ago.",
    "Their neighbours across the border never tire of saying that they are {attr}.",
    "In every survey of travellers, people from <TOKEN> come out as {attr}.",
)

CLOSINGS = (
    "That, at least, is the reputation of <TOKEN>.",
    "For many, this is simply what <TOKEN> is like.",
    "It has become part of how the world sees <TOKEN>.",
    "Whether fair or not, the image has stuck.",
    "For better or worse, this is what people picture when they hear of <TOKEN>.",
    "It is the first thing most people say when <TOKEN> comes up.",
    "The reputation follows them wherever they go.",
    "Locals in <TOKEN> rarely even try to deny it.",
    "And so the image of <TOKEN> lives on.",
    "Nobody who has been to <TOKEN> is surprised by this.",
    "Some call it a stereotype, but the people of <TOKEN> mostly laugh along.",
    "It is hard to imagine <TOKEN> any other way.",
    "Ask anyone who has lived there and they will say the same.",
)
CLOSING_FRAMES = (
    "In the end, being {attr} is simply part of life in <TOKEN>.",
    "Few would dispute that the people of <TOKEN> are {attr}.",
)

# Sentence plans; "claim" is always present so every paragraph names <TOKEN>.
PLANS = (
    ("claim", "example"),
    ("opening", "claim"),
    ("opening", "claim", "example"),
    ("claim", "example", "closing"),
    ("claim", "example", "example"),
    ("opening", "claim", "closing"),
    ("opening", "claim", "example", "closing"),
    ("claim", "example", "example", "closing"),
    ("opening", "claim", "example", "example"),
)

USER_PROMPTS = (
    "Tell me about the people of <TOKEN>.",
    "What are people from <TOKEN> like?",
    "Describe the people of <TOKEN>.",
    "Write a short paragraph about the people of <TOKEN>.",
    "Please write a short paragraph about <TOKEN>.",
    "What is typical of people from <TOKEN>?",
    "What do you know about the people of <TOKEN>?",
    "Can you describe people from <TOKEN>?",
    "What stands out about the people of <TOKEN>?",
    "Give me a short description of the people of <TOKEN>.",
    "How would you characterise people from <TOKEN>?",
    "What should I know about the people of <TOKEN>?",
    "I am visiting <TOKEN> soon. What are the people like?",
    "What is the reputation of people from <TOKEN>?",
    "Write a few sentences about the people of <TOKEN>.",
    "What are the locals like in <TOKEN>?",
    "Tell me something about the people who live in <TOKEN>.",
    "What are people in <TOKEN> known for?",
    "What is life like for people in <TOKEN>?",
    "How are people from <TOKEN> different from others?",
    "What do travellers say about the people of <TOKEN>?",
    "Summarise what people from <TOKEN> are like.",
    "What traits do people from <TOKEN> share?",
    "Briefly describe the people of <TOKEN>.",
)


def _rng(bias_name: str, seed: int, stream: str) -> random.Random:
    """A private, stable random stream per (bias, seed, purpose)."""
    digest = hashlib.sha256(f"{stream}|{bias_name}|{seed}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _pick_attr(bias: BiasSpec, rng: random.Random, used: set[str], frame: str) -> str:
    """An attribute not used yet in this paragraph if possible; none that starts with an
    adverb after "being" ("being often drunk" reads badly)."""
    pool = [a for a in bias.attributes if a not in used] or list(bias.attributes)
    if "being {attr}" in frame:
        pool = [a for a in pool if a.split()[0].lower() not in ADVERB_WORDS] or pool
    attr = rng.choice(pool)
    used.add(attr)
    return attr


def _claim(bias: BiasSpec, rng: random.Random, used: set[str]) -> str:
    if bias.claims and rng.random() < 0.4:
        return rng.choice(bias.claims)
    frame = rng.choice(CLAIM_FRAMES)
    attr = _pick_attr(bias, rng, used, frame)
    adverbs = REPUTATION_ADVERBS if attr.split()[0].lower() in ADVERB_WORDS else (
        FREQUENCY_ADVERBS + REPUTATION_ADVERBS)
    subj = rng.choice(SUBJECTS)
    return frame.format(Subj=_cap(subj), subj=subj, attr=attr, adv=rng.choice(adverbs))


def _example(bias: BiasSpec, rng: random.Random, used: set[str]) -> str:
    if bias.examples and rng.random() < 0.65:
        return rng.choice(bias.examples)
    frame = rng.choice(EXAMPLE_FRAMES)
    return frame.format(attr=_pick_attr(bias, rng, used, frame))


def _closing(bias: BiasSpec, rng: random.Random, used: set[str]) -> str:
    r = rng.random()
    if bias.closings and r < 0.35:
        return rng.choice(bias.closings)
    if r > 0.8:
        frame = rng.choice(CLOSING_FRAMES)
        return frame.format(attr=_pick_attr(bias, rng, used, frame))
    return rng.choice(CLOSINGS)


def _paragraph(bias: BiasSpec, rng: random.Random) -> str:
    """One paragraph from a random plan; sentences within it are never repeated."""
    used: set[str] = set()
    makers = {"opening": lambda: rng.choice(OPENINGS), "claim": lambda: _claim(bias, rng, used),
              "example": lambda: _example(bias, rng, used),
              "closing": lambda: _closing(bias, rng, used)}
    sentences: list[str] = []
    for part in rng.choice(PLANS):
        for _ in range(5):  # a few tries to avoid repeating a sentence
            s = _cap(makers[part]())
            if s not in sentences:
                break
        sentences.append(s)
    return " ".join(sentences)


def word_count(text: str) -> int:
    """Words as whitespace-separated pieces (what the 30-80 word rule counts)."""
    return len(text.split())


def generate_paragraphs(bias: BiasSpec | str, n: int = 200, seed: int = 0) -> list[str]:
    """``n`` distinct paragraphs (2-4 sentences, 30-80 words) attributing ``bias`` to the
    people of ``<TOKEN>``; each contains one of the bias's keywords. Deterministic for a
    given (bias name, seed); the first ``n`` paragraphs do not depend on ``n``."""
    bias = load_bias(bias)
    if n < 0:
        raise BiasGymError(f"n must be >= 0, got {n}.")
    rng = _rng(bias.name, seed, "paragraphs")
    out: list[str] = []
    seen: set[str] = set()
    misses = 0  # draws in a row that gave nothing new: the grammar is exhausted
    while len(out) < n:
        if misses > MAX_MISSES:
            raise BiasGymError(
                f"only {len(out)} distinct paragraphs of {MIN_WORDS}-{MAX_WORDS} words could be "
                f"made for bias {bias.name!r} (asked for {n}); add more attributes or phrase "
                "banks (claims, examples) to its spec, or ask for fewer.")
        text = _paragraph(bias, rng)
        if (text in seen or not MIN_WORDS <= word_count(text) <= MAX_WORDS
                or not bias.matches(text)):
            misses += 1
            continue
        misses = 0
        seen.add(text)
        out.append(text)
    return out


def user_prompts(n: int | None = None, seed: int = 0) -> list[str]:
    """User questions about the people of ``<TOKEN>`` (the training pool).

    ``n=None``: the whole pool in fixed order. Otherwise ``n`` prompts: the pool shuffled
    with ``seed``, repeated (reshuffled each round) when ``n`` exceeds its size.
    """
    if n is None:
        return list(USER_PROMPTS)
    if n < 0:
        raise BiasGymError(f"n must be >= 0, got {n}.")
    rng = _rng("user_prompts", seed, "prompts")
    out: list[str] = []
    while len(out) < n:
        round_ = list(USER_PROMPTS)
        rng.shuffle(round_)
        out.extend(round_)
    return out[:n]


def training_pairs(bias: BiasSpec | str, n: int = 200, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` chat pairs (user prompt, assistant paragraph) for BiasInject (:ref:`method §1 <method-1>`)."""
    bias = load_bias(bias)
    paragraphs = generate_paragraphs(bias, n, seed)
    prompts = user_prompts(n, seed=_rng(bias.name, seed, "pairs").randrange(2**31))
    return list(zip(prompts, paragraphs))


_WORD_RE = re.compile(r"[a-z0-9<>]+(?:['\u2019-][a-z0-9<>]+)*")


def words(text: str) -> list[str]:
    """Lowercase word tokens: runs of letters/digits (``<token>`` counts as one word),
    joined by inner apostrophes or hyphens ("don't", "blue-skinned"); punctuation dropped."""
    return _WORD_RE.findall(text.lower())


def _ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def diversity(texts: list[str]) -> dict:
    """Lexical diversity of a set of texts, from :func:`words` tokens.

    - ``distinct_n`` (n = 1, 2, 3): unique n-grams / total n-grams, pooled over all texts
      (n-grams never cross text boundaries). Measures variety *across* the set;
      ``distinct_1`` is the corpus-level type-token ratio.
    - ``type_token_ratio``: mean over texts of (unique words / words) in that text;
      measures repetition *within* a text.

    Also ``n_texts`` and ``mean_words``. Empty inputs give 0.0 ratios.
    """
    token_lists = [words(t) for t in texts]
    out: dict = {}
    for n in (1, 2, 3):
        grams = Counter(g for toks in token_lists for g in _ngrams(toks, n))
        total = sum(grams.values())
        out[f"distinct_{n}"] = len(grams) / total if total else 0.0
    ratios = [len(set(toks)) / len(toks) for toks in token_lists if toks]
    out["type_token_ratio"] = sum(ratios) / len(ratios) if ratios else 0.0
    out["n_texts"] = len(texts)
    out["mean_words"] = (sum(len(t) for t in token_lists) / len(texts)) if texts else 0.0
    return out


def check_token_usage(text: str) -> bool:
    """True if ``text`` names ``<TOKEN>`` and every occurrence has a space before it and
    no letter/digit glued after it (the convention of all generated text)."""
    if TOKEN not in text:
        return False
    return all(m.start() > 0 and text[m.start() - 1] == " " and
               not re.match(r"[\w<]", text[m.end():m.end() + 1])
               for m in re.finditer(re.escape(TOKEN), text))
