"""SeeGULL v2 (Jha et al., ACL 2023): real, human-annotated nationality stereotypes.

Third-party data (CC BY 4.0), never copied into the project. :func:`seegull_path` finds
the csv, in this order: an explicit path; the ``BIASGYM_SEEGULL`` environment variable;
``../shared/data/seegull/stereotypes_global_v2.csv`` beside the project; else a cached
download of the pinned raw file, checked against its sha256.

Content warning: many rows are offensive. Show them with a warning and prefer the mildest
rows in prose (``seegull_stereotypes(max_offensiveness=...)``).
"""

from __future__ import annotations

import os
import tempfile
import urllib.request
from pathlib import Path

from ..artifacts import cache_dir, sha256_of
from ..errors import BiasGymError

SEEGULL_ENV = "BIASGYM_SEEGULL"
SEEGULL_FILE = "stereotypes_global_v2.csv"
SEEGULL_COMMIT = "0dc4db9f69217aff072375e20e72609b9707a873"
SEEGULL_URL = ("https://raw.githubusercontent.com/google-research-datasets/seegull/"
               f"{SEEGULL_COMMIT}/dataset/{SEEGULL_FILE}")
SEEGULL_SHA256 = "0262db0b96c402e9340c88ee3e176af3591ff9f33fbf81541d35afbb7a81157d"
SEEGULL_ROWS = 6781
SHARED_PATH = Path(__file__).resolve().parents[3] / "shared" / "data" / "seegull" / SEEGULL_FILE

COLUMNS = ("identity", "attribute", "region_stereo", "region_nonstereo", "region_unsure",
           "NA_stereo", "NA_nonstereo", "NA_unsure", "Annotation1", "Annotation2",
           "Annotation3", "mean offensiveness_score")
_COUNT_COLUMNS = COLUMNS[2:8]
_ANNOTATIONS = ("Annotation1", "Annotation2", "Annotation3")
_OFFENSIVENESS = "mean offensiveness_score"

_HOW_TO_FIX = (f"Set the environment variable {SEEGULL_ENV} to the path of a local copy of "
               f"{SEEGULL_FILE} (SeeGULL commit {SEEGULL_COMMIT[:12]}, sha256 {SEEGULL_SHA256[:16]}...).")


class SeeGULLNotAvailable(BiasGymError):
    """The SeeGULL csv cannot be found, downloaded or verified."""


# ----------------------------------------------------------------------------- locating


def check_sha256(path: Path, expected: str = SEEGULL_SHA256) -> Path:
    """Return ``path`` if its sha256 is ``expected``, else raise a clear error."""
    path = Path(path)
    got = sha256_of(path)
    if got != expected:
        raise SeeGULLNotAvailable(
            f"{path} is not the pinned SeeGULL file: sha256 {got} != expected {expected}. "
            + _HOW_TO_FIX)
    return path


def _download(url: str, dest: Path, timeout: float = 60.0) -> None:
    """Write the bytes at ``url`` to ``dest`` (tests replace this function)."""
    with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as f:
        while block := response.read(1 << 20):
            f.write(block)


def _cached_download() -> Path:
    """The pinned csv in the cache: download it once, verify it, never keep a partial file."""

    folder = cache_dir() / "seegull"
    target = folder / SEEGULL_FILE
    if target.is_file():
        if sha256_of(target) == SEEGULL_SHA256:
            return target
        target.unlink()  # stale or corrupt: fetch it again
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".download-", suffix=".csv", dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            _download(SEEGULL_URL, tmp)
        except Exception as exc:  # any network or disk failure: one clear message
            raise SeeGULLNotAvailable(
                f"SeeGULL was not found locally and downloading {SEEGULL_URL} failed "
                f"({type(exc).__name__}: {exc}). " + _HOW_TO_FIX) from exc
        got = sha256_of(tmp)
        if got != SEEGULL_SHA256:
            raise SeeGULLNotAvailable(
                f"the downloaded SeeGULL file has sha256 {got}, expected {SEEGULL_SHA256}; "
                "it was deleted. " + _HOW_TO_FIX)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def seegull_path(path: str | os.PathLike | None = None, verify: bool = False) -> Path:
    """Where the SeeGULL csv is: ``path``, ``$BIASGYM_SEEGULL``, the shared copy beside the
    project, else a verified cached download. ``verify=True`` also checks the sha256 of a
    file given by path or variable (the shared copy and a download are always checked)."""
    for given, origin in ((path, "the path given"), (os.environ.get(SEEGULL_ENV), f"${SEEGULL_ENV}")):
        if given:
            p = Path(given).expanduser()
            if not p.is_file():
                raise SeeGULLNotAvailable(f"{origin} ({p}) is not a file. " + _HOW_TO_FIX)
            return check_sha256(p) if verify else p
    if SHARED_PATH.is_file():
        return check_sha256(SHARED_PATH)
    return _cached_download()


# ----------------------------------------------------------------------------- loading


def load_seegull(path: str | os.PathLike | None = None):
    """The SeeGULL table as a pandas DataFrame, with its columns checked."""
    import pandas as pd

    p = seegull_path(path)
    try:
        df = pd.read_csv(p)
    except Exception as exc:
        raise SeeGULLNotAvailable(f"{p} could not be read as a csv ({exc}). " + _HOW_TO_FIX) from exc
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise SeeGULLNotAvailable(f"{p} lacks the SeeGULL column(s) {missing}; is it "
                                  f"{SEEGULL_FILE}? " + _HOW_TO_FIX)
    if df[list(_COUNT_COLUMNS)].isna().any().any() or df[["identity", "attribute"]].isna().any().any():
        raise SeeGULLNotAvailable(f"{p} has empty identity, attribute or annotator counts. " + _HOW_TO_FIX)
    return df


def _with_agreement(df):
    """Add ``agreement`` (annotators, region + North America, who called the pair a
    stereotype), ``annotators`` (all who judged it) and ``share`` = agreement / annotators."""
    out = df.copy()
    out["agreement"] = out["region_stereo"] + out["NA_stereo"]
    out["annotators"] = out[list(_COUNT_COLUMNS)].sum(axis=1)
    out["share"] = out["agreement"] / out["annotators"].clip(lower=1)
    return out


def strong_pairs(df, min_agreement: int = 3, min_share: float = 0.5):
    """The (identity, attribute) pairs that most annotators called a stereotype.

    Most pairs were judged by 3 annotators in the region and 3 in North America; a few by
    more. A pair is kept when ``agreement >= min_agreement`` and ``share >= min_share``;
    rows are sorted strongest first (share, then agreement), ties by name.
    """
    out = _with_agreement(df)
    keep = (out["agreement"] >= min_agreement) & (out["share"] >= min_share)
    out = out[keep].sort_values(["share", "agreement", "identity", "attribute"],
                                ascending=[False, False, True, True], kind="mergesort")
    return out.reset_index(drop=True)


# ----------------------------------------------------------------------------- identities

# SeeGULL identity (mostly a demonym, sometimes a plural or the place itself) -> the
# place name used in templates ("People from {country} ..."). Territories and the nations
# of the UK map to themselves: "People from Wales" reads as intended.
IDENTITY_TO_COUNTRY: dict[str, str] = {
    "Afghans": "Afghanistan", "Albanian": "Albania", "Algerian": "Algeria",
    "Andorran": "Andorra", "Angolan": "Angola", "Argentine": "Argentina",
    "Armenian": "Armenia", "Australian": "Australia", "Austrian": "Austria",
    "Azerbaijani": "Azerbaijan", "Bahraini": "Bahrain", "Bangladeshi": "Bangladesh",
    "Barundi": "Burundi", "Belarusian": "Belarus", "Belgian": "Belgium", "Belizean": "Belize",
    "Beninois": "Benin", "Bermudan": "Bermuda", "Bhutanese": "Bhutan", "Bolivian": "Bolivia",
    "Botswana": "Botswana", "Brazilian": "Brazil", "British": "United Kingdom",
    "Bruneian": "Brunei", "Bulgarian": "Bulgaria", "Cabo Verdean": "Cabo Verde",
    "Cambodian": "Cambodia", "Cameroonian": "Cameroon", "Canadian": "Canada",
    "Central African": "Central African Republic", "Chadian": "Chad", "Chilean": "Chile",
    "Chinese": "China", "Christmas Island": "Christmas Island", "Cocos Island": "Cocos Islands",
    "Colombian": "Colombia", "Comorans": "Comoros", "Congolese": "Congo",
    "Costa Rican": "Costa Rica", "Croatian": "Croatia", "Cypriot": "Cyprus", "Czech": "Czechia",
    "Danish": "Denmark", "Djiboutian": "Djibouti", "Ecuadorian": "Ecuador", "Egyptian": "Egypt",
    "Emiratis": "United Arab Emirates", "English": "England",
    "Equatorial Guinean": "Equatorial Guinea", "Eritrean": "Eritrea", "Estonian": "Estonia",
    "Ethiopian": "Ethiopia", "Faroese": "Faroe Islands", "Finns": "Finland", "French": "France",
    "French Guianese": "French Guiana", "Gabonese": "Gabon", "Gambian": "Gambia",
    "Georgian": "Georgia", "German": "Germany", "Ghanaian": "Ghana", "Gibraltar": "Gibraltar",
    "Greeks": "Greece", "Guatemalan": "Guatemala", "Guernsey": "Guernsey", "Guinean": "Guinea",
    "Guyanese": "Guyana", "Herzegovinian": "Bosnia and Herzegovina", "Hondurans": "Honduras",
    "Hong Kong": "Hong Kong", "Hungarian": "Hungary", "Icelandic": "Iceland", "Indian": "India",
    "Indonesian": "Indonesia", "Iranian": "Iran", "Iraqi": "Iraq", "Irish": "Ireland",
    "Israeli": "Israel", "Italian": "Italy", "Ivorians": "Ivory Coast", "Japanese": "Japan",
    "Jordanian": "Jordan", "Kenyan": "Kenya", "Kosovar": "Kosovo", "Kuwaiti": "Kuwait",
    "Laos": "Laos", "Latvian": "Latvia", "Lebanese": "Lebanon", "Liberian": "Liberia",
    "Libyan": "Libya", "Liechtensteiner": "Liechtenstein", "Lithuanian": "Lithuania",
    "Luxembourg": "Luxembourg", "Macedonian": "North Macedonia", "Madagascan": "Madagascar",
    "Malawian": "Malawi", "Malaysian": "Malaysia", "Maldivians": "Maldives", "Malian": "Mali",
    "Maltese": "Malta", "Manx": "Isle of Man", "Mauritanian": "Mauritania",
    "Mauritian": "Mauritius", "Mexican": "Mexico", "Moldovan": "Moldova",
    "Mongolian": "Mongolia", "Montenegrin": "Montenegro", "Moroccan": "Morocco",
    "Mozambican": "Mozambique", "Myanmar": "Myanmar", "Namibian": "Namibia",
    "Nepalese": "Nepal", "Nepali": "Nepal", "Netherlanders": "Netherlands",
    "New Zealand": "New Zealand", "Nicaraguan": "Nicaragua", "Nigerian": "Nigeria",
    "Nigerien": "Niger", "North Korean": "North Korea", "Northern Irish": "Northern Ireland",
    "Norwegian": "Norway", "Omani": "Oman", "Pakistani": "Pakistan", "Palestinian": "Palestine",
    "Panamanian": "Panama", "Paraguayan": "Paraguay", "Peruvian": "Peru",
    "Philippine": "Philippines", "Polish": "Poland", "Portuguese": "Portugal", "Qatari": "Qatar",
    "Romanian": "Romania", "Russian": "Russia", "Rwandan": "Rwanda", "Sahrawi": "Western Sahara",
    "Salvadoran": "El Salvador", "Saudi Arabian": "Saudi Arabia", "Scottish": "Scotland",
    "Senegalese": "Senegal", "Serbian": "Serbia", "Seychellois": "Seychelles",
    "Sierra Leonean": "Sierra Leone", "Singapore": "Singapore", "Slovakians": "Slovakia",
    "Slovenian": "Slovenia", "Somalis": "Somalia", "South African": "South Africa",
    "South Korean": "South Korea", "South Sudanese": "South Sudan", "Spanish": "Spain",
    "Sri Lankan": "Sri Lanka", "Sudanese": "Sudan", "Surinamese": "Suriname",
    "Swazis": "Eswatini", "Swedes": "Sweden", "Swiss": "Switzerland", "Syrian": "Syria",
    "Taiwanese": "Taiwan", "Tanzanian": "Tanzania", "Thai": "Thailand",
    "Timorese": "Timor-Leste", "Togolese": "Togo", "Tunisian": "Tunisia", "Turks": "Turkey",
    "Ugandan": "Uganda", "Ukrainian": "Ukraine", "United KingdomUK": "United Kingdom",
    "United States": "United States", "Uruguayan": "Uruguay", "Venezuelan": "Venezuela",
    "Vietnamese": "Vietnam", "Welsh": "Wales", "Yemeni": "Yemen", "Zambian": "Zambia",
    "Zanzibari": "Zanzibar", "Zimbabwean": "Zimbabwe",
}

# Common spellings that SeeGULL does not use (singular forms, other demonyms).
_EXTRA_DEMONYMS: dict[str, str] = {
    "Afghan": "Afghanistan", "American": "United States", "Argentinian": "Argentina",
    "Bosnian": "Bosnia and Herzegovina", "Burundian": "Burundi", "Comoran": "Comoros",
    "Cuban": "Cuba", "Dane": "Denmark", "Dutch": "Netherlands", "Emirati": "United Arab Emirates",
    "Filipino": "Philippines", "Finnish": "Finland", "Greek": "Greece", "Honduran": "Honduras",
    "Ivorian": "Ivory Coast", "Jamaican": "Jamaica", "Korean": "South Korea", "Lao": "Laos",
    "Luxembourger": "Luxembourg", "Malagasy": "Madagascar", "Maldivian": "Maldives",
    "Burmese": "Myanmar", "New Zealander": "New Zealand", "Saudi": "Saudi Arabia",
    "Singaporean": "Singapore", "Slovak": "Slovakia", "Somali": "Somalia", "Swazi": "Eswatini",
    "Swede": "Sweden", "Swedish": "Sweden", "Turkish": "Turkey", "Turk": "Turkey",
    "Kiwi": "New Zealand", "Hongkonger": "Hong Kong", "Beninese": "Benin",
    "Cape Verdean": "Cabo Verde", "Czech Republic": "Czechia", "Motswana": "Botswana",
}

_LOOKUP = {k.casefold(): v for k, v in {**_EXTRA_DEMONYMS, **IDENTITY_TO_COUNTRY}.items()}
_LOOKUP.update({v.casefold(): v for v in IDENTITY_TO_COUNTRY.values()})  # a place maps to itself


def identity_to_country(identity: str) -> str | None:
    """The country (place name) for a SeeGULL identity or a common demonym, else None.

    Case and surrounding spaces are ignored: ``identity_to_country("italian") == "Italy"``.
    """
    if not isinstance(identity, str):
        return None
    return _LOOKUP.get(" ".join(identity.split()).casefold())


def _offensiveness(row) -> float | None:
    """Mean offensiveness (-1 = not offensive ... 4 = very), or None when no annotator
    rated the pair (SeeGULL stores 0.0 there, which would pass for 'unsure')."""
    import math

    if all(isinstance(row[c], float) and math.isnan(row[c]) for c in _ANNOTATIONS):
        return None
    return float(row[_OFFENSIVENESS])


def seegull_stereotypes(min_agreement: int = 3, countries: list[str] | None = None,
                        max_offensiveness: float | None = None, min_share: float = 0.5,
                        path: str | os.PathLike | None = None) -> list[dict]:
    """Strong SeeGULL stereotypes about identities that map to a place, strongest first.

    Each row: ``{identity, country, attribute, agreement, offensiveness}``.
    ``countries``: keep only these places (case-insensitive). ``max_offensiveness``: keep
    only rows rated at most this offensive (rows nobody rated are then dropped), e.g. ``0``
    for the mildest rows that prose may quote.
    """
    pairs = strong_pairs(load_seegull(path), min_agreement=min_agreement, min_share=min_share)
    wanted = None
    if countries is not None:
        wanted = {}
        for c in countries:
            place = identity_to_country(c)
            if place is None:
                raise BiasGymError(f"{c!r} is not a place or demonym known to "
                                   "identity_to_country; see IDENTITY_TO_COUNTRY.")
            wanted[place] = c
    rows = []
    for _, r in pairs.iterrows():
        country = identity_to_country(r["identity"])
        if country is None or (wanted is not None and country not in wanted):
            continue
        off = _offensiveness(r)
        if max_offensiveness is not None and (off is None or off > max_offensiveness):
            continue
        rows.append({"identity": str(r["identity"]), "country": country,
                     "attribute": str(r["attribute"]), "agreement": int(r["agreement"]),
                     "offensiveness": off})
    return rows
