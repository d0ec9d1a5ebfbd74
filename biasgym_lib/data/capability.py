"""The capability sets shipped with the project (:ref:`method §5 <method-5>`), read without any hub.

- ``data/capability/neutral.jsonl``: original neutral passages (no nationality, country,
  ethnicity or demonym), for perplexity. Lines: ``{"id", "topic", "text"}``.
- ``data/capability/mc.jsonl``: four-option general-knowledge questions (geography,
  science, arithmetic, language, history), for accuracy. Lines:
  ``{"id", "category", "question", "options": [4 strings], "answer": index}``.
- ``data/capability/country_texts.jsonl``: original factual passages that each name 2-5 reference
  countries (no statements about peoples), for perplexity under entity-level interventions.
  Lines: ``{"id", "topic", "text"}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import BiasGymError

CAPABILITY_DIR = Path(__file__).resolve().parents[2] / "data" / "capability"
NEUTRAL_FILE = CAPABILITY_DIR / "neutral.jsonl"
MC_FILE = CAPABILITY_DIR / "mc.jsonl"
COUNTRY_TEXTS_FILE = CAPABILITY_DIR / "country_texts.jsonl"
MC_CATEGORIES = ("geography", "science", "arithmetic", "language", "history")
N_OPTIONS = 4


class CapabilityDataError(BiasGymError):
    """A shipped capability file is missing or malformed."""


@dataclass(frozen=True)
class MCQuestion:
    """One multiple-choice question; ``answer`` indexes ``options``."""

    id: str
    category: str
    question: str
    options: tuple[str, ...]
    answer: int

    @property
    def correct(self) -> str:
        return self.options[self.answer]


def _read_jsonl(path: Path) -> list[dict]:
    """Every line of a JSON-lines file, with the line number in any error."""
    if not path.is_file():
        raise CapabilityDataError(f"capability file {path} is missing; it ships with the project "
                                  "in data/capability/ (a source checkout or editable install is needed).")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CapabilityDataError(f"{path.name} line {n} is not valid JSON: {exc}") from exc
        if not isinstance(row, dict):
            raise CapabilityDataError(f"{path.name} line {n} must be a JSON object.")
        rows.append(row)
    if not rows:
        raise CapabilityDataError(f"{path} is empty.")
    return rows


def _check_keys(row: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise CapabilityDataError(f"{where} lacks the key(s) {missing}.")


def _check_unique_ids(rows: list[dict], name: str) -> None:
    seen = set()
    for r in rows:
        if r["id"] in seen:
            raise CapabilityDataError(f"{name}: duplicate id {r['id']!r}.")
        seen.add(r["id"])


def load_neutral_records(path: Path = NEUTRAL_FILE) -> list[dict]:
    """The neutral passages as ``{"id", "topic", "text"}`` dicts, validated."""
    return _passages(path)


def _passages(path, check=None) -> list[dict]:
    """``{"id", "topic", "text"}`` records of a JSONL file with non-empty texts and unique ids;
    ``check(record, where)`` validates each further."""
    rows = _read_jsonl(Path(path))
    for n, r in enumerate(rows, start=1):
        where = f"{Path(path).name} record {n}"
        _check_keys(r, ("id", "topic", "text"), where)
        if not isinstance(r["text"], str) or not r["text"].strip():
            raise CapabilityDataError(f"{where} ({r['id']!r}) has an empty text.")
        if check is not None:
            check(r, where)
    _check_unique_ids(rows, Path(path).name)
    return rows


def load_neutral_texts(path: Path = NEUTRAL_FILE) -> list[str]:
    """The neutral passages' texts, in file order (for :func:`biasgym_lib.evaluate.perplexity`)."""
    return [r["text"] for r in load_neutral_records(path)]


def load_country_records(path: Path = COUNTRY_TEXTS_FILE) -> list[dict]:
    """The country passages as ``{"id", "topic", "text"}`` dicts, validated; each text must name
    at least two different countries of the countries file (its reference or contrast lists; read
    from the file itself, so a run that uses only some reference countries reads the same texts)."""
    import re

    from .specs import contrast_countries, load_countries

    names = [row["name"] for row in load_countries()] + contrast_countries()
    patterns = {c: re.compile(r"\b" + re.escape(c) + r"\b") for c in names}

    def names_two(r, where):
        named = [c for c, pat in patterns.items() if pat.search(r["text"])]
        if len(named) < 2:
            raise CapabilityDataError(f"{where} ({r['id']!r}) names {len(named)} "
                                      f"country(ies) {named}; at least two are needed.")
    return _passages(path, names_two)


def load_country_texts(path: Path = COUNTRY_TEXTS_FILE) -> list[str]:
    """The country passages' texts, in file order (for :func:`biasgym_lib.evaluate.perplexity`)."""
    return [r["text"] for r in load_country_records(path)]


def _mc_question(r: dict, where: str) -> MCQuestion:
    _check_keys(r, ("id", "category", "question", "options", "answer"), where)
    opts = r["options"]
    if not isinstance(opts, list) or len(opts) != N_OPTIONS or not all(isinstance(o, str) and o.strip() for o in opts):
        raise CapabilityDataError(f"{where} ({r['id']!r}) must have {N_OPTIONS} non-empty string options.")
    if len({o.strip().casefold() for o in opts}) != N_OPTIONS:
        raise CapabilityDataError(f"{where} ({r['id']!r}) has repeated options: {opts}.")
    ans = r["answer"]
    if not isinstance(ans, int) or isinstance(ans, bool) or not 0 <= ans < N_OPTIONS:
        raise CapabilityDataError(f"{where} ({r['id']!r}) answer must be an index 0-{N_OPTIONS - 1}, got {ans!r}.")
    if r["category"] not in MC_CATEGORIES:
        raise CapabilityDataError(f"{where} ({r['id']!r}) has unknown category {r['category']!r}; "
                                  f"known: {MC_CATEGORIES}.")
    if not isinstance(r["question"], str) or not r["question"].strip():
        raise CapabilityDataError(f"{where} ({r['id']!r}) has an empty question.")
    return MCQuestion(id=str(r["id"]), category=r["category"], question=r["question"],
                      options=tuple(opts), answer=ans)


def load_mc(path: Path = MC_FILE, categories: list[str] | None = None) -> list[MCQuestion]:
    """The multiple-choice questions, validated; optionally only some ``categories``."""
    rows = _read_jsonl(Path(path))
    questions = [_mc_question(r, f"{Path(path).name} record {n}") for n, r in enumerate(rows, start=1)]
    _check_unique_ids(rows, Path(path).name)
    if categories is not None:
        unknown = sorted(set(categories) - set(MC_CATEGORIES))
        if unknown:
            raise CapabilityDataError(f"unknown categories {unknown}; known: {MC_CATEGORIES}.")
        questions = [q for q in questions if q.category in categories]
    return questions
