"""`medzoo new-recipe`: the scaffold installs with pip, lists in `medzoo list`, and its own test passes."""
import importlib
import subprocess
import sys

import pytest
from click.testing import CliRunner

from medzoo import host
from medzoo.cli import main


def pip(*args):
    return subprocess.run([sys.executable, "-m", "pip", "-q", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name, extra", [("my-recipe", []), ("my-bentsao", ["--from", "bentsao"])])
def test_scaffold_installs_lists_and_passes_its_test(tmp_path, name, extra):
    result = CliRunner().invoke(main, ["new-recipe", name, "--dir", str(tmp_path), *extra])
    assert result.exit_code == 0, result.output
    pkg = tmp_path / f"medzoo-{name}"
    assert {p.name for p in pkg.iterdir()} >= {"setup.py", "README.md", "tests", f"medzoo_{name.replace('-', '_')}"}
    installed = pip("install", "--no-deps", "--no-build-isolation", "-e", str(pkg))
    assert installed.returncode == 0, installed.stderr
    try:
        importlib.invalidate_caches()
        sys.path.insert(0, str(pkg))  # an editable install's path hook is read at interpreter start
        cat = host.catalog(refresh=True)
        assert name in cat.recipes, cat.failures
        assert cat.origin[("recipes", name)] == name
        listing = CliRunner().invoke(main, ["list", name])
        assert name in listing.output
        if extra:
            assert cat.recipes[name].methods == cat.recipes["bentsao"].methods
            assert cat.templates[f"{name}-template"].query == cat.templates["bentsao-med"].query
        own_test = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(pkg / "tests")],
                                  capture_output=True, text=True, timeout=300, cwd=pkg)
        assert own_test.returncode == 0, own_test.stdout + own_test.stderr
    finally:
        sys.path.remove(str(pkg))
        pip("uninstall", "-y", f"medzoo-{name}")
        importlib.invalidate_caches()
        host.catalog(refresh=True)
    assert name not in host.catalog().recipes


def test_scaffold_refuses_bad_or_taken_names(tmp_path):
    for bad, message in (("Bad_Name", "use lower-case letters"), ("bentsao", "already exists")):
        result = CliRunner().invoke(main, ["new-recipe", bad, "--dir", str(tmp_path)])
        assert result.exit_code == 2 and message in result.output
    assert not list(tmp_path.iterdir())  # nothing half-written
    CliRunner().invoke(main, ["new-recipe", "twice", "--dir", str(tmp_path)])
    again = CliRunner().invoke(main, ["new-recipe", "twice", "--dir", str(tmp_path)])
    assert again.exit_code == 2 and "already exists" in again.output
