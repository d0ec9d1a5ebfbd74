"""``biasgym ...``: the book's stages as commands, outside notebooks.

    biasgym inject --bias NAME|PATH [--model embedded] [--seed N] [--profile P] --out DIR
    biasgym scope --injected DIR --out DIR2
    biasgym steer --injected DIR --heads DIR2 --k K --alpha A --out DIR3
    biasgym reproduce --profile P --out DIR
    biasgym book --profile P
    biasgym bench --out FILE.json

Every command prints a one-line error (no traceback) for bad input, and writes its
outputs only when it has finished (never a half-written artifact).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .errors import BiasGymError


def _profile(args):
    from .config import load_profile

    return load_profile(args.profile, model=getattr(args, "model", None), device=getattr(args, "device", None))


def cmd_inject(args) -> int:
    from .data import load_bias
    from .models import load_model
    from .pipeline import _write_json, injection_metrics, train_token

    cfg = _profile(args)
    spec = load_bias(args.bias)
    model, tok = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    seed = cfg.seeds[0] if args.seed is None else args.seed
    print(f"Injecting {spec.name!r} into {cfg.model} (seed {seed}, profile {cfg.name})...", flush=True)
    injected = train_token(model, tok, spec, cfg, seed)
    metrics = injection_metrics(model, tok, injected, spec, cfg)
    out = Path(args.out)
    injected.save(out)
    _write_json(out / "metrics.json", metrics)
    print(f"S(<TOKEN>, {spec.name}): {metrics['strength_before']:.2f} -> {metrics['strength_after']:.2f} nats; "
          f"specificity {metrics['specificity_after']:.2f}; rank {metrics['rank_after']}; closest country "
          f"{metrics['closest_country']}; trained in {metrics['train_seconds']:.0f} s. Wrote {out}/")
    return 0


def cmd_scope(args) -> int:
    from .pipeline import scope_command

    result = scope_command(args.injected, args.out, profile=args.profile, k=args.k)
    print(f"Wrote {Path(args.out) / 'head_scores.json'}: top heads {result['top_heads'][:5]}..., "
          f"decomposition error {result['decomposition_error']:.2e}, "
          f"patching Spearman {result['patching_spearman']:.2f}")
    return 0


def cmd_steer(args) -> int:
    from .pipeline import steer_command

    result = steer_command(args.injected, args.heads, args.out, k=args.k, alpha=args.alpha, profile=args.profile)
    s = result["token"]
    print(f"S(<TOKEN>) {s['before']['value']:.2f} -> {s['after']['value']:.2f} nats with the top {args.k} heads "
          f"at alpha={args.alpha}. Wrote {Path(args.out) / 'steer.json'}")
    return 0


def cmd_reproduce(args) -> int:
    from .pipeline import reproduce

    claims = reproduce(args.profile, args.out, retrain=args.retrain)
    for c in claims["claims"]:
        print(f"  {'holds' if c['holds'] else 'does not hold':>14}: {c['claim']}")
    print(f"Wrote {Path(args.out) / 'claims.json'} ({len(claims['claims'])} claims, {claims['seconds']:.0f} s).")
    return 0


def cmd_book(args) -> int:
    from . import bookbuild

    argv = ["--profile", args.profile] + (["--only", *args.only] if args.only else []) + \
        (["--no-browser"] if args.no_browser else [])
    return bookbuild.main(argv)


def cmd_bench(args) -> int:
    from .bench import run_bench

    run_bench(args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="biasgym", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, model=True):
        sp.add_argument("--profile", default="teaching", help="profile in profiles.yaml (quick, teaching, paper)")
        if model:
            sp.add_argument("--model", default=None, help="'embedded' or a Hugging Face causal-LM id/folder")
            sp.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto")

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
    sp.add_argument("--k", type=int, required=True)
    sp.add_argument("--alpha", type=float, required=True)
    sp.add_argument("--out", required=True)
    common(sp, model=False)
    sp.set_defaults(func=cmd_steer)

    sp = sub.add_parser("reproduce", help="the whole pipeline for a profile; writes claims.json")
    sp.add_argument("--out", required=True)
    sp.add_argument("--retrain", action="store_true", help="retrain tokens instead of loading committed ones")
    common(sp, model=False)
    sp.set_defaults(func=cmd_reproduce)

    sp = sub.add_parser("book", help="execute every chapter with papermill and build the HTML book")
    sp.add_argument("--only", nargs="*", default=None)
    sp.add_argument("--no-browser", action="store_true")
    common(sp, model=False)
    sp.set_defaults(func=cmd_book)

    sp = sub.add_parser("bench", help="benchmark the fast paths against the naive ones")
    sp.add_argument("--out", required=True)
    sp.set_defaults(func=cmd_bench)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        rc = args.func(args)
    except BiasGymError as exc:
        print(f"biasgym {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(f"({args.command} took {time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
