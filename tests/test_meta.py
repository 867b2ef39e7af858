"""datasette-style meta-tests: every hook is documented in the plugin tutorial and exercised by a test."""
import inspect
import re
from pathlib import Path

import pytest

from medzoo import hookspecs

ROOT = Path(__file__).parent.parent
HOOKS = sorted(name for name, f in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("register_"))
DOC = (ROOT / "docs" / "writing-a-recipe-plugin.md").read_text(encoding="utf-8")
TESTS = {p.name: p.read_text(encoding="utf-8") for p in (ROOT / "tests").glob("test_*.py") if p.name != "test_meta.py"}


def test_hooks_are_collected():
    assert "register_recipes" in HOOKS and len(HOOKS) >= 7


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented_with_its_signature(hook):
    assert re.search(rf"^### `{hook}\(register\)`", DOC, re.M), f"docs: add a '### `{hook}(register)`' section"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_implemented_by_a_test_plugin(hook):
    assert any(re.search(rf"def {hook}\(", text) for text in TESTS.values()), f"no test plugin implements {hook}"


def test_documented_hooks_exist():
    documented = set(re.findall(r"^### `(register_\w+)\(register\)`", DOC, re.M))
    assert documented == set(HOOKS)
