"""The test venv holds exactly the lock file's versions, and the lock covers what moeguard imports."""

import ast
import os
import sys
from pathlib import Path

import pytest

from moeguard.lockdiff import canonical, differences, installed, read_lock

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
# import name -> distribution name, where they differ
DIST = {"yaml": "pyyaml", "rouge_score": "rouge-score", "huggingface_hub": "huggingface-hub", "sklearn": "scikit-learn"}


@pytest.mark.skipif(os.environ.get("MOEGUARD_UNLOCKED") == "1", reason="make test-latest runs unlocked versions on purpose")
def test_installed_versions_are_the_locked_ones():
    diff = differences(read_lock(LOCK), installed())
    assert not diff, f"installed versions differ from {LOCK.name} (run `make venv` after `rm -rf .venv`): {diff}"


def test_lock_pins_torch_cpu_and_every_direct_import():
    lock = read_lock(LOCK)
    assert lock["torch"] == "2.13.0+cpu"
    assert not [n for n in lock if n.startswith("nvidia-")], "a CUDA torch dependency got into the lock"
    stdlib = set(sys.stdlib_module_names)
    imported = set()
    for folder in ("src", "tests", "benchmarks"):
        for f in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.Import):
                    imported |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    imported.add(node.module.split(".")[0])
                # and the dynamic forms: pytest.importorskip("playwright.sync_api"), __import__, import_module,
                # find_spec (a package dropped from its extra would only skip its test)
                elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                        and isinstance(node.args[0].value, str) and not node.args[0].value.startswith(".") \
                        and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
                            "importorskip", "__import__", "import_module", "find_spec"):
                    imported.add(node.args[0].value.split(".")[0])
    local = {"moeguard"} | {f.stem for folder in ("benchmarks", "tests") for f in (ROOT / folder).glob("*.py")}
    third_party = {canonical(DIST.get(m, m)) for m in imported - stdlib - local}
    assert third_party, "found no imports: the scan is broken"
    assert "playwright" in third_party, "the dynamic imports were not scanned (importorskip)"
    missing = sorted(third_party - set(lock))
    assert not missing, f"imported but not locked: {missing}"
    declared = {canonical(r.name) for r in _declared()}
    undeclared = sorted(third_party - declared)
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def _declared():
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in [*project["dependencies"], *sum(project["optional-dependencies"].values(), [])]]


def test_lock_satisfies_pyproject():
    """A range edited in pyproject.toml without `make lock` is caught here, not by a user."""
    lock = read_lock(LOCK)
    unmet = [f"{r} (locked: {lock.get(canonical(r.name), 'absent')})" for r in _declared()
             if canonical(r.name) not in lock or not r.specifier.contains(lock[canonical(r.name)], prereleases=True)]
    assert not unmet, f"pyproject.toml asks for what {LOCK.name} does not pin; run `make lock`: {unmet}"


def test_a_package_the_lock_does_not_name_is_a_difference():
    """Only the lock's own entries were compared: a stray `pip install` went unseen."""
    assert differences({"a": "1"}, {"a": "1", "b": "2", "pip": "24"}) == [("b", None, "2")]
    assert differences({"a": "1"}, {"a": "2"}) == [("a", "1", "2")]
