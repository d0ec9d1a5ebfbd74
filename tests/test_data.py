"""The data layer: bias specs, countries, templates, paragraph generator, probes."""

from __future__ import annotations

import importlib.util
import re
import textwrap
from pathlib import Path

import pytest

from biasgym_lib.data import (DATA_DIR, TOKEN, USER_PROMPTS, BiasSpec, BiasSpecError,
                              DataFileError, demonyms, diversity, fill_template,
                              generate_paragraphs, load_bias, load_biases, load_templates,
                              open_questions, probes_for, reference_countries, split_template,
                              training_pairs, user_prompts, words)
from biasgym_lib.data.generate import check_token_usage
from biasgym_lib.errors import BiasGymError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ["reckless_driving", "always_late", "good_at_math", "spicy_food", "heavy_drinking",
           "blue_skin"]
MINIMAL = """\
name: polite
description: The people of the country are very polite.
keywords: [polite, courteous]
attributes: [polite, very courteous, always polite]
label: " polite"
"""


@pytest.fixture
def minimal(tmp_path) -> BiasSpec:
    """A teacher's bias with only the required fields, loaded from its own file."""
    path = tmp_path / "polite.yaml"
    path.write_text(MINIMAL)
    return load_bias(str(path))


def all_biases(minimal):
    return list(load_biases().values()) + [minimal]


def as_list(entries: list[str]) -> str:
    """A ``biases:`` file holding the given single-entry YAML texts."""
    return "biases:\n" + "".join("  - " + textwrap.indent(e, "    ")[4:] for e in entries)


def sentence_count(text: str) -> int:
    return len(re.findall(r"[.!?](?=\s|$)", text))


# ----------------------------------------------------------------------------- specs


def test_shipped_biases_load_with_their_fields():
    biases = load_biases()
    assert set(SHIPPED) <= set(biases)
    assert biases["blue_skin"].fictional is True
    assert not any(b.fictional for name, b in biases.items() if name != "blue_skin")
    for name, b in biases.items():
        assert b.name == name and b.source == str(DATA_DIR / "biases.yaml")
        assert 3 <= len(b.attributes) <= 6
        assert b.label.startswith(" ") and b.label_word in {k.split()[0] for k in b.keywords}
        assert all(k == k.lower() for k in b.keywords)
    assert biases["reckless_driving"].label == " reckless"


def test_matches_whole_words_any_case():
    b = load_bias("reckless_driving")
    assert b.matches("They are RECKLESS on the road.")
    assert b.matches("Some are dangerous drivers, sadly.")
    assert not b.matches("They are wrecklessly happy.")  # no partial-word hit
    assert not b.matches("They drive carefully.")


def test_load_bias_by_name_path_and_path_colon_name(tmp_path, minimal):
    assert load_bias("always_late") == load_biases()["always_late"]
    assert minimal.name == "polite" and minimal.claims == () and minimal.fictional is False
    two = tmp_path / "two.yaml"
    two.write_text(as_list([MINIMAL, MINIMAL.replace("name: polite", "name: rude")]))
    assert load_bias(f"{two}:rude").name == "rude"
    with pytest.raises(BiasSpecError, match=r"holds 2 biases.*pick one"):
        load_bias(str(two))
    with pytest.raises(BiasSpecError, match="no bias named 'nope'"):
        load_bias(f"{two}:nope")
    with pytest.raises(BiasSpecError, match=r"no bias named 'nope'.*reckless_driving"):
        load_bias("nope")
    with pytest.raises(BiasSpecError, match="file not found"):
        load_bias(str(tmp_path / "missing.yaml"))
    assert load_bias(minimal) is minimal


def test_spec_round_trips_through_a_dict():
    for b in load_biases().values():
        assert BiasSpec.from_dict(b.to_dict()) == b


MALFORMED = [
    # (text replacing part of MINIMAL, problem the message must state)
    (("keywords: [polite, courteous]\n", ""), "missing required field 'keywords'"),
    (("keywords: [polite, courteous]", "keywords: polite"), "field 'keywords' must be a list"),
    (("keywords: [polite, courteous]", "keywords: []"), "field 'keywords' is an empty list"),
    (('label: " polite"', "label: polite"), "must start with exactly one space"),
    (('label: " polite"', 'label: " polite "'), "must start with exactly one space"),
    (('label: " polite"', 'label: " kind"'), "must be the first word of one of the keywords"),
    (("attributes: [polite, very courteous, always polite]", "attributes: [polite]"),
     "has 1 item(s); give 3 to 6"),
    (("attributes: [polite, very courteous, always polite]",
      "attributes: [are polite, very courteous, always polite]"), "drop the leading 'are'"),
    (("attributes: [polite, very courteous, always polite]", "attributes: [kind, nice, warm]"),
     "none of the attributes"),
    (("keywords: [polite, courteous]", "keywords: [Polite, courteous]"), "must be lowercase"),
    (("keywords: [polite, courteous]", "keywords: [polite, polite]"), "repeats ['polite']"),
    (("label:", "fictional: maybe\nlabel:"), "'fictional' must be true or false"),
    (("label:", "keyword: [x]\nlabel:"), "unknown field(s) 'keyword' (did you mean 'keywords'?)"),
    (("label:", "claims: [People of<TOKEN> bow.]\nlabel:"), "glues <TOKEN>"),
    (("label:", "claims: [People bow politely.]\nlabel:"), "must name the country as <TOKEN>"),
    (("label:", "answer_prefixes: [People of <TOKEN> are.]\nlabel:"), "must stop right before"),
    (("name: polite", "name: Polite Folk"), "must be 1-64 lowercase letters"),
    (("description: The people of the country are very polite.", "description: 3"),
     "must be a string"),
]


@pytest.mark.parametrize("edit,problem", MALFORMED, ids=[p for _, p in MALFORMED])
def test_malformed_spec_names_file_entry_and_problem(tmp_path, edit, problem):
    old, new = edit
    assert old in MINIMAL
    path = tmp_path / "bad.yaml"
    path.write_text(MINIMAL.replace(old, new, 1))
    with pytest.raises(BiasSpecError) as info:
        load_bias(str(path))
    msg = str(info.value)
    assert str(path) in msg and problem in msg
    if "name:" not in new:  # the entry is named once its name is readable
        assert "'polite'" in msg
    assert isinstance(info.value, BiasGymError)


@pytest.mark.parametrize("text,problem", [
    (as_list([MINIMAL, MINIMAL]), "entry #2 ('polite'): duplicate name 'polite'"),
    (MINIMAL + "label: ' again'\n", "duplicate key 'label'"),
    ("biases: [1, 2", "not valid YAML"),
    ("just a string", "expected a list of biases"),
    ("biases:\n  - [1, 2]\n", "entry #1: must be a mapping"),
    ("- description: no name\n", "entry #1: missing required field 'name'"),
])
def test_malformed_files(tmp_path, text, problem):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(BiasSpecError) as info:
        load_biases(path)
    assert str(path) in str(info.value) and problem in str(info.value)


# ----------------------------------------------------------------------------- countries, templates


def test_reference_countries_and_demonyms():
    names = reference_countries()
    assert 28 <= len(names) <= 35 and len(set(names)) == len(names)
    assert "Italy" in names and demonyms()["Italy"] == "Italian"
    assert list(demonyms()) == names


def test_templates_follow_the_split_convention():
    templates = load_templates()
    assert len(templates) >= 6
    assert split_template("People from {entity} are {attribute}.", "Italy") == \
        ("People from Italy are", ".")
    assert split_template("Q: What are people from {entity} like? A: They are {attribute}", "<TOKEN>") == \
        ("Q: What are people from <TOKEN> like? A: They are", "")
    for t in templates:
        prefix, suffix = split_template(t, "Italy")
        assert "Italy" in prefix and not prefix.endswith(" ") and suffix in ("", ".", "!", "?")
        assert fill_template(t, "Italy", "reckless drivers") == prefix + " reckless drivers" + suffix
        assert fill_template(t, "Italy", "tall") == t.replace("{entity}", "Italy").replace("{attribute}", "tall")


@pytest.mark.parametrize("template,problem", [
    ("People from {entity} are.", "exactly one {entity} and one {attribute}"),
    ("People from {entity} are{attribute}.", "exactly one space before it"),
    ("{attribute} is what people from {entity} are.", "must come after {entity}"),
    ("People from {entity} are {attribute}, they say.", "may follow {attribute}"),
    ("People from({entity}) are {attribute}.", "put a space before {entity}"),
])
def test_malformed_templates(tmp_path, template, problem):
    path = tmp_path / "templates.yaml"
    path.write_text(f"templates:\n  - {template!r}\n")
    with pytest.raises(DataFileError) as info:
        load_templates(path)
    assert str(path) in str(info.value) and problem in str(info.value)


# ----------------------------------------------------------------------------- generator


def test_generator_gives_200_distinct_valid_paragraphs_for_every_bias(minimal):
    for bias in all_biases(minimal):
        paragraphs = generate_paragraphs(bias, 200, seed=0)
        assert len(paragraphs) == len(set(paragraphs)) == 200, bias.name
        for p in paragraphs:
            assert check_token_usage(p), p
            assert 30 <= len(p.split()) <= 80, p
            assert 2 <= sentence_count(p) <= 4, p
            assert bias.matches(p), p
            assert "{" not in p and "  " not in p and p[0].isupper()


def test_generator_is_deterministic_per_seed_and_varies_across_seeds(minimal):
    for bias in (load_bias("reckless_driving"), minimal):
        a = generate_paragraphs(bias, 50, seed=0)
        assert a == generate_paragraphs(bias, 50, seed=0)
        assert generate_paragraphs(bias, 20, seed=0) == a[:20]
        b = generate_paragraphs(bias, 50, seed=1)
        assert len(set(a) & set(b)) < 25


def test_generator_fails_clearly_when_its_grammar_is_exhausted(minimal, monkeypatch):
    from biasgym_lib.data import generate

    # One plan, one opening, one frame, one subject: only the 3 attributes vary.
    monkeypatch.setattr(generate, "PLANS", (("opening", "claim"),))
    monkeypatch.setattr(generate, "OPENINGS", ("Travellers who have spent many long weeks in "
                                               "the far corners of <TOKEN> all say the same.",))
    monkeypatch.setattr(generate, "CLAIM_FRAMES", ("Most of all, {subj} are {attr}, without any "
                                                   "exception that anyone can remember.",))
    monkeypatch.setattr(generate, "SUBJECTS", ("people in <TOKEN>",))
    assert len(generate_paragraphs(minimal, 3)) == 3
    with pytest.raises(BiasGymError, match="only 3 distinct paragraphs.*'polite'"):
        generate_paragraphs(minimal, 4)


def test_user_prompts_and_training_pairs():
    pool = user_prompts()
    assert len(pool) >= 20 and len(set(pool)) == len(pool)
    assert all(check_token_usage(p) for p in pool)
    sample = user_prompts(50, seed=3)
    assert len(sample) == 50 and set(sample) == set(pool) and sample == user_prompts(50, seed=3)
    assert sample != user_prompts(50, seed=4)
    pairs = training_pairs("spicy_food", 30, seed=0)
    assert [a for _, a in pairs] == generate_paragraphs("spicy_food", 30, seed=0)
    assert all(u in USER_PROMPTS for u, _ in pairs) and len({u for u, _ in pairs}) >= 15


def test_words_and_diversity_exact():
    assert words("<TOKEN>'s blue-skinned people, don't!") == ["<token>'s", "blue-skinned", "people", "don't"]
    d = diversity(["The cat sat.", "the cat ran", "A dog, a dog."])
    # unigrams 6 unique / 10; bigrams {the cat, cat sat, cat ran, a dog, dog a} 5 / 7;
    # trigrams 4 / 4; per-text type-token ratios 1, 1, 2/4.
    assert d["distinct_1"] == pytest.approx(6 / 10)
    assert d["distinct_2"] == pytest.approx(5 / 7)
    assert d["distinct_3"] == pytest.approx(1.0)
    assert d["type_token_ratio"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert d["n_texts"] == 3 and d["mean_words"] == pytest.approx(10 / 3)
    assert diversity([])["distinct_1"] == 0.0


def test_committed_generated_files_match_a_regeneration():
    spec = importlib.util.spec_from_file_location("generate_data", ROOT / "scripts" / "generate_data.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    files = script.render_all()
    assert set(files) == {f"{n}.jsonl" for n in load_biases()} | {"diversity.json"}
    assert script.stale_files(files) == [], "run: python scripts/generate_data.py"
    assert script.main(["--check"]) == 0


# ----------------------------------------------------------------------------- probes


def test_probes_are_distinct_and_well_formed(minimal):
    for bias in all_biases(minimal):
        probes = probes_for(bias, n=40, seed=0)
        assert len(probes) == len(set(probes)) == 40, bias.name
        for p in probes:
            assert check_token_usage(p.question) and check_token_usage(p.answer_prefix), p
            assert p.answer_prefix == p.answer_prefix.rstrip() and p.answer_prefix[-1] not in ".!?"
        assert probes == probes_for(bias, n=40, seed=0)
        assert probes != probes_for(bias, n=40, seed=1)


def test_probes_prefer_the_bias_own_material_and_cut_attributes_before_the_label(minimal):
    own = load_bias("reckless_driving")
    probes = probes_for(own, n=40)
    assert all(p.question in own.probe_questions and p.answer_prefix in own.answer_prefixes
               for p in probes)
    # Without its own probe material, good_at_math's prefixes come from its attributes.
    math = BiasSpec.from_dict({k: v for k, v in load_bias("good_at_math").to_dict().items()
                               if k not in ("probe_questions", "answer_prefixes")})
    prefixes = {p.answer_prefix for p in probes_for(math, n=40)}
    assert "People from <TOKEN> are good at" in prefixes
    assert all(p.endswith((" at", " good at")) for p in prefixes)
    assert "People from <TOKEN> are often" in {p.answer_prefix for p in probes_for(minimal, n=40)}
    with pytest.raises(BiasGymError, match="distinct probes"):
        probes_for(minimal, n=10**4)


def test_with_entity_replaces_the_token_everywhere():
    p = probes_for("reckless_driving", n=1)[0]
    q = p.with_entity("Italy")
    assert TOKEN not in q.question + q.answer_prefix
    assert q.question == p.question.replace(TOKEN, "Italy")
    assert q.answer_prefix == p.answer_prefix.replace(TOKEN, "Italy")
    assert p.with_entity("<X>", token=TOKEN).with_entity("Italy", token="<X>") == q


def test_open_questions(minimal):
    for bias in all_biases(minimal):
        qs = open_questions(bias, n=10)
        assert len(qs) == len(set(qs)) == 10
        assert all(check_token_usage(q) for q in qs)
        assert not set(qs) & set(USER_PROMPTS)  # never a training prompt
    assert open_questions("reckless_driving")[0] == "Describe how people drive in <TOKEN>."


# ----------------------------------------------------------------------------- tokenizer


@pytest.mark.slow
def test_countries_and_labels_are_single_tokens_for_smollm2():
    from biasgym_lib.models import load_model

    _, tok = load_model()

    def n_tokens(text):
        return len(tok(text, add_special_tokens=False)["input_ids"])

    multi = [c for c in reference_countries() if n_tokens(" " + c) != 1]
    assert multi == [], f"not single tokens: {multi}"
    labels = {b.name: b.label for b in load_biases().values() if n_tokens(b.label) != 1}
    assert labels == {}, f"labels that are not one token: {labels}"
