"""The shape the repository promises its readers (README, "Where the method lives"):

* the two training scripts hold their parser and their epoch loop, readable top to bottom;
* no function of the project's own code takes more than 8 positional or required parameters
  (options with defaults are keyword-only): a call reads as what it passes;
* the README stays short enough to read in one sitting.
"""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MAX_PARAMETERS = 8
README_MAX_LINES = 500


def project_files():
    """The project's own Python files: entry scripts and packages (tests and benchmarks aside)."""
    files = sorted(REPO.glob("*.py"))
    for package in ("datasets", "models", "utils"):
        files += sorted((REPO / package).rglob("*.py"))
    return files


def too_many_parameters(tree):
    """``(name, line, positional, required)`` of each function over the limit."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        a = node.args
        positional = [p.arg for p in a.posonlyargs + a.args if p.arg not in ("self", "cls")]
        # defaults belong to the last positional parameters; self/cls never has one
        required = len(positional) - len(a.defaults) + sum(d is None for d in a.kw_defaults)
        if len(positional) > MAX_PARAMETERS or required > MAX_PARAMETERS:
            found.append((node.name, node.lineno, len(positional), required))
    return found


def test_the_checker_finds_a_long_signature():
    tree = ast.parse("def f(a, b, c, d, e, f, g, h, i=1):\n    pass\n"
                     "def g(a, *, b, c, d, e, f, g, h, i):\n    pass\n"
                     "def ok(a, b, c, d, e, f, g, h, *, i=1, j=2):\n    pass\n"
                     "class C:\n    def m(self, a, b, c, d, e, f, g, h):\n        pass\n")
    assert [(name, positional, required) for name, _, positional, required in too_many_parameters(tree)] == [
        ("f", 9, 8), ("g", 1, 9)]


def test_no_function_takes_more_than_eight_positional_or_required_parameters():
    offenders = []
    for path in project_files():
        for name, line, positional, required in too_many_parameters(ast.parse(path.read_text(encoding="utf-8"))):
            offenders.append(f"{path.relative_to(REPO)}:{line} {name}: {positional} positional, {required} required")
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("script", ["main.py", "train_pu_selective_fixmatch.py"])
def test_training_scripts_hold_their_parser_and_epoch_loop(script):
    tree = ast.parse((REPO / script).read_text(encoding="utf-8"))
    functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert {"build_parser", "main"} <= functions
    loops = [node for node in ast.walk(tree) if isinstance(node, ast.For)
             and isinstance(node.target, ast.Name) and node.target.id == "epoch"]
    assert loops, f"{script} has no `for epoch in ...` loop"


def test_readme_is_short_enough_to_read_in_one_sitting():
    lines = (REPO / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES})"
