"""The data issue 12 added: the knowledge control's facts, the contrast countries, the
held-out selection templates; and the run folder's key, which must change with the code
and the data so that no stage result outlives what computed it."""

import pytest

from biasgym_lib.config import load_profile
from biasgym_lib.data import (DataFileError, contrast_countries, load_facts, load_templates, reference_countries,
                              selection_templates)
from biasgym_lib.data.facts import RELATIONS


def test_the_facts_are_many_known_relations_over_many_countries():
    facts = load_facts()
    assert len(facts) >= 30 and len({f.country for f in facts}) >= 15
    assert {f.relation for f in facts} == set(RELATIONS)
    assert {f.country for f in facts} <= set(reference_countries())  # single tokens, like every reference
    assert len({f.name for f in facts}) == len(facts) and all(f.attributes == (f.attribute,) for f in facts)


def test_bad_fact_files_are_refused(tmp_path):
    path = tmp_path / "facts.yaml"
    path.write_text("facts:\n  - {country: Italy, relation: colour, attribute: red}\n")
    with pytest.raises(DataFileError, match="relation 'colour'"):
        load_facts(path)
    path.write_text("facts:\n  - {country: Italy, relation: demonym, attribute: Italian}\n"
                    "  - {country: Italy, relation: demonym, attribute: Italian}\n")
    with pytest.raises(DataFileError, match="listed twice"):
        load_facts(path)


def test_contrast_countries_never_meet_the_references(tmp_path):
    contrast = contrast_countries()
    assert contrast and not set(contrast) & set(reference_countries())
    path = tmp_path / "countries.yaml"
    path.write_text("countries:\n  - {name: Italy, demonym: Italian}\ncontrast: [Italy]\n")
    with pytest.raises(DataFileError, match="also reference countries"):
        contrast_countries(path)


def test_selection_templates_are_held_out():
    chosen = selection_templates()
    assert chosen and not set(chosen) & set(load_templates())


def test_steering_references_span_the_list():
    from biasgym_lib.runs import steer_references

    cfg = load_profile("teaching")
    refs = steer_references(cfg, 8)
    everything = reference_countries()
    assert len(refs) == 8 and len(set(refs)) == 8 and refs[0] == everything[0]
    positions = [everything.index(c) for c in refs]
    assert positions == sorted(positions) and positions[-1] >= len(everything) - len(everything) // 8 - 1
    assert steer_references(cfg, None) == everything


def test_the_run_folder_changes_when_a_data_file_changes(tmp_path, monkeypatch):
    """Editing a template (or any data file, or the library) must give a new run folder,
    so a kept number is never served for data that would compute another."""
    import shutil

    import biasgym_lib.cache as pipeline

    root = tmp_path / "project"
    shutil.copytree(pipeline.PROJECT_ROOT / "data", root / "data", ignore=shutil.ignore_patterns("tokens"))
    monkeypatch.setattr(pipeline, "PROJECT_ROOT", root)
    cfg = load_profile("quick")
    before = pipeline.run_dir(cfg)
    assert pipeline.run_dir(cfg) == before  # stable
    templates = root / "data" / "templates.yaml"
    templates.write_text(templates.read_text().replace("People from {entity} are {attribute}.",
                                                       "Folks from {entity} are {attribute}."))
    assert pipeline.run_dir(cfg) != before
    assert pipeline.run_dir(load_profile("quick", k=5)) != pipeline.run_dir(cfg)


def test_selection_facts_are_held_out_from_the_knowledge_control():
    from biasgym_lib.data import selection_facts

    templates, facts = selection_facts()
    control = load_facts()
    assert len(facts) >= 10 and not {f.country for f in facts} & {f.country for f in control}
    assert not set(templates) & set(load_templates())
    # issue 23: the control asks capitals of *other* countries, and a relation no ranking ever sees
    from biasgym_lib.data import held_out_relations

    held = held_out_relations()
    assert held and {f.relation for f in facts} == {"capital"} and not set(held) & {"capital"}
    assert {f.relation for f in control} >= {"demonym", "continent", "language", "capital", *held}
    assert len({f.relation for f in control}) >= 5 and sum(f.relation in held for f in control) >= 10


def test_relations_with_their_own_templates_use_them(tmp_path):
    from biasgym_lib.data.facts import relation_templates

    own = relation_templates()
    facts = load_facts()
    for f in facts:
        assert f.templates == own.get(f.relation, ())
    assert {"capital", "currency"} <= set(own) and "demonym" not in own
    path = tmp_path / "facts.yaml"
    path.write_text("relation_templates:\n  colour: [\"The flag of {entity} is {attribute}.\"]\n"
                    "facts:\n  - {country: Italy, relation: demonym, attribute: Italian}\n")
    with pytest.raises(DataFileError, match="known relation"):
        load_facts(path)
    path.write_text("held_out_relations: [capital]\nfacts: []\n")
    from biasgym_lib.data import held_out_relations

    with pytest.raises(DataFileError, match="cannot be held out"):
        held_out_relations(path)


def test_selective_ranking_subtracts_the_knowledge_scores():
    import torch

    from types import SimpleNamespace

    from biasgym_lib.heads import bias_rankings

    atp = torch.zeros(3, 4)
    atp[0, 0], atp[1, 1], atp[2, 2] = 3.0, 2.0, 1.0
    knowledge = torch.zeros(3, 4)
    knowledge[0, 0] = 5.0  # the top attribution-patching head also carries country facts
    scope = SimpleNamespace(scores={m: atp for m in ("dla", "delta_dla", "attr", "atp", "attention")})  # a ScopeResult's scores
    ranks = bias_rankings([scope, scope], 3, knowledge=knowledge)
    assert ranks["atp"][:3] == [(0, 0), (1, 1), (2, 2)]
    assert ranks["atp_selective"][:2] == [(1, 1), (2, 2)] and (0, 0) not in ranks["atp_selective"]
    assert "atp_selective" not in bias_rankings([scope], 3)
    assert set(ranks["random"]) == {1, 2, 3} and len(ranks["random"][2]) == 5
