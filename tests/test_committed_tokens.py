"""The token vectors committed under data/tokens are what the code produces (issue 5):
retrain one with the same seed and settings and compare."""

import json
import re

import pytest
import torch

from biasgym_lib.config import load_profile
from biasgym_lib.tokens import InjectedToken
from biasgym_lib.inject import TRAINER_VERSION
from biasgym_lib.runs import committed_token_dir, get_token, token_settings, TOKENS_DIR, train_token

# Same seed, same machine type: expected bit-identical; a different BLAS or CPU may change
# the last bits of the float32 sums, so allow a small absolute tolerance per coordinate.
VECTOR_ATOL = 1e-4


def _committed():
    return sorted(TOKENS_DIR.glob("*/*/seed*/token.json"))


def test_committed_tokens_exist_and_describe_their_settings():
    files = _committed()
    assert files, "no committed tokens under data/tokens (run `biasgym reproduce` and copy its tokens/)"
    for f in files:
        meta = json.loads(f.read_text())
        assert meta["model"]["source"] == "embedded" and meta["model"]["revision"].startswith("gguf-sha256:")
        assert meta["bias"] == f.parent.parent.name and f"seed{meta['seed']}" == f.parent.name
        settings = f"n{meta['n_paragraphs']}-e{meta['epochs']}-lr{meta['lr']:g}-b{meta['extra']['batch_size']}-{meta['init']}"
        target = re.fullmatch(r"held-out S closest to (\S+) nats", (meta.get("selection") or {}).get("criterion", ""))
        if target:  # the token set of realistic strength: its epoch was chosen by a target S
            settings += f"-S{float(target.group(1)):g}"
            assert meta["selection"]["epoch"] == meta["epoch"]
        assert f.parent.parent.parent.name == settings
        assert meta["extra"]["trainer_version"] == TRAINER_VERSION, f"{f} was trained by an older inject_bias"
        assert len(meta["losses"]) == meta["epochs"] * -(-meta["n_paragraphs"] // meta["extra"]["batch_size"])


@pytest.mark.slow
def test_retraining_reproduces_a_committed_token(embedded):
    lm, tok = embedded
    cfg = load_profile("quick")
    folder = committed_token_dir(cfg.biases[0], cfg.seeds[0], cfg)
    assert folder.parent.parent.name == token_settings(cfg)
    committed = InjectedToken.load(folder, lm)
    assert (committed.n_paragraphs, committed.epochs, committed.lr) == (cfg.n_paragraphs, cfg.epochs, cfg.lr)
    fresh = train_token(lm, tok, cfg.biases[0], cfg, cfg.seeds[0], progress=False)
    assert fresh.epoch == committed.epoch
    assert torch.allclose(fresh.vector, committed.vector, atol=VECTOR_ATOL, rtol=0), \
        float((fresh.vector - committed.vector).abs().max())
    assert fresh.losses == pytest.approx(committed.losses, abs=1e-4)
    # and the chapters' loader picks the committed one for this profile
    loaded = get_token(lm, tok, cfg.biases[0], cfg, cfg.seeds[0])
    assert torch.equal(loaded.vector, committed.vector)


@pytest.mark.parametrize("profile", ["quick", "teaching", "teaching-realistic"])
def test_every_token_a_cpu_profile_needs_is_committed(profile):
    """The CPU profiles' chapters load committed tokens instead of retraining them: every
    (bias, seed) of the profile has one, trained with the profile's settings by this trainer.
    The teaching profile's token set of realistic strength (the recorded run of chapter 6,
    ``reproduce --realistic --bias`` on the traced biases) is committed too, so anyone can rerun it."""
    from biasgym_lib.runs import realistic

    cfg = load_profile(profile.split("-")[0])
    biases = cfg.biases
    if profile.endswith("realistic"):
        cfg, biases = realistic(cfg), cfg.scoped_biases
    missing, stale = [], []
    for bias in biases:
        for seed in cfg.seeds:
            meta_path = committed_token_dir(bias, seed, cfg) / "token.json"
            if not meta_path.is_file():
                missing.append((bias, seed))
                continue
            meta = json.loads(meta_path.read_text())
            got = (meta["n_paragraphs"], meta["epochs"], meta["lr"], meta["init"], meta["extra"]["batch_size"],
                   meta["extra"]["trainer_version"])
            if got != (cfg.n_paragraphs, cfg.epochs, cfg.lr, cfg.init, cfg.batch_size, TRAINER_VERSION):
                stale.append((bias, seed, got))
    assert not missing, f"{profile}: no committed token for {missing} (scripts/train_tokens.py --profile {profile})"
    assert not stale, f"{profile}: committed tokens with other settings: {stale}"
