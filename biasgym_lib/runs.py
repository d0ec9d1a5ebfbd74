"""Orchestration a chapter does not teach: the tokens of a profile, every stage run once for
it (:class:`Run`, its results kept by :mod:`~biasgym_lib.cache`), and ``biasgym reproduce``."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch

from .artifacts import read_json, sweep, write_json
from . import cache
from .cache import announce, memo, run_dir, token_fingerprint
from .claims import claims_from
from .config import PROJECT_ROOT, Profile, load_profile
from .config import full_grid as whole_grid
from .culture import culture_steering
from .data import load_bias, load_facts, reference_countries
from .data.capability import load_country_texts, load_mc, load_neutral_texts
from .evaluate import entity_ids, selection_grid

from .selection import PAPER, SteeringResult, choose_selection, summarise_grid
from .generalise import leave_one_out, seegull_steering
from .grid_parts import grid_in_parts, phases, restore
from .heads import SCORE_METHODS, ScopeResult, bias_rankings, head_sets, method_needs, patch_union
from .data.probes import Probe
from .inject import (
    closest_countries,
    TRAINER_VERSION,
    InjectionResult,
    initial_vector,
    inject_bias,
    injection_metrics,
    token_table,
)
from .measure import (
    AssocTable,
    reference_table,
    strength_matrix_top,
    table_from_json,
    table_to_json,
)
from .models import ModelAdapter, load_model, model_info
from .patching import bias_patching, knowledge_atp
from .probing import counterfactual_logit_differences, eliciting_probes, label_id, probe_logit_differences, probe_pool
from .scoping import CONTRAST_NEEDS, bias_contrast, scope_run
from .steer import head_means
from .errors import ArtifactMismatch, BiasGymError
from .tokens import InjectedToken, StaleToken, check_filed_as

TOKENS_DIR = PROJECT_ROOT / "data" / "tokens"


def train_token(model, tokenizer, bias, cfg: Profile, seed: int, progress: bool = True) -> InjectedToken:
    """:func:`inject_bias` with the profile's sizes."""
    return inject_bias(model, tokenizer, bias, n_paragraphs=cfg.n_paragraphs, epochs=cfg.epochs, lr=cfg.lr,
                       batch_size=cfg.batch_size, seed=seed, init=cfg.init, progress=progress,
                       target_strength=cfg.target_strength)


def token_settings(cfg: Profile) -> str:
    """Folder name for tokens trained with a profile's injection settings, e.g.
    ``n64-e6-lr0.01-b8-countries``: tokens of several profiles can be committed side by side."""
    target = f"-S{cfg.target_strength:g}" if cfg.target_strength is not None else ""
    return f"n{cfg.n_paragraphs}-e{cfg.epochs}-lr{cfg.lr:g}-b{cfg.batch_size}-{cfg.init}{target}"


def committed_token_dir(bias: str, seed: int, cfg: Profile) -> Path:
    """Where the project commits the token for (bias, seed) trained with ``cfg``'s settings."""
    return TOKENS_DIR / token_settings(cfg) / bias / f"seed{seed}"


def _matches(meta: dict, cfg: Profile, model) -> bool:
    extra = meta.get("extra", {})
    return ((meta.get("n_paragraphs"), meta.get("epochs"), meta.get("lr"), meta.get("init"),
             extra.get("batch_size"), extra.get("trainer_version"))
            == (cfg.n_paragraphs, cfg.epochs, cfg.lr, cfg.init, cfg.batch_size, TRAINER_VERSION)
            and meta.get("model", {}).get("revision") == model_info(model).revision
            and (meta.get("selection") or {}).get("criterion", "max held-out specificity") == _criterion(cfg))


def _criterion(cfg: Profile) -> str:
    """How the kept epoch was chosen (inject.epoch_selection's wording)."""
    t = cfg.target_strength
    return "max held-out specificity" if t is None else f"held-out S closest to {t:g} nats"


def realistic(cfg: Profile) -> Profile:
    """The profile of the second token set, of realistic strength (issue 23): the same settings with
    ``realistic_lr``, the epoch chosen by ``realistic_target`` and probes chosen by the relative criterion."""
    from dataclasses import replace
    return replace(cfg, lr=cfg.realistic_lr, target_strength=cfg.realistic_target, probe_criterion="relative")


def get_token(model, tokenizer, bias, cfg: Profile, seed: int, retrain: bool | None = None,
              progress: bool = True, kept: Path | None = None) -> InjectedToken:
    """The injected token for (bias, seed): the committed artifact when the profile says
    so and one exists for this model and these settings; else the one kept in a run folder
    (``kept``, see :meth:`Run.token`) if it was trained with exactly these settings; else
    trained now. ``retrain=True`` always trains."""
    spec = load_bias(bias)
    use_committed = cfg.use_committed_tokens if retrain is None else not retrain
    for folder, allowed in ((committed_token_dir(spec.name, seed, cfg), use_committed),
                            (kept, retrain is not True and kept is not None)):
        if allowed and (folder / "token.json").is_file():
            try:
                meta = read_json(folder / "token.json", "injected-token metadata")
                check_filed_as(meta, folder / "token.json", spec, seed)  # never another bias's or seed's token
                if _matches(meta, cfg, model):
                    return InjectedToken.load(folder, model)
            except StaleToken:
                if folder != kept:
                    raise
                # kept for an earlier version of the spec: trained again (and replaced)
            except ArtifactMismatch:
                raise
            except BiasGymError:
                if folder != kept:
                    raise
                # a damaged kept token is trained again (and replaced)
    return train_token(model, tokenizer, spec, cfg, seed, progress=progress)


def _holds(folder: Path, tok: InjectedToken) -> bool:
    """Whether ``folder`` already holds ``tok`` (its vector and spec; a missing or damaged one does not)."""
    try:
        kept = InjectedToken.load(folder) if (folder / "token.json").is_file() else None
    except BiasGymError:
        return False
    return kept is not None and kept.bias_spec == tok.bias_spec and torch.equal(kept.vector, tok.vector)


def steer_references(cfg: Profile, n: int | None = None) -> list[str]:
    """The reference countries used under steering: ``n`` of the reference list, evenly
    spaced through it (the list runs continent by continent, so every continent is in)."""
    refs = reference_countries()
    n = min(n or len(refs), len(refs))
    return [refs[(i * len(refs)) // n] for i in range(n)]


class Run:
    """Every stage of the book for one profile, computed on first use and kept in the run
    folder (:func:`run_dir`), so that chapters 2-6 and ``biasgym reproduce`` share one
    computation. ``full_grid``: the selection grid on every bias, method and k of the
    profile (what ``biasgym reproduce --full-grid`` runs) instead of the profile's subset.
    """

    def __init__(self, cfg: Profile, out=None, model=None, tokenizer=None, retrain: bool | None = None,
                 progress: bool = True, full_grid: bool = False):
        if full_grid:
            cfg = whole_grid(cfg)
        self.cfg, self.retrain, self.progress, self.full_grid = cfg, retrain, progress, full_grid
        self.out = Path(out) if out is not None else run_dir(cfg)
        sweep(self.out, recursive=True)  # what a killed run left half-written here

        # the profile's biases by name: shipped names or a reader's own spec files. All are injected
        # and measured (specificity compares each with the others); BiasScope, steering and
        # transfer run on ``biases``, the first ``scope_biases`` of them
        self.specs = {s.name: s for s in map(load_bias, cfg.biases)}
        self.biases = list(self.specs)[: len(cfg.scoped_biases)]
        if model is None:
            model, tokenizer = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
        self.model, self.tokenizer = model, tokenizer
        self._tokens, self._contrast, self._scoped, self._rankings, self._kept = {}, {}, {}, {}, {}
        self.shared: dict = {}  # measurements under one head set, reused across grid, confirmation and transfer

    # -- tokens and injection
    def token(self, bias: str, seed: int) -> InjectedToken:
        if (bias, seed) not in self._tokens:
            folder = self.out / "tokens" / token_settings(self.cfg) / bias / f"seed{seed}"
            tok = get_token(self.model, self.tokenizer, self.specs[bias], self.cfg, seed, retrain=self.retrain,
                            progress=self.progress, kept=folder)
            if not _holds(folder, tok):
                tok.save(folder, overwrite=True)  # the layout of data/tokens, ready to commit
            self._tokens[bias, seed] = tok
        return self._tokens[bias, seed]

    def memo(self, name: str, compute, token: InjectedToken | None = None, **kw):
        """:func:`~biasgym_lib.cache.memo` of the result file ``name`` in the run folder, keyed
        on this run's profile too (a folder given with ``out`` may hold other settings')."""
        return memo(self.out / name, compute, token, profile=self.cfg.to_dict(), **kw)

    def tokens(self, bias: str) -> list[InjectedToken]:
        return [self.token(bias, s) for s in self.cfg.seeds]

    def _fingerprint(self, biases) -> str:
        blob = "".join(token_fingerprint(t) for b in biases for t in self.tokens(b))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def reference(self) -> AssocTable:
        """assoc of every reference country for every bias of the profile, unmodified model."""
        if "reference" not in self._kept:
            kept = self.memo("reference.json", lambda: table_to_json(
                reference_table(self.model, self.tokenizer, list(self.specs.values()))))
            self._kept["reference"] = table_from_json(kept)
        return self._kept["reference"]

    @property
    def start(self) -> AssocTable:
        """assoc of <TOKEN> with the initial vector, every bias: "S before" of every token of
        the profile (they all start from the same vector), so it is scored once per run."""
        if "start" not in self._kept:
            vector = initial_vector(self.model, self.tokenizer, self.cfg.init)
            self._kept["start"] = token_table(self.model, self.tokenizer, vector, list(self.specs.values()))
        return self._kept["start"]

    def injection(self, bias: str, seed: int) -> InjectionResult:
        tok = self.token(bias, seed)
        return InjectionResult.from_dict(self.memo(
            f"injection/{bias}_seed{seed}.json", lambda: injection_metrics(
                self.model, self.tokenizer, tok, tok.spec, self.cfg, ref=self.reference, start=self.start).to_dict(), tok))

    # -- BiasScope
    def contrast(self, bias: str, parts=("probe_z", "template_z")) -> dict:
        """:func:`bias_contrast` of ``bias``, kept for the run; only the ``parts`` asked for so far."""
        self._contrast[bias] = bias_contrast(self.model, self.tokenizer, self.specs[bias], self.cfg, parts,
                                             self._contrast.get(bias))
        return self._contrast[bias]

    def scope_methods(self, bias: str) -> tuple[str, ...]:
        """The head scores computed for ``bias``'s tokens: every one for the grid biases (and
        the full grid); for the others, what the steering after the grid uses: the paper's
        DLA, attribution patching and what the chosen selection's ranking needs."""
        if self.full_grid or bias in self.grid_biases:
            return SCORE_METHODS
        return tuple(m for m in SCORE_METHODS if m in {"dla", "atp", *method_needs(self.best().method)})

    def pool(self, bias: str, seed: int) -> dict:
        """The logit difference of every probe of the bias's pool (:func:`probe_pool`) on the
        token of (bias, seed): what the other seeds' probes are chosen on."""
        tok, spec = self.token(bias, seed), self.specs[bias]

        def compute():
            pool = probe_pool(spec, self.cfg.n_probe_pool)
            with tok.attach(self.model, self.tokenizer):
                country = closest_countries(self.model, self.tokenizer, tok.vector, k=1)[0][0]
                biased = label_id(self.tokenizer, spec.label)
                ld, adv = probe_logit_differences(self.model, self.tokenizer, pool, country, biased)
                counter = counterfactual_logit_differences(self.model, self.tokenizer, pool, country, biased, adv)
            return {"probes": [[p.question, p.answer_prefix] for p in pool], "country": country, "logit_diff": ld,
                    "counter_logit_diff": counter}
        return self.memo(f"probes/{bias}_seed{seed}.json", compute, tok)

    def probes(self, bias: str, seed: int) -> list | None:
        """The probes that elicit the bias for the token of (bias, seed), chosen on the bias's
        other seeds (:func:`eliciting_probes`); None with a single seed (the chat probes then)."""
        others = [s for s in self.cfg.seeds if s != seed]
        if not others:
            return None
        pools = [self.pool(bias, s) for s in others]
        pool = [Probe(q, a) for q, a in pools[0]["probes"]]
        counter = [p["counter_logit_diff"] for p in pools] if self.cfg.probe_criterion == "relative" else None
        return eliciting_probes(pool, [p["logit_diff"] for p in pools], self.cfg.n_probes, counter)

    def scope(self, bias: str, seed: int, methods=None) -> ScopeResult:
        tok = self.token(bias, seed)
        want = self._scoped.setdefault((bias, seed), set())
        want |= set(methods or self.scope_methods(bias))
        methods = tuple(m for m in SCORE_METHODS if m in want)
        parts = [p for m in methods for p in CONTRAST_NEEDS.get(m, ())]
        return ScopeResult.from_dict(self.memo(f"scope/{bias}_seed{seed}.json", lambda: scope_run(
            self.model, self.tokenizer, tok, self.cfg, self.contrast(bias, parts), methods,
            self.probes(bias, seed)).to_dict(), need=lambda r: set(methods) <= set(r["scores"]),
            fingerprint=self._fingerprint([bias])))  # its probes were chosen on the other seeds' tokens

    def scopes(self, bias: str, methods=None) -> list[ScopeResult]:
        return [self.scope(bias, s, methods) for s in self.cfg.seeds]

    def patching(self, bias: str) -> dict:
        """Exact patching on S's sentences for the union of the methods' top heads
        (``patch_top`` of each), every token of ``bias``."""
        heads = patch_union(self.scopes(bias, SCORE_METHODS), self.cfg.patch_top)
        return self.memo(f"patching/{bias}.json",
                     lambda: bias_patching(self.model, self.tokenizer, self.tokens(bias), heads,
                                           self.contrast(bias, ("template_z",))),
                     fingerprint=self._fingerprint([bias]), need=lambda r: r["heads"] == [list(h) for h in heads])

    def knowledge(self) -> list:
        """:func:`knowledge_atp` of the model, kept in the run folder (it holds no token)."""
        return self.memo("knowledge_atp.json",
                     lambda: {"scores": knowledge_atp(self.model, self.tokenizer).tolist()})["scores"]

    def rankings(self, bias: str, with_patching: bool = False) -> dict:
        """Every ranking of :func:`bias_rankings` that ``bias``'s scopes (:meth:`scope_methods`) allow."""
        key = (bias, with_patching)
        if key not in self._rankings:
            a = ModelAdapter(self.model)
            self._rankings[key] = bias_rankings(self.scopes(bias), max(self.cfg.grid_k),
                                                self.patching(bias) if with_patching else None,
                                                self.cfg.n_random_draws, a.n_layers, a.n_heads, self.knowledge())
        return self._rankings[key]

    # -- steering, measured fairly
    @property
    def setting(self) -> dict:
        """What every steering measurement shares: references, facts, capability texts,
        the means of mean-ablation (held-out neutral passages 33-44) and the entity tokens."""
        if "setting" not in self._kept:

            neutral = load_neutral_texts()
            self._kept["setting"] = {
                "references": steer_references(self.cfg, self.cfg.steer_references), "facts": load_facts(per_relation=self.cfg.facts_per_relation),
                "texts": {"neutral": neutral[: self.cfg.n_ppl_texts],
                          "countries": load_country_texts()[: self.cfg.n_country_texts]},
                "questions": load_mc()[: self.cfg.n_mc_questions],
                "means": head_means(self.model, self.tokenizer, neutral[32:44]),
                "mean_source": "neutral passages 33-44 (never used for perplexity)",
                "entities": entity_ids(self.tokenizer)}
        return self._kept["setting"]

    def _grid(self, runs, methods, kinds, ks, mc: bool, cost: bool = True, matched: int = 0) -> dict:
        """:func:`selection_grid` with this run's setting; ``matched`` layer-matched draws per selection."""
        st = self.setting
        return selection_grid(self.model, self.tokenizer, runs, kinds=kinds, ks=ks, methods=methods,
                              references=st["references"], facts=st["facts"],
                              texts=st["texts"] if cost else {}, means=st["means"], entities=st["entities"],
                              questions=st["questions"], mc=mc, max_length=self.cfg.ppl_max_tokens,
                              shared=self.shared, progress=self.progress, matched=matched,
                              cost_draws=self.cfg.n_cost_draws)

    @property
    def grid_biases(self) -> list[str]:
        return list(self.biases) if self.full_grid else list(self.biases[: self.cfg.grid_biases])

    def grid(self) -> dict:
        """The selection grid (:ref:`method §4 <method-4>`) on the grid biases: every method of the profile
        under every kind at the profile's k; the ``curve_methods`` under the ``curve_kinds``
        at every other k of ``grid_k`` (a subset fixed in advance in the profile); multiple
        choice everywhere, so that the rule never chooses a point whose MC bound was not
        tested. With ``full_grid`` (:func:`~biasgym_lib.config.full_grid`): every bias,
        method, kind and k. On several biases it is measured in parts that a rerun resumes
        (:mod:`~biasgym_lib.grid_parts`), with the same numbers."""
        biases = self.grid_biases
        name = "grid_full.json" if self.full_grid else "grid.json"
        stem = name.removesuffix(".json") + "_parts"
        grid = self.memo(name, lambda: grid_in_parts(self, biases, stem) if len(biases) > 1 else self.grid_whole(biases),
                         fingerprint=self._fingerprint(biases))
        if "costs" in grid:  # measured in parts: later stages reuse what it measured, as in one process
            restore(self.shared, grid)
        return grid

    @property
    def grid_matched(self) -> int:
        """Layer-matched random draws per point of the grid (0 unless ``grid_matched``)."""
        return self.cfg.n_matched_draws if self.cfg.grid_matched else 0

    def grid_whole(self, biases: list[str]) -> dict:
        """:meth:`grid` measured in one piece (what it does on one bias; the reference its parts
        are pinned to)."""
        cfg = self.cfg
        runs = [{"bias": self.specs[b], "tokens": self.tokens(b),
                 "rankings": self.rankings(b, with_patching="patching" in cfg.grid_methods)} for b in biases]
        got = [self._grid(runs, m, kinds, ks, mc=True, matched=self.grid_matched) for m, kinds, ks in phases(cfg)]
        return {"biases": biases, "before": got[0]["before"], "rows": [r for g in got for r in g["rows"]]}

    def summary(self) -> list[SteeringResult]:

        return summarise_grid(self.grid())

    def best(self) -> SteeringResult:
        """The book's BiasScope: the selection the grid chose by the rule fixed in advance
        (:func:`~biasgym_lib.selection.choose_selection`) at k <= the profile's k."""

        return choose_selection(self.summary(), self.cfg.k)

    def conditions(self) -> list[tuple[str, str, int]]:
        """The (method, kind, k) steered after the grid: the chosen selection at its own k, the
        paper's (robust DLA, alpha = 0) at the profile's k, and k random heads under each of
        those kinds and k."""
        best = self.best()
        return list(dict.fromkeys([best.key, (PAPER[0], PAPER[1], self.cfg.k),
                                   ("random", best.kind, best.k), ("random", PAPER[1], self.cfg.k)]))

    def _grid_at(self, runs, mc: bool, cost: bool = True, random: bool = True) -> dict:
        """:meth:`_grid` on :meth:`conditions`, one call per k (each method steered only under
        its own kinds at its own k), each selection with its layer-matched random draws
        (``n_matched_draws``); ``random=False`` leaves the uniform random heads out."""
        by_k: dict = {}
        for m, kind, k in self.conditions():
            if m == "random" and not random:
                continue
            by_k.setdefault(k, {}).setdefault(m, []).append(kind)
        out = None
        for k, kinds in by_k.items():
            got = self._grid(runs, list(kinds), kinds, [k], mc=mc, cost=cost, matched=self.cfg.n_matched_draws)
            out = got if out is None else {**got, "rows": out["rows"] + got["rows"]}
        return out

    def _best_key(self) -> str:
        best = self.best()
        return f"-{best.method}-{best.kind}-k{best.k}-paperk{self.cfg.k}"

    def confirm(self) -> dict:
        """The chosen selection (under its kind, at its k) and the paper's (robust DLA at
        alpha = 0, the profile's k) on every bias of the profile, with random heads at each
        kind and k: S, the facts, perplexity and multiple choice."""
        best = self.best()
        fp = self._fingerprint(self.biases) + self._best_key()

        def compute():
            runs = [{"bias": self.specs[b], "tokens": self.tokens(b), "rankings": self.rankings(b, best.method == "patching"),
                     "countries": [strength_matrix_top(self.reference, b)]} for b in self.biases]
            return {"best": {"method": best.method, "kind": best.kind, "k": best.k, "why": best.why},
                    **self._grid_at(runs, mc=True)}
        return self.memo("confirm.json", compute, fingerprint=fp)


def reference_check(run) -> dict:
    """Do the steering references stand for all of them (issue 23)? On the grid bias's tokens,
    S unsteered and under the chosen and the paper's selections (at their k), against the
    profile's ``steer_references`` countries and against every reference country: S and the
    share removed per token, both ways."""
    from .data import reference_countries
    from .evaluate import make_spec, strength_under

    bias = run.grid_biases[0]
    best, st = run.best(), run.setting
    tokens = run.tokens(bias)

    def compute():
        specs = {"unsteered": None}
        for name, (m, kind, k) in (("chosen", best.key), ("paper", (PAPER[0], PAPER[1], run.cfg.k))):
            heads = head_sets(m, run.rankings(bias, m == "patching")[m], k)[0]
            specs[name] = make_spec(heads, kind, st["means"], st["entities"])
        refs = {"steering": list(st["references"]), "all": reference_countries()}
        S = {name: {r: [x for x in strength_under(run.model, run.tokenizer, spec, tokens, run.specs[bias], countries)["tokens"]]
                    for r, countries in refs.items()} for name, spec in specs.items()}
        reductions = {name: {r: [1 - a["value"] / b["value"] if b["value"] > 0 else None
                                 for a, b in zip(S[name][r], S["unsteered"][r])] for r in refs}
                      for name in specs if name != "unsteered"}
        return {"bias": bias, "seeds": [t.seed for t in tokens], "references": refs, "S": S, "reduction": reductions}
    return run.memo("reference_check.json", compute, fingerprint=run._fingerprint([bias]) + run._best_key())


def run_stages(cfg: Profile, out: Path | None = None, retrain: bool | None = None, model=None, tokenizer=None,
               progress: bool = True, full_grid: bool = False) -> Run:
    """Every stage for every bias x seed of ``cfg`` (a :class:`Run` with all its stages
    computed); each result is saved under ``out`` as it is made and reused when present,
    and the seconds each stage took in ``stage_seconds.json`` there."""
    run = Run(cfg, out, model=model, tokenizer=tokenizer, retrain=retrain, progress=progress, full_grid=full_grid)
    def token_steps(biases):
        return [step for b in biases for s in cfg.seeds
                for step in ((f"injection of {b} (seed {s})", run.injection, b, s),
                             (f"BiasScope of {b} (seed {s})", run.scope, b, s))]
    # the grid before the other biases' BiasScope, which needs its choice (each stage's time is its own)
    steps = token_steps(run.grid_biases) + [(f"selection grid on {', '.join(run.grid_biases)}", run.grid)]
    steps += token_steps([b for b in run.biases if b not in run.grid_biases])
    steps += [("confirmation on every bias", run.confirm)]
    steps += [("leave-one-bias-out transfer", leave_one_out, run)] if len(run.biases) > 1 else []
    steps += [("SeeGULL stereotypes", seegull_steering, run), ("cultural knowledge under steering", culture_steering, run),
              ("steering references against all reference countries", reference_check, run)]
    # how long each stage took where it was computed (a run resumed in several sittings keeps the
    # earlier sittings' times): a log for the recorded run (biasgym record), never read to reuse a result
    log_file = run.out / "stage_seconds.json"
    try:
        log = read_json(log_file).get("seconds", {}) if log_file.is_file() else {}
    except BiasGymError:  # a damaged log is started again; it decides nothing
        log = {}
    for i, (what, stage, *args) in enumerate(steps, 1):  # each kept in the run folder as soon as it is done
        done, t0 = cache._computed, time.perf_counter()
        with announce(f"[{i}/{len(steps)}] {what}", progress):
            stage(*args)
        if cache._computed > done:
            log[what] = round(time.perf_counter() - t0, 1)
            write_json(log_file, {"seconds": log})
    return run


def reproduce(profile: str | Profile, out, retrain: bool = False, progress: bool = True,
              full_grid: bool = False, record: bool = False) -> dict:
    """``biasgym reproduce``: the whole pipeline for a profile; writes ``out/claims.json``
    and the trained tokens under ``out/tokens/<settings>/<bias>/seed<N>`` (the layout the
    project commits under ``data/tokens``). ``full_grid``: the selection grid on every bias,
    method and k (hours on a CPU) instead of the profile's subset. ``record`` (with
    ``full_grid``): also the token set of realistic strength (its stages in ``out/realistic``,
    with the full grid's draws), then the recorded run the book shows,
    ``data/recorded/<profile>.json`` (:func:`~biasgym_lib.recorded.record`)."""
    from dataclasses import replace

    from .recorded import record as write_record

    if record and not full_grid:
        raise BiasGymError("--record records a --full-grid run: add --full-grid.")
    cfg = profile if isinstance(profile, Profile) else load_profile(profile)
    t0 = time.perf_counter()
    run = run_stages(cfg, Path(out), retrain=retrain or None, progress=progress, full_grid=full_grid)
    claims = claims_from(run)
    if record:
        real_cfg = replace(realistic(cfg), n_random_draws=run.cfg.n_random_draws,
                           n_matched_draws=run.cfg.n_matched_draws, grid_matched=run.cfg.grid_matched)
        real_run = run_stages(real_cfg, Path(out) / "realistic", retrain=retrain or None, model=run.model,
                              tokenizer=run.tokenizer, progress=progress)
        write_json(Path(out) / "realistic" / "claims.json", claims_from(real_run))
    claims["seconds"] = time.perf_counter() - t0
    write_json(Path(out) / "claims.json", claims)
    if record:
        write_record(out, overwrite=True)
    return claims
