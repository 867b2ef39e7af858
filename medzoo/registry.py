"""Reads and checks registry.yaml, the zoo's index: which recipes exist and their published checkpoints.

Every error names the file and line at fault, e.g. ``registry.yaml:14: recipe 'bentso' is not registered;
did you mean 'bentsao'?``.
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from medzoo.host import Catalog, unknown
from medzoo.objects import MedzooError, PublishedCheckpoint

LAYOUTS = ("peft", "freeze-state-dict", "prefix-state-dict", "full", "medzoo")
CHECKPOINT_FIELDS = {"repo_id", "recipe", "method", "base_model", "revision", "card", "layout", "note"}
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def data_root() -> Path:
    """Where registry.yaml and cards/ live: $MEDZOO_DATA, the source checkout, or <prefix>/share/medzoo."""
    env = os.environ.get("MEDZOO_DATA")
    if env:
        return Path(env)
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "registry.yaml").is_file():
        return checkout
    return Path(sys.prefix) / "share" / "medzoo"


def registry_path() -> Path:
    return Path(os.environ.get("MEDZOO_REGISTRY") or data_root() / "registry.yaml")


def cards_dir() -> Path:
    return data_root() / "cards"


@dataclass
class Registry:
    path: Path
    recipes: list = field(default_factory=list)
    checkpoints: list = field(default_factory=list)   # PublishedCheckpoint
    lines: dict = field(default_factory=dict)          # repo_id -> line

    def checkpoints_of(self, recipe: str) -> list[PublishedCheckpoint]:
        return [c for c in self.checkpoints if c.recipe == recipe]

    def checkpoint(self, repo_id: str) -> PublishedCheckpoint | None:
        for c in self.checkpoints:
            if c.repo_id.lower() == repo_id.lower():
                return c
        return None


class _Where:
    def __init__(self, path: Path):
        self.name = path.name

    def __call__(self, node, message: str) -> MedzooError:
        return MedzooError(f"{self.name}:{node.start_mark.line + 1}: {message}")


def _scalar(node, where, what):
    if not isinstance(node, yaml.ScalarNode):
        raise where(node, f"{what} must be a plain value")
    return node.value


def load(cat: Catalog, path: Path | None = None) -> Registry:
    path = Path(path or registry_path())
    where = _Where(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise MedzooError(f"{path}: cannot read the zoo registry: {exc.strerror}") from None
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "context_mark", None) or getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise MedzooError(f"{path.name}{line}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    reg = Registry(path)
    if root is None:
        return reg
    if not isinstance(root, yaml.MappingNode):
        raise where(root, "the registry must be a mapping with 'recipes' and 'checkpoints'")
    for key_node, value in root.value:
        key = key_node.value
        if key == "version":
            continue
        if key == "recipes":
            if not isinstance(value, yaml.SequenceNode):
                raise where(value, "'recipes' must be a list of recipe names")
            for item in value.value:
                name = _scalar(item, where, "a recipe name")
                if name not in cat.recipes and name not in cat.aliases:
                    raise where(item, unknown("recipe", str(name), cat.recipes))
                reg.recipes.append(cat.aliases.get(name, name))
        elif key == "checkpoints":
            if not isinstance(value, yaml.SequenceNode):
                raise where(value, "'checkpoints' must be a list")
            for item in value.value:
                reg.checkpoints.append(_checkpoint(cat, item, where, reg))
        else:
            raise where(key_node, f"unknown key {key!r}; expected 'version', 'recipes', 'checkpoints'")
    return reg


def _checkpoint(cat: Catalog, node, where, reg: Registry) -> PublishedCheckpoint:
    if not isinstance(node, yaml.MappingNode):
        raise where(node, "a checkpoint must be a mapping with repo_id, recipe, method, base_model")
    values, lines = {}, {}
    for key_node, value_node in node.value:
        key = key_node.value
        if key not in CHECKPOINT_FIELDS:
            raise where(key_node, unknown("checkpoint field", key, CHECKPOINT_FIELDS).replace(
                " is not registered", " is not known"))
        values[key] = _scalar(value_node, where, f"field {key!r}")
        lines[key] = value_node
    for required in ("repo_id", "recipe", "method", "base_model"):
        if required not in values:
            raise where(node, f"checkpoint is missing field {required!r}")
    repo_id = values["repo_id"]
    if not REPO_ID.match(repo_id):
        raise where(lines["repo_id"], f"repo_id {repo_id!r} is not of the form owner/name")
    if reg.checkpoint(repo_id):
        raise where(lines["repo_id"], f"checkpoint {repo_id!r} is listed twice (first at line "
                                      f"{reg.lines[repo_id]})")
    recipe_name = cat.aliases.get(values["recipe"], values["recipe"])
    if recipe_name not in cat.recipes:
        raise where(lines["recipe"], unknown("recipe", values["recipe"], cat.recipes))
    recipe = cat.recipes[recipe_name]
    if values["method"] not in recipe.methods:
        raise where(lines["method"], f"method {values['method']!r} is not offered by recipe {recipe_name!r} "
                                     f"(it offers {', '.join(recipe.methods)})")
    if values["base_model"] not in cat.base_models:
        raise where(lines["base_model"], unknown("base model", values["base_model"], cat.base_models))
    layout = values.get("layout", "peft")
    if layout not in LAYOUTS:
        raise where(lines["layout"], f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    if "card" in values and not (cards_dir() / values["card"]).is_file():
        raise where(lines["card"], f"card {values['card']!r} not found in {cards_dir()}")
    reg.lines[repo_id] = node.start_mark.line + 1
    return PublishedCheckpoint(repo_id=repo_id, recipe=recipe_name, method=values["method"],
                               base_model=values["base_model"], revision=values.get("revision", "main"),
                               card=values.get("card"), layout=layout, note=values.get("note", ""))
