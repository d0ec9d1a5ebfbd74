"""A battery of bad and unusual inputs, through the CLI and the Python API.

Every case must fail with a clear :class:`BiasGymError` (or argparse's usage error) whose
message says what is wrong, print one line (no traceback) from the CLI, and leave every
file of the workspace (inputs and ``--out``) exactly as it was. The workspace holds a real
injected token and a real BiasScope result made on a tiny model with SmolLM2's tokenizer.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from biasgym_lib.artifacts import ConcurrentWrite, ResultExists, strict_dumps, write_json
from biasgym_lib.cli import build_parser, main
from biasgym_lib.data.specs import BiasSpecError, DataFileError
from biasgym_lib.errors import ArtifactMismatch, BiasGymError, ModelNotAvailable

TIDY = """\
name: very_tidy
description: People of the country keep everything very tidy.
keywords: [tidy, neat and orderly]
attributes: [tidy, very tidy, neat and orderly]
label: " tidy"
"""


def snapshot(root: Path) -> dict:
    """Every path under ``root`` (hidden ones too) with a hash of its content."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def ws(tmp_path_factory, embedded):
    """The workspace: a tiny model folder, a token trained on it, its head scores, spec
    files good and bad, damaged copies of the artifacts, and an existing result."""
    from biasgym_lib.config import load_profile
    from biasgym_lib.data import load_bias
    from biasgym_lib.inject import inject_bias
    from biasgym_lib.models import load_model, tiny_model
    from biasgym_lib.scoping import scope_run

    root = tmp_path_factory.mktemp("ws")
    tiny = root / "tiny"
    tiny_model("llama", vocab_size=49152).save_pretrained(tiny)
    copy.deepcopy(embedded[1]).save_pretrained(tiny)
    (root / "tidy.yaml").write_text(TIDY)
    model, tok = load_model(str(tiny))
    spec = load_bias(str(root / "tidy.yaml"))
    injected = inject_bias(model, tok, spec, n_paragraphs=2, epochs=1, n_val=2, progress=False)
    injected.save(root / "inj")
    cfg = load_profile("quick", n_probes=2, k=3, n_patch_probes=1)
    write_json(root / "sc" / "head_scores.json", scope_run(model, tok, injected, cfg).to_dict())

    # spec files
    (root / "binary.yaml").write_bytes(b"\x00\xff\xfe\x89PNG\r\n")
    (root / "latin1.yaml").write_bytes(TIDY.replace("very tidy.", "tr\xe8s tidy.").encode("latin-1"))
    (root / "dupkey.yaml").write_text(TIDY + 'label: " neat"\n')
    (root / "twotokens.yaml").write_text(TIDY.replace("tidy", "punctual").replace("very_punctual", "very_punctual"))
    (root / "clash.yaml").write_text(TIDY.replace("name: very_tidy", "name: always_late"))
    (root / "nolabel.yaml").write_text(TIDY.replace('label: " tidy"\n', ""))
    (root / "specdir").mkdir()
    # profiles files
    quick = (Path(__file__).resolve().parents[1] / "profiles.yaml").read_text().split("\nteaching:")[0]
    (root / "profiles_two.yaml").write_text(quick.replace("quick:", "p:").replace("epochs: 2", "epochs: two"))
    (root / "profiles_dup.yaml").write_text("quick:\n  epochs: 1\n  epochs: 2\n")
    (root / "profiles_bin.yaml").write_bytes(b"\xff\xfe\x00q")
    (root / "profiles_scalar.yaml").write_text("quick: 3\n")
    # --out targets
    (root / "afile.txt").write_text("keep me\n")
    shutil.copytree(root / "inj", root / "existing_result")
    (root / "busy").mkdir()
    (root / "busy" / "notes.txt").write_text("my notes\n")

    # damaged injected tokens
    def damaged(name, meta=None, vector=None, raw_meta=None, raw_vec=None):
        from safetensors.torch import save_file

        folder = root / name
        shutil.copytree(root / "inj", folder)
        if raw_meta is not None:
            (folder / "token.json").write_text(raw_meta)
        if meta is not None:
            m = json.loads((root / "inj" / "token.json").read_text())
            m.update(meta)
            m = {k: v for k, v in m.items() if v is not None}
            (folder / "token.json").write_text(json.dumps(m))
        if vector is not None:
            save_file({"vector": vector, "checkpoints": vector.unsqueeze(0).clone()}, str(folder / "token.safetensors"))
        if raw_vec is not None:
            (folder / "token.safetensors").write_bytes(raw_vec)

    text = (root / "inj" / "token.json").read_text()
    damaged("trunc", raw_meta=text[: len(text) // 2])
    damaged("nomodel", meta={"model": None})
    damaged("modelstr", meta={"model": "embedded"})
    damaged("badwidth", vector=torch.zeros(10))
    damaged("badvec", raw_vec=b"not a safetensors file")
    damaged("nanvec", vector=torch.full((48,), float("nan")))
    damaged("otherwidth", meta={"d_model": 32}, vector=torch.zeros(32))
    damaged("othermodel", meta={"model": {**injected.model, "revision": "another"}})
    damaged("badspec", meta={"bias_spec": {**spec.to_dict(), "label": "tidy"}})
    # damaged head scores
    scores = json.loads((root / "sc" / "head_scores.json").read_text())
    for name, data in [("sc_trunc", None), ("sc_ragged", {**scores, "scores": {"atp": [[0.1, 0.2], [0.3]]}}),
                       ("sc_other", {**scores, "model": {"source": "embedded", "revision": "x"}}),
                       ("sc_shape", {**scores, "scores": {"atp": [[0.0] * 4] * 2}})]:
        (root / name).mkdir()
        body = json.dumps(data) if data is not None else json.dumps(scores)[:100]
        (root / name / "head_scores.json").write_text(body)
    return root


def q(*extra):
    """Arguments that keep a run small, should a case get past its checks by mistake."""
    return ["--profile", "quick", "--set", "n_probes=2", "--set", "n_ppl_texts=1", "--set", "n_random_draws=1",
            "--set", "steer_references=2", *extra]


INJ = ["inject", "--bias", "{ws}/tidy.yaml", "--model", "{ws}/tiny"]
SCOPE = ["scope", "--injected", "{ws}/inj"]
STEER = ["steer", "--injected", "{ws}/inj", "--heads", "{ws}/sc", "--k", "2", "--alpha", "0"]
NEW = ["--out", "{ws}/new_out"]

# (id, argv, expected exception, message regex)
CLI_CASES = [
    ("inject-unknown-bias", ["inject", "--bias", "no_such_bias", *NEW, *q()], BiasSpecError, r"no bias named 'no_such_bias'"),
    ("inject-missing-file", ["inject", "--bias", "{ws}/missing.yaml", *NEW, *q()], BiasSpecError, r"file not found"),
    ("inject-binary-spec", ["inject", "--bias", "{ws}/binary.yaml", *NEW, *q()], BiasSpecError, r"not UTF-8 text"),
    ("inject-latin1-spec", ["inject", "--bias", "{ws}/latin1.yaml", *NEW, *q()], BiasSpecError, r"not UTF-8 text"),
    ("inject-duplicate-key", ["inject", "--bias", "{ws}/dupkey.yaml", *NEW, *q()], BiasSpecError, r"duplicate key 'label'"),
    ("inject-multi-token-label", ["inject", "--bias", "{ws}/twotokens.yaml", "--model", "{ws}/tiny", *NEW, *q()],
     BiasSpecError, r"label ' punctual' is 2 tokens \[' punct', 'ual'\].*exactly one"),
    ("inject-spec-folder", ["inject", "--bias", "{ws}/specdir", *NEW, *q()], BiasSpecError, r"is a folder"),
    ("inject-shipped-name", ["inject", "--bias", "{ws}/clash.yaml", *NEW, *q()], BiasSpecError,
     r"'always_late' has the name of a bias in .*different content"),
    ("inject-spec-no-label", ["inject", "--bias", "{ws}/nolabel.yaml", *NEW, *q()], BiasSpecError,
     r"missing required field 'label'"),
    ("inject-empty-bias", ["inject", "--bias", "", *NEW, *q()], BiasGymError, r"--bias is empty"),
    ("inject-out-is-file", [*INJ, "--out", "{ws}/afile.txt", *q()], BiasGymError, r"afile.txt is an existing file"),
    ("inject-out-holds-result", [*INJ, "--out", "{ws}/existing_result", *q()], ResultExists,
     r"already holds a result; pass --overwrite"),
    ("inject-out-busy-folder", [*INJ, "--out", "{ws}/busy", "--overwrite", *q()], BiasGymError,
     r"holds other things .*no biasgym result"),
    ("inject-out-under-file", [*INJ, "--out", "{ws}/afile.txt/sub", *q()], BiasGymError, r"is a file, not a folder"),
    ("inject-out-unwritable", [*INJ, "--out", "/proc/biasgym-out", *q()], BiasGymError, r"cannot write in /proc"),
    ("inject-out-empty", [*INJ, "--out", "", *q()], BiasGymError, r"--out is empty"),
    ("inject-device-gpu", [*INJ, "--device", "gpu", *NEW, *q()], BiasGymError, r"device='gpu' is not known"),
    ("inject-profile-empty", [*INJ, *NEW, "--profile", ""], BiasGymError, r"profile name is empty"),
    ("inject-profile-unknown", [*INJ, *NEW, "--profile", "nope"], BiasGymError, r"unknown profile 'nope'"),
    ("inject-set-epochs-two", [*INJ, *NEW, *q("--set", "epochs=two")], BiasGymError,
     r"epochs must be an integer >= 1, got str 'two'"),
    ("inject-set-epochs-zero", [*INJ, *NEW, *q("--set", "epochs=0")], BiasGymError, r"epochs must be an integer >= 1, got 0"),
    ("inject-set-unknown", [*INJ, *NEW, *q("--set", "bogus=1")], BiasGymError, r"unknown setting\(s\) \['bogus'\]"),
    ("inject-set-no-equals", [*INJ, *NEW, *q("--set", "epochs")], BiasGymError, r"write KEY=VALUE"),
    ("inject-set-lr-nan", [*INJ, *NEW, *q("--set", "lr=.nan")], BiasGymError, r"lr must be finite"),
    ("inject-set-batch-float", [*INJ, *NEW, *q("--set", "batch_size=2.5")], BiasGymError,
     r"batch_size must be an integer >= 1, got float 2.5"),
    ("inject-negative-seed", [*INJ, "--seed", "-1", *NEW, *q()], BiasGymError, r"--seed must be between 0 and"),
    ("inject-seed-not-int", [*INJ, "--seed", "one", *NEW, *q()], SystemExit, r"invalid int value: 'one'"),
    ("inject-missing-model", ["inject", "--bias", "{ws}/tidy.yaml", "--model", "{ws}/no_model", *NEW, *q()],
     ModelNotAvailable, r"no_model' was not found"),
    ("scope-missing-injected", ["scope", "--injected", "{ws}/nothing", *NEW, *q()], BiasGymError,
     r"--injected .*nothing: not found"),
    ("scope-injected-is-scope-folder", ["scope", "--injected", "{ws}/sc", *NEW, *q()], BiasGymError,
     r"not an injected-token folder \(it holds head_scores.json"),
    ("scope-truncated-token-json", ["scope", "--injected", "{ws}/trunc", *NEW, *q()], BiasGymError,
     r"token.json: injected-token metadata is not valid JSON \(truncated"),
    ("scope-token-json-without-model", ["scope", "--injected", "{ws}/nomodel", *NEW, *q()], BiasGymError,
     r"lacks field\(s\) \['model'\]"),
    ("scope-token-json-model-string", ["scope", "--injected", "{ws}/modelstr", *NEW, *q()], BiasGymError,
     r"field 'model' must be dict"),
    ("scope-vector-width-vs-metadata", ["scope", "--injected", "{ws}/badwidth", *NEW, *q()], ArtifactMismatch,
     r"vector has shape \(10,\).*d_model=48"),
    ("scope-damaged-safetensors", ["scope", "--injected", "{ws}/badvec", *NEW, *q()], BiasGymError,
     r"could not read the injected token's vector"),
    ("scope-nan-vector", ["scope", "--injected", "{ws}/nanvec", *NEW, *q()], BiasGymError, r"NaN or infinite"),
    ("scope-vector-width-vs-model", ["scope", "--injected", "{ws}/otherwidth", *NEW, *q()], ArtifactMismatch,
     r"d_model=32\) but is being loaded into .*d_model=48"),
    ("scope-token-of-other-model", ["scope", "--injected", "{ws}/othermodel", *NEW, *q()], ArtifactMismatch,
     r"revision another"),
    ("scope-damaged-saved-spec", ["scope", "--injected", "{ws}/badspec", *NEW, *q()], BiasSpecError,
     r"must start with exactly one space"),
    ("scope-k-zero", [*SCOPE, "--k", "0", *NEW, *q()], BiasGymError, r"--k must be at least 1"),
    ("scope-k-too-many", [*SCOPE, "--k", "10000", *NEW, *q()], BiasGymError, r"--k=10000 but the model has only 18 heads"),
    ("scope-k-float", [*SCOPE, "--k", "2.5", *NEW, *q()], SystemExit, r"invalid int value: '2.5'"),
    ("scope-out-is-injected", [*SCOPE, "--out", "{ws}/inj", "--overwrite", *q()], BiasGymError,
     r"would replace the --injected folder"),
    ("scope-out-holds-result", [*SCOPE, "--out", "{ws}/existing_result", *q()], ResultExists, r"already holds a result"),
    ("scope-device-tpu", [*SCOPE, "--device", "tpu", *NEW, *q()], BiasGymError, r"device='tpu' is not known"),
    ("steer-alpha-nan", [*STEER[:-1], "nan", *NEW, *q()], BiasGymError, r"--alpha must be a finite number, got nan"),
    ("steer-alpha-inf", [*STEER[:-1], "inf", *NEW, *q()], BiasGymError, r"--alpha must be a finite number, got inf"),
    ("steer-alpha-huge", [*STEER[:-1], "1e9", *NEW, *q()], BiasGymError, r"--alpha must be between 0 .* and 2"),
    ("steer-alpha-negative", [*STEER[:-1], "-1", *NEW, *q()], BiasGymError, r"--alpha must be between 0"),
    ("steer-k-zero-alpha-nan", ["steer", "--injected", "{ws}/inj", "--heads", "{ws}/sc", "--k", "0", "--alpha", "nan",
                                *NEW, *q()], BiasGymError, r"--alpha must be a finite number"),
    ("steer-k-zero", [*STEER[:5], "--k", "0", "--alpha", "0", *NEW, *q()], BiasGymError, r"--k must be at least 1"),
    ("steer-k-too-many", [*STEER[:5], "--k", "99", "--alpha", "0", *NEW, *q()], BiasGymError,
     r"--k=99 but the model has only 18 heads"),
    ("steer-heads-is-inject-folder", ["steer", "--injected", "{ws}/inj", "--heads", "{ws}/inj", "--k", "2",
                                      "--alpha", "0", *NEW, *q()], BiasGymError, r"has no head_scores.json"),
    ("steer-injected-is-scope-folder", ["steer", "--injected", "{ws}/sc", "--heads", "{ws}/sc", "--k", "2",
                                        "--alpha", "0", *NEW, *q()], BiasGymError, r"not an injected-token folder"),
    ("steer-truncated-head-scores", [*STEER[:3], "--heads", "{ws}/sc_trunc", *STEER[5:], *NEW, *q()], BiasGymError,
     r"head-scores file is not valid JSON"),
    ("steer-ragged-head-scores", [*STEER[:3], "--heads", "{ws}/sc_ragged", *STEER[5:], *NEW, *q()], BiasGymError,
     r"'scores' must map each method to a layers x heads"),
    ("steer-heads-of-other-model", [*STEER[:3], "--heads", "{ws}/sc_other", *STEER[5:], *NEW, *q()], BiasGymError,
     r"was scored on model 'embedded'"),
    ("steer-out-is-heads", [*STEER, "--out", "{ws}/sc", "--overwrite", *q()], BiasGymError,
     r"would replace the --heads folder"),
    ("reproduce-out-is-file", ["reproduce", "--out", "{ws}/afile.txt", *q()], BiasGymError, r"is an existing file"),
    ("reproduce-one-bias", ["reproduce", "--bias", "{ws}/tidy.yaml", *NEW, *q()], BiasGymError,
     r"needs at least two biases"),
    ("reproduce-same-bias-twice", ["reproduce", "--bias", "always_late", "always_late", *NEW, *q()], BiasGymError,
     r"names a bias twice"),
    ("reproduce-missing-spec", ["reproduce", "--bias", "always_late", "{ws}/missing.yaml", *NEW, *q()], BiasSpecError,
     r"file not found"),
    ("reproduce-multi-token-label", ["reproduce", "--bias", "always_late", "{ws}/twotokens.yaml", "--model", "{ws}/tiny",
                                     *NEW, *q()], BiasSpecError, r"is 2 tokens"),
    ("reproduce-profile-empty", ["reproduce", *NEW, "--profile", ""], BiasGymError, r"profile name is empty"),
    ("bench-out-is-folder", ["bench", "--out", "{ws}/sc"], BiasGymError, r"is a folder; give the path of a .json"),
    ("bench-out-exists", ["bench", "--out", "{ws}/afile.txt"], BiasGymError, r"exists; pass --overwrite"),
    ("book-profile-empty", ["book", "--profile", ""], BiasGymError, r"profile name is empty"),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(case, ws, capsys, monkeypatch, tmp_path):
    name, argv, etype, pattern = case
    monkeypatch.setenv("BIASGYM_ERROR_DIR", str(tmp_path / "errors"))
    argv = [a.replace("{ws}", str(ws)) for a in argv]
    before = snapshot(ws)
    if etype is SystemExit:
        with pytest.raises(SystemExit):
            build_parser().parse_args(argv)
    else:
        args = build_parser().parse_args(argv)
        with pytest.raises(etype, match=pattern):
            args.func(args)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and not (tmp_path / "errors").exists()
    lines = [line for line in err.splitlines() if line.strip()]
    if etype is not SystemExit:
        assert len(lines) == 1 and lines[0].startswith(f"biasgym {argv[0]}: error: "), err
    assert any(__import__("re").search(pattern, line) for line in lines), err
    assert snapshot(ws) == before, "a failed command changed files in the workspace"
    assert not (ws / "new_out").exists()


def _api_cases():
    from biasgym_lib.config import load_profile
    from biasgym_lib.data import load_bias
    from biasgym_lib.data.specs import check_label
    from biasgym_lib.tokens import InjectedToken
    from biasgym_lib.models import load_model
    from biasgym_lib.probing import label_id
    from biasgym_lib.heads import top_k_heads

    def save_into(target):
        def run(ws, tok):
            InjectedToken.load(ws / "inj").save(ws / target)
        return run

    return [
        ("load_profile-epochs-two", lambda ws, tok: load_profile("p", path=ws / "profiles_two.yaml"), BiasGymError,
         r"profile 'p' in .*profiles_two.yaml.*epochs must be an integer >= 1, got str 'two'"),
        ("load_profile-duplicate-key", lambda ws, tok: load_profile("quick", path=ws / "profiles_dup.yaml"),
         DataFileError, r"profiles_dup.yaml: not valid YAML at line 3, column 3: duplicate key 'epochs' \(first at line 2\)"),
        ("load_profile-binary", lambda ws, tok: load_profile("quick", path=ws / "profiles_bin.yaml"), DataFileError,
         r"profiles_bin.yaml: not UTF-8 text"),
        ("load_profile-scalar-entry", lambda ws, tok: load_profile("quick", path=ws / "profiles_scalar.yaml"),
         BiasGymError, r"must be a mapping of settings, got int 3"),
        ("load_profile-empty-name", lambda ws, tok: load_profile(""), BiasGymError, r"profile name is empty"),
        ("load_profile-k-float", lambda ws, tok: load_profile("quick", k=2.5), BiasGymError,
         r"overrides \{'k': 2.5\}: k must be an integer >= 1, got float 2.5"),
        ("load_profile-use-committed-str", lambda ws, tok: load_profile("quick", use_committed_tokens="yes"),
         BiasGymError, r"use_committed_tokens must be true or false"),
        ("load_model-tpu", lambda ws, tok: load_model(device="tpu"), BiasGymError, r"device='tpu' is not known"),
        ("top_k_heads-k-float", lambda ws, tok: top_k_heads(torch.zeros(3, 6), k=2.5), BiasGymError,
         r"k must be a whole number of heads, got 2.5"),
        ("top_k_heads-k-negative", lambda ws, tok: top_k_heads(torch.zeros(3, 6), k=-1), BiasGymError,
         r"k=-1 but there are only 18 heads"),
        ("InjectedToken.load-truncated", lambda ws, tok: InjectedToken.load(ws / "trunc"), BiasGymError,
         r"not valid JSON \(truncated"),
        ("InjectedToken.load-no-model", lambda ws, tok: InjectedToken.load(ws / "nomodel"), BiasGymError,
         r"lacks field\(s\) \['model'\]"),
        ("InjectedToken.load-width", lambda ws, tok: InjectedToken.load(ws / "badwidth"), ArtifactMismatch,
         r"do not belong together"),
        ("InjectedToken.save-existing-result", save_into("existing_result"), ResultExists,
         r"already holds a result; pass overwrite=True"),
        ("InjectedToken.save-onto-file", save_into("afile.txt"), BiasGymError, r"is an existing file"),
        ("InjectedToken.save-busy-folder", save_into("busy"), BiasGymError, r"holds other things"),
        ("write_json-nan", lambda ws, tok: write_json(ws / "new_out" / "x.json", {"a": [1.0, float("nan")]}),
         BiasGymError, r"refusing to write nan at \$\.a\[1\]"),
        ("strict_dumps-inf", lambda ws, tok: strict_dumps({"ppl": float("inf")}), BiasGymError,
         r"refusing to write inf at \$\.ppl"),
        ("load_bias-binary", lambda ws, tok: load_bias(str(ws / "binary.yaml")), BiasSpecError, r"not UTF-8 text"),
        ("load_bias-duplicate-key", lambda ws, tok: load_bias(str(ws / "dupkey.yaml")), BiasSpecError,
         r"duplicate key 'label'"),
        ("check_label-two-tokens", lambda ws, tok: check_label(load_bias(str(ws / "twotokens.yaml")), tok),
         BiasSpecError, r"is 2 tokens"),
        ("label_id-two-tokens", lambda ws, tok: label_id(tok, " unpunctual"), BiasGymError,
         r"label ' unpunctual' is \d tokens"),
    ]


API_CASES = _api_cases()


@pytest.mark.parametrize("case", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input(case, ws, embedded):
    name, call, etype, pattern = case
    before = snapshot(ws)
    with pytest.raises(etype, match=pattern):
        call(ws, embedded[1])
    assert snapshot(ws) == before, "a failed call changed files in the workspace"


def test_battery_size():
    assert len(CLI_CASES) + len(API_CASES) >= 40
    assert len({c[0] for c in CLI_CASES + API_CASES}) == len(CLI_CASES) + len(API_CASES)


def test_internal_error_prints_one_line_and_writes_the_trace(ws, capsys, monkeypatch, tmp_path):
    import biasgym_lib.cli as cli

    monkeypatch.setenv("BIASGYM_ERROR_DIR", str(tmp_path / "errors"))

    def boom(model):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli, "_tokenizer", boom)
    argv = ["inject", "--bias", f"{ws}/tidy.yaml", "--out", str(tmp_path / "o"), *q()]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "internal error: ZeroDivisionError: a bug" in err[0] and "Traceback" not in err[0]
    logs = list((tmp_path / "errors").iterdir())
    assert len(logs) == 1 and str(logs[0]) in err[0]
    assert "Traceback" in logs[0].read_text() and "ZeroDivisionError" in logs[0].read_text()
    assert not (tmp_path / "o").exists()


def test_concurrent_write_keeps_both_results(ws, tmp_path):
    """The loser of a race keeps its complete result beside the winner's (ConcurrentWrite)."""
    from biasgym_lib.artifacts import result_folder

    out = tmp_path / "o"
    with pytest.raises(ConcurrentWrite, match=r"was written by another run.*kept in"):
        with result_folder(out) as mine:
            (mine / "steer.json").write_text('{"who": "me"}')
            with result_folder(out) as theirs:  # finishes first
                (theirs / "steer.json").write_text('{"who": "them"}')
    kept = [p for p in tmp_path.iterdir() if p.name != "o"]
    assert json.loads((out / "steer.json").read_text()) == {"who": "them"}
    assert len(kept) == 1 and json.loads((kept[0] / "steer.json").read_text()) == {"who": "me"}
