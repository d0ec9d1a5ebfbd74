"""Static checks of the chapter notebooks (fast: nothing is executed).

Every ``book/chapters/*.ipynb`` must be committed clean (no outputs, no execution counts),
have exactly one ``parameters`` cell that sets ``profile`` (default "teaching"), start with
the Colab-only install cell, keep its code thin (no function longer than 5 lines, no
class) and be listed in ``_toc.yml``; every chapter after 00 ends with >= 2 exercises.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import nbformat
import pytest
import yaml
from IPython.core.inputtransformer2 import TransformerManager

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "book" / "chapters").glob("*.ipynb"))
MAX_FUNCTION_LINES = 5
# Headings allowed after the first exercise: more exercises, their solutions, the summary.
TAIL_HEADINGS = re.compile(r"exercise|solution|summary|further reading|what next|next|references", re.I)


def toc_files(toc_path: Path = ROOT / "_toc.yml") -> list[str]:
    """Every ``file:`` entry of the table of contents, in order (globs are not files)."""
    found: list[str] = []

    def walk(node):
        if isinstance(node, dict):
            found.extend(node[k] for k in ("root", "file") if isinstance(node.get(k), str))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(yaml.safe_load(toc_path.read_text()))
    return found


def code_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def python_source(cell) -> str:
    """The cell's code as plain Python (IPython magics and ! commands transformed)."""
    return TransformerManager().transform_cell(cell.source)


def headings(nb) -> list[str]:
    lines = [ln for c in nb.cells if c.cell_type == "markdown" for ln in c.source.splitlines()]
    return [ln.lstrip("#").strip() for ln in lines if re.match(r"^#{1,6}\s", ln)]


def read(path: Path):
    return nbformat.read(path, as_version=4)


def test_there_are_chapters():
    assert CHAPTERS, "no notebooks in book/chapters/"
    assert CHAPTERS[0].stem == "00_setup"


def test_toc_lists_exactly_the_chapter_files():
    in_toc = {f for f in toc_files() if f.startswith("book/chapters/")}
    on_disk = {f"book/chapters/{p.stem}" for p in CHAPTERS}
    assert not on_disk - in_toc, f"chapters missing from _toc.yml: {sorted(on_disk - in_toc)}"
    assert not in_toc - on_disk, f"_toc.yml lists chapters that do not exist: {sorted(in_toc - on_disk)}"


def test_toc_lists_chapters_in_file_order():
    in_toc = [f for f in toc_files() if f.startswith("book/chapters/")]
    assert in_toc == sorted(in_toc), "chapters in _toc.yml must be in reading (file-name) order"


def test_every_toc_entry_exists():
    for entry in toc_files():
        candidates = [ROOT / f"{entry}{ext}" for ext in ("", ".md", ".ipynb")]
        assert any(p.is_file() for p in candidates), f"_toc.yml entry {entry!r} has no file"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    nb = read(path)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{path.name}: cells {dirty} have outputs or execution counts; clear them before committing"
    assert "papermill" not in nb.metadata, f"{path.name} is an executed copy (papermill metadata); commit the clean one"
    assert "widgets" not in nb.metadata, f"{path.name} carries widget state; clear it before committing"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_kernelspec_is_plain_python3(path):
    assert read(path).metadata.get("kernelspec", {}).get("name") == "python3", \
        f"{path.name}: kernelspec must be 'python3' so that it opens anywhere"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_one_parameters_cell_that_sets_profile(path):
    cells = [c for c in code_cells(read(path)) if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{path.name}: {len(cells)} cells tagged 'parameters'; exactly one is needed"
    assigned = {}
    for node in ast.parse(python_source(cells[0])).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    assigned[target.id] = node.value.value
    assert "profile" in assigned, f"{path.name}: the parameters cell must set `profile`"
    assert assigned["profile"] == "teaching", f"{path.name}: the default profile must be 'teaching'"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_first_code_cell_is_the_colab_install(path):
    first = code_cells(read(path))[0]
    assert '"google.colab" in sys.modules' in first.source, \
        f"{path.name}: the first code cell must be the Colab-only install cell (see 00_setup)"
    assert "remove-cell" in first.metadata.get("tags", []), \
        f"{path.name}: tag the Colab cell remove-cell: a web reader's first screen is prose, not set-up"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_code_is_thin(path):
    for i, cell in enumerate(code_cells(read(path))):
        tree = ast.parse(python_source(cell))
        for node in ast.walk(tree):
            assert not isinstance(node, ast.ClassDef), \
                f"{path.name}, code cell {i}: class {node.name} belongs in biasgym_lib"
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                assert n <= MAX_FUNCTION_LINES, (
                    f"{path.name}, code cell {i}: function {node.name} has {n} lines "
                    f"(at most {MAX_FUNCTION_LINES}); move it into biasgym_lib")


def exercise_problem(heads: list[str]) -> str | None:
    """Why a chapter's headings do not end with >= 2 exercises (None when they do)."""
    exercises = [h for h in heads if "Exercise" in h and not re.fullmatch(r"Exercises?", h)]
    if len(exercises) < 2:
        return f"needs >= 2 exercise headings (e.g. '### Exercise 1: ...'), found {len(exercises)}"
    stray = [h for h in heads[heads.index(exercises[0]):] if not TAIL_HEADINGS.search(h)]
    return f"the exercises must end the chapter; found after them: {stray}" if stray else None


@pytest.mark.parametrize("path", [p for p in CHAPTERS if not p.stem.startswith("00")], ids=lambda p: p.stem)
def test_ends_with_exercises(path):
    problem = exercise_problem(headings(read(path)))
    assert problem is None, f"{path.name}: {problem}"


def test_checks_can_fail(tmp_path):
    """The helpers above see what they must: a long function, magics, headings."""
    long_def = "def f(x):\n" + "    x += 1\n" * MAX_FUNCTION_LINES + "    return x\n"
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("## Exercise 1: a\n\ntext\n### Exercise 2: b"),
        nbformat.v4.new_code_cell("%pip install nothing\n!ls\n" + long_def),
    ])
    tree = ast.parse(python_source(nb.cells[1]))
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef))
    assert fn.end_lineno - fn.lineno + 1 > MAX_FUNCTION_LINES
    assert headings(nb) == ["Exercise 1: a", "Exercise 2: b"]
    assert exercise_problem(headings(nb)) is None
    assert exercise_problem(["Intro", "Summary", "Exercises", "Exercise 1"]) is not None
    assert exercise_problem(["Exercise 1", "Exercise 2", "Appendix: more code"]) is not None
    assert exercise_problem(["Intro", "Summary", "Exercises", "Exercise 1", "Solution", "Exercise 2"]) is None
    toc = tmp_path / "_toc.yml"
    toc.write_text("root: intro\nparts:\n  - chapters:\n      - file: a\n        sections:\n          - file: b\n")
    assert toc_files(toc) == ["intro", "a", "b"]


# The stage module each chapter teaches: the chapter calls it, not a copy elsewhere.
TEACHES = {"01": ["measure"], "02": ["inject"], "03": ["scope"], "04": ["steer", "evaluate"], "05": ["generalise"],
           "06": ["claims"], "07": ["culture"]}


@pytest.mark.parametrize("path", [p for p in CHAPTERS if p.stem[:2] in TEACHES], ids=lambda p: p.stem)
def test_each_chapter_imports_the_stage_module_it_teaches(path):
    source = "\n".join(python_source(c) for c in code_cells(read(path)))
    for module in TEACHES[path.stem[:2]]:
        assert re.search(rf"^from biasgym_lib\.{module} import ", source, re.M), \
            f"{path.name} teaches biasgym_lib.{module} but never imports from it"


def glued_names(cells) -> set[str]:
    """The names the code cells glue; an f-string name keeps its {placeholders}."""
    return set(re.findall(r'glue\(f?"([A-Za-z0-9_{}]+)"', "\n".join(c.source for c in cells if c.cell_type == "code")))


def is_glued(name: str, glued: set[str]) -> bool:
    return name in glued or any("{" in g and re.fullmatch(re.sub(r"\{[^}]*\}", ".+", g), name) for g in glued)


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_the_summary_states_what_was_measured(path):
    """Every chapter's summary carries measured numbers, glued from this run (myst-nb glue),
    and every name it cites is glued in the chapter: nothing hard-coded."""
    cells = read(path).cells
    summary = next((c.source for c in cells if c.cell_type == "markdown" and "## Summary" in c.source), "")
    summary = summary[summary.index("## Summary"):].split("\n## ")[0] if summary else ""
    cited = set(re.findall(r"\{glue:text\}`([A-Za-z0-9_]+)", summary))
    assert cited, f"{path.name}: the summary states no glued number"
    glued = glued_names(cells)
    missing = {name for name in cited if not is_glued(name, glued)}
    assert not missing, f"{path.name}: the summary cites {sorted(missing)}, which no cell glues"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_each_chapter_asks_questions_to_discuss(path):
    text = "\n".join(c.source for c in read(path).cells if c.cell_type == "markdown")
    assert "## Discussion" in text, f"{path.name}: add a '## Discussion' section before the exercises"
    section = text[text.index("## Discussion"):].split("\n## ")[0]
    assert len(re.findall(r"^\d+\. .*\?", section, re.M)) >= 2, f"{path.name}: at least two discussion questions"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_each_chapter_points_to_further_reading(path):
    text = "\n".join(c.source for c in read(path).cells if c.cell_type == "markdown")
    assert "## Further reading" in text, f"{path.name}: add a '## Further reading' section"
    section = text[text.index("## Further reading"):].split("\n## ")[0]
    assert re.search(r"\]\(https?://", section), f"{path.name}: further reading needs at least one link"


# ----------------------------------------------------------------------------- exercises and solutions

REVEAL = re.compile(r"""reveal\(["'](ch\d\.\w+)["']\)""")
BUILD_CHECK = re.compile(r"exercises\.(ch\d)\.check_(\w+)\((?!answer_)(\w+)")  # a reading check takes answer_N


def solution_problems(nb) -> list[str]:
    """Why a reader could see a solution by accident: a solution must live in
    ``biasgym_lib.solutions``, reached only from a commented cell tagged ``solution``."""
    from biasgym_lib.solutions import solution

    problems = []
    for i, cell in enumerate(code_cells(nb)):
        tags = cell.metadata.get("tags", [])
        lines = [ln for ln in cell.source.splitlines() if ln.strip()]
        if "solution" in tags:
            if any(not ln.lstrip().startswith("#") for ln in lines):
                problems.append(f"code cell {i}: a solution cell must be all comments (the reader runs it on purpose)")
            names = REVEAL.findall(cell.source)
            if not names:
                problems.append(f"code cell {i}: a solution cell must name reveal(\"chN.function\")")
            for name in names:
                try:
                    solution(name)
                except Exception as exc:  # noqa: BLE001 - reported as a problem
                    problems.append(f"code cell {i}: {exc}")
        else:
            live = "\n".join(ln for ln in lines if not ln.lstrip().startswith("#"))
            if REVEAL.search(live) or re.search(r"\b(solution_\d|solutions\.ch\d)", live):
                problems.append(f"code cell {i}: runs a solution without the reader asking for it")
            if re.search(r"^#\s*solution", cell.source, re.I | re.M):
                problems.append(f"code cell {i}: a solution written in the notebook")
    return problems


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_no_solution_is_visible_in_the_notebook(path):
    problems = solution_problems(read(path))
    assert not problems, f"{path.name}: {problems}"
    n_exercises = sum(1 for h in headings(read(path)) if re.match(r"Exercise \d", h))
    cells = code_cells(read(path))
    n_solutions = sum(1 for c in cells if "solution" in c.metadata.get("tags", []))
    assert n_solutions == n_exercises, f"{path.name}: {n_exercises} exercises but {n_solutions} solution cells"
    for i, cell in enumerate(cells):  # the check before each solution gives nothing away: one call
        if "solution" in cell.metadata.get("tags", []):
            check = cells[i - 1].source.strip()
            tree = ast.parse(check)
            assert len(tree.body) == 1 and isinstance(tree.body[0], ast.Expr) and check.startswith("exercises.ch"), \
                f"{path.name}: the check before a solution must be one call of exercises.chN.check_*, got {check!r}"


def test_solution_checks_can_fail():
    new = nbformat.v4.new_code_cell
    hidden = new("# Solution\nsolution_1 = 3", metadata={"tags": ["hide-cell"]})
    live = new('f = reveal("ch1.continuation_logprob")', metadata={"tags": ["solution"]})
    unknown = new('# f = reveal("ch1.nothing")', metadata={"tags": ["solution"]})
    good = new('# f = reveal("ch1.continuation_logprob")', metadata={"tags": ["solution"]})
    assert len(solution_problems(nbformat.v4.new_notebook(cells=[hidden]))) == 2
    assert solution_problems(nbformat.v4.new_notebook(cells=[live]))
    assert solution_problems(nbformat.v4.new_notebook(cells=[unknown]))
    assert solution_problems(nbformat.v4.new_notebook(cells=[good])) == []


@pytest.mark.parametrize("path", [p for p in CHAPTERS if p.stem[:2] in ("01", "02", "03", "04", "05")],
                         ids=lambda p: p.stem)
def test_chapters_1_to_5_have_a_build_exercise_with_a_stub_and_a_rating(path):
    nb = read(path)
    calls = [m for c in code_cells(nb) for m in BUILD_CHECK.findall(c.source)]
    assert calls, f"{path.name}: no build exercise (a call of exercises.chN.check_<name>(fn, ...))"
    for chapter, name, fn in calls:
        assert chapter == f"ch{int(path.stem[:2])}", f"{path.name} calls chapter {chapter}'s check"
        assert name == fn, f"{path.name}: check_{name} should check the reader's {name}"
        stub = next((c.source for c in code_cells(nb) if c.source.startswith(f"def {fn}(")), "")
        assert 'raise NotImplementedError("write this function")' in stub, f"{path.name}: {fn} needs an unfilled stub"
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    for block in re.split(r"\n(?=### Exercise)", text)[1:]:
        assert re.search(r"Difficulty \d/5 · Importance \d/5 · about \d+ minutes", block), \
            f"{path.name}: every exercise states difficulty, importance and time: {block[:60]!r}"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_each_chapter_asks_for_a_prediction_before_a_run(path):
    cells = read(path).cells
    at = [i for i, c in enumerate(cells) if c.cell_type == "markdown" and "**Predict, then run.**" in c.source]
    assert at, f"{path.name}: add a 'Predict, then run' question before a cell whose output answers it"
    assert all(i + 1 < len(cells) and cells[i + 1].cell_type == "code" for i in at), \
        f"{path.name}: a prediction must come right before the code cell that answers it"


def test_the_introduction_states_the_findings_glued_from_the_chapters():
    """The introduction's findings are pasted from the chapters (cross-document glue), each
    key glued by the chapter it names: no number in it is typed in."""
    text = (ROOT / "book" / "intro.md").read_text()
    assert "## What this build found" in text
    section = text[text.index("## What this build found"):].split("\n## ")[0]
    cited = re.findall(r"\{glue:text\}`chapters/([\w.]+\.ipynb)::([A-Za-z0-9_]+)", section)
    # myst-nb 1.4 splits the format off at the last ':', so "doc::key" without one loses its key
    assert not re.search(r"\{glue:text\}`[^`]*::[A-Za-z0-9_]+`", section), "give every cross-document glue a format (:s, :d)"
    assert {nb for nb, _ in cited} >= {"02_bias_inject.ipynb", "04_steering.ipynb", "05_generalisation.ipynb",
                                       "06_reproducing_the_claims.ipynb"}
    for nb, key in cited:
        assert is_glued(key, glued_names(read(ROOT / "book" / "chapters" / nb).cells)), \
            f"the introduction cites {key!r} from {nb}, which that chapter never glues"
    keys = {key for _, key in cited}
    for key in keys:  # every debiasing number with its random-heads baseline and its facts
        base = key.removesuffix("_reduction")
        if key.endswith("_reduction"):
            assert {f"{base}_random", f"{base}_facts"} <= keys, f"{key} needs its random heads and facts"
        if key.endswith("_seegull"):
            assert {f"{key}_random", f"{key}_facts"} <= keys, f"{key} needs its random heads and facts"
    assert not re.search(r"\d+(\.\d+)?\s*%", re.sub(r"\{glue:text\}`[^`]+`", "", section)), \
        "a percentage is typed into the findings instead of glued"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_the_chapter_s_time_counts_its_exercises(path):
    text = "\n".join(c.source for c in read(path).cells if c.cell_type == "markdown")
    stated = re.search(r"Time: about \d+ minutes to read and run, plus about (\d+) for the exercises", text)
    assert stated, f"{path.name}: state the time to read and run, and the time for the exercises"
    exercises = sum(int(m) for m in re.findall(r"Difficulty \d/5 · Importance \d/5 · about (\d+) minutes", text))
    assert int(stated.group(1)) == exercises, f"{path.name}: the exercises add up to {exercises} minutes"


def test_glue_prints_what_it_glues_for_readers_in_jupyter(capsys):
    from biasgym_lib.plots import glue

    glue("ch9_share", 0.123456, display=False)
    glue("ch9_name", "atp / zero / k = 2", display=False)
    assert capsys.readouterr().out == "ch9_share: 0.1235\nch9_name: atp / zero / k = 2\n"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_chapters_glue_with_the_printing_glue(path):
    source = "\n".join(c.source for c in code_cells(read(path)))
    assert "from biasgym_lib.plots import glue" in source and "from myst_nb import glue" not in source


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_the_cell_that_glues_is_hidden_from_web_readers(path):
    """Its source shows "{glue:text}" in a comment; on the web page the summary shows the numbers."""
    for cell in code_cells(read(path)):
        if "from biasgym_lib.plots import glue" in cell.source:
            assert "remove-cell" in cell.metadata.get("tags", []), f"{path.name}: tag the glue cell remove-cell"
