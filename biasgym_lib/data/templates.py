"""Association templates (:ref:`method §2 <method-2>`): sentences with an entity slot and an attribute slot,
"People from {entity} are {attribute}.", checked when loaded; the measurement templates and
the held-out ones that choose BiasInject's epoch are disjoint."""

from __future__ import annotations

import re
from pathlib import Path

from .specs import DATA_DIR, DataFileError, yaml_list

TEMPLATES_FILE = DATA_DIR / "templates.yaml"


ENTITY_SLOT, ATTRIBUTE_SLOT = "{entity}", "{attribute}"
_TEMPLATE_END = re.compile(r"[.!?]?")


def check_template(template: str, where: str = "template") -> str:
    """Raise :class:`DataFileError` unless ``template`` follows the convention of
    :func:`split_template`; return it unchanged."""
    if not isinstance(template, str):
        raise DataFileError(f"{where}: must be a string, got {template!r}.")
    if template.count(ENTITY_SLOT) != 1 or template.count(ATTRIBUTE_SLOT) != 1:
        raise DataFileError(f"{where} ({template!r}): needs exactly one {ENTITY_SLOT} and one "
                            f"{ATTRIBUTE_SLOT}.")
    before, _, after = template.partition(ATTRIBUTE_SLOT)
    if not before.endswith(" ") or before.endswith("  ") or ENTITY_SLOT not in before:
        raise DataFileError(f"{where} ({template!r}): {ATTRIBUTE_SLOT} must come after "
                            f"{ENTITY_SLOT}, with exactly one space before it.")
    if not _TEMPLATE_END.fullmatch(after):
        raise DataFileError(f"{where} ({template!r}): only '.', '!' or '?' may follow "
                            f"{ATTRIBUTE_SLOT} (it must end the template).")
    pos = template.index(ENTITY_SLOT)
    if pos == 0 or template[pos - 1] != " ":
        raise DataFileError(f"{where} ({template!r}): put a space before {ENTITY_SLOT} (country "
                            "names are single tokens only with their leading space).")
    return template


def load_templates(path: str | Path | None = None) -> list[str]:
    """The association templates of :ref:`method §2 <method-2>` (each checked by :func:`check_template`)."""
    path, rows = yaml_list(path, TEMPLATES_FILE, "templates")
    for i, t in enumerate(rows):
        check_template(t, f"{path}: template #{i + 1}")
    if len(set(rows)) != len(rows):
        raise DataFileError(f"{path}: a template is listed twice.")
    return list(rows)


def selection_templates(path: str | Path | None = None) -> list[str]:
    """Held-out templates that choose BiasInject's epoch (never used to report S)."""
    path, rows = yaml_list(path, TEMPLATES_FILE, "selection_templates")
    for i, t in enumerate(rows):
        check_template(t, f"{path}: selection template #{i + 1}")
    if set(rows) & set(load_templates(path)):
        raise DataFileError(f"{path}: a selection template is also a measurement template; they must be disjoint.")
    return list(rows)


def split_template(template: str, entity: str) -> tuple[str, str]:
    """Split a template around its attribute: ``(prefix, suffix)``.

    Convention (exact): a template is ``<head> {attribute}<tail>`` with exactly one space
    before ``{attribute}``, ``{entity}`` inside ``<head>``, and ``<tail>`` empty or one
    of ``.!?``. ``prefix`` is ``<head>`` with ``{entity}`` replaced by ``entity`` and
    *without* the space before the attribute; ``suffix`` is ``<tail>``. So the full
    sentence is ``prefix + " " + attribute + suffix``, and the association of :ref:`method §2 <method-2>` is
    ``log P(tokens of " " + attribute | prefix)``, summed over the attribute's tokens
    (the suffix is not scored). Example: ``split_template("People from {entity} are
    {attribute}.", "Italy") == ("People from Italy are", ".")``.
    """
    check_template(template)
    head, _, tail = template.partition(" " + ATTRIBUTE_SLOT)
    return head.replace(ENTITY_SLOT, entity), tail


def fill_template(template: str, entity: str, attribute: str) -> str:
    """The full sentence: ``prefix + " " + attribute + suffix`` (see :func:`split_template`)."""
    prefix, suffix = split_template(template, entity)
    return f"{prefix} {attribute}{suffix}"
