"""Results are written whole: never mixed, never half-written, never silently replaced,
and two writers racing for one folder leave complete, self-consistent results."""

from __future__ import annotations

import json
import multiprocessing as mp
import random
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_tensors

from biasgym_lib.artifacts import (ConcurrentWrite, ResultExists, read_files, read_json, result_folder,
                                   strict_dumps, write_json)
from biasgym_lib.errors import BiasGymError
from biasgym_lib.tokens import InjectedToken

TRIALS = 50
FILES = {"token.json", "token.safetensors", "metrics.json"}


def fake_token(bias: str, value: float, d: int = 8) -> InjectedToken:
    """A small token whose every part says which bias it is (vector filled with ``value``)."""
    return InjectedToken(token="<TOKEN>", vector=torch.full((d,), value), bias=bias, seed=0, epoch=1, lr=0.01,
                         epochs=1, init="countries", n_paragraphs=1, losses=[1.0], val_losses=[1.0],
                         checkpoints=torch.full((1, d), value), model={"source": "test", "revision": "r"},
                         d_model=d)


VALUES = {"bias_a": 1.0, "bias_b": 2.0, "bias_c": 3.0, "bias_d": 4.0}


def check_folder(folder: Path, listing: bool = True) -> str:
    """Assert ``folder`` is one complete, self-consistent injected-token result; its bias.
    Its files are read through one handle on the folder (as InjectedToken.load does), so
    a folder swapped in meanwhile cannot make a consistent pair look mixed. ``listing``:
    also check it holds nothing else (only meaningful while no writer is at work)."""
    if listing:
        names = {p.name for p in folder.iterdir()}
        assert names == FILES, sorted(names)
    raw = read_files(folder, sorted(FILES))
    meta = json.loads(raw["token.json"])  # readable, strict JSON
    metrics = json.loads(raw["metrics.json"])
    st_bias = safe_load_metadata(raw["token.safetensors"])["bias"]
    tensors = load_tensors(raw["token.safetensors"])
    bias = meta["bias"]
    assert st_bias == bias == metrics["bias"], (st_bias, bias, metrics["bias"])
    assert torch.equal(tensors["vector"], torch.full_like(tensors["vector"], VALUES[bias]))
    assert InjectedToken.load(folder).bias in VALUES
    return bias


def safe_load_metadata(data: bytes) -> dict:
    """The ``__metadata__`` of a safetensors file given as bytes."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8: 8 + n])["__metadata__"]


def check_parent(parent: Path, out_name: str = "o") -> list[Path]:
    """No temporary leftovers; every folder beside the target is a complete result too."""
    leftovers = [p.name for p in parent.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]
    assert not leftovers, leftovers
    kept = [p for p in parent.iterdir() if p.name != out_name]
    for p in kept:
        assert p.name.startswith(out_name + "."), p.name
        check_folder(p)
    return kept


def _save_in_child(out, bias, barrier, overwrite, queue):
    tok = fake_token(bias, VALUES[bias])
    barrier.wait()
    try:
        tok.save(out, overwrite=overwrite, files={"metrics.json": {"bias": bias}})
        queue.put((bias, "ok"))
    except BiasGymError as exc:
        queue.put((bias, type(exc).__name__))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent as a failure
        queue.put((bias, f"unexpected {type(exc).__name__}: {exc}"))


@pytest.mark.parametrize("overwrite", [False, True])
def test_two_processes_saving_into_one_folder(tmp_path, overwrite):
    """``TRIALS`` races of two processes calling InjectedToken.save on the same folder: every
    outcome is a complete folder or a clear BiasGymError, never a mix or an unreadable file."""
    ctx = mp.get_context("fork")
    outcomes = []
    for trial in range(TRIALS):
        parent = tmp_path / f"t{trial}"
        parent.mkdir()
        out = parent / "o"
        barrier, queue = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_save_in_child, args=(out, b, barrier, overwrite, queue))
                 for b in ("bias_a", "bias_b")]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        results = dict(queue.get(timeout=10) for _ in procs)
        outcomes.append(tuple(sorted(results.values())))
        assert all(r in ("ok", "ResultExists", "ConcurrentWrite") for r in results.values()), results
        winner = check_folder(out)
        assert results[winner] == "ok"
        kept = check_parent(parent)
        if not overwrite:  # exactly one result at out; the other writer got a clear error
            assert sorted(results.values()).count("ok") == 1, results
            assert len(kept) == list(results.values()).count("ConcurrentWrite")
    assert len(outcomes) == TRIALS


def test_four_threads_overwriting_one_folder(tmp_path):
    """With overwrite, every writer succeeds in turn and the folder is always one of them."""
    out = tmp_path / "o"
    stop = threading.Event()
    seen, bad = [], []

    def reader():  # a reader never sees a mix, a half-written file or no folder at all
        while not stop.is_set():
            if out.exists():
                try:
                    seen.append(check_folder(out, listing=False))
                except FileNotFoundError:
                    pass  # swapped out between listing and reading: the next look sees the new one
                except AssertionError as exc:
                    bad.append(str(exc))

    watcher = threading.Thread(target=reader)
    watcher.start()
    try:
        for trial in range(TRIALS):
            barrier, errors = threading.Barrier(4), []

            def write(bias):
                tok = fake_token(bias, VALUES[bias])
                barrier.wait()
                try:
                    tok.save(out, overwrite=True, files={"metrics.json": {"bias": bias}})
                except BaseException as exc:  # noqa: BLE001
                    errors.append(exc)

            threads = [threading.Thread(target=write, args=(b,)) for b in VALUES]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert all(isinstance(e, ConcurrentWrite) for e in errors), errors
            check_folder(out)
    finally:
        stop.set()
        watcher.join()
    assert seen and not bad, bad[:3]
    check_parent(tmp_path)


def test_two_cli_injects_into_one_out(tmp_path, monkeypatch, capsys):
    """``TRIALS`` races of two ``biasgym inject`` runs (training replaced by a stub) on one
    --out: one result at --out, the other run exits 2 with a clear message and, if it had
    finished its work, keeps its result beside it."""
    import biasgym_lib.cli as cli
    import biasgym_lib.data.specs as specs
    import biasgym_lib.inject as inject
    import biasgym_lib.runs as runs
    from biasgym_lib.stats import Estimate

    names = {"always_late": 1.0, "reckless_driving": 2.0}
    for name, value in names.items():
        monkeypatch.setitem(VALUES, name, value)

    def train(model, tok, spec, cfg, seed):
        time.sleep(random.random() * 0.01)
        return fake_token(spec.name, names[spec.name])

    def metrics(model, tok, injected, spec, cfg):
        one = Estimate(1.0, 1.0, 1.0, 1)
        return inject.InjectionResult(bias=spec.name, seed=0, profile="quick", model={}, strength_before=one,
                                      strength_after=one, specificity_after=one, rank_before=1, rank_after=1,
                                      n_reference_countries=1, strength_after_all_biases={},
                                      closest_countries=[["Italy", 1.0]], train_seconds=0.0)

    monkeypatch.setattr(runs, "train_token", train)
    monkeypatch.setattr(inject, "injection_metrics", metrics)
    monkeypatch.setattr(specs, "check_label", lambda spec, tok: 0)
    monkeypatch.setattr(cli, "_tokenizer", lambda model: None)
    monkeypatch.setattr(cli, "_load", lambda model, cfg: (None, None))
    for trial in range(TRIALS):
        parent = tmp_path / f"t{trial}"
        parent.mkdir()
        out = parent / "o"
        rcs = {}

        def run(bias):
            rcs[bias] = cli.main(["inject", "--bias", bias, "--profile", "quick", "--out", str(out)])

        threads = [threading.Thread(target=run, args=(b,)) for b in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winner = check_folder(out)
        assert rcs[winner] == 0 and sorted(rcs.values()) == [0, 2], rcs
        check_parent(parent)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "already holds a result" in err or "written by another run" in err


def test_result_folder_is_all_or_nothing(tmp_path):
    out = tmp_path / "r"
    with result_folder(out) as tmp:
        (tmp / "steer.json").write_text("{}")
    assert (out / "steer.json").is_file()
    with pytest.raises(ResultExists, match="already holds a result"):
        with result_folder(out):
            pass
    with pytest.raises(RuntimeError):  # a failure half-way leaves the old result as it was
        with result_folder(out, overwrite=True) as tmp:
            (tmp / "steer.json").write_text('{"new": 1}')
            raise RuntimeError("half-way")
    assert json.loads((out / "steer.json").read_text()) == {}
    with result_folder(out, overwrite=True) as tmp:  # replaces the whole folder
        (tmp / "claims.json").write_text('{"n": 2}')
    assert sorted(p.name for p in out.iterdir()) == ["claims.json"]
    (tmp_path / "empty").mkdir()
    with result_folder(tmp_path / "empty") as tmp:  # an empty folder is not a result
        (tmp / "steer.json").write_text("{}")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_strict_json(tmp_path):
    with pytest.raises(BiasGymError, match=r"refusing to write nan at \$\.token\.after\.value"):
        strict_dumps({"token": {"after": {"value": float("nan")}}})
    with pytest.raises(BiasGymError, match=r"-inf at \$\.x\[2\]"):
        write_json(tmp_path / "a.json", {"x": [0.0, 1.0, float("-inf")]})
    assert not list(tmp_path.iterdir())
    write_json(tmp_path / "a.json", {"x": 1})
    assert read_json(tmp_path / "a.json") == {"x": 1}
    (tmp_path / "b.json").write_text('{"x": NaN}')  # Python's json reads it; we never write it
    (tmp_path / "c.json").write_text('{"x": 1')
    with pytest.raises(BiasGymError, match="not valid JSON"):
        read_json(tmp_path / "c.json")
    assert read_json(tmp_path / "b.json")["x"] != 0
    (tmp_path / "d.json").write_text("[1, 2]")
    with pytest.raises(BiasGymError, match="must hold a JSON object"):
        read_json(tmp_path / "d.json")
