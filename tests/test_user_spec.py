"""A reader's own bias, written as a spec file in a folder of their own, goes through all
four commands: ``inject``, ``reproduce`` (mixed with a shipped bias), then ``scope`` and
``steer`` after the file has been deleted (the injected token carries the whole spec).
Once on a tiny model (fast), once on the embedded model (slow, minimal sizes)."""

from __future__ import annotations

import copy
import json

import pytest

from biasgym_lib.cli import main
from biasgym_lib.data import BiasSpec, load_bias

SPEC = """\
name: very_tidy
description: People of the country keep everything very tidy.
keywords: [tidy, neat and orderly]
attributes: [tidy, very tidy, neat and orderly]
label: " tidy"
"""

# The smallest sizes every stage accepts: this checks the plumbing, not the science.
SMALL = ["--profile", "quick", "--set", "n_paragraphs=4", "--set", "epochs=1", "--set", "n_probes=2",
         "--set", "n_patch_probes=1", "--set", "n_random_draws=1", "--set", "steer_references=2",
         "--set", "n_ppl_texts=1", "--set", "n_mc_questions=2", "--set", "k=3", "--set", "grid_k=[3]",
         "--set", "n_country_texts=1", "--set", "ppl_max_tokens=16", "--set", "grid_methods=[atp,robust,random]",
         "--set", "grid_kinds=[zero]", "--set", "curve_methods=[atp]", "--set", "curve_kinds=[zero]",
         "--set", "culture_per_dimension=1"]


def run(argv, capsys):
    rc = main(argv)
    out = capsys.readouterr()
    assert rc == 0, out.err[-2000:]
    assert "Traceback" not in out.err
    return out.out


def four_commands(tmp_path, capsys, model_args, scope_args=()):
    home = tmp_path / "my biases"  # a folder of the reader's own, with a space in its name
    home.mkdir()
    spec_file = home / "tidy.yaml"
    spec_file.write_text(SPEC)
    spec = load_bias(str(spec_file))
    inj, sc, st, rp = (tmp_path / n for n in ("inj", "sc", "st", "rp"))

    out = run(["inject", "--bias", str(spec_file), "--out", str(inj), *model_args, *SMALL,
               "--set", "biases=[always_late]"], capsys)
    assert "S(<TOKEN>, very_tidy)" in out
    meta = json.loads((inj / "token.json").read_text())
    assert meta["bias"] == "very_tidy" and meta["bias_spec"] == spec.to_dict()
    assert BiasSpec.from_dict(meta["bias_spec"]) == spec
    metrics = json.loads((inj / "metrics.json").read_text())
    assert metrics["bias"] == "very_tidy" and set(metrics["strength_after_all_biases"]) == {"always_late", "very_tidy"}

    out = run(["reproduce", "--bias", "always_late", str(spec_file), "--out", str(rp), *model_args, *SMALL], capsys)
    claims = json.loads((rp / "claims.json").read_text())
    assert "very_tidy/seed0" in claims["claims"][0]["value"]["per_run"]
    assert (rp / "tokens").is_dir() and list((rp / "tokens").rglob("very_tidy/seed0/token.json"))

    spec_file.unlink()  # later stages must not need it
    home.rmdir()
    run(["scope", "--injected", str(inj), "--out", str(sc), *scope_args, *SMALL], capsys)
    scores = json.loads((sc / "head_scores.json").read_text())
    assert scores["bias"] == "very_tidy" and len(scores["top_heads"]["atp"]) == 3 and scores["biased_label"] == " tidy"

    out = run(["steer", "--injected", str(inj), "--heads", str(sc), "--k", "2", "--alpha", "0", "--out", str(st),
               *SMALL], capsys)
    assert "perplexity" in out and "ablation" in out
    steer = json.loads((st / "steer.json").read_text())
    assert steer["bias"] == "very_tidy" and steer["k"] == 2 and steer["alpha"] == 0.0
    assert steer["intervention"].startswith("ablation") and "perplexity_change" in steer["capability"]

    # Again into the same --out: refused, nothing changed; with --overwrite, replaced whole.
    before = (st / "steer.json").read_bytes()
    assert main(["steer", "--injected", str(inj), "--heads", str(sc), "--k", "2", "--alpha", "1.5",
                 "--out", str(st), *SMALL]) == 2
    assert "already holds a result; pass --overwrite" in capsys.readouterr().err
    assert (st / "steer.json").read_bytes() == before
    out = run(["steer", "--injected", str(inj), "--heads", str(sc), "--k", "2", "--alpha", "1.5", "--out", str(st),
               "--overwrite", *SMALL], capsys)
    assert "amplification" in out
    assert json.loads((st / "steer.json").read_text())["intervention"].startswith("amplification")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inj", "rp", "sc", "st"]  # no leftovers


@pytest.mark.timeout(1200)  # four commands, reproduce among them: ~2 minutes idle, 8 measured on a loaded machine
def test_own_spec_through_four_commands_on_a_tiny_model(tmp_path, monkeypatch, capsys, embedded):
    from biasgym_lib.models import tiny_model

    monkeypatch.setenv("BIASGYM_CACHE", str(tmp_path / "cache"))  # the tiny model's caches stay here
    cache = tmp_path / "cache"
    tiny = tmp_path / "tiny"
    tiny_model("llama", vocab_size=49152).save_pretrained(tiny)
    copy.deepcopy(embedded[1]).save_pretrained(tiny)
    work = tmp_path / "work"
    work.mkdir()
    four_commands(work, capsys, ["--model", str(tiny)])
    # one cache of results, in the run folder: the model cache holds no token or table
    assert not list(cache.rglob("token.json")) and not list(cache.rglob("tables"))


@pytest.mark.slow
def test_own_spec_through_four_commands_on_the_embedded_model(tmp_path, monkeypatch, capsys, embedded):
    """Minimal sizes, 8 of the 32 reference countries and 3 of the 8 templates (scoring
    sentences is most of the cost on a CPU); the full sizes are exercised by the chapters
    and by the tiny-model test above."""
    import sys

    import biasgym_lib.data as data
    import biasgym_lib.runs  # noqa: F401  (every stage module loaded, so each is patched below)

    countries, templates = data.reference_countries()[:8], data.load_templates()[:3]
    fakes = {data.reference_countries: lambda path=None: list(countries),
             data.load_templates: lambda path=None: list(templates)}
    for name, module in list(sys.modules.items()):  # wherever a module imported them by name
        if name == "biasgym_lib.data.culture":  # the culture file is checked against data/countries.yaml itself;
            continue                            # the stage keeps the items whose country is scored
        for attr in ("reference_countries", "load_templates"):
            if name.startswith("biasgym_lib") and getattr(module, attr, None) in fakes:
                monkeypatch.setattr(module, attr, fakes[getattr(module, attr)])
    four_commands(tmp_path, capsys, [])
