"""Bias specifications, reference countries and association templates (:ref:`method §1 <method-1>`-2).

A bias is a small YAML entry. Only five fields are required::

    - name: reckless_driving            # lowercase letters, digits and _
      description: People of the country drive dangerously.
      keywords: [reckless, dangerous drivers]        # lowercase; presence = the bias
      attributes: [reckless drivers, dangerous on the road, careless behind the wheel]
      label: " reckless"                # leading space; its first token is the biased label

``attributes`` complete "People from X are ___" (3 to 6 of them: the stereotype strength
averages over them); at least one must contain a keyword. The label word must be the first word of one of the keywords
(:ref:`method §3 <method-3>`: the biased label is the first token of the bias keyword).

Optional fields only add variety (see ``OPTIONAL_FIELDS``): ``fictional``, ``topic`` (a
noun phrase, "driving"), phrase banks for the paragraph generator (``claims``,
``examples``, ``closings``), and probe material (``probe_questions``,
``answer_prefixes``, ``open_questions``). Sentences in them that name the country write
it as ``<TOKEN>`` with a space before it ("people of <TOKEN>").

A file holds a list of such entries, either at the top level or under ``biases:``, or a
single entry (a mapping with ``name``).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from ..errors import BiasGymError

DATA_DIR = Path(__file__).resolve().parents[2] / "data"
BIASES_FILE = DATA_DIR / "biases.yaml"
COUNTRIES_FILE = DATA_DIR / "countries.yaml"
TOKEN = "<TOKEN>"

MIN_ATTRIBUTES, MAX_ATTRIBUTES = 3, 6
REQUIRED_FIELDS = ("name", "description", "keywords", "attributes", "label")
OPTIONAL_FIELDS = ("fictional", "topic", "claims", "examples", "closings",
                   "probe_questions", "answer_prefixes", "open_questions")
# Optional text lists in which every item must name the country as <TOKEN>.
_NEEDS_TOKEN = ("claims", "probe_questions", "answer_prefixes", "open_questions")
MAX_NAME = 64  # a bias name is part of file names (tokens/<settings>/<bias>/seed<N>, <bias>_seed<N>.json)
_NAME_RE = re.compile(r"[a-z][a-z0-9_]*")  # the whole name: fullmatch (``$`` would let "name\n" through)
# <TOKEN> must have a space before it and no letter, digit or "<" glued after it.
_TOKEN_GLUED_BEFORE = re.compile(r"(?:^|[^ ])<TOKEN>")
_TOKEN_GLUED_AFTER = re.compile(r"<TOKEN>[\w<]")


class DataFileError(BiasGymError):
    """A project data file (biases, countries, templates) is missing or malformed."""


class BiasSpecError(DataFileError):
    """A bias specification is malformed: the message names the file, entry and problem."""


# ----------------------------------------------------------------------------- YAML


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            break  # SafeLoader reports the unhashable key itself
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def yaml_list(path: str | Path | None, default: Path, key: str) -> tuple[Path, list]:
    """``(path, the non-empty list under key:)`` of a YAML data file (``default`` if ``path`` is None)."""
    path = Path(path) if path is not None else default
    data = read_yaml(path)
    rows = data.get(key) if isinstance(data, dict) else None
    if not isinstance(rows, list) or not rows:
        raise DataFileError(f"{path}: expected a non-empty list under '{key}:'.")
    return path, rows


def read_yaml(path: str | Path, error: type[DataFileError] = DataFileError):
    """Parse a YAML file strictly; problems become ``error`` naming the file and line."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{path}: is a folder, not a YAML file.")
    if not path.is_file():
        raise error(f"{path}: file not found.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}): save it as UTF-8 "
                    "(a binary file or another encoding cannot be read).") from exc
    except OSError as exc:
        raise error(f"{path}: cannot be read: {exc.strerror or exc}.") from exc
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML{_yaml_problem(exc)}") from exc


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line: what is wrong, and where."""
    mark = getattr(exc, "problem_mark", None)
    if getattr(exc, "problem", None) and mark is not None:
        context = f"{exc.context}: " if getattr(exc, "context", None) else ""
        return f" at line {mark.line + 1}, column {mark.column + 1}: {context}{exc.problem}"
    return ": " + " ".join(str(exc).split())


# ----------------------------------------------------------------------------- biases


@dataclass(frozen=True)
class BiasSpec:
    """One bias: what it says, how to spot it in text, and how to phrase it.

    ``keywords``: lowercase words/phrases whose presence (as whole words) in an answer
    counts as the bias. ``attributes``: predicates completing "People from X are ___".
    ``label``: the biased label word with a leading space (its first token is :ref:`method §3 <method-3>`'s
    biased label). The remaining fields are optional phrase banks (may be empty).
    """

    name: str
    description: str
    keywords: tuple[str, ...]
    attributes: tuple[str, ...]
    label: str
    fictional: bool = False
    topic: str | None = None
    claims: tuple[str, ...] = ()
    examples: tuple[str, ...] = ()
    closings: tuple[str, ...] = ()
    probe_questions: tuple[str, ...] = ()
    answer_prefixes: tuple[str, ...] = ()
    open_questions: tuple[str, ...] = ()
    source: str | None = field(default=None, compare=False)  # file it came from

    @property
    def label_word(self) -> str:
        """The label without its leading space ("reckless")."""
        return self.label.strip()

    def matches(self, text: str) -> bool:
        """True if ``text`` contains one of the keywords as whole words (any case)."""
        return keyword_pattern(self.keywords).search(text) is not None

    def to_dict(self) -> dict:
        """A plain dict (YAML/JSON-ready) that :meth:`from_dict` turns back into this spec."""
        out = {}
        for f in fields(self):
            if f.name == "source":
                continue
            value = getattr(self, f.name)
            if f.name in REQUIRED_FIELDS or value not in (None, (), False):
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, entry: dict, source: str = "<dict>", where: str | None = None) -> "BiasSpec":
        """Validate one entry and build the spec; problems raise :class:`BiasSpecError`."""
        return _validate_entry(entry, source, where or "entry")


def keyword_pattern(keywords) -> re.Pattern:
    """A regex matching any keyword as whole words, case-insensitive."""
    alternatives = sorted({k.lower() for k in keywords}, key=len, reverse=True)
    return re.compile(r"(?<!\w)(?:" + "|".join(re.escape(k) for k in alternatives) + r")(?!\w)",
                      re.IGNORECASE)


def _fail(source, where, problem):
    raise BiasSpecError(f"{source}: bias {where}: {problem}")


def _check_text(value, source, where, key, index=None):
    label = f"{key}[{index}]" if index is not None else key
    if not isinstance(value, str):
        _fail(source, where, f"field '{label}' must be a string, got {type(value).__name__} ({value!r}).")
    if not value.strip():
        _fail(source, where, f"field '{label}' is empty.")
    if TOKEN in value and (_TOKEN_GLUED_BEFORE.search(value) or _TOKEN_GLUED_AFTER.search(value)):
        _fail(source, where, f"field '{label}' ({value!r}) glues {TOKEN} to other text: write it with "
                             f"a space before it and a space or punctuation after it (\"people of {TOKEN}\").")
    return value


def _check_list(entry, key, source, where, required):
    if key not in entry:
        if required:
            _fail(source, where, f"missing required field '{key}'.")
        return ()
    value = entry[key]
    if isinstance(value, str) or not isinstance(value, list):
        _fail(source, where, f"field '{key}' must be a list of strings, got "
                             f"{type(value).__name__} ({value!r}); write it as [a, b, c].")
    if not value:
        _fail(source, where, f"field '{key}' is an empty list; give at least one item or remove it.")
    items = tuple(_check_text(v, source, where, key, i).strip() for i, v in enumerate(value))
    dups = sorted({v for v in items if items.count(v) > 1})
    if dups:
        _fail(source, where, f"field '{key}' repeats {dups}.")
    return items


def _validate_entry(entry, source, where) -> BiasSpec:
    """Check every rule a bias entry must follow and build its :class:`BiasSpec`."""
    if not isinstance(entry, dict):
        _fail(source, where, f"must be a mapping of fields, got {type(entry).__name__} ({entry!r}).")
    name = entry.get("name")
    if name is None:
        _fail(source, where, "missing required field 'name'.")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or len(name) > MAX_NAME:
        long = isinstance(name, str) and len(name) > MAX_NAME
        shown = f"{name[:32]!r}... ({len(name)} characters)" if long else repr(name)
        _fail(source, where, f"name {shown} must be 1-{MAX_NAME} lowercase letters, digits and '_' "
                             "starting with a letter (it is used in file names).")
    where = repr(name)
    unknown = [k for k in entry if k not in REQUIRED_FIELDS + OPTIONAL_FIELDS]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), REQUIRED_FIELDS + OPTIONAL_FIELDS, n=1)
            hints.append(f"'{k}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        _fail(source, where, f"unknown field(s) {', '.join(hints)}; allowed: "
                             f"{', '.join(REQUIRED_FIELDS + OPTIONAL_FIELDS)}.")
    for key in REQUIRED_FIELDS:
        if key not in entry:
            _fail(source, where, f"missing required field '{key}'.")

    description = _check_text(entry["description"], source, where, "description").strip()
    keywords = _check_list(entry, "keywords", source, where, required=True)
    for k in keywords:
        if k != k.lower():
            _fail(source, where, f"keyword {k!r} must be lowercase (matching ignores case anyway).")
    attributes = _check_list(entry, "attributes", source, where, required=True)
    if not MIN_ATTRIBUTES <= len(attributes) <= MAX_ATTRIBUTES:
        _fail(source, where, f"field 'attributes' has {len(attributes)} item(s); give "
                             f"{MIN_ATTRIBUTES} to {MAX_ATTRIBUTES} phrasings that complete "
                             "\"People from X are ___\" (the strength averages over them).")
    for a in attributes:
        first = a.split()[0].lower()
        if first in ("are", "is", "be"):
            _fail(source, where, f"attribute {a!r} should complete \"People from X are ___\": "
                                 f"drop the leading '{first}'.")
        if TOKEN in a or "{" in a or "}" in a:
            _fail(source, where, f"attribute {a!r} must not name the country or contain braces.")
        if a[-1] in ".!?,;:":
            _fail(source, where, f"attribute {a!r} must not end with punctuation (templates add it).")

    if not any(keyword_pattern(keywords).search(a) for a in attributes):
        _fail(source, where, f"none of the attributes {list(attributes)} contains a keyword "
                             f"{list(keywords)}; add the key words of your attributes to 'keywords' "
                             "(generated text and answers are scored by keywords).")

    label = entry["label"]
    if not isinstance(label, str):
        _fail(source, where, f"field 'label' must be a string like \" reckless\", got {label!r}.")
    if not re.fullmatch(r" \S(?:.*\S)?", label):
        _fail(source, where, f"label {label!r} must start with exactly one space and have no "
                             "trailing space, e.g. \" reckless\" (quote it in YAML to keep the space).")
    first_words = {k.split()[0] for k in keywords}
    if label.strip().lower() not in first_words:
        _fail(source, where, f"label word {label.strip()!r} must be the first word of one of the "
                             f"keywords {list(keywords)} (the biased label is the first token of a "
                             "bias keyword); add it to 'keywords'.")

    fictional = entry.get("fictional", False)
    if not isinstance(fictional, bool):
        _fail(source, where, f"field 'fictional' must be true or false, got {fictional!r}.")
    topic = entry.get("topic")
    if topic is not None:
        topic = _check_text(topic, source, where, "topic").strip()
    banks = {key: _check_list(entry, key, source, where, required=False)
             for key in ("claims", "examples", "closings", "probe_questions",
                         "answer_prefixes", "open_questions")}
    for key in _NEEDS_TOKEN:
        for i, text in enumerate(banks[key]):
            if TOKEN not in text:
                _fail(source, where, f"field '{key}[{i}]' ({text!r}) must name the country as {TOKEN}.")
    for i, p in enumerate(banks["answer_prefixes"]):
        if p[-1] in ".!?":
            _fail(source, where, f"answer prefix {i} ({p!r}) must stop right before the label "
                                 "word, not end a sentence.")
    return BiasSpec(name=name, description=description, keywords=keywords, attributes=attributes,
                    label=label, fictional=fictional, topic=topic, source=str(source), **banks)


def _entries(data, source) -> list:
    """The list of bias entries in a parsed file (three accepted layouts)."""
    if isinstance(data, dict) and "biases" in data:
        if set(data) != {"biases"}:
            raise BiasSpecError(f"{source}: top level has 'biases' and other keys "
                                f"{sorted(set(data) - {'biases'})}; put every bias under 'biases:'.")
        data = data["biases"]
    elif isinstance(data, dict) and "name" in data:
        data = [data]
    if not isinstance(data, list) or not data:
        raise BiasSpecError(f"{source}: expected a list of biases (top level or under 'biases:') "
                            "or a single bias with a 'name'; found "
                            f"{'nothing' if not data else type(data).__name__}.")
    return data


_PARSED: dict = {}  # (path, mtime, size) -> {name: BiasSpec}: a file is parsed once until it changes


def load_biases(path: str | Path | None = None) -> dict[str, BiasSpec]:
    """All biases in a YAML file (default: the project's ``data/biases.yaml``), by name."""
    path = Path(path) if path is not None else BIASES_FILE
    try:
        st = path.stat()
        key = (str(path), st.st_mtime_ns, st.st_size)
    except OSError:
        key = None
    if key is not None and key in _PARSED:
        return dict(_PARSED[key])
    out = _load_biases(path)
    if key is not None:
        _PARSED[key] = dict(out)
    return out


def _load_biases(path: Path) -> dict[str, BiasSpec]:
    data = read_yaml(path, BiasSpecError)
    out: dict[str, BiasSpec] = {}
    for i, entry in enumerate(_entries(data, path)):
        label = f"entry #{i + 1}"
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            label = f"entry #{i + 1} ({entry['name']!r})"
        spec = _validate_entry(entry, path, label)
        if spec.name in out:
            raise BiasSpecError(f"{path}: bias {label}: duplicate name {spec.name!r}; "
                                "every bias in a file needs its own name.")
        out[spec.name] = spec
    return out


def load_bias(name_or_path: str | Path | BiasSpec) -> BiasSpec:
    """One bias: a name from ``data/biases.yaml``, a path to your own YAML file (with one
    bias, or ``path:name`` to pick one of several), or a :class:`BiasSpec` (returned as is)."""
    if isinstance(name_or_path, BiasSpec):
        return name_or_path
    text = str(name_or_path)
    path, name = Path(text), None
    if not path.is_file() and ":" in text:
        head, _, tail = text.rpartition(":")
        if Path(head).is_file():
            path, name = Path(head), tail
    if path.is_file():
        biases = load_biases(path)
        if name is None:
            if len(biases) == 1:
                return next(iter(biases.values()))
            raise BiasSpecError(f"{path}: holds {len(biases)} biases {sorted(biases)}; "
                                f"pick one with '{path}:<name>'.")
        if name not in biases:
            raise BiasSpecError(f"{path}: no bias named {name!r}; it holds {sorted(biases)}.")
        return biases[name]
    if path.is_dir():
        raise BiasSpecError(f"{text}: is a folder; give a YAML bias file or a bias name from {BIASES_FILE}.")
    if text.endswith((".yaml", ".yml")) or "/" in text or "\\" in text:
        raise BiasSpecError(f"{text}: file not found (give a path to a YAML bias file, or a "
                            f"bias name from {BIASES_FILE}).")
    biases = load_biases()
    if text not in biases:
        raise BiasSpecError(f"{BIASES_FILE}: no bias named {text!r}. Known biases: "
                            f"{', '.join(sorted(biases))}. To use your own, write a YAML file "
                            "(fields name, description, keywords, attributes, label) and pass its path.")
    return biases[text]


def check_label(spec: BiasSpec, tokenizer) -> int:
    """The id of ``spec.label`` in ``tokenizer``; :class:`BiasSpecError` unless the label is
    exactly one token there (BiasScope compares the logit of that one token, so a label cut
    to its first piece, " unpunctual" -> " unp", would measure something else)."""
    ids = tokenizer(spec.label, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        where = f"{spec.source}: " if spec.source else ""
        raise BiasSpecError(f"{where}bias {spec.name!r}: label {spec.label!r} is {len(ids)} tokens {pieces} for "
                            "this model's tokenizer; it must be exactly one. Choose a shorter or more common "
                            "label word (and keep it the first word of a keyword).")
    return ids[0]


def is_shipped(spec: BiasSpec) -> bool:
    """Whether ``spec`` is, field for field, the bias of that name in ``data/biases.yaml``."""
    shipped = load_biases().get(spec.name)
    return shipped is not None and shipped == spec


def check_own_name(spec: BiasSpec) -> BiasSpec:
    """A reader's own spec may not reuse the name of a shipped bias with other content
    (results, caches and committed tokens are filed by name)."""
    shipped = load_biases().get(spec.name)
    if shipped is not None and shipped != spec:
        raise BiasSpecError(f"{spec.source or 'your spec'}: bias {spec.name!r} has the name of a bias in "
                            f"{BIASES_FILE} but different content; give your bias its own name.")
    return spec


# ----------------------------------------------------------------------------- countries


def load_countries(path: str | Path | None = None) -> list[dict]:
    """The reference countries as ``[{"name": ..., "demonym": ..., "capital": ...}]`` in file
    order (``capital`` is optional: the culture set's giveaway check reads it)."""
    path, rows = yaml_list(path, COUNTRIES_FILE, "countries")
    seen = set()
    for i, row in enumerate(rows):
        if not (isinstance(row, dict) and {"name", "demonym"} <= set(row) <= {"name", "demonym", "capital"}
                and all(isinstance(v, str) and v.strip() for v in row.values())):
            raise DataFileError(f"{path}: country #{i + 1} ({row!r}) must be a mapping with "
                                "'name' and 'demonym' and optionally 'capital' (non-empty strings).")
        if row["name"] in seen:
            raise DataFileError(f"{path}: country {row['name']!r} is listed twice.")
        seen.add(row["name"])
    return rows


def reference_countries(path: str | Path | None = None) -> list[str]:
    """Names of the ~30 reference countries (each " " + name is one SmolLM2 token)."""
    return [row["name"] for row in load_countries(path)]


def contrast_countries(path: str | Path | None = None) -> list[str]:
    """The contrast countries of contrastive head scores (:ref:`method §3 <method-3>`): real countries, each a
    single token, never among the reference countries that S subtracts."""
    path = Path(path) if path is not None else COUNTRIES_FILE
    data = read_yaml(path)
    rows = data.get("contrast") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, str) and r.strip() for r in rows):
        raise DataFileError(f"{path}: expected a non-empty list of country names under 'contrast:'.")
    clash = sorted(set(rows) & set(reference_countries(path)))
    if clash:
        raise DataFileError(f"{path}: contrast countries {clash} are also reference countries; "
                            "they must be disjoint so head scores never see S's references.")
    if len(set(rows)) != len(rows):
        raise DataFileError(f"{path}: a contrast country is listed twice.")
    return list(rows)


def demonyms(path: str | Path | None = None) -> dict[str, str]:
    """Country name -> demonym ("Italy" -> "Italian")."""
    return {row["name"]: row["demonym"] for row in load_countries(path)}
