"""The knowledge control (:ref:`method §5 <method-5>`): factual country-attribute pairs (``data/facts.yaml``).

A head set that lowers stereotypes by erasing what the model knows about countries in
general is not removing a bias. So every steering condition is also measured on facts
("People from Japan are Japanese", "... are Asian", "... are speakers of Hindi", "The
capital of Japan is Tokyo", "The currency of Japan is the yen") with the same machinery as
stereotype strength: S(country, fact) = assoc(country, fact) minus the mean over the
reference countries, all under the same intervention. Relations with templates of their
own (capital, currency) use them instead of S's. The held-out relation (currency) is one
that no way of ranking heads ever sees; it is reported apart (:func:`held_out_relations`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .specs import DATA_DIR, DataFileError, read_yaml, yaml_list

FACTS_FILE = DATA_DIR / "facts.yaml"
RELATIONS = ("demonym", "continent", "language", "capital", "currency")


@dataclass(frozen=True)
class Fact:
    """One factual pair: ``attribute`` completes "People from {country} are ___" (S's
    templates), or the relation's own ``templates`` ("The capital of {entity} is {attribute}.")."""

    country: str
    relation: str
    attribute: str
    templates: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """A unique name, used as the "bias" name in association tables."""
        return f"fact: {self.country} / {self.attribute}"

    @property
    def attributes(self) -> tuple[str, ...]:
        """One phrasing: a fact behaves like a one-attribute bias for :func:`assoc_tables`."""
        return (self.attribute,)


def relation_templates(path: str | Path | None = None) -> dict[str, tuple[str, ...]]:
    """The relations that have templates of their own (``relation_templates:``), checked."""
    from .templates import check_template

    path = Path(path) if path is not None else FACTS_FILE
    data = read_yaml(path)
    block = (data.get("relation_templates") if isinstance(data, dict) else None) or {}
    if not isinstance(block, dict):
        raise DataFileError(f"{path}: relation_templates must map a relation to a list of templates.")
    out = {}
    for relation, templates in block.items():
        if relation not in RELATIONS or not isinstance(templates, list) or not templates:
            raise DataFileError(f"{path}: relation_templates.{relation} must be a known relation with a list of "
                                f"templates; known relations: {list(RELATIONS)}.")
        for i, t in enumerate(templates):
            check_template(t, f"{path}: relation_templates.{relation} #{i + 1}")
        out[relation] = tuple(templates)
    return out


def held_out_relations(path: str | Path | None = None) -> tuple[str, ...]:
    """The relations no way of ranking heads ever sees (``held_out_relations:``), reported
    apart in the knowledge control."""
    path = Path(path) if path is not None else FACTS_FILE
    data = read_yaml(path)
    rel = (data.get("held_out_relations") if isinstance(data, dict) else None) or []
    if not isinstance(rel, list) or any(r not in RELATIONS for r in rel):
        raise DataFileError(f"{path}: held_out_relations must list known relations ({list(RELATIONS)}).")
    if "capital" in rel:
        raise DataFileError(f"{path}: 'capital' cannot be held out: the atp_selective ranking is built on capitals.")
    return tuple(rel)


def load_facts(path: str | Path | None = None, per_relation: int = 0) -> list[Fact]:
    """The shipped factual pairs, validated (known relation, no duplicates), each with its
    relation's own templates where it has some. ``per_relation`` > 0 keeps the first that many
    of each relation, in file order (a profile's ``facts_per_relation``: CI's small knowledge
    control; every relation, the held-out one included, stays)."""
    path, rows = yaml_list(path, FACTS_FILE, "facts")
    own = relation_templates(path)
    out, seen = [], set()
    for i, row in enumerate(rows, start=1):
        if not (isinstance(row, dict) and set(row) == {"country", "relation", "attribute"}
                and all(isinstance(v, str) and v.strip() for v in row.values())):
            raise DataFileError(f"{path}: fact #{i} ({row!r}) must have exactly country, relation and "
                                "attribute (non-empty strings).")
        if row["relation"] not in RELATIONS:
            raise DataFileError(f"{path}: fact #{i} has relation {row['relation']!r}; known: {list(RELATIONS)}.")
        fact = Fact(row["country"], row["relation"], row["attribute"], own.get(row["relation"], ()))
        if fact in seen:
            raise DataFileError(f"{path}: fact #{i} ({fact.country} / {fact.attribute}) is listed twice.")
        seen.add(fact)
        out.append(fact)
    if per_relation > 0:
        by_relation: dict = {}
        for f in out:
            by_relation.setdefault(f.relation, []).append(f)
        out = [f for f in out if f in by_relation[f.relation][:per_relation]]
    return out


def selection_facts(path: str | Path | None = None) -> tuple[list[str], list[Fact]]:
    """The facts that select heads (``atp_selective``), never used in the knowledge control:
    ``(templates, facts)``; their countries are disjoint from :func:`load_facts`'s (the control
    asks the same relation, capital, of other countries; its held-out relation never)."""
    from .templates import check_template

    path = Path(path) if path is not None else FACTS_FILE
    data = read_yaml(path)
    block = data.get("selection_facts") if isinstance(data, dict) else None
    if not isinstance(block, dict) or not block.get("templates") or not block.get("pairs"):
        raise DataFileError(f"{path}: expected 'selection_facts:' with 'templates' and 'pairs'.")
    templates = list(block["templates"])
    for i, t in enumerate(templates):
        check_template(t, f"{path}: selection_facts template #{i + 1}")
    facts = []
    for i, row in enumerate(block["pairs"], start=1):
        if not (isinstance(row, dict) and set(row) == {"country", "attribute"}):
            raise DataFileError(f"{path}: selection fact #{i} ({row!r}) must have exactly country and attribute.")
        facts.append(Fact(row["country"], "capital", row["attribute"]))
    clash = {f.country for f in facts} & {f.country for f in load_facts(path)}
    if clash:
        raise DataFileError(f"{path}: selection facts and the knowledge control share countries {sorted(clash)}; "
                            "they must be disjoint so the control stays held out.")
    return templates, facts
