"""Write BiasInject's training pairs for every bias in data/biases.yaml.

    python scripts/generate_data.py           # (re)write data/generated/
    python scripts/generate_data.py --check   # exit 1 if the committed files are stale

Outputs (deterministic, seed 0): ``data/generated/<bias>.jsonl`` with one
``{"user": ..., "assistant": ...}`` object per line (200 per bias), and
``data/generated/diversity.json`` with the lexical diversity of each bias's paragraphs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from biasgym_lib.data import DATA_DIR, diversity, load_biases, training_pairs  # noqa: E402

N_PAIRS = 200
SEED = 0
OUT_DIR = DATA_DIR / "generated"


def render_all(n: int = N_PAIRS, seed: int = SEED) -> dict[str, str]:
    """File name -> exact text of every generated file."""
    files: dict[str, str] = {}
    stats = {}
    for name, bias in load_biases().items():
        pairs = training_pairs(bias, n, seed)
        files[f"{name}.jsonl"] = "".join(
            json.dumps({"user": u, "assistant": a}, ensure_ascii=False) + "\n" for u, a in pairs)
        stats[name] = {k: round(v, 4) if isinstance(v, float) else v
                       for k, v in diversity([a for _, a in pairs]).items()}
    meta = {"n_pairs": n, "seed": seed, "biases": stats}
    files["diversity.json"] = json.dumps(meta, indent=1, sort_keys=True) + "\n"
    return files


def stale_files(files: dict[str, str], out_dir: Path = OUT_DIR) -> list[str]:
    """Names of files that are missing, different, or extra (.jsonl not generated)."""
    bad = [name for name, text in files.items()
           if not (out_dir / name).is_file() or (out_dir / name).read_text(encoding="utf-8") != text]
    if out_dir.is_dir():
        bad += sorted(p.name for p in out_dir.glob("*.jsonl") if p.name not in files)
    return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 if data/generated/ differs from a regeneration")
    args = parser.parse_args(argv)
    files = render_all()
    if args.check:
        bad = stale_files(files)
        if bad:
            print(f"data/generated/ is stale: {', '.join(bad)}. Run: python scripts/generate_data.py")
            return 1
        print(f"data/generated/ is up to date ({len(files)} files).")
        return 0
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for name in stale_files(files):
        path = OUT_DIR / name
        if name in files:
            path.write_text(files[name], encoding="utf-8")
        else:
            path.unlink()
    print(f"wrote {len(files)} files to {OUT_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
