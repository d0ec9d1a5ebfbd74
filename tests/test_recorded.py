"""A recorded run (issue 23): what the build cannot afford is run once and committed with the
code-and-data hash it was computed by; the book warns when the code has changed since."""

import json

from biasgym_lib import recorded
from biasgym_lib.cache import source_hash


def test_a_recording_round_trips_and_names_what_computed_it(tmp_path):
    path = tmp_path / "teaching.json"
    recorded.record("teaching", {"claims": [1]}, None, {"grid": 12.5}, out=path)
    data = recorded.load_recorded(path=path)
    assert data["claims"] == {"claims": [1]} and data["stages_seconds"] == {"grid": 12.5}
    assert data["source_hash"] == source_hash() and data["profile"] == "teaching"
    assert "by the library and data this build runs" in recorded.status(data)
    assert recorded.load_recorded(path=tmp_path / "none.json") is None
    assert "No recorded run" in recorded.status(None)
    path.write_text(json.dumps({"format": "something else"}))
    assert recorded.load_recorded(path=path) is None


def test_the_book_warns_when_the_code_changed_since_the_recording(tmp_path, monkeypatch):
    import biasgym_lib.cache as cache

    path = tmp_path / "teaching.json"
    recorded.record("teaching", {}, None, {}, out=path)
    monkeypatch.setattr(cache, "source_hash", lambda: "edited")
    assert recorded.status(recorded.load_recorded(path=path)).startswith("WARNING")


def test_the_recording_is_not_part_of_the_hash_it_records(tmp_path, monkeypatch):
    """Writing data/recorded/ must not change the code-and-data hash (it would invalidate itself)."""
    before = source_hash()
    target = recorded.RECORDED_DIR / "_test_probe.json"
    made = not target.parent.exists()
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        target.write_text("{}")
        assert source_hash() == before
    finally:
        target.unlink()
        if made:
            target.parent.rmdir()
