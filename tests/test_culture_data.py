"""The culture set (data/culture.yaml, METHOD §5 "cultural knowledge") and its loader:
counts, no giveaway names, no SeeGULL attribute of the item's own country, sources, errors.

Fast: no model. The single-token rule for the answers holds because every answer is a
reference country (tests/test_data.py checks those with the real tokenizer, as a slow test).
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections import Counter
from functools import lru_cache

import pytest

from biasgym_lib.data import contrast_countries, load_biases, load_countries, load_facts, reference_countries
from biasgym_lib.data import seegull as sg
from biasgym_lib.data.culture import (CULTURE_DIMENSIONS, ICH_LISTS, WORLD_HERITAGE, CultureItem,
                                      load_culture)
from biasgym_lib.data.facts import selection_facts
from biasgym_lib.data.specs import DataFileError

MIN_ITEMS, MIN_COUNTRIES, MIN_PER_COUNTRY, MAX_PER_COUNTRY, MIN_PER_DIMENSION = 90, 24, 3, 6, 8
CONTRAST_CAPITALS = {"Austria": "Vienna", "Chile": "Santiago", "Ghana": "Accra", "Korea": "Seoul"}
# Beyond the data files: other spellings of capitals, older and other country names and
# demonyms, languages of the reference countries, and place adjectives that point at one
# country (a city's or region's). Countries and demonyms of SeeGULL come from seegull.py.
OTHER_NAMES = (
    "Kiev", "Delhi", "Berne", "Peking", "Saigon", "Bombay", "Rio",
    "Persia", "Siam", "Siamese", "Burma", "Ceylon", "Britain", "Holland", "America", "Americas",
    "American", "Afghan", "Bosnian", "Burmese", "Cuban", "Emirati", "Ivorian", "Jamaican", "Saudi",
    "Singaporean", "Slovak", "Somali", "Turk", "Argentinian", "Filipino", "Swede", "Swedes", "Finnish", "Dane", "Danish", "Dutch", "Korean",
    "Turkish", "Austrian", "Chilean", "Ghanaian", "Scandinavian", "Latino", "Hispanic",
    "Arabic", "Arab", "Persian", "Farsi", "Hindi", "Urdu", "Punjabi", "Bengali", "Tamil", "Sanskrit",
    "Mandarin", "Cantonese", "Swahili", "Amharic", "Oromo", "Yoruba", "Igbo", "Hausa", "Quechua",
    "Guarani", "Gaelic", "Catalan", "Basque", "Malay", "Javanese", "Berber", "Amazigh", "Hebrew",
    "Roman", "Parisian", "Athenian", "Muscovite", "Viennese", "Neapolitan", "Sicilian",
    "Venetian", "Andalusian", "Bavarian", "Castilian", "Tibetan", "Cossack", "Aztec", "Inca",
    "Maya", "Mayan", "Aboriginal", "Maori", "Viking", "Norse", "Celtic",
)


def fold(text: str) -> str:
    """Lower case without accents: "Brasília" and "brasilia" compare equal."""
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c)).casefold()


def giveaway_words() -> set[str]:
    """Every name a description must not contain, from the data files and the lists above."""
    words = set(OTHER_NAMES)
    for row in load_countries():
        words |= {row["name"], row["demonym"], row["capital"]}
    words |= set(contrast_countries()) | set(CONTRAST_CAPITALS.values())
    words |= {f.attribute.removeprefix("speakers of ") for f in load_facts() if f.relation == "language"}
    words |= {f.attribute for f in selection_facts()[1]}  # capitals, as facts.yaml spells them
    words |= set(sg.IDENTITY_TO_COUNTRY) | set(sg.IDENTITY_TO_COUNTRY.values())
    return {fold(w) for w in words}


def whole_words(words) -> re.Pattern:
    """Any of ``words`` as whole words (a plural -s/-es too), on folded text."""
    alternatives = sorted(set(words), key=len, reverse=True)
    return re.compile(r"(?<!\w)(" + "|".join(map(re.escape, alternatives)) + r")(?:s|es)?(?!\w)")


GIVEAWAY = whole_words(giveaway_words())


def giveaways(text: str) -> list[str]:
    """The giveaway words found in ``text``."""
    return [m.group(1) for m in GIVEAWAY.finditer(fold(text))]


@lru_cache(maxsize=1)
def items() -> tuple[CultureItem, ...]:
    return tuple(load_culture())


# ----------------------------------------------------------------------------- counts


def test_counts_countries_and_dimensions():
    data = items()
    per_country = Counter(c for item in data for c in item.countries)
    per_dimension = Counter(item.dimension for item in data)
    assert len(data) >= MIN_ITEMS, f"{len(data)} items, want at least {MIN_ITEMS}"
    assert len(per_country) >= MIN_COUNTRIES, f"{len(per_country)} countries: {sorted(per_country)}"
    thin = {c: n for c, n in per_country.items() if n < MIN_PER_COUNTRY}
    heavy = {c: n for c, n in per_country.items() if n > MAX_PER_COUNTRY}
    assert not thin and not heavy, f"too few items: {thin}; too many: {heavy}"
    missing = {d: per_dimension[d] for d in CULTURE_DIMENSIONS if per_dimension[d] < MIN_PER_DIMENSION}
    assert not missing, f"dimensions with fewer than {MIN_PER_DIMENSION} items: {missing}"


def test_every_answer_is_a_reference_country_and_ids_are_unique():
    refs = set(reference_countries())
    data = items()
    assert all(item.countries and set(item.countries) <= refs for item in data)
    assert all(not set(item.also_inscribed) & refs for item in data)
    assert len({item.id for item in data}) == len(data)
    assert all(isinstance(item.countries, tuple) and item.country == item.countries[0] for item in data)


def test_descriptions_are_one_sentence_about_a_photo():
    bad = [item.id for item in items() if not (item.description.startswith("A photo of ")
                                              and item.description.endswith(".")
                                              and not re.search(r"[.!?;]\s", item.description[:-1]))]
    assert not bad, f"not one 'A photo of ...' sentence: {bad}"


# ----------------------------------------------------------------------------- giveaways


def test_no_description_names_a_country_demonym_language_or_capital():
    found = [(item.id, word) for item in items() for word in giveaways(item.description)]
    assert not found, "descriptions that give the answer away (item, word): " + ", ".join(map(str, found))


@pytest.mark.parametrize("text, word", [
    ("A photo of an Italian piazza.", "italian"),
    ("A photo of Italians in a piazza.", "italian"),
    ("A photo of a street in Brasília.", "brasilia"),
    ("A photo of a bakery in Kyiv.", "kyiv"),
    ("A photo of a MEXICO CITY market.", "mexico city"),
    ("A photo of a loom in Ghana.", "ghana"),
    ("A photo of a man singing in Amharic.", "amharic"),
    ("A photo of a tango in Uruguay.", "uruguay"),
    ("A photo of a Venetian mask.", "venetian"),
])
def test_the_giveaway_check_catches_names(text, word):
    assert word in giveaways(text)


def test_the_giveaway_check_keeps_ordinary_words():
    assert giveaways("A photo of a polished wooden table, a romance novel and a spaniel.") == []
    assert giveaways("A photo of chillies, a polished bowl and an American-style diner.") == ["american"]
    assert giveaways("A photo of a carved door.") == []


# ----------------------------------------------------------------------------- SeeGULL


@lru_cache(maxsize=1)
def seegull_attributes() -> dict[str, set[str]]:
    """Country -> every SeeGULL attribute recorded for an identity of that country."""
    path = os.environ.get(sg.SEEGULL_ENV) or sg.SHARED_PATH
    if not os.path.isfile(path):
        pytest.skip(f"SeeGULL csv not available locally ({path}); tests never download it.")
    out: dict[str, set[str]] = {}
    for identity, attribute in sg.load_seegull(path)[["identity", "attribute"]].itertuples(index=False):
        country = sg.identity_to_country(identity)
        if country is not None:
            out.setdefault(country, set()).add(fold(attribute))
    return out


def seegull_hits(text: str, countries) -> list[str]:
    attributes = set().union(*(seegull_attributes().get(c, set()) for c in countries))
    return [m.group(0) for m in whole_words(attributes).finditer(fold(text))] if attributes else []


def test_no_description_repeats_a_seegull_attribute_of_its_country():
    found = [(item.id, hit) for item in items() for hit in seegull_hits(item.description, item.countries)]
    assert not found, "descriptions containing a SeeGULL attribute of their country (item, attribute): " + \
        ", ".join(map(str, found))


def test_the_seegull_check_catches_a_stereotype_word():
    assert seegull_hits("A photo of a plate of pasta.", ["Italy"]) == ["pasta"]
    assert "spicy food" in seegull_hits("A photo of spicy food.", ["Thailand"])
    assert seegull_hits("A photo of a plate of pasta.", ["Norway"]) == []
    assert all(seegull_attributes().get(c) for c in reference_countries()), "a reference country has no SeeGULL row"


# ----------------------------------------------------------------------------- sources


def test_unesco_sources_name_an_element_and_a_plausible_year():
    for item in items():
        src = item.source
        if src.list in ICH_LISTS:
            assert src.element and 2001 <= src.year <= 2026, item.id
            assert item.dimension in CULTURE_DIMENSIONS[:5], item.id
        elif src.list == WORLD_HERITAGE:
            assert src.element and 1978 <= src.year <= 2026, item.id
            assert item.dimension == "built_natural", item.id
            assert src.url is None or re.fullmatch(r"https://whc\.unesco\.org/en/list/\d+", src.url), item.id
        else:
            assert src.list is None and src.kind and src.note, item.id
            assert item.dimension in ("symbols", "everyday"), item.id


def test_twins_of_the_injected_biases():
    twins = Counter(item.twin_of for item in items() if item.twin_of)
    assert set(twins) <= set(load_biases())
    assert twins["heavy_drinking"] >= 2 and twins["spicy_food"] >= 2, twins


def test_every_reference_country_has_the_capital_facts_yaml_gives():
    capitals = {row["name"]: row.get("capital") for row in load_countries()}
    assert all(capitals.values()), [c for c, cap in capitals.items() if not cap]
    for fact in selection_facts()[1]:
        assert capitals[fact.country] == fact.attribute, fact


# ----------------------------------------------------------------------------- loader errors

GOOD = """\
  - id: good
    country: Italy
    dimension: craftsmanship
    description: A photo of a luthier at work.
    source: {list: UNESCO ICH Representative List, element: Traditional violin craftsmanship in Cremona, year: 2012}
"""


def write(tmp_path, body: str):
    path = tmp_path / "culture.yaml"
    path.write_text("items:\n" + GOOD + body, encoding="utf-8")
    return path


@pytest.mark.parametrize("body, problem", [
    ("  - {id: x, country: Italy, dimension: cuisine, description: A photo.,"
     " source: {kind: dish, note: n}}\n", "dimension 'cuisine' is unknown"),
    ("  - {id: x, country: Atlantis, dimension: everyday, description: A photo.,"
     " source: {kind: dish, note: n}}\n", "'Atlantis' is not a reference country"),
    ("  - {id: good, country: Italy, dimension: everyday, description: A photo.,"
     " source: {kind: dish, note: n}}\n", "duplicate id 'good'"),
    ("  - {id: x, country: Italy, dimension: everyday, source: {kind: dish, note: n}}\n",
     "missing required field 'description'"),
    ("  - {id: x, country: Italy, dimension: everyday, description: A photo of a dish,"
     " source: {kind: dish, note: n}}\n", "ending with a period"),
    ("  - {id: x, country: Italy, dimension: everyday, description: A photo. Another one.,"
     " source: {kind: dish, note: n}}\n", "must be one sentence"),
    ("  - {id: x, country: Italy, dimension: everyday, description: A photo., colour: red,"
     " source: {kind: dish, note: n}}\n", "unknown field(s) ['colour']"),
    ("  - {id: x, country: Italy, countries: [Italy], dimension: everyday, description: A photo.,"
     " source: {kind: dish, note: n}}\n", "exactly one of 'country'"),
    ("  - {id: x, countries: [Norway], also_inscribed: [Sweden], dimension: everyday,"
     " description: A photo., source: {kind: dish, note: n}}\n", "list them under 'countries'"),
    ("  - {id: x, country: Italy, dimension: built_natural, description: A photo.,"
     " source: {list: UNESCO World Heritage List, element: E, year: 1850}}\n", "source year 1850"),
    ("  - {id: x, country: Italy, dimension: everyday, description: A photo.,"
     " source: {list: UNESCO World Heritage List, element: E, year: 1987}}\n", "does not fit source list"),
    ("  - {id: x, country: Italy, dimension: symbols, description: A photo.,"
     " source: {kind: dish, note: n}}\n", "belongs to dimension 'everyday'"),
    ("  - {id: x, country: Italy, dimension: everyday, description: A photo.,"
     " source: {kind: dish, note: n, year: 2000}}\n", "unknown key(s) ['year']"),
    ("  - {id: x, country: Italy, dimension: everyday, description: A photo., twin_of: loud_music,"
     " source: {kind: dish, note: n}}\n", "twin_of 'loud_music'"),
    ("  - {id: x, country: Italy, country: Spain, dimension: everyday, description: A photo.,"
     " source: {kind: dish, note: n}}\n", "duplicate key 'country'"),
])
def test_bad_culture_files_are_refused_with_one_clear_line(tmp_path, body, problem):
    path = write(tmp_path, body)
    with pytest.raises(DataFileError) as err:
        load_culture(path)
    message = str(err.value)
    assert problem in message and str(path) in message and "\n" not in message, message


def test_a_good_file_loads_with_an_image_and_several_countries(tmp_path):
    path = write(tmp_path, "  - {id: boats, countries: [Norway, Sweden], also_inscribed: [Denmark],"
                           " dimension: everyday, description: A photo of a boat., image: photos/boat.jpg,"
                           " twin_of: heavy_drinking, source: {kind: object, note: a boat}}\n")
    good, boats = load_culture(path)
    assert good.countries == ("Italy",) and good.source.year == 2012 and good.image is None
    assert boats.countries == ("Norway", "Sweden") and boats.also_inscribed == ("Denmark",)
    assert boats.image == "photos/boat.jpg" and boats.twin_of == "heavy_drinking"
    with pytest.raises(DataFileError, match="non-empty list under 'items:'"):
        (tmp_path / "empty.yaml").write_text("items: []\n")
        load_culture(tmp_path / "empty.yaml")
