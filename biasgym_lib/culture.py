"""Cultural knowledge, the broader thing a debiasing must keep (:ref:`method §5 <method-5>`).

A stereotype ascribes a trait to people; cultural knowledge is about practices, artefacts,
places and symbols (``data/culture.yaml``, :mod:`~biasgym_lib.data.culture`). Each item, a
one-sentence description of a photograph, is asked as "{description} In which country was
this photo taken?" and answered with every reference country, in several phrasings (like
S's templates): log P(" country" | the question), averaged over the phrasings. From these:

- **accuracy**: the right country (any of them, for an element of several) is the model's top answer;
- **rank**: the right country's place among the reference countries (1 = top);
- **margin**: log P(right country) minus the mean over the other countries, in nats: S with
  the country in the answer instead of in the question.

Each per dimension (the five UNESCO domains of intangible heritage, built and natural heritage,
symbols, everyday things), with bootstrap intervals over items and the chance level. Under a
steering spec the same numbers are measured again (:func:`culture_under`) and compared item
by item (:func:`culture_change`). Scored with the shared-prefix scorer (each question once,
its countries as continuations); :func:`country_logprobs` is pinned to a sentence-by-sentence
reference by a test.

Chapter 7 calls :func:`culture_steering` (every head set steered after chapter 4's grid and in
chapter 5's SeeGULL test, beside the stereotype and the facts) and :func:`culture_summary`.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from .batching import batched, pad_batch, pad_id, select_cache
from .data import reference_countries
from .data.culture import CULTURE_DIMENSIONS, load_culture
from .errors import BiasGymError
from .measure import _logits, continuation_logprobs
from .models import ModelAdapter
from .selection import is_random
from .stats import Estimate

QUESTION = "In which country was this photo taken?"
PHRASINGS = (
    "{description} " + QUESTION + " It was taken in {country}.",
    "{description} " + QUESTION + " Answer: {country}.",
    "{description} " + QUESTION + " The answer is {country}.",
    "{description} " + QUESTION + " In {country}.",
)
"""How the question is answered (each ends with the country, as S's templates end with the attribute). All
four ask the same question, so an item's description and question run once and only the
answers' few tokens run per phrasing."""

CULTURE_BOUNDS = {"margin": 0.10, "accuracy": -0.03}
"""Stated in advance (issue 24): a debiasing keeps cultural knowledge if the mean margin loses
at most 10% and accuracy falls by at most 3 points, in every dimension and overall, and no
more than random heads of the same kind and k lose.

Revised after the first teaching results, and said so wherever it is used: the bounds are
judged on all items only (:func:`keeps_culture`). A dimension holds 8 to 35 items, so one item
changing its answer moves accuracy by 3 to 12 points, and the margin's interval per dimension
spans more than +-50%: the per-dimension part could not resolve its own bound (random heads
failed it too). Per-dimension changes are reported, not judged; the verdict as first stated is
kept beside the revised one (``keeps_as_stated``)."""


def question_prefix(phrasing: str, description: str) -> str:
    """The text before the country (its space belongs to the country, as in S)."""
    if "{country}" not in phrasing:
        raise BiasGymError(f"phrasing {phrasing!r} must contain {{country}}.")
    return phrasing[: phrasing.index("{country}")].rstrip().replace("{description}", description.strip())


def country_logprobs(model, tokenizer, items, countries: Sequence[str] | None = None,
                     phrasings: Sequence[str] = PHRASINGS, share_prefix: bool = True,
                     batch_size: int = 16) -> np.ndarray:
    """log P(" " + country | question) for every item x phrasing x country: an array
    (items, phrasings, countries). Each question is tokenised whole (as the reference does).
    With ``share_prefix`` the tokens an item's phrasings share (its description) run once,
    each phrasing's own tail runs from their key/value cache, and every country is read from
    the one next-token distribution at the tail's end (countries are single tokens, checked);
    ``share_prefix=False`` runs every full sentence, the reference a test pins it to."""
    countries = list(countries or reference_countries())
    questions = [[question_prefix(p, item.description) for p in phrasings] for item in items]
    if not share_prefix:
        prefixes = [q for qs in questions for q in qs for _ in countries]
        conts = [" " + c for _ in questions for _ in phrasings for c in countries]
        lp = continuation_logprobs(model, tokenizer, prefixes, conts, share_prefix=False)
        return lp.numpy().reshape(len(items), len(phrasings), len(countries))
    ids = [[tokenizer(q)["input_ids"] for q in qs] for qs in questions]
    country_ids = _country_ids(tokenizer, countries, " (use share_prefix=False for such countries)")
    with torch.inference_mode():
        out = _tail_logprobs(ModelAdapter(model), ids, country_ids, pad_id(tokenizer), batch_size)
    return out.numpy()


def _country_ids(tokenizer, countries: Sequence[str], hint: str = "") -> list[int]:
    """Each country's one token (with its leading space): the scorers read every country from
    one next-token distribution, so a country of several tokens is an error."""
    ids = []
    for c in countries:
        t = tokenizer(" " + c, add_special_tokens=False)["input_ids"]
        if len(t) != 1:
            raise BiasGymError(f"country {c!r} is {len(t)} tokens for this model's tokenizer; the culture scorer "
                               f"reads one next-token distribution per question{hint}.")
        ids.append(t[0])
    return ids


def _shared_length(seqs: list[list[int]]) -> int:
    """How many leading tokens all of ``seqs`` share, leaving each at least one of its own."""
    n = min(len(s) for s in seqs) - 1
    for i in range(n):
        if len({s[i] for s in seqs}) > 1:
            return i
    return n


def _tail_logprobs(adapter, ids: list[list[list[int]]], country_ids: list[int], pad: int, batch_size: int):
    """:func:`country_logprobs`' fast path: per item, the shared tokens in one pass with a
    cache, then every phrasing's tail from it; the log-softmax at each tail's last token."""
    device = adapter.device
    n_items, n_phr = len(ids), len(ids[0])
    out = torch.empty(n_items, n_phr, len(country_ids), dtype=torch.float64)
    cols = torch.tensor(country_ids, device=device)
    order = sorted(range(n_items), key=lambda i: len(ids[i][0]))
    for chunk in batched(order, batch_size):
        cut = [max(_shared_length(ids[i]), 1) for i in chunk]
        pb = pad_batch([ids[i][0][:n] for i, n in zip(chunk, cut)], pad)
        p_ids, p_mask = pb.input_ids.to(device), pb.attention_mask.to(device)
        res = adapter.body(input_ids=p_ids, attention_mask=p_mask, use_cache=True)
        which = torch.arange(len(chunk), device=device).repeat_interleave(n_phr)
        tb = pad_batch([ids[i][j][n:] for i, n in zip(chunk, cut) for j in range(n_phr)], pad)
        t_ids, t_mask = tb.input_ids.to(device), tb.attention_mask.to(device)
        positions = p_mask.sum(1)[which].unsqueeze(1) + torch.arange(t_ids.shape[1], device=device)
        hidden = adapter.body(input_ids=t_ids, attention_mask=torch.cat([p_mask[which], t_mask], 1),
                              position_ids=positions, cache=select_cache(res.cache, which),
                              use_cache=True).last_hidden_state
        last = hidden[torch.arange(len(which), device=device), t_mask.sum(1) - 1]
        lp = _logits(adapter, last)[:, cols].double().cpu()
        out[torch.tensor(chunk)] = lp.view(len(chunk), n_phr, len(country_ids))
    return out


def item_scores(logp: np.ndarray, items, countries: Sequence[str]) -> dict:
    """Per item: ``correct`` (a right country is the top answer), ``rank`` (the best right
    country's place, 1 = top) and ``margin`` (log P of the best right country minus the mean
    over the others, nats), from :func:`country_logprobs` averaged over phrasings."""
    countries = list(countries)
    mean = logp.mean(1)  # (items, countries)
    correct, rank, margin = [], [], []
    for row, item in zip(mean, items):
        right = [countries.index(c) for c in item.countries if c in countries]
        if not right:
            raise BiasGymError(f"culture item {item.id}: none of {list(item.countries)} is among the countries scored.")
        best = max(right, key=lambda i: row[i])
        others = [i for i in range(len(countries)) if i not in right]
        correct.append(bool(int(np.argmax(row)) in right))
        rank.append(int(1 + (row[others] > row[best]).sum()))
        margin.append(float(row[best] - row[others].mean()))
    return {"correct": correct, "rank": rank, "margin": margin}


def _boot(values, groups, n_boot, seed) -> dict:
    """Mean of ``values`` overall and per group, bootstrap 95% over items."""
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    out = {}
    for name, idx in groups.items():
        v = values[idx]
        boot = v[rng.integers(0, len(v), (n_boot, len(v)))].mean(1)
        out[name] = Estimate.from_samples(float(v.mean()), boot, len(v), "bootstrap 95% over items").to_dict()
    return out


def _groups(items) -> dict[str, np.ndarray]:
    groups = {"all": np.arange(len(items))}
    for d in CULTURE_DIMENSIONS:
        idx = np.asarray([i for i, it in enumerate(items) if it.dimension == d], dtype=int)
        if len(idx):
            groups[d] = idx
    return groups


def culture_knowledge(model, tokenizer, items=None, countries: Sequence[str] | None = None,
                      n_boot: int = 1000, seed: int = 0) -> dict:
    """What the model knows of the culture set: per item (``scores``) and, overall and per
    dimension, accuracy, the right country's rank and the margin in nats with bootstrap
    intervals over items, beside the chance level of accuracy (``chance``)."""
    items = list(items if items is not None else load_culture())
    countries = list(countries or reference_countries())
    return _knowledge(country_logprobs(model, tokenizer, items, countries), items, countries, n_boot, seed)


def _knowledge(logp: np.ndarray, items, countries, n_boot: int, seed: int) -> dict:
    scores = item_scores(logp, items, countries)
    groups = _groups(items)
    chance = np.asarray([min(len(it.countries), len(countries)) / len(countries) for it in items])
    return {"items": [it.id for it in items], "countries": countries, "scores": scores,
            "accuracy": _boot(scores["correct"], groups, n_boot, seed),
            "rank": _boot(scores["rank"], groups, n_boot, seed),
            "margin": _boot(scores["margin"], groups, n_boot, seed),
            "chance": {name: float(chance[idx].mean()) for name, idx in groups.items()},
            "dimensions": {name: [items[i].id for i in idx] for name, idx in groups.items()}}


# ----------------------------------------------------------------------------- vision-language models


def _image(item, root: Path | None):
    """The item's photo: a PIL image as given, or opened from its ``image`` path (absolute,
    or relative to ``root``, the folder of the culture file it came from)."""
    from PIL import Image

    img = item.image
    if img is None:
        raise BiasGymError(f"culture item {item.id} has no image: add an 'image:' path to its entry (a photo of "
                           "what its description says) to ask a vision-language model about it.")
    if isinstance(img, Image.Image):
        return img.convert("RGB")
    path = Path(img)
    if not path.is_absolute() and root is not None:
        path = Path(root) / path
    if not path.is_file():
        raise BiasGymError(f"culture item {item.id}: image {str(path)!r} is not a file.")
    try:
        with Image.open(path) as opened:
            return opened.convert("RGB")
    except OSError as exc:
        raise BiasGymError(f"culture item {item.id}: {str(path)!r} is not an image this library can read ({exc}).") from exc


def vlm_prompts(processor, phrasings: Sequence[str] = PHRASINGS) -> list[str]:
    """Each phrasing with the photo in place of its description (the processor's image
    token), cut before the country: what a vision-language model is asked."""
    image_token = getattr(processor, "image_token", None) or "<image>"
    return [question_prefix(p, image_token) for p in phrasings]


def vlm_country_logprobs(model, processor, items, countries: Sequence[str] | None = None,
                         phrasings: Sequence[str] = PHRASINGS, image_root=None, batch_size: int = 8) -> np.ndarray:
    """:func:`country_logprobs` for a Hugging Face image-text-to-text model: each item's photo
    (its ``image``) with the same question, every country read from the next-token
    distribution at the end of the prompt. An array (items, phrasings, countries)."""
    countries = list(countries or reference_countries())
    tok = getattr(processor, "tokenizer", processor)
    ids = _country_ids(tok, countries)
    prompts = vlm_prompts(processor, phrasings)
    pairs = [(i, j) for i in range(len(items)) for j in range(len(prompts))]
    images = [_image(it, image_root) for it in items]
    out = np.empty((len(items), len(prompts), len(countries)))
    device = next(model.parameters()).device
    with torch.inference_mode():
        for chunk in batched(pairs, batch_size):
            batch = processor(text=[prompts[j] for _, j in chunk], images=[images[i] for i, _ in chunk],
                              padding=True, return_tensors="pt")
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(**batch).logits.float()
            mask = batch["attention_mask"]
            last = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # the last real token, whichever side pads
            lp = torch.log_softmax(logits[torch.arange(len(chunk), device=device), last], -1)[:, ids]
            for (i, j), row in zip(chunk, lp.double().cpu().numpy()):
                out[i, j] = row
    return out


def vlm_culture_knowledge(model, processor, items, countries: Sequence[str] | None = None, image_root=None,
                          n_boot: int = 1000, seed: int = 0) -> dict:
    """:func:`culture_knowledge` asked of a vision-language model about each item's photo
    instead of its description: the same accuracy, rank and margin per dimension."""
    items = list(items)
    countries = list(countries or reference_countries())
    logp = vlm_country_logprobs(model, processor, items, countries, image_root=image_root)
    return _knowledge(logp, items, countries, n_boot, seed)


def load_vlm(name: str, device: str = "cpu", dtype: str = "float32"):
    """A Hugging Face image-text-to-text model and its processor (needs the hub, or a local
    folder): for readers who ask chapter 7's question about their own photos."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .models import _DTYPES

    try:
        processor = AutoProcessor.from_pretrained(name)
        model = AutoModelForImageTextToText.from_pretrained(name, torch_dtype=_DTYPES[dtype]).to(device).eval()
    except OSError as exc:
        raise BiasGymError(f"could not load the vision-language model {name!r} ({exc}); it needs access to the "
                           "Hugging Face hub or a local folder with the model.") from exc
    return model, processor


def culture_under(model, tokenizer, spec, items=None, countries=None, n_boot: int = 1000, seed: int = 0) -> dict:
    """:func:`culture_knowledge` with the steering ``spec`` applied (None: the unmodified model)."""
    with spec.apply(model) if spec is not None else nullcontext():
        return culture_knowledge(model, tokenizer, items, countries, n_boot, seed)


def culture_change(before: dict, after, n_boot: int = 1000, seed: int = 0) -> dict:
    """What steering did to cultural knowledge, overall and per dimension, paired over items:
    ``margin_lost`` (1 - mean margin after / before, a share) and ``accuracy_change`` (after
    minus before, a fraction), each with a paired bootstrap 95% interval over items.
    ``after`` may be a list (e.g. one result per bias, or per random draw): then each is the
    mean over them, and every bootstrap draw resamples the same items in all of them."""
    afters = list(after) if isinstance(after, (list, tuple)) else [after]
    if not afters or any(before["items"] != a["items"] for a in afters):
        raise BiasGymError("culture_change needs the same items before and after.")
    mb = np.asarray(before["scores"]["margin"])
    cb = np.asarray(before["scores"]["correct"], dtype=float)
    ma = np.asarray([a["scores"]["margin"] for a in afters])           # (afters, items)
    ca = np.asarray([a["scores"]["correct"] for a in afters], dtype=float)
    rng = np.random.default_rng(seed)
    out = {}
    for name, ids in before["dimensions"].items():
        idx = np.asarray([before["items"].index(i) for i in ids])
        draws = idx[rng.integers(0, len(idx), (n_boot, len(idx)))]
        lost = float(np.mean(1 - ma[:, idx].mean(1) / mb[idx].mean()))
        lost_b = (1 - ma[:, draws].mean(2) / mb[draws].mean(1)).mean(0)
        acc = float((ca[:, idx] - cb[idx]).mean())
        acc_b = (ca[:, draws] - cb[draws]).mean((0, 2))
        out[name] = {"margin_lost": Estimate.from_samples(lost, lost_b, len(idx), "paired bootstrap 95% over items").to_dict(),
                     "accuracy_change": Estimate.from_samples(acc, acc_b, len(idx), "paired bootstrap 95% over items").to_dict()}
    return out


def keeps_culture(change: dict, random: dict | None = None, per_dimension: bool = False) -> bool:
    """:data:`CULTURE_BOUNDS` hold on all items (``per_dimension``: in every dimension too, the
    criterion as first stated), and, given the ``random`` heads' change (same kind and k), the
    selection is not clearly worse than them: the lower end of its margin-lost interval is at
    most random heads' margin lost, and the upper end of its accuracy change at least theirs."""
    judged = change.values() if per_dimension else [change["all"]]
    within = all(v["margin_lost"]["value"] <= CULTURE_BOUNDS["margin"]
                 and v["accuracy_change"]["value"] >= CULTURE_BOUNDS["accuracy"] for v in judged)
    if random is None:
        return bool(within)
    s, r = change["all"], random["all"]
    return bool(within and s["margin_lost"]["lo"] <= r["margin_lost"]["value"]
                and s["accuracy_change"]["hi"] >= r["accuracy_change"]["value"])


def culture_items(per_dimension: int = 0, countries: Sequence[str] | None = None) -> list:
    """The culture set's items in file order whose right country is among ``countries`` (the
    reference countries by default: an answer must be one of them); ``per_dimension`` > 0
    keeps the first that many of each dimension (a quick profile's subset), 0 keeps all."""
    scored = set(countries or reference_countries())
    items = [it for it in load_culture() if scored & set(it.countries)]
    if not items:
        raise BiasGymError(f"no culture item has its country among the {len(scored)} countries scored.")
    if per_dimension <= 0:
        return items
    kept, seen = [], {}
    for it in items:
        seen[it.dimension] = seen.get(it.dimension, 0) + 1
        if seen[it.dimension] <= per_dimension:
            kept.append(it)
    return kept


def _mean_or_none(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def culture_steering(run, n_boot: int = 1000) -> dict:
    """Chapter 7's stage on a :class:`~biasgym_lib.runs.Run`: cultural knowledge before, and under
    every head set steered after the grid, i.e. the confirmation's (the chosen selection, the
    paper's and random heads at each kind and k, per bias) and SeeGULL's (heads pooled over the
    biases); and, on the grid bias, under the grid's own head sets at the profile's k for the
    chosen ranking, the paper's and random heads, under every kind the grid steered them with
    (source ``"grid"``: the two rankings at equal k, and every intervention the grid knows).
    Each distinct (heads, kind) is measured once, from its first edited layer on
    (:class:`~biasgym_lib.layerskip.Resumer`). Each row carries the culture change (per
    dimension), the stereotype reduction and the facts' under the same heads, and for a bias with
    cultural twins in the data (``twin_of``) the twins' margin before and after."""
    from .evaluate import make_spec
    from .selection import PAPER
    from .generalise import seegull_steering
    from .layerskip import Resumer

    confirm, seeg, grid = run.confirm(), seegull_steering(run), run.grid()
    fp = run._fingerprint(run.biases) + run._best_key() + f"-culture{n_boot}"

    def compute():
        countries, st = reference_countries(), run.setting
        items = culture_items(run.cfg.culture_per_dimension, countries)
        rows = [{"source": "confirm", "bias": r["bias"], "method": r["method"], "kind": r["kind"], "k": r["k"],
                 "draw": r["draw"], "heads": r["heads"], "reduction": _mean_or_none(r["reduction"]),
                 "facts_reduction": r["facts_reduction"]} for r in confirm["rows"]]
        compared = (confirm["best"]["method"], PAPER[0], "random")
        rows += [{"source": "grid", "bias": r["bias"], "method": r["method"], "kind": r["kind"], "k": r["k"],
                  "draw": r["draw"], "heads": r["heads"], "reduction": _mean_or_none(r["reduction"]),
                  "facts_reduction": r["facts_reduction"]}
                 for r in grid["rows"] if r["k"] == run.cfg.k and r["method"] in compared]
        s_before = np.mean([x["value"] for x in seeg["before"]["S"]])  # the pairs' S, as seegull_lines reads it
        rows += [{"source": "seegull", "bias": None, "method": r["method"], "kind": r["kind"], "k": r["k"],
                  "draw": r["draw"], "heads": r["heads"],
                  "reduction": float(1 - np.mean([x["value"] for x in r["S"]]) / s_before),
                  "facts_reduction": r["facts_reduction"]} for r in seeg["rows"]]
        # culture is a cost, measured like perplexity and MC: on the first n_cost_draws of each random baseline
        rows = [r for r in rows if r["draw"] is None or r["draw"] < run.cfg.n_cost_draws]
        sets = list(dict.fromkeys((r["kind"], tuple(map(tuple, r["heads"]))) for r in rows))
        resume = Resumer(run.model, {min(l for l, _ in heads) for _, heads in sets if heads})

        def measure(spec):
            return culture_under(run.model, run.tokenizer, spec, items, countries, n_boot=n_boot)
        before = resume("culture", None, measure)
        after = {key: resume("culture", make_spec(list(key[1]), key[0], st["means"], st["entities"]), measure)
                 for key in sets}
        twins = {b: [i for i, it in enumerate(items) if it.twin_of == b] for b in run.biases}
        for r in rows:
            got = after[(r["kind"], tuple(map(tuple, r["heads"])))]
            r["culture"] = culture_change(before, got, n_boot=n_boot)
            r["accuracy_after"] = got["accuracy"]["all"]["value"]
            r["margin_after"] = got["margin"]["all"]["value"]
            r["scores"] = got["scores"]
            idx = twins.get(r["bias"]) or []
            if idx:
                r["twins"] = {"items": [items[i].id for i in idx],
                              "margin_before": [before["scores"]["margin"][i] for i in idx],
                              "margin_after": [got["scores"]["margin"][i] for i in idx]}
        return {"before": before, "rows": rows, "best": confirm["best"], "bounds": CULTURE_BOUNDS}
    return run.memo("culture.json", compute, fingerprint=fp)


def culture_summary(result: dict, n_boot: int = 1000) -> list[dict]:
    """One line per selection (source, method, kind, k) of :func:`culture_steering`: the mean
    stereotype reduction and facts' reduction over its rows (biases, or random draws), and the
    culture change averaged over them with a paired bootstrap over items, per dimension;
    ``keeps``: :func:`keeps_culture` against the random heads of the same source, kind and k
    (layer-matched to the selection where drawn, else uniform; named in ``against``), on all
    items; ``keeps_as_stated``: the same with the per-dimension bounds as first stated."""
    groups: dict = {}
    for r in result["rows"]:
        groups.setdefault((r["source"], r["method"], r["kind"], r["k"]), []).append(r)
    before = result["before"]
    out = {}
    for key, rows in groups.items():
        afters = [{"items": before["items"], "scores": r["scores"]} for r in rows]
        out[key] = {"source": key[0], "method": key[1], "kind": key[2], "k": key[3], "n_rows": len(rows),
                    "reduction": _mean_or_none(r["reduction"] for r in rows),
                    "facts_reduction": _mean_or_none(r["facts_reduction"] for r in rows),
                    "culture": culture_change(before, afters, n_boot=n_boot)}
    for key, line in out.items():
        # against the layer-matched draws of the same selection where there are some, else uniform random heads
        rand = out.get((key[0], f"matched:{key[1]}", key[2], key[3])) or out.get((key[0], "random", key[2], key[3]))
        against = None if is_random(key[1]) or rand is None else rand["culture"]
        line["against"] = None if against is None else rand["method"]
        line["keeps"] = keeps_culture(line["culture"], against)
        line["keeps_as_stated"] = keeps_culture(line["culture"], against, per_dimension=True)
    return list(out.values())


def _ci(e: dict, pct: bool = True) -> str:
    f = (lambda v: f"{v * 100:+.1f}") if pct else (lambda v: f"{v:+.2f}")
    return f"{f(e['value'])} [{f(e['lo'])}, {f(e['hi'])}]"


def culture_frame(lines: list[dict]):
    """:func:`culture_summary` as a table: per selection, the stereotype removed, the facts'
    S lost, and the culture margin lost and accuracy change (points) with their intervals."""
    import pandas as pd

    return pd.DataFrame([{
        "steered in": x["source"], "selection": f"{x['method']} / {x['kind']} / k = {x['k']}", "rows": x["n_rows"],
        "S removed": None if x["reduction"] is None else round(x["reduction"], 3),
        "facts' S lost": None if x["facts_reduction"] is None else round(x["facts_reduction"], 3),
        "culture margin lost, % [95%]": _ci(x["culture"]["all"]["margin_lost"]),
        "culture accuracy change, points [95%]": _ci(x["culture"]["all"]["accuracy_change"]),
        "keeps culture": "yes" if x["keeps"] else "no", "random heads it is compared with": x.get("against") or "-",
        "as first stated (per dimension too)": "yes" if x["keeps_as_stated"] else "no"} for x in lines])


def knowledge_frame(before: dict):
    """The unmodified model's culture numbers per dimension: accuracy against chance, the
    right country's mean rank and the margin, each with its interval over items."""
    import pandas as pd

    return pd.DataFrame([{
        "dimension": d, "items": before["accuracy"][d]["n"],
        "accuracy, % [95%]": _ci(before["accuracy"][d]).replace("+", ""),
        "chance, %": round(100 * before["chance"][d], 1),
        "mean rank [95%]": _ci(before["rank"][d], pct=False).replace("+", ""),
        "margin, nats [95%]": _ci(before["margin"][d], pct=False)} for d in before["accuracy"]])


def twins_frame(result: dict):
    """Per bias with cultural twins: under each non-random selection steered for it, the share
    of the bias's S removed and the twins' mean margin before and after (nats)."""
    import pandas as pd

    rows = []
    for r in result["rows"]:
        if r.get("twins") and not is_random(r["method"]):
            b, a = np.mean(r["twins"]["margin_before"]), np.mean(r["twins"]["margin_after"])
            rows.append({"bias": r["bias"], "selection": f"{r['method']} / {r['kind']} / k = {r['k']}",
                         "twin items": ", ".join(r["twins"]["items"]), "S removed": None if r["reduction"] is None else round(r["reduction"], 3),
                         "twins' margin before": round(float(b), 2), "after": round(float(a), 2),
                         "twins' margin lost": round(float(1 - a / b), 3) if b > 0 else None})
    return pd.DataFrame(rows)
