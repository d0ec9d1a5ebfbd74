"""``biasgym ...``: the book's stages as commands, outside notebooks.

    biasgym inject --bias NAME|FILE --out DIR [--model M] [--device D] [--seed N]
    biasgym scope --injected DIR --out DIR2 [--k K]
    biasgym steer --injected DIR --heads DIR2 --k K --alpha A --out DIR3 [--heads-from-other-bias]
    biasgym reproduce --out DIR [--bias NAME|FILE ...] [--model M] [--retrain] [--full-grid|--power|--realistic]
    biasgym record RUN_FOLDER [--out FILE] [--commit SHA]
    biasgym book --profile P
    biasgym bench --out FILE.json

Every command also takes ``--profile P`` (quick, teaching, paper; default teaching), ``--set KEY=VALUE``
(repeatable: override one profile setting, e.g. ``--set epochs=1``) and ``--overwrite``.

``--bias`` is a bias name from data/biases.yaml or the path of your own YAML spec file (``FILE:NAME``
picks one bias of several in a file). The injected token keeps the whole spec, so ``scope`` and
``steer`` never need the file again.

``--alpha`` scales the output of the top k heads: 0 removes them (zero-ablation, the paper's setting),
0 < alpha < 1 weakens them, 1 changes nothing, and 1 < alpha <= 2 is *amplification* (the heads are
strengthened: the opposite of debiasing, for dose-response checks only). Negative, larger or non-finite
values are refused.

Every input and ``--out`` are checked before any model work. A result is a folder that appears whole
(written next to it and renamed into place); a folder that already holds a result is replaced only with
``--overwrite``. A bad input prints a one-line error (exit 2); an unexpected internal error prints one
line and the file holding the full trace (exit 1).
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

from .errors import BiasGymError, report_internal_error

ALPHA_MIN, ALPHA_MAX = 0.0, 2.0
MAX_SEED = 2**32 - 1


# ----------------------------------------------------------------------------- checks (no model work)


def _sets(items) -> dict:
    """``--set KEY=VALUE`` items as profile overrides (VALUE is read as YAML: 3, 0.5, [0, 1])."""
    import yaml

    from .data.specs import _StrictLoader

    out = {}
    for item in items or []:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise BiasGymError(f"--set {item!r}: write KEY=VALUE, e.g. --set epochs=1.")
        try:
            value = yaml.load(text, Loader=_StrictLoader)
        except yaml.YAMLError as exc:
            raise BiasGymError(f"--set {item!r}: the value is not valid YAML ({str(exc).splitlines()[0]}).") from exc
        if value is None:
            raise BiasGymError(f"--set {item!r}: give a value after '='.")
        if key in out:
            raise BiasGymError(f"--set {key} is given twice.")
        out[key] = value
    return out


def _profile(args, **overrides):
    """The profile with ``--set``, ``--model``, ``--device`` and ``overrides`` applied (all
    checked), and the cache folder its model needs (:func:`~biasgym_lib.models.check_cache`)."""
    from .config import load_profile
    from .models import check_cache

    sets = _sets(getattr(args, "set", None))
    for key in ("model", "device"):
        if getattr(args, key, None) is not None:
            sets[key] = getattr(args, key)
    sets.update({k: v for k, v in overrides.items() if v is not None})
    cfg = load_profile(args.profile, **sets)
    check_cache(cfg.model)  # a cache folder that cannot be used fails now, not after the model work
    return cfg


def _spec(arg: str):
    """A bias by name or from the reader's own file, fully validated."""
    from .data import load_bias
    from .data.specs import check_own_name

    if not isinstance(arg, str) or not arg.strip():
        raise BiasGymError("--bias is empty: give a bias name from data/biases.yaml or the path of your spec file.")
    return check_own_name(load_bias(arg))


def _absolute(arg: str) -> str:
    """A ``--bias`` argument with a spec file's path made absolute (``FILE`` or ``FILE:NAME``),
    so the run finds it whatever its working folder; a name is returned as is."""
    if Path(arg).is_file():
        return str(Path(arg).resolve())
    head, _, tail = arg.rpartition(":")
    if head and Path(head).is_file():
        return f"{Path(head).resolve()}:{tail}"
    return arg


def _seed(value) -> int:
    if value is None:
        return None
    if not 0 <= value <= MAX_SEED:
        raise BiasGymError(f"--seed must be between 0 and {MAX_SEED}, got {value}.")
    return value


def _alpha(value: float) -> float:
    if not math.isfinite(value):
        raise BiasGymError(f"--alpha must be a finite number, got {value}.")
    if not ALPHA_MIN <= value <= ALPHA_MAX:
        raise BiasGymError(f"--alpha must be between {ALPHA_MIN:g} (remove the heads) and {ALPHA_MAX:g} "
                           f"(amplify them), got {value:g}; 1 leaves them unchanged.")
    return value


def intervention(alpha: float) -> str:
    """What scaling heads by ``alpha`` does, in words."""
    if alpha == 0:
        return "ablation (heads removed)"
    if alpha < 1:
        return "attenuation (heads weakened)"
    if alpha == 1:
        return "no change (alpha = 1)"
    return "amplification (heads strengthened, not debiasing)"


def _k(value, flag: str = "--k", n_heads: int | None = None) -> int:
    if value is None:
        return None
    if value < 1:
        raise BiasGymError(f"{flag} must be at least 1 head, got {value}.")
    if n_heads is not None and value > n_heads:
        raise BiasGymError(f"{flag}={value} but the model has only {n_heads} heads.")
    return value


def _injected(folder):
    """The injected token in ``folder`` (written by ``biasgym inject``), read and checked
    (metadata, vector, saved spec); no model is loaded."""
    from .tokens import ARTIFACT_META, ARTIFACT_VECTOR, InjectedToken

    path = Path(folder)
    if not path.is_dir():
        raise BiasGymError(f"--injected {folder}: {'is a file' if path.exists() else 'not found'}; give the "
                           "folder written by `biasgym inject --out`.")
    if not (path / ARTIFACT_META).is_file() or not (path / ARTIFACT_VECTOR).is_file():
        other = next((n for n in ("head_scores.json", "steer.json", "claims.json") if (path / n).is_file()), None)
        hint = f" (it holds {other}: a result of another command)" if other else ""
        raise BiasGymError(f"--injected {folder} is not an injected-token folder{hint}: it needs {ARTIFACT_META} "
                           f"and {ARTIFACT_VECTOR}, written by `biasgym inject --out`.")
    return InjectedToken.load(path)


def _out(args, inputs=()) -> Path:
    """``--out`` checked before any work; it may not be one of the input folders or hold one."""
    from .artifacts import check_out

    out = check_out(args.out, args.overwrite)
    target = out.resolve()
    for flag, folder in inputs:
        src = Path(folder).resolve()
        if src == target or target in src.parents:
            raise BiasGymError(f"--out {args.out} would replace the {flag} folder {folder}; give another folder.")
    return out


def _tokenizer(model: str):
    from .models import load_tokenizer

    return load_tokenizer(model)


def _load(model: str, cfg):
    from .models import load_model

    return load_model(model, device=cfg.device, dtype=cfg.dtype)


# ----------------------------------------------------------------------------- commands


def cmd_inject(args) -> int:
    from .data.specs import check_label
    from .inject import injection_metrics
    from .runs import train_token

    cfg = _profile(args)
    spec = _spec(args.bias)
    seed = cfg.seeds[0] if args.seed is None else _seed(args.seed)
    others = [_spec(b) for b in cfg.biases]  # scored beside it (specificity needs them)
    if not [b for b in others if b.name != spec.name]:
        raise BiasGymError(f"the profile's biases {list(cfg.biases)} hold no bias other than {spec.name!r}: "
                           "specificity compares with at least one other (--set biases=[always_late], say).")
    out = _out(args)
    check_label(spec, _tokenizer(cfg.model))
    model, tok = _load(cfg.model, cfg)
    print(f"Injecting {spec.name!r} into {cfg.model} (seed {seed}, profile {cfg.name})...", flush=True)
    injected = train_token(model, tok, spec, cfg, seed)
    m = injection_metrics(model, tok, injected, spec, cfg)
    injected.save(out, overwrite=args.overwrite, files={"metrics.json": m.to_dict()}, precheck=False)
    print(f"S(<TOKEN>, {spec.name}): {m.strength_before.value:.2f} -> {m.strength_after.value:.2f} nats; "
          f"specificity {m.specificity_after.value:.2f}; rank {m.rank_after}; closest country "
          f"{m.closest_country}; trained in {m.train_seconds:.0f} s. Wrote {out}/")
    return 0


def cmd_scope(args) -> int:
    from .artifacts import result_folder, write_json
    from .data.specs import check_label
    from .models import ModelAdapter
    from .scoping import scope_run

    injected = _injected(args.injected)
    cfg = _profile(args, model=injected.model["source"], k=_k(args.k))
    spec = injected.spec
    out = _out(args, [("--injected", args.injected)])
    check_label(spec, _tokenizer(cfg.model))
    model, tokenizer = _load(cfg.model, cfg)
    injected.check_model(model)
    adapter = ModelAdapter(model)
    _k(cfg.k, "--k" if args.k is not None else "k (profile)", adapter.n_layers * adapter.n_heads)
    print(f"Scoring every head for {spec.name!r} (seed {injected.seed}) on {cfg.n_probes} probes: DLA, ΔDLA, "
          "attribute-matched ΔDLA, attribution patching, attention (a few minutes on a CPU)...", flush=True)
    result = scope_run(model, tokenizer, injected, cfg)
    with result_folder(out, args.overwrite, precheck=False) as tmp:  # the spec too: steer checks whose heads these are
        write_json(tmp / "head_scores.json", {**result.to_dict(), "bias_spec": spec.to_dict()})
    print(f"Wrote {out / 'head_scores.json'}: scores {sorted(result.scores)}; top attribution-patching heads "
          f"{result.top_heads('atp')[:5]}...; DLA decomposition error {result.decomposition_error:.2e}")
    return 0


def cmd_steer(args) -> int:
    import torch

    from .artifacts import result_folder, write_json
    from .data import load_facts
    from .data.capability import load_neutral_texts
    from .data.specs import check_label
    from .evaluate import steer_token
    from .heads import heads_source, load_head_scores, top_k_heads
    from .models import ModelAdapter
    from .runs import steer_references
    from .steer import SteeringSpec

    alpha = _alpha(args.alpha)
    scores = load_head_scores(args.heads)
    if args.method not in scores["scores"]:
        raise BiasGymError(f"--method {args.method!r}: {args.heads}/head_scores.json has scores for "
                           f"{sorted(scores['scores'])}.")
    table = scores["scores"][args.method]
    injected = _injected(args.injected)
    n_layers, n_heads = len(table), len(table[0])
    k = _k(args.k, n_heads=n_layers * n_heads)
    src, rev = injected.model["source"], injected.model["revision"]
    if (scores["model"]["source"], scores["model"]["revision"]) != (src, rev):
        raise BiasGymError(f"--heads {args.heads} was scored on model {scores['model']['source']!r} "
                           f"({scores['model']['revision']}) but the token was trained on {src!r} ({rev}).")
    cfg = _profile(args, model=src)
    spec = injected.spec
    source = heads_source(scores, spec, args.heads_from_other_bias, f"--heads {args.heads}")
    out = _out(args, [("--injected", args.injected), ("--heads", args.heads)])
    check_label(spec, _tokenizer(cfg.model))
    model, tokenizer = _load(cfg.model, cfg)
    injected.check_model(model)
    adapter = ModelAdapter(model)
    if (adapter.n_layers, adapter.n_heads) != (n_layers, n_heads):
        raise BiasGymError(f"--heads {args.heads} scores {n_layers} x {n_heads} heads but the model has "
                           f"{adapter.n_layers} x {adapter.n_heads}.")
    heads = top_k_heads(torch.tensor(table), k)
    steering = SteeringSpec(heads=heads, alpha=alpha, source={"method": args.method, "k": k, "bias": source["bias"]})
    result = {"bias": spec.name, "seed": injected.seed, "method": args.method, "k": k, "alpha": alpha,
              "intervention": intervention(alpha), "heads_from": source, **steer_token(
                  model, tokenizer, injected, steering, steer_references(cfg, cfg.steer_references), load_facts(per_relation=cfg.facts_per_relation),
                  load_neutral_texts()[: cfg.n_ppl_texts], cfg.n_random_draws)}
    s0, s1 = result["token"]["before"]["value"], result["token"]["after"]["value"]
    ppl, change = result["capability"], result["capability"]["perplexity_change"]["change"]
    with result_folder(out, args.overwrite, precheck=False) as tmp:
        write_json(tmp / "steer.json", result)
    red = result["reduction"]
    red_text = f"reduction {red:.0%}" if red is not None else "no reduction defined (S before <= 0)"
    print(f"S(<TOKEN>) {s0:.2f} -> {s1:.2f} nats ({red_text}) with the top {k} {args.method} heads at "
          f"alpha={alpha:g}, {result['intervention']}; facts lose {result['facts_reduction']:.0%} of their S; "
          f"perplexity {ppl['perplexity_before']:.1f} -> {ppl['perplexity_after']:.1f} ({change['value']:+.1%}, 95% CI "
          f"[{change['lo']:+.1%}, {change['hi']:+.1%}], {ppl['n_texts']} texts). Wrote {out / 'steer.json'}")
    return 0


def cmd_reproduce(args) -> int:
    from .artifacts import resumable_folder
    from .data.specs import check_label
    from .config import power
    from .runs import realistic, reproduce

    cfg = _profile(args)
    if args.bias:
        specs = [_spec(b) for b in args.bias]
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise BiasGymError(f"--bias names a bias twice: {names}.")
        biases = tuple(_absolute(b) for b in args.bias)
        cfg = replace(cfg, biases=biases, scope_biases=0,  # every bias named is traced
                      overrides={**cfg.overrides, "biases": list(biases), "scope_biases": 0})
    else:
        specs = [_spec(b) for b in cfg.biases]
    cfg = power(cfg) if args.power else cfg  # (argparse refuses --power with --full-grid, which draws as many)
    if args.realistic:
        if args.record:
            raise BiasGymError("--record already runs the token set of realistic strength; drop --realistic.")
        cfg = realistic(cfg)
    if len(specs) < 2:
        raise BiasGymError(f"reproduce needs at least two biases (specificity and leave-one-out compare them); "
                           f"got {[s.name for s in specs]}.")
    out = _out(args)
    tok = _tokenizer(cfg.model)
    for s in specs:
        check_label(s, tok)
    with resumable_folder(out, args.overwrite) as work:  # kept if stopped: the same command continues from it
        claims = reproduce(cfg, work, retrain=args.retrain, full_grid=args.full_grid, record=args.record)
    for c in claims["claims"]:
        holds = c["holds"] if isinstance(c["holds"], dict) else {"": c["holds"]}
        for name, ok in holds.items():
            print(f"  {'holds' if ok else 'does not hold':>14}: {c['claim']}" + (f" ({name})" if name else ""))
    print(f"Wrote {out / 'claims.json'} ({len(claims['claims'])} claims, {claims['seconds']:.0f} s).")
    return 0


def cmd_record(args) -> int:
    from .recorded import record

    print(f"Wrote {record(args.folder, args.out and Path(args.out), args.commit, args.overwrite)}.")
    return 0


def cmd_book(args) -> int:
    from .tools import bookbuild

    _profile(args)  # checked here, before any chapter runs
    if args.cell_timeout is not None and args.cell_timeout < 1:
        raise BiasGymError(f"--cell-timeout must be at least 1 second, got {args.cell_timeout}.")
    argv = ["--profile", args.profile] + (["--only", *args.only] if args.only else []) + \
        (["--no-browser"] if args.no_browser else []) + \
        (["--cell-timeout", str(args.cell_timeout)] if args.cell_timeout is not None else [])
    return bookbuild.main(argv)


def cmd_bench(args) -> int:
    from .artifacts import check_out
    from .tools.bench import run_bench

    out = Path(args.out)
    if out.is_dir():
        raise BiasGymError(f"--out {out} is a folder; give the path of a .json file.")
    if out.exists() and not args.overwrite:
        raise BiasGymError(f"--out {out} exists; pass --overwrite to re-measure into it.")
    check_out(out.with_name(out.name + ".d"), flag="--out")  # its folder is one we can write in
    run_bench(out)
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="biasgym", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, model=True, device=True):
        sp.add_argument("--profile", default="teaching", help="profile in profiles.yaml (quick, teaching, paper)")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override one profile setting, e.g. --set epochs=1 (repeatable)")
        if model:
            sp.add_argument("--model", default=None, help="'embedded' or a Hugging Face causal-LM id/folder")
        if device:
            sp.add_argument("--device", default=None, help="cpu, cuda, cuda:N, mps or auto")
        sp.add_argument("--overwrite", action="store_true", help="replace a result already in --out")

    sp = sub.add_parser("inject", help="BiasInject: train the <TOKEN> vector for one bias")
    sp.add_argument("--bias", required=True, help="a bias name from data/biases.yaml, or a path to your own spec file")
    sp.add_argument("--seed", type=int, default=None)
    sp.add_argument("--out", required=True)
    common(sp)
    sp.set_defaults(func=cmd_inject)

    sp = sub.add_parser("scope", help="BiasScope: score every attention head for an injected token")
    sp.add_argument("--injected", required=True, help="folder written by `biasgym inject`")
    sp.add_argument("--out", required=True)
    sp.add_argument("--k", type=int, default=None, help="how many top heads to list (default: the profile's k)")
    common(sp, model=False)
    sp.set_defaults(func=cmd_scope)

    sp = sub.add_parser("steer", help="scale the top heads and measure S before/after, with baselines")
    sp.add_argument("--injected", required=True)
    sp.add_argument("--heads", required=True, help="folder written by `biasgym scope`")
    sp.add_argument("--k", type=int, required=True, help="how many of the top heads to scale (>= 1)")
    sp.add_argument("--alpha", type=float, required=True,
                    help=f"scale of the heads, {ALPHA_MIN:g} to {ALPHA_MAX:g}: 0 removes them, 1 changes nothing, "
                         "above 1 amplifies them")
    sp.add_argument("--method", default="atp", help="which head score ranks the heads (dla, delta_dla, attr, atp, "
                                                     "attention; default atp)")
    sp.add_argument("--heads-from-other-bias", action="store_true",
                    help="steer with heads scored for another bias (a transfer test; recorded in steer.json)")
    sp.add_argument("--out", required=True)
    common(sp, model=False)
    sp.set_defaults(func=cmd_steer)

    sp = sub.add_parser("reproduce", help="the whole pipeline for a profile; writes claims.json")
    sp.add_argument("--out", required=True)
    sp.add_argument("--bias", nargs="+", default=None,
                    help="the biases to run instead of the profile's: names and/or spec files (at least two)")
    sp.add_argument("--retrain", action="store_true", help="retrain tokens instead of loading committed ones")
    draws = sp.add_mutually_exclusive_group()
    draws.add_argument("--full-grid", action="store_true",
                    help="the whole selection grid (every bias, method, intervention and k in 1, 2, 5, 10, 20, 20 "
                         "uniform and 20 layer-matched random draws), not the profile's subset; hours on a CPU")
    sp.add_argument("--realistic", action="store_true",
                    help="run the token set of realistic strength (the profile's realistic_lr and realistic_target, "
                         "probes chosen by the relative criterion) instead of the book's; biasgym record keeps it")
    draws.add_argument("--power", action="store_true", help="the profile's grid, with 20 layer-matched random draws per "
                    "compared selection in every later stage, 5 with costs, and all 232 MC questions; biasgym record keeps it")
    sp.add_argument("--record", action="store_true",
                    help="also run the token set of realistic strength and write the results the book shows to "
                         "data/recorded/<profile>.json (with the commit and code hash)")
    common(sp)
    sp.set_defaults(func=cmd_reproduce)

    sp = sub.add_parser("record", help="commit a finished --full-grid run as the book's recorded run")
    sp.add_argument("folder", help="the --out folder of a finished biasgym reproduce --full-grid")
    sp.add_argument("--out", default=None, help="where to write it (default data/recorded/<profile>.json)")
    sp.add_argument("--commit", default=None, help="the commit that ran it (default: this checkout's, if its code is the run's)")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing recording")
    sp.set_defaults(func=cmd_record)

    sp = sub.add_parser("book", help="execute every chapter with papermill and build the HTML book")
    sp.add_argument("--only", nargs="*", default=None)
    sp.add_argument("--no-browser", action="store_true")
    sp.add_argument("--cell-timeout", type=int, default=None, metavar="SECONDS",
                    help="fail a chapter whose cell runs longer than this (default: the profile's cell_timeout)")
    sp.add_argument("--profile", default="teaching", help="profile in profiles.yaml (quick, teaching, paper)")
    sp.set_defaults(func=cmd_book)

    sp = sub.add_parser("bench", help="benchmark the fast paths against the naive ones")
    sp.add_argument("--out", required=True)
    sp.add_argument("--overwrite", action="store_true", help="replace an existing file")
    sp.set_defaults(func=cmd_bench)
    return p


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse has already printed
        return exc.code if isinstance(exc.code, int) else 2
    t0 = time.perf_counter()
    # SIGTERM (what `timeout` and CI send) stops a command like Ctrl-C does: its clean-up runs
    # (a temporary folder is removed, reproduce's finished stages are kept) and it exits 143.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if main_thread else None
    try:
        rc = args.func(args)
    except BiasGymError as exc:
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"biasgym {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated (SIGTERM)", file=sys.stderr)
        return 143
    except Exception as exc:  # noqa: BLE001 - a bug: one line here, the trace in a file
        return report_internal_error(args.command, exc)
    finally:
        if main_thread:  # None: a handler not set from Python; the default then
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    print(f"({args.command} took {time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return rc


class Terminated(BaseException):
    """SIGTERM arrived (not an Exception: nothing on the way may swallow it)."""


def _terminated(signum, frame):
    raise Terminated()


if __name__ == "__main__":
    sys.exit(main())
