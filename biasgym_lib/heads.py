"""Head scores and head sets: BiasScope's result for one token (:class:`ScopeResult`),
validating heads, ranking them by a score, robust and random selections, how far two
rankings agree, and the naive score: attention to the entity."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .batching import Batch, batches, check_batch, n_prompts
from .errors import ArtifactMismatch, BiasGymError
from .models import ModelAdapter, adapter_of
from .stats import Estimate

Head = tuple[int, int]


def heads_or_all(model, heads: Iterable | None) -> list[Head]:
    """:func:`validate_heads`, or every head of the model when ``heads`` is None."""
    adapter = adapter_of(model)
    if heads is None:
        return [(l, h) for l in range(adapter.n_layers) for h in range(adapter.n_heads)]
    return validate_heads(adapter, heads)


def _as_scores(scores) -> torch.Tensor:
    s = torch.as_tensor(getattr(scores, "scores", scores))  # an (L, H) tensor or HeadScores
    if s.ndim != 2:
        raise BiasGymError(f"head scores must be an (L, H) matrix, got shape {tuple(s.shape)}.")
    return s.float()


def top_k_heads(scores, k: int) -> list[Head]:
    """The k heads with the largest scores (an (L, H) tensor or HeadScores), descending;
    NaN scores (heads not scored) come last; ties keep (layer, head) order."""
    s = _as_scores(scores)
    L, H = s.shape
    try:
        if isinstance(k, bool):
            raise TypeError
        k = k.__index__()
    except (TypeError, AttributeError, RuntimeError, ValueError):
        raise BiasGymError(f"k must be a whole number of heads, got {k!r}.") from None
    if not 0 <= k <= L * H:
        raise BiasGymError(f"k={k} but there are only {L * H} heads.")
    flat = torch.nan_to_num(s.flatten(), nan=-math.inf)
    order = sorted(range(L * H), key=lambda i: (-float(flat[i]), i))
    return [(i // H, i % H) for i in order[:k]]


def robust_heads(score_list: Sequence, k: int, m: int) -> list[Head]:
    """Heads in the top-k of at least ``m`` of the ``n`` score matrices (e.g. one per injection
    seed), most frequent first, then by mean score."""
    if not score_list:
        raise BiasGymError("robust_heads got no score matrices.")
    n = len(score_list)
    if not 1 <= m <= n:
        raise BiasGymError(f"m={m} must be between 1 and the number of runs ({n}).")
    mats = [_as_scores(s) for s in score_list]
    if len({tuple(x.shape) for x in mats}) != 1:
        raise BiasGymError("robust_heads got score matrices of different shapes (different models?).")
    counts: dict[Head, int] = {}
    for s in mats:
        for head in top_k_heads(s, k):
            counts[head] = counts.get(head, 0) + 1
    mean = torch.nan_to_num(torch.stack(mats), nan=0.0).mean(0)
    keep = [hd for hd, c in counts.items() if c >= m]
    return sorted(keep, key=lambda hd: (-counts[hd], -float(mean[hd]), hd))


def overlap(a_heads: Iterable, b_heads: Iterable) -> float:
    """Jaccard overlap ``len(A & B) / len(A | B)`` of two head sets (1.0 for two empty sets)."""
    a = {tuple(int(v) for v in x) for x in a_heads}
    b = {tuple(int(v) for v in x) for x in b_heads}
    union = a | b
    return 1.0 if not union else len(a & b) / len(union)


def agreement(units_a: Sequence, units_b: Sequence, k: int, n_boot: int = 1000, seed: int = 0) -> dict:
    """How far two head rankings agree on the top k, with bootstrap 95% intervals over seeds
    and units (:ref:`method §3 <method-3>`): ``units_a`` / ``units_b`` hold, per injection run (seed), a
    ``(units, L, H)`` tensor of per-probe or per-sentence scores (NaN = not scored). Each
    bootstrap draw resamples the runs, then each method's units within every run, ranks
    heads by the mean and compares the top-k sets. Returns ``{"jaccard": Estimate dict,
    "precision": Estimate dict}`` (precision: share of B's top k that is in A's top k).
    Spearman over all L x H heads is dominated by near-zero heads and says little."""

    if not units_a or len(units_a) != len(units_b):
        raise BiasGymError("agreement needs the same number of runs (one tensor per seed) for both rankings.")
    rng = torch.Generator().manual_seed(seed)

    def top(units, runs, draw):
        chosen = []
        for r in runs:
            u = torch.as_tensor(units[r], dtype=torch.float32)
            idx = torch.randint(0, u.shape[0], (u.shape[0],), generator=rng) if draw else torch.arange(u.shape[0])
            chosen.append(u[idx].mean(0))
        return set(top_k_heads(torch.stack(chosen).mean(0), k))

    def stats(a, b):
        return len(a & b) / len(a | b) if a | b else 1.0, len(a & b) / k if k else 1.0

    n = len(units_a)
    point = stats(top(units_a, range(n), False), top(units_b, range(n), False))
    draws = []
    for _ in range(n_boot):
        runs = torch.randint(0, n, (n,), generator=rng).tolist()
        draws.append(stats(top(units_a, runs, True), top(units_b, runs, True)))
    draws = np.asarray(draws)
    out = {}
    for i, name in enumerate(("jaccard", "precision")):
        lo, hi = np.percentile(draws[:, i], [2.5, 97.5])
        out[name] = Estimate(float(point[i]), float(lo), float(hi), n).to_dict()
    return out


def spearman(a, b) -> float:
    """Spearman rank correlation of two score matrices (flattened; NaN pairs ignored)."""
    from scipy.stats import spearmanr

    x = torch.as_tensor(a, dtype=torch.float64).flatten()
    y = torch.as_tensor(b, dtype=torch.float64).flatten()
    if x.shape != y.shape:
        raise BiasGymError(f"spearman needs two score sets of the same size, got {len(x)} and {len(y)}.")
    ok = ~(torch.isnan(x) | torch.isnan(y))
    if int(ok.sum()) < 2:
        raise BiasGymError("spearman needs at least two scored heads in common.")
    return float(spearmanr(x[ok].numpy(), y[ok].numpy()).statistic)


def as_head(item) -> Head:
    """A (layer, head) pair of ints from a tuple or a JSON list."""
    try:
        layer, head = item
        if isinstance(layer, bool) or isinstance(head, bool) or int(layer) != layer or int(head) != head:
            raise ValueError
        return int(layer), int(head)
    except (TypeError, ValueError) as exc:
        raise BiasGymError(f"a head is a (layer, head) pair of integers, got {item!r}.") from exc


def validate_heads(model, heads: Iterable) -> list[Head]:
    """The heads as (layer, head) tuples, checked against the model's shape."""
    adapter = adapter_of(model)
    if heads is None:
        raise BiasGymError("no heads given: give a list of (layer, head) pairs.")
    out = [as_head(x) for x in heads]
    for layer, head in out:
        if not (0 <= layer < adapter.n_layers and 0 <= head < adapter.n_heads):
            raise BiasGymError(
                f"head ({layer}, {head}) does not exist in this model: it is out of range for "
                f"{adapter.n_layers} layers x {adapter.n_heads} heads (0-based); were these heads "
                "found on another model?")
    if len(set(out)) != len(out):
        raise BiasGymError(f"the head list has duplicates: {out}.")
    return out


def random_heads(n_layers: int, n_heads: int, k: int, seed: int) -> list[Head]:
    """k distinct heads drawn uniformly (the random-heads baseline), sorted, reproducible."""
    total = n_layers * n_heads
    if not 0 <= k <= total:
        raise BiasGymError(f"k={k} random heads asked for, but the model has {total} heads.")
    picks = random.Random(seed).sample(range(total), k)
    return sorted((i // n_heads, i % n_heads) for i in picks)


def layer_matched_heads(heads: Iterable, n_heads: int, seed: int) -> list[Head]:
    """Random heads with the same count per layer as ``heads`` (the layer-matched baseline:
    a selection that sits in the upper layers is compared with random heads from the same
    layers, not from all of them), drawn uniformly within each layer, sorted, reproducible."""
    counts: dict[int, int] = {}
    for layer, _ in (as_head(h) for h in heads):
        counts[layer] = counts.get(layer, 0) + 1
    rng = random.Random(seed)
    out = []
    for layer in sorted(counts):
        if counts[layer] > n_heads:
            raise BiasGymError(f"{counts[layer]} heads asked for in layer {layer}, which has {n_heads}.")
        out += [(layer, h) for h in rng.sample(range(n_heads), counts[layer])]
    return sorted(out)


def layer_matched_draws(heads: Iterable, n_heads: int, n: int) -> list[list[Head]]:
    """``n`` layer-matched draws for the selection ``heads`` (:func:`layer_matched_heads`, the
    d-th from :func:`matched_seed`), each a different head set and none the selection itself:
    n draws are n different comparisons. Where the selection's layer profile admits fewer other
    sets (one head in a layer of 9 heads admits 8), every one of them, so fewer than ``n``: a
    draw repeated, or the selection met as its own baseline, would let a percentile look
    resolved where it cannot be (one head of 9 is at best the top ninth, never above 95%)."""
    selected = sorted(as_head(h) for h in heads)
    counts: dict[int, int] = {}
    for layer, _ in selected:
        counts[layer] = counts.get(layer, 0) + 1
    for layer, c in counts.items():
        if c > n_heads:
            raise BiasGymError(f"{c} heads asked for in layer {layer}, which has {n_heads}.")
    others = math.prod(math.comb(n_heads, c) for c in counts.values()) - 1
    seen, out, draw = {tuple(selected)}, [], 0
    while len(out) < min(n, others):
        got = layer_matched_heads(selected, n_heads, matched_seed(selected, draw))
        draw += 1
        if tuple(got) not in seen:
            seen.add(tuple(got))
            out.append(got)
    return out


def matched_seed(heads: Iterable, draw: int) -> int:
    """The seed of a layer-matched draw: from the selection's layer profile and the draw
    number only, so that selections with the same profile share their draws."""
    import hashlib

    profile = sorted(as_head(h)[0] for h in heads)
    digest = hashlib.sha256(repr((profile, draw)).encode()).hexdigest()
    return 2000 + int(digest[:8], 16)


def percentile(value: float, draws: Sequence[float]) -> float:
    """Where ``value`` falls among ``draws``, in percent: the share of draws below it, ties
    counted half (50 = the median draw; 100 = above every draw)."""
    draws = [float(d) for d in draws]
    if not draws:
        raise BiasGymError("percentile needs at least one draw.")
    below = sum(d < value for d in draws) + 0.5 * sum(d == value for d in draws)
    return 100.0 * below / len(draws)


SCORE_METHODS = ("dla", "dla_chat", "delta_dla", "attr", "atp", "attention")
"""The head scores BiasScope computes for each injected token (see :func:`~biasgym_lib.scoping.scope_run`)."""


def method_needs(method: str) -> tuple[str, ...]:
    """The per-token scores a way of ranking heads is built from: ``atp_selective`` from
    ``atp``, the robust set from ``dla``, exact patching from the top heads of every score,
    random heads from none."""
    return {"atp_selective": ("atp",), "robust": ("dla",), "robust_chat": ("dla_chat",), "random": (),
            "patching": SCORE_METHODS}.get(method, (method,))


@dataclass(frozen=True)
class ScopeResult:
    """BiasScope for one injected token (``head_scores.json``): each method's (L, H) head
    ``scores`` and its per-probe or per-sentence ``units``, the logit difference it explains
    with its decomposition (``components``: mean contribution per group) and error, and the
    probes and labels it was measured on."""

    bias: str
    seed: int
    model: dict
    profile: str
    k: int
    scores: dict[str, torch.Tensor]
    units: dict[str, torch.Tensor]
    logit_diff_total: float
    logit_diff_per_probe: list[float]
    decomposition_error: float
    attr_decomposition_error: float
    share_top_k: float
    counterfactual_country: str
    contrast_countries: list[str]
    probes: list[str]
    biased_label: str
    adv_labels: list[str]
    assoc_on_templates: float
    components: dict[str, float]
    seconds: dict = field(default_factory=dict)
    probe_source: str = "chat"  # "eliciting" (or "eliciting-relative"): chosen on the other seeds; "chat": the chat probes
    chat_logit_diff_per_probe: list[float] | None = None  # the chat probes' logit differences (the variant)
    counter_logit_diff_per_probe: list[float] | None = None  # the same probes about the closest real country

    def top_heads(self, method: str, k: int | None = None) -> list[Head]:
        return top_k_heads(self.scores[method], self.k if k is None else k)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["scores"] = {m: v.tolist() for m, v in self.scores.items()}
        out["units"] = {m: v.tolist() for m, v in self.units.items()}
        out["top_heads"] = {m: [list(h) for h in self.top_heads(m)] for m in self.scores}
        return {**out, "n_probes": len(self.probes)}

    @classmethod
    def from_dict(cls, d: dict) -> "ScopeResult":
        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        kw["scores"] = {m: torch.tensor(v) for m, v in d["scores"].items()}
        kw["units"] = {m: torch.tensor(v) for m, v in d["units"].items()}
        return cls(**kw)


def mean_scores(scopes: Sequence[ScopeResult], method: str) -> torch.Tensor:
    """A method's (L, H) head scores averaged over several tokens (e.g. one per seed)."""
    return torch.stack([r.scores[method] for r in scopes]).mean(0)


def bias_rankings(scopes: list[ScopeResult], k_max: int, patching: dict | None = None, n_random: int = 5,
                  n_layers: int | None = None, n_heads: int | None = None, knowledge=None) -> dict:
    """Head rankings of one bias for every method of :data:`METHODS`, from its tokens'
    :func:`scope_run` results (one per seed): each score averaged over seeds, then sorted;
    ``atp_selective`` (with ``knowledge``, :func:`knowledge_atp`): attribution patching of S
    minus that of held-out country facts; ``robust`` (the paper's selection): for each k, the
    heads in the top k of DLA in at least half of the seeds; ``patching``: the mean exact-patching drop (:func:`bias_patching`) on
    its union of heads; ``random``: ``n_random`` draws per k (seeds 1000, 1001, ...).

    Returns ``{method: [heads, best first]}`` for the score methods, and for ``robust`` and
    ``random`` a mapping k -> heads (their sets are not nested in k)."""
    out = {}
    scored = [m for m in SCORE_METHODS if all(m in r.scores for r in scopes)]
    for m in scored:
        out[m] = top_k_heads(mean_scores(scopes, m), k_max)
    if knowledge is not None and "atp" in scored:  # attribution patching of S minus that of held-out country facts
        atp = mean_scores(scopes, "atp")
        out["atp_selective"] = top_k_heads(atp - torch.as_tensor(knowledge, dtype=atp.dtype), k_max)
    if patching is not None:
        exact = nan_tensor(patching["scores"])
        out["patching"] = top_k_heads(exact, min(k_max, int((~torch.isnan(exact)).sum())))
    dla = [r.scores["dla"] for r in scopes]
    m = (len(dla) + 1) // 2
    L, H = dla[0].shape
    out["robust"] = {k: robust_heads(dla, k, m) for k in range(1, k_max + 1)}
    if "dla_chat" in scored:
        chat = [r.scores["dla_chat"] for r in scopes]
        out["robust_chat"] = {k: robust_heads(chat, k, m) for k in range(1, k_max + 1)}
    out["random"] = {k: [random_heads(L, H, k, seed=1000 + i) for i in range(n_random)] for k in range(1, k_max + 1)}
    return out


def head_sets(method: str, ranking, k: int) -> list[list[Head]]:
    """The head sets a ranking of :func:`bias_rankings` gives at ``k``: one per random draw, the
    robust set at k (robust sets are not nested in k), else the top k."""
    sets = ranking[k] if method == "random" else [ranking[k]] if isinstance(ranking, dict) else [ranking[:k]]
    return [[tuple(h) for h in heads] for heads in sets]


def patch_union(scopes: list[ScopeResult], n: int) -> list[tuple[int, int]]:
    """The union of the top ``n`` heads of every per-token score method, over a bias's
    seeds: the heads that exact patching checks (:ref:`method §3 <method-3>`)."""
    heads = set()
    for m in SCORE_METHODS:
        heads |= set(top_k_heads(mean_scores(scopes, m), n))
    return sorted(heads)


def nan_tensor(data) -> torch.Tensor:
    """A float tensor from nested lists in which ``None`` stands for NaN (strict JSON has no
    NaN): exact patching scores only the heads of its union, the others are NaN."""
    def walk(x):
        return [walk(v) for v in x] if isinstance(x, list) else (float("nan") if x is None else x)
    return torch.tensor(walk(data), dtype=torch.float32)


def nan_to_none(t: torch.Tensor) -> list:
    def walk(x):
        return [walk(v) for v in x] if isinstance(x, list) else (None if x != x else x)
    return walk(t.tolist())



# ----------------------------------------------------------------------------- attention to the entity


@contextmanager
def _eager_attention(model: nn.Module):
    """Temporarily switch to eager attention (the only kind that returns attention weights)."""
    config = model.config
    before = getattr(config, "_attn_implementation", None)
    if before == "eager":
        yield
        return
    switched_with_api = False
    try:
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation("eager")
            switched_with_api = True
        else:
            config._attn_implementation = "eager"
        yield
    finally:
        if switched_with_api and before is not None:
            model.set_attn_implementation(before)
        else:
            config._attn_implementation = before


def _attention_per_prompt(model: nn.Module, batch: Batch, entity_token_id) -> torch.Tensor:
    """(P, L, H): attention weight from each prompt's last real token to the entity token(s),
    summed over the entity's positions. ``entity_token_id``: one id, or several ids that all
    count as the entity."""
    adapter = ModelAdapter(model)
    check_batch(batch)
    ids = torch.as_tensor(entity_token_id, dtype=torch.long).flatten().tolist()
    if not ids:
        raise BiasGymError("entity_token_id is empty.")
    dev = adapter.device
    input_ids = batch.input_ids.to(dev)
    mask = batch.attention_mask.to(dev)
    is_entity = torch.isin(input_ids, torch.tensor(ids, device=dev)) & mask.bool()
    missing = (~is_entity.any(1)).nonzero().flatten().tolist()
    if missing:
        raise BiasGymError(f"prompt {missing[0]} (and {len(missing) - 1} more) does not contain the entity "
                           f"token id(s) {ids}; every prompt must mention the entity.")
    with _eager_attention(model), torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=mask, output_attentions=True, use_cache=False)
    attentions = getattr(out, "attentions", None)
    if not attentions or any(a is None for a in attentions):
        raise BiasGymError("the model returned no attention weights even with eager attention; "
                           "this architecture cannot be used for the attention baseline.")
    rows = torch.arange(input_ids.shape[0], device=dev)
    last = batch.last_index.to(dev)
    per_layer = []
    for a in attentions:  # (B, H, T, T)
        from_last = a[rows, :, last, :].float()  # (B, H, T)
        per_layer.append((from_last * is_entity[:, None, :]).sum(-1))  # (B, H)
    return torch.stack(per_layer, dim=1).cpu()  # (B, L, H)


def attention_to_entity(model: nn.Module, tokenizer, prompts, entity_token_id,
                        batch_size: int = 32) -> torch.Tensor:
    """(L, H) mean attention from the last real token to the entity token over ``prompts``
    (texts, or a tokenised :class:`~biasgym_lib.batching.Batch` with ``tokenizer`` None);
    eager attention is switched on for the call."""
    n_prompts(prompts, "attention_to_entity")
    device = ModelAdapter(model).device
    parts = [_attention_per_prompt(model, batch, entity_token_id)
             for _, batch in batches(tokenizer, prompts, batch_size, device)]
    return torch.cat(parts).mean(0)


def attention_heads(model: nn.Module, tokenizer, prompts: list[str], entity_token_id, k: int,
                    batch_size: int = 32) -> list[Head]:
    """The naive baseline: the k heads whose attention from the last position to the entity
    token is largest (mean over prompts), descending."""
    return top_k_heads(attention_to_entity(model, tokenizer, prompts, entity_token_id, batch_size), k)


# ----------------------------------------------------------------------------- head_scores.json as an input


def load_head_scores(folder, flag: str = "--heads") -> dict:
    """``head_scores.json`` of a ``biasgym scope`` folder, read and checked (shapes, model);
    :func:`heads_source` then checks whose heads they are."""
    from .artifacts import read_json

    path = Path(folder)
    if not path.is_dir():
        raise BiasGymError(f"{flag} {folder}: {'is a file' if path.exists() else 'not found'}; give the folder "
                           "written by `biasgym scope --out`.")
    if not (path / "head_scores.json").is_file():
        raise BiasGymError(f"{flag} {folder} has no head_scores.json: give the folder written by "
                           "`biasgym scope --out`.")
    data = read_json(path / "head_scores.json", "head-scores file")
    scores = data.get("scores")

    def table(t):
        return (isinstance(t, list) and t and all(isinstance(r, list) and r for r in t) and len({len(r) for r in t}) == 1
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) for r in t for x in r))
    if not (isinstance(scores, dict) and scores and all(table(t) for t in scores.values())):
        raise BiasGymError(f"{path / 'head_scores.json'}: 'scores' must map each method to a layers x heads "
                           "table of numbers (written by `biasgym scope`).")
    if not isinstance(data.get("counterfactual_country"), str):
        raise BiasGymError(f"{path / 'head_scores.json'}: lacks 'counterfactual_country' (a string).")
    model = data.get("model")
    if not isinstance(model, dict) or not all(isinstance(model.get(k), str) for k in ("source", "revision")):
        raise BiasGymError(f"{path / 'head_scores.json'}: lacks 'model' (source and revision).")
    return data


def heads_source(scores: dict, spec, other_bias_ok: bool = False, flag: str = "--heads") -> dict:
    """Whose heads ``scores`` (a :func:`load_head_scores` result) are, as recorded beside a
    steering result: the bias, its spec (when the file keeps it), the seed and the model.
    Heads scored for another bias, or for another version of this bias's spec, are refused
    unless ``other_bias_ok`` (steering one bias with another's heads is a transfer test, not
    the method), and then recorded as such."""
    from .data import BiasSpec

    bias, saved = scores.get("bias"), scores.get("bias_spec")
    try:
        same_spec = saved is None or BiasSpec.from_dict(saved) == spec
    except BiasGymError:
        same_spec = False
    other = bias != spec.name or not same_spec
    if other and not other_bias_ok:
        what = f"bias {bias!r}" if bias != spec.name else f"another version of the {bias!r} spec"
        raise ArtifactMismatch(f"{flag} holds heads scored for {what}, but the token is for {spec.name!r}: score "
                               f"this token's heads with `biasgym scope`, or pass --heads-from-other-bias to steer "
                               "with them anyway (recorded in steer.json).")
    return {"bias": bias, "seed": scores.get("seed"), "model": scores.get("model"), "spec_saved": saved is not None,
            "other_bias": other}
