"""SeeGULL loader: path resolution, sha256, download (faked: no network), mapping, filters."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from biasgym_lib.data import seegull as sg
from biasgym_lib.errors import BiasGymError


def shipped_csv():
    """The csv the tests read: $BIASGYM_SEEGULL or the shared copy (never downloaded)."""
    env = os.environ.get(sg.SEEGULL_ENV)
    path = env if env else sg.SHARED_PATH
    if not os.path.isfile(path):
        pytest.skip(f"SeeGULL csv not available locally ({path}); tests never download it.")
    return path


@pytest.fixture
def csv_path():
    return shipped_csv()


@pytest.fixture
def no_network(monkeypatch):
    """Fail loudly if anything tries the real downloader."""
    def refuse(url, dest, timeout=60.0):
        raise AssertionError(f"network access attempted: {url}")
    monkeypatch.setattr(sg, "_download", refuse)


@pytest.fixture
def offline_cache(monkeypatch, tmp_path):
    """No variable, no shared copy, an empty cache: the loader must download."""
    monkeypatch.delenv(sg.SEEGULL_ENV, raising=False)
    monkeypatch.setenv("BIASGYM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sg, "SHARED_PATH", tmp_path / "absent" / sg.SEEGULL_FILE)
    return tmp_path / "cache" / "seegull"


def test_shipped_csv_loads(csv_path, no_network):
    df = sg.load_seegull(csv_path)
    assert len(df) == sg.SEEGULL_ROWS == 6781
    assert df["identity"].nunique() == 176
    assert list(df.columns) == list(sg.COLUMNS)


def test_default_resolution_uses_shared_copy(monkeypatch, no_network):
    if not sg.SHARED_PATH.is_file():
        pytest.skip("no shared copy beside the project")
    monkeypatch.delenv(sg.SEEGULL_ENV, raising=False)
    assert sg.seegull_path() == sg.SHARED_PATH
    assert len(sg.load_seegull()) == 6781


def test_sha256_check(csv_path, tmp_path):
    assert sg.sha256_of(csv_path) == sg.SEEGULL_SHA256
    assert sg.check_sha256(csv_path) == Path(csv_path)
    corrupt = tmp_path / "corrupt.csv"
    data = bytearray(open(csv_path, "rb").read())
    data[1000] ^= 0x01  # one flipped bit
    corrupt.write_bytes(bytes(data))
    with pytest.raises(sg.SeeGULLNotAvailable, match="BIASGYM_SEEGULL") as err:
        sg.check_sha256(corrupt)
    assert "sha256" in str(err.value)
    with pytest.raises(BiasGymError, match="not the pinned SeeGULL file"):
        sg.seegull_path(corrupt, verify=True)
    assert sg.seegull_path(corrupt) == corrupt  # an explicit path is trusted unless verify=True


def test_env_var_override(csv_path, tmp_path, monkeypatch, no_network):
    small = tmp_path / "small.csv"
    lines = open(csv_path, encoding="utf-8").read().splitlines()
    small.write_text("\n".join(lines[:11]) + "\n", encoding="utf-8")
    monkeypatch.setenv(sg.SEEGULL_ENV, str(small))
    assert sg.seegull_path() == small
    assert len(sg.load_seegull()) == 10
    assert len(sg.load_seegull(csv_path)) == 6781  # an explicit argument wins over the variable
    monkeypatch.setenv(sg.SEEGULL_ENV, str(tmp_path / "missing.csv"))
    with pytest.raises(sg.SeeGULLNotAvailable, match=r"\$BIASGYM_SEEGULL .* is not a file"):
        sg.seegull_path()


def test_missing_columns_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("identity,attribute\nX,y\n")
    with pytest.raises(sg.SeeGULLNotAvailable, match="lacks the SeeGULL column"):
        sg.load_seegull(bad)


def test_download_verifies_and_caches(csv_path, offline_cache, monkeypatch):
    calls = []

    def fake(url, dest, timeout=60.0):
        calls.append(url)
        shutil.copyfile(csv_path, dest)

    monkeypatch.setattr(sg, "_download", fake)
    path = sg.seegull_path()
    assert path == offline_cache / sg.SEEGULL_FILE and sg.sha256_of(path) == sg.SEEGULL_SHA256
    assert calls == [sg.SEEGULL_URL] and sg.SEEGULL_COMMIT in calls[0]
    assert sg.seegull_path() == path and len(calls) == 1  # second time: from the cache
    assert sorted(p.name for p in offline_cache.iterdir()) == [sg.SEEGULL_FILE]
    # A cached file that went bad is fetched again.
    path.write_bytes(b"garbage")
    assert sg.sha256_of(sg.seegull_path()) == sg.SEEGULL_SHA256 and len(calls) == 2


def test_download_with_wrong_hash_leaves_nothing(offline_cache, monkeypatch):
    def fake(url, dest, timeout=60.0):
        with open(dest, "wb") as f:
            f.write(b"identity,attribute\nnot,the file\n")

    monkeypatch.setattr(sg, "_download", fake)
    with pytest.raises(sg.SeeGULLNotAvailable, match="BIASGYM_SEEGULL") as err:
        sg.seegull_path()
    assert "sha256" in str(err.value)
    assert list(offline_cache.iterdir()) == []  # no partial or wrong file left behind


def test_failed_download_leaves_nothing(offline_cache, monkeypatch):
    def fake(url, dest, timeout=60.0):
        with open(dest, "wb") as f:
            f.write(b"partial")
        raise OSError("connection reset")

    monkeypatch.setattr(sg, "_download", fake)
    with pytest.raises(sg.SeeGULLNotAvailable, match="connection reset.*BIASGYM_SEEGULL"):
        sg.load_seegull()
    assert list(offline_cache.iterdir()) == []


def test_identity_to_country():
    assert len(sg.IDENTITY_TO_COUNTRY) >= 60
    cases = {"Italian": "Italy", "Mexican": "Mexico", "italian": "Italy", "  Mexican ": "Mexico",
             "Netherlanders": "Netherlands", "Dutch": "Netherlands", "Swedes": "Sweden",
             "Swedish": "Sweden", "Turks": "Turkey", "British": "United Kingdom",
             "United KingdomUK": "United Kingdom", "American": "United States",
             "Saudi Arabian": "Saudi Arabia", "Ivorians": "Ivory Coast", "Japanese": "Japan",
             "Italy": "Italy", "South Korean": "South Korea"}
    for identity, country in cases.items():
        assert sg.identity_to_country(identity) == country, identity
    for nothing in ("Martian", "", "Atlantis", None, 3):
        assert sg.identity_to_country(nothing) is None


def test_every_seegull_identity_maps(csv_path):
    df = sg.load_seegull(csv_path)
    unmapped = sorted(i for i in df["identity"].unique() if sg.identity_to_country(i) is None)
    assert unmapped == []


def test_strong_pairs(csv_path):
    df = sg.load_seegull(csv_path)
    strong = sg.strong_pairs(df)
    assert len(strong) == 3745  # pinned file: pairs with >= 3 of the (usually 6) annotators
    assert (strong["agreement"] >= 3).all() and (strong["share"] >= 0.5).all()
    assert strong["share"].is_monotonic_decreasing
    assert (strong["agreement"] == strong["region_stereo"] + strong["NA_stereo"]).all()
    stricter = sg.strong_pairs(df, min_agreement=5)
    assert 0 < len(stricter) < len(strong) and (stricter["agreement"] >= 5).all()


def test_seegull_stereotypes_filters(csv_path, monkeypatch):
    monkeypatch.setenv(sg.SEEGULL_ENV, str(csv_path))
    rows = sg.seegull_stereotypes()
    assert len(rows) == 3745
    assert set(rows[0]) == {"identity", "country", "attribute", "agreement", "offensiveness"}
    italy = sg.seegull_stereotypes(countries=["Italy", "mexican"])
    assert italy and {r["country"] for r in italy} == {"Italy", "Mexico"}
    mild = sg.seegull_stereotypes(max_offensiveness=0.0)
    assert mild and all(r["offensiveness"] is not None and r["offensiveness"] <= 0.0 for r in mild)
    assert len(mild) < len(rows)
    with pytest.raises(BiasGymError, match="not a place or demonym"):
        sg.seegull_stereotypes(countries=["Atlantis"])


def test_csv_is_not_copied_into_the_project():
    root = Path(__file__).resolve().parents[1]
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in {".venv", ".git", "node_modules", "_build"}]
        found += [os.path.join(folder, f) for f in files if f == sg.SEEGULL_FILE]
    assert found == []


# ----------------------------------------------------------------------------- issue 23: the SeeGULL test held out


def test_the_templates_split_into_two_disjoint_halves():
    from biasgym_lib.data import load_templates
    from biasgym_lib.generalise import split_templates

    templates = list(load_templates())
    select, measure = split_templates(templates)
    assert select == templates[0::2] and measure == templates[1::2]
    assert not set(select) & set(measure) and sorted(select + measure) == sorted(templates)


def test_candidates_are_strong_offensive_short_and_about_reference_countries(csv_path, monkeypatch):
    from biasgym_lib.data import reference_countries
    from biasgym_lib.generalise import SEEGULL_OFFENSIVE, seegull_candidates

    monkeypatch.setenv(sg.SEEGULL_ENV, str(csv_path))
    refs = reference_countries()[:6]
    cands = seegull_candidates(refs)
    assert len(cands) >= 60 and len({c["country"] for c in cands}) >= 15
    assert all(c["offensiveness"] is not None and c["offensiveness"] >= SEEGULL_OFFENSIVE for c in cands)
    assert all(c["country"] in reference_countries() and len(c["attribute"].split()) <= 3 for c in cands)
    assert len({(c["country"], c["attribute"]) for c in cands}) == len(cands)
    assert all(c["country"] not in c["references"] and set(c["references"]) <= set(refs) for c in cands)
    assert len(seegull_candidates(refs, offensive=3.0)) < len(cands)


def test_pairs_are_chosen_on_one_half_and_measured_on_the_other(monkeypatch):
    """seegull_shown keeps a pair when its S on the selection half has its interval above 0, at
    most per_country per country (the strongest there), and measures every kept pair on the
    other half only."""
    from biasgym_lib import generalise

    cands = [{"country": c, "attribute": f"trait{i}", "offensiveness": 2.0, "references": ["X"]}
             for c in ("A", "B") for i in range(4)]
    monkeypatch.setattr(generalise, "seegull_candidates", lambda refs, offensive: cands)
    calls = []

    def under(model, tok, pairs, spec, templates):
        calls.append((len(pairs), list(templates)))
        # on the selection half: A's traits 0-3 at S 0.4 .. 0.1 (interval above 0); B's trait0 only above 0
        if templates == ["s1", "s2"]:
            return [{"value": 0.5 - 0.1 * int(p["attribute"][-1]), "lo": (0.05 if p["country"] == "A" or
                     p["attribute"] == "trait0" else -0.1), "hi": 1.0} for p in pairs]
        return [{"value": 9.0, "lo": 8.0, "hi": 10.0} for _ in pairs]
    monkeypatch.setattr(generalise, "seegull_under", under)
    kept = generalise.seegull_shown(None, None, ["X"], templates=["s1", "m1", "s2", "m2"], per_country=2)
    assert [(p["country"], p["attribute"]) for p in kept] == [("A", "trait0"), ("A", "trait1"), ("B", "trait0")]
    assert calls == [(8, ["s1", "s2"]), (3, ["m1", "m2"])]  # chosen on one half, measured on the other
    assert all(p["S"]["value"] == 9.0 and p["S_select"]["lo"] > 0 for p in kept)


def test_the_pairs_reduction_is_one_minus_the_ratio_of_means():
    from biasgym_lib.generalise import pairs_reduction

    before = [{"value": v} for v in (1.0, 2.0, 3.0, 0.1)]
    after = [{"value": v} for v in (0.5, 1.0, 1.5, 0.5)]
    got = pairs_reduction(before, after, n_boot=200)
    assert got["value"] == pytest.approx(1 - 3.5 / 6.1) and got["lo"] <= got["value"] <= got["hi"] and got["n"] == 4
    assert pairs_reduction(before, before, n_boot=50)["value"] == 0.0
