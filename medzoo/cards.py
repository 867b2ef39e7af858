"""Model cards: Hugging Face-style Markdown with YAML front matter, read from cards/ and rendered for runs."""
from __future__ import annotations

from pathlib import Path

import yaml

from medzoo.objects import MedzooError

REQUIRED = ("language", "license", "base_model", "library_name", "tags", "datasets")


def card_path(recipe) -> Path | None:
    """A recipe's card: in its plugin package when it ships one there, else in medzoo's cards/."""
    if not recipe.card:
        return None
    if recipe.package:
        from importlib import resources

        try:
            candidate = resources.files(recipe.package) / recipe.card
            if candidate.is_file():
                return Path(str(candidate))
        except ModuleNotFoundError:
            pass
    from medzoo.registry import cards_dir

    return cards_dir() / recipe.card


def split(text: str, name: str) -> tuple[dict, str, int]:
    """(front matter, body, line where the body starts); errors name the file and line."""
    lines = text.splitlines(keepends=True)
    if not lines or lines[0].strip() != "---":
        raise MedzooError(f"{name}:1: a model card must start with '---' and YAML front matter")
    for end in range(1, len(lines)):
        if lines[end].strip() == "---":
            break
    else:
        raise MedzooError(f"{name}:1: the front matter opened here is never closed with '---'")
    try:
        meta = yaml.safe_load("".join(lines[1:end])) or {}
    except yaml.YAMLError as exc:
        # an unclosed bracket is reported at the end of the text; where it opened is the useful line
        mark = getattr(exc, "context_mark", None) or getattr(exc, "problem_mark", None)
        line = mark.line + 2 if mark else 1
        raise MedzooError(f"{name}:{line}: front matter is not valid YAML: {getattr(exc, 'problem', exc)}") \
            from None
    if not isinstance(meta, dict):
        raise MedzooError(f"{name}:2: front matter must be a mapping")
    return meta, "".join(lines[end + 1:]), end + 2


def read(path: Path) -> tuple[dict, str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise MedzooError(f"{path}: cannot read model card: {exc.strerror}") from None
    meta, body, _ = split(text, Path(path).name)
    check(meta, Path(path).name, text)
    return meta, body


def check(meta: dict, name: str, text: str = "") -> None:
    for key in REQUIRED:
        if key not in meta:
            raise MedzooError(f"{name}:1: front matter is missing {key!r} (needs {', '.join(REQUIRED)})")
    for key in ("tags", "datasets"):
        if not isinstance(meta[key], list):
            line = next((i + 1 for i, l in enumerate(text.splitlines()) if l.startswith(f"{key}:")), 1)
            raise MedzooError(f"{name}:{line}: {key!r} must be a list")


def dump(meta: dict, body: str) -> str:
    front = yaml.safe_dump(meta, allow_unicode=True, sort_keys=False).strip()
    return f"---\n{front}\n---\n{body.lstrip(chr(10))}"


def render_run_card(recipe_card: Path | None, run: dict, figures: dict, library_name: str) -> str:
    """A run's card: the recipe's card with the run's base model, tags and figures filled in."""
    if recipe_card and Path(recipe_card).is_file():
        meta, body = read(recipe_card)
    else:
        meta, body = {"language": ["zh"], "license": "apache-2.0", "tags": [], "datasets": []}, ""
    meta = dict(meta)
    meta["base_model"] = run["base_model_id"]
    meta["library_name"] = library_name
    meta["language"] = meta.get("language") or ["zh"]
    tags = list(meta.get("tags") or [])
    for tag in ("medical", "medzoo", run["recipe"], run["method"]):
        if tag not in tags:
            tags.append(tag)
    meta["tags"] = tags
    if run.get("datasets"):
        meta["datasets"] = list(run["datasets"])
    rows = "\n".join(f"| {k} | {v} |" for k, v in figures.items())
    section = (f"\n## This checkpoint\n\nTrained with `medzoo train {run['recipe']}` "
               f"(method `{run['method']}`, profile `{run.get('profile', '?')}`).\n\n"
               f"| figure | value |\n|---|---|\n{rows}\n")
    return dump(meta, body.rstrip() + "\n" + section)
