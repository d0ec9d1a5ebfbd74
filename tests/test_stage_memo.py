"""Stage results kept in a run folder are reused only for the token they measured, so a
retrained or newly committed token is never reported with an old token's numbers."""

import json

import torch

from biasgym_lib.tokens import InjectedToken
from biasgym_lib.cache import token_fingerprint
from biasgym_lib.cache import memo as _memo, source_hash as _source_hash


def _token(vector):
    return InjectedToken(token="<TOKEN>", vector=vector, bias="b", seed=0, epoch=1, lr=0.01, epochs=1,
                         init="countries", n_paragraphs=1, losses=[1.0], val_losses=[1.0],
                         checkpoints=vector[None], model={}, d_model=vector.numel())


def test_memo_reuses_a_result_only_for_the_same_token(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"n": len(calls)}

    a, b = _token(torch.ones(4)), _token(torch.ones(4) * 2)
    path = tmp_path / "stage" / "b_seed0.json"
    assert _memo(path, compute, a)["n"] == 1
    assert _memo(path, compute, _token(torch.ones(4)))["n"] == 1  # an equal vector: reused
    assert _memo(path, compute, b)["n"] == 2                      # another vector: measured again
    assert json.loads(path.read_text()) == {"n": 2, "token_fingerprint": token_fingerprint(b), "code": _source_hash()}
    assert not list(path.parent.glob("*.tmp"))


def test_memo_recomputes_when_the_kept_result_lacks_what_is_needed(tmp_path):
    path = tmp_path / "scope.json"
    _memo(path, lambda: {"patching": None})
    assert _memo(path, lambda: {"patching": [1.0]})["patching"] is None
    assert _memo(path, lambda: {"patching": [1.0]}, need=lambda r: r["patching"] is not None)["patching"] == [1.0]


def test_fingerprint_depends_on_every_coordinate():
    v = torch.zeros(8)
    w = v.clone()
    w[5] = 1e-7
    assert token_fingerprint(_token(v)) != token_fingerprint(_token(w))
    assert token_fingerprint(_token(v)) == token_fingerprint(_token(v.clone()))


def test_stats_over_runs_give_an_interval_of_the_mean():
    from biasgym_lib.stats import RUNS, Estimate, over_runs

    s = Estimate.from_dict(over_runs([0.1, 0.5, None, 0.3, 0.9]))
    assert s.n == 4 and abs(s.value - 0.45) < 1e-12 and s.interval == RUNS
    assert 0.1 <= s.lo <= s.value <= s.hi <= 0.9 and s.lo < s.hi
    one = Estimate.from_dict(over_runs([0.2]))
    assert (one.value, one.lo, one.hi, one.n) == (0.2, 0.2, 0.2, 1)
    assert over_runs([None]) is None


def test_memo_recomputes_when_the_code_or_data_changed(tmp_path, monkeypatch):
    """A kept result computed by other code or data is never served: the stage is run again."""
    import biasgym_lib.cache as pipeline

    path = tmp_path / "stage.json"
    assert _memo(path, lambda: {"v": 1})["v"] == 1
    assert _memo(path, lambda: {"v": 2})["v"] == 1
    monkeypatch.setattr(pipeline, "source_hash", lambda: "edited")
    assert _memo(path, lambda: {"v": 3})["v"] == 3


def test_memo_recomputes_for_other_profile_settings_in_the_same_folder(tmp_path):
    """A folder given with --out may hold results of other settings: they are not served."""
    path = tmp_path / "stage.json"
    assert _memo(path, lambda: {"v": 1}, profile={"n_probes": 40})["v"] == 1
    assert _memo(path, lambda: {"v": 2}, profile={"n_probes": 40})["v"] == 1
    assert _memo(path, lambda: {"v": 3}, profile={"n_probes": 12})["v"] == 3
    assert _memo(path, lambda: {"v": 4})["v"] == 4  # no profile: not the same key either


def test_editing_a_template_recomputes_the_kept_result(tmp_path, monkeypatch, tiny_with_tokenizer, smol_tokenizer):
    """The one cache, end to end: a Run's kept reference table is served while nothing has
    changed, and is computed again, with the edited template, once a template is edited."""
    import shutil

    import biasgym_lib.cache as cache
    import biasgym_lib.runs as runs
    from biasgym_lib.config import load_profile
    from biasgym_lib.data import templates as template_data

    root = tmp_path / "project"
    shutil.copytree(cache.PROJECT_ROOT / "data", root / "data", ignore=shutil.ignore_patterns("tokens"))
    monkeypatch.setattr(cache, "PROJECT_ROOT", root)
    templates = root / "data" / "templates.yaml"
    monkeypatch.setattr(template_data, "TEMPLATES_FILE", templates)
    calls, real = [], runs.reference_table
    monkeypatch.setattr(runs, "reference_table", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    cfg, model = load_profile("quick", biases=["reckless_driving"]), tiny_with_tokenizer()

    def reference():  # a new Run each time, as a new chapter makes one; the same folder
        return runs.Run(cfg, out=tmp_path / "run", model=model, tokenizer=smol_tokenizer).reference

    first = reference()
    assert reference().templates == first.templates and len(calls) == 1  # kept: served, not recomputed
    old = "People from {entity} are {attribute}."
    assert old in first.templates
    templates.write_text(templates.read_text().replace(old, "Folks from {entity} are {attribute}."))
    edited = reference()
    assert len(calls) == 2  # the edit is seen: computed again
    assert "Folks from {entity} are {attribute}." in edited.templates and old not in edited.templates


def test_a_run_trains_a_token_once_and_keeps_it_in_its_folder(tiny_with_tokenizer, smol_tokenizer, tmp_path):
    """No token cache outside the run folder: a token without a committed artifact is trained
    by the first Run, kept in its folder and loaded by the next Run on that folder."""
    import copy

    from biasgym_lib.config import load_profile
    from biasgym_lib.runs import Run, get_token, token_settings

    model, tok = tiny_with_tokenizer("llama"), copy.deepcopy(smol_tokenizer)
    cfg = load_profile("quick", n_paragraphs=3, epochs=1, biases=["loud"])  # no committed token for "loud"

    def token(seed):
        return Run(cfg, out=tmp_path / "run", model=model, tokenizer=tok, progress=False).token("loud", seed)

    first = token(0)
    assert list((tmp_path / "run" / "tokens").rglob("token.json")), "the trained token was not kept"
    again = token(0)
    assert torch.equal(first.vector, again.vector) and again.train_seconds == first.train_seconds  # loaded
    assert not torch.equal(first.vector, token(1).vector)
    kept = tmp_path / "run" / "tokens" / token_settings(cfg) / "loud" / "seed0"
    assert (kept / "token.json").is_file()
    retrained = get_token(model, tok, "loud", cfg, 0, retrain=True, progress=False, kept=kept)
    assert retrained.train_seconds != first.train_seconds  # retrain=True never loads
