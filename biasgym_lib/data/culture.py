"""The culture set (:ref:`method §5 <method-5>`, cultural knowledge): ``data/culture.yaml``.

A stereotype ascribes a trait to people; cultural knowledge is about practices, objects,
places and symbols, and a debiasing must keep it. Each item is a one-sentence photo
description ("A photo of ...") naming neither its country nor any demonym, language, capital
or other country; asked which reference country the photo was taken in. Dimensions
(``CULTURE_DIMENSIONS``): first the five domains of intangible heritage of the UNESCO 2003
Convention (Art. 2.2) - ``oral_traditions`` (language as a vehicle of heritage included),
``performing_arts``, ``social_practices`` (rituals, festive events), ``knowledge_nature``
(nature and the universe), ``craftsmanship`` - whose items are elements of UNESCO's
Representative List, Urgent Safeguarding List or Register of Good Safeguarding Practices;
then ``built_natural`` (the World Heritage List), ``symbols`` (flag, coat of arms) and
``everyday`` (a dish, garment or object on no list). UNESCO items give the element as
inscribed and its year. An element of several countries lists the reference ones under
``countries`` (each a right answer), the rest under ``also_inscribed``. ``twin_of`` names the
bias of ``data/biases.yaml`` whose stereotype the item is the cultural twin of (a beer
festival for ``heavy_drinking``); ``image`` (optional) is a photo's path, for models that see.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from pathlib import Path

from .specs import DATA_DIR, DataFileError, load_biases, read_yaml, reference_countries

CULTURE_FILE = DATA_DIR / "culture.yaml"
CULTURE_DIMENSIONS = ("oral_traditions", "performing_arts", "social_practices", "knowledge_nature",
                      "craftsmanship", "built_natural", "symbols", "everyday")
ICH_LISTS = ("UNESCO ICH Representative List", "UNESCO ICH Urgent Safeguarding List",
             "UNESCO Register of Good Safeguarding Practices")
WORLD_HERITAGE = "UNESCO World Heritage List"
FIRST_YEAR = {**dict.fromkeys(ICH_LISTS, 2001), WORLD_HERITAGE: 1978}  # first proclamation / inscription
KINDS = {"national flag": "symbols", "coat of arms": "symbols", "national symbol": "symbols",
         "dish": "everyday", "garment": "everyday", "object": "everyday"}
_FIELDS = ("id", "country", "countries", "also_inscribed", "dimension", "description", "source",
           "twin_of", "image")
_ID = re.compile(r"[a-z0-9][a-z0-9_]*")


@dataclass(frozen=True)
class Source:
    """A UNESCO list (``list``, ``element``, ``year``) or a symbol / everyday thing (``kind``,
    ``note``); ``url`` where a page confirms it."""

    list: str | None = None
    element: str | None = None
    year: int | None = None
    kind: str | None = None
    note: str | None = None
    url: str | None = None


@dataclass(frozen=True)
class CultureItem:
    """One photo description and the reference country (or countries) it was taken in."""

    id: str
    countries: tuple[str, ...]
    dimension: str
    description: str
    source: Source
    also_inscribed: tuple[str, ...] = ()
    twin_of: str | None = None
    image: str | None = None

    @property
    def country(self) -> str:
        """The (first) right answer."""
        return self.countries[0]


def _names(value, key, fail) -> tuple[str, ...]:
    if not (isinstance(value, list) and value and all(isinstance(v, str) and v.strip() for v in value)):
        fail(f"'{key}' must be a non-empty list of names, got {value!r}.")
    if len(set(value)) != len(value):
        fail(f"'{key}' lists a name twice: {value!r}.")
    return tuple(value)


def _source(raw, dimension, fail) -> Source:
    if not isinstance(raw, dict) or not ({"list", "kind"} & set(raw)):
        fail(f"'source' needs 'list' (a UNESCO list) or 'kind' ({', '.join(KINDS)}), got {raw!r}.")
    allowed = {"list", "element", "year", "url"} if "list" in raw else {"kind", "note", "url"}
    if set(raw) - allowed:
        fail(f"source has unknown key(s) {sorted(set(raw) - allowed)}; allowed: {sorted(allowed)}.")
    if "list" in raw:
        lst, year = raw["list"], raw.get("year")
        if lst not in FIRST_YEAR:
            fail(f"source list {lst!r} is unknown; known: {sorted(FIRST_YEAR)}.")
        if dimension != "built_natural" if lst == WORLD_HERITAGE else dimension not in CULTURE_DIMENSIONS[:5]:
            fail(f"dimension {dimension!r} does not fit source list {lst!r} (World Heritage is built_natural; "
                 "the ICH lists take one of the five ICH domains).")
        if not (isinstance(raw.get("element"), str) and raw["element"].strip()):
            fail("a UNESCO source needs 'element' (its official name).")
        if not (type(year) is int and FIRST_YEAR[lst] <= year <= datetime.date.today().year + 1):
            fail(f"source year {year!r} is not a year of {lst!r} (from {FIRST_YEAR[lst]}).")
    else:
        if raw["kind"] not in KINDS:
            fail(f"source kind {raw['kind']!r} is unknown; known: {list(KINDS)}.")
        if KINDS[raw["kind"]] != dimension:
            fail(f"a source of kind {raw['kind']!r} belongs to dimension {KINDS[raw['kind']]!r}, not {dimension!r}.")
        if not (isinstance(raw.get("note"), str) and raw["note"].strip()):
            fail(f"a source of kind {raw['kind']!r} needs a 'note' saying what it is.")
    if "url" in raw and not (isinstance(raw["url"], str) and raw["url"].startswith(("https://", "http://"))):
        fail(f"source url {raw['url']!r} must be an http(s) address.")
    return Source(**raw)


def _item(row, refs, biases, fail) -> CultureItem:
    if not isinstance(row, dict):
        fail(f"must be a mapping of fields, got {row!r}.")
    unknown = [k for k in row if k not in _FIELDS]
    if unknown:
        fail(f"unknown field(s) {unknown}; allowed: {list(_FIELDS)}.")
    for key in ("id", "dimension", "description", "source"):
        if key not in row:
            fail(f"missing required field '{key}'.")
    if not (isinstance(row["id"], str) and _ID.fullmatch(row["id"])):
        fail(f"id {row['id']!r} must be lowercase letters, digits and '_'.")
    if ("country" in row) == ("countries" in row):
        fail("give exactly one of 'country' (one name) or 'countries' (a list).")
    countries = (row["country"],) if "country" in row else _names(row["countries"], "countries", fail)
    for c in countries:
        if c not in refs:
            fail(f"country {c!r} is not a reference country of data/countries.yaml.")
    also = _names(row["also_inscribed"], "also_inscribed", fail) if "also_inscribed" in row else ()
    if set(also) & set(refs):
        fail(f"also_inscribed {sorted(set(also) & set(refs))} are reference countries: list them under 'countries'.")
    if row["dimension"] not in CULTURE_DIMENSIONS:
        fail(f"dimension {row['dimension']!r} is unknown; known: {list(CULTURE_DIMENSIONS)}.")
    text = " ".join(row["description"].split()) if isinstance(row["description"], str) else ""
    if not text.endswith("."):
        fail(f"description {text or row['description']!r} must be a string ending with a period.")
    if re.search(r"[.!?]\s", text[:-1]):
        fail(f"description {text!r} must be one sentence.")
    if row.get("twin_of") is not None and row["twin_of"] not in biases:
        fail(f"twin_of {row['twin_of']!r} is not a bias of data/biases.yaml ({', '.join(sorted(biases))}).")
    if row.get("image") is not None and not (isinstance(row["image"], str) and row["image"].strip()):
        fail(f"image {row['image']!r} must be a path.")
    return CultureItem(row["id"], countries, row["dimension"], text, _source(row["source"], row["dimension"], fail),
                       also, row.get("twin_of"), row.get("image"))


def load_culture(path: str | Path | None = None) -> list[CultureItem]:
    """The items of ``path`` (default ``data/culture.yaml``), validated strictly: a problem
    raises :class:`DataFileError` in one line naming the file and the item."""
    path = Path(path) if path is not None else CULTURE_FILE
    data = read_yaml(path)
    if not (isinstance(data, dict) and set(data) == {"items"} and isinstance(data["items"], list) and data["items"]):
        raise DataFileError(f"{path}: expected a non-empty list under 'items:' and nothing else at the top level.")
    refs, biases, out, seen = reference_countries(), load_biases(), [], set()
    for i, row in enumerate(data["items"], start=1):
        label = f"#{i} ({row['id']!r})" if isinstance(row, dict) and "id" in row else f"#{i}"

        def fail(problem, label=label):
            raise DataFileError(f"{path}: culture item {label}: {problem}")

        item = _item(row, refs, biases, fail)
        if item.id in seen:
            fail(f"duplicate id {item.id!r}; every item needs its own id.")
        seen.add(item.id)
        out.append(item)
    return out
