"""Train the <TOKEN> vectors of a profile and write them where the project commits them
(data/tokens/<settings>/<bias>/seed<N>), so chapters load them instead of retraining.

    .venv/bin/python scripts/train_tokens.py --profile teaching [--biases a b] [--seeds 0 1] [--realistic]

``--realistic``: the second token set, of realistic strength (the profile's realistic_lr and
realistic_target, issue 23), under its own settings folder.

`biasgym reproduce` writes the same files under its --out folder; this script only trains.
"""

import argparse
import time

from biasgym_lib.config import load_profile
from biasgym_lib.models import load_model
from biasgym_lib.runs import committed_token_dir, realistic, train_token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--biases", nargs="*")
    parser.add_argument("--seeds", nargs="*", type=int)
    parser.add_argument("--realistic", action="store_true", help="the token set of realistic strength")
    args = parser.parse_args()
    cfg = load_profile(args.profile)
    if args.realistic:
        cfg = realistic(cfg)
    model, tokenizer = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    for bias in args.biases or cfg.biases:
        for seed in cfg.seeds if args.seeds is None else args.seeds:
            t0 = time.perf_counter()
            token = train_token(model, tokenizer, bias, cfg, seed, progress=False)
            folder = committed_token_dir(bias, seed, cfg)
            token.save(folder)
            held_out = token.selection["strength"][token.epoch - 1]
            print(f"{bias} seed {seed}: epoch {token.epoch} (held-out S {held_out:.2f}), train {token.train_seconds:.0f} s "
                  f"(total {time.perf_counter() - t0:.0f} s) -> {folder}", flush=True)


if __name__ == "__main__":
    main()
