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
    from biasgym_lib.measure import over_runs as _stats

    s = _stats([0.1, 0.5, None, 0.3, 0.9])
    assert s["n"] == 4 and abs(s["mean"] - 0.45) < 1e-12 and (s["min"], s["max"]) == (0.1, 0.9)
    assert s["min"] <= s["ci"][0] <= s["mean"] <= s["ci"][1] <= s["max"] and s["ci"][0] < s["ci"][1]
    assert _stats([0.2])["ci"] == [0.2, 0.2]
    assert _stats([None])["ci"] is None


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
