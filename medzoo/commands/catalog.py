"""`medzoo list`, `medzoo info`, `medzoo plugins`: reading the catalog. Never imports torch."""
from __future__ import annotations

import json
import unicodedata
from dataclasses import asdict
from pathlib import Path

import click

from medzoo import cards, host, memory, recipes, registry, zoo
from medzoo.objects import Recipe

EXAMPLE = ("偏头痛有哪些常见症状？", [("偏头痛是什么病？", "偏头痛是一种常见的慢性神经血管性疾病。")])


def width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(width(str(r[i])) for r in [headers] + rows) for i in range(len(headers))]

    def line(cells):
        return "  ".join(str(c) + " " * (w - width(str(c))) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def load() -> tuple[host.Catalog, registry.Registry]:
    cat = host.catalog()
    return cat, registry.load(cat)


def warn_failures(cat: host.Catalog) -> None:
    for failure in cat.failures:
        click.echo(f"warning: plugin {failure.plugin!r}: {failure.reason}", err=True)


def recipe_row(cat, reg, r: Recipe) -> dict:
    return {
        "name": r.name, "title": r.title, "base_model": r.base_model, "modern_base": r.modern_base,
        "methods": list(r.methods), "default_method": r.default_method, "profiles": list(r.profiles),
        "default_profile": r.default_profile, "datasets": list(r.datasets), "template": r.template,
        "checkpoints": [c.repo_id for c in reg.checkpoints_of(r.name)],
        "plugin": cat.origin[("recipes", r.name)], "variant_of": r.variant_of,
    }


@click.command("list")
@click.argument("pattern", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--local", is_flag=True, help="List the models in your local zoo (trained or pulled).")
def list_cmd(pattern, as_json, local):
    """List recipes (or, with --local, your models), optionally filtered by a glob PATTERN.

    \b
    Examples:
      medzoo list
      medzoo list "*chatglm*"
      medzoo list --json
      medzoo list --local
    """
    if local:
        return list_local(pattern, as_json)
    cat, reg = load()
    warn_failures(cat)
    rows = [recipe_row(cat, reg, r) for r in cat.match(pattern)]
    if as_json:
        click.echo(json.dumps(rows, ensure_ascii=False, indent=2))
        return
    if not rows:
        click.echo(f"no recipe matches {pattern!r}" if pattern else "no recipes registered")
        return
    body = [[r["name"], f"{r['base_model']} | {r['modern_base']}",
             ",".join(m + ("*" if m == r["default_method"] else "") for m in r["methods"]),
             ",".join(r["profiles"]), ",".join(r["datasets"]), ",".join(r["checkpoints"]) or "-"] for r in rows]
    click.echo(table(["recipe", "base (seed | modern)", "methods (*default)", "profiles", "datasets",
                      "published"], body))


def list_local(pattern, as_json):
    import fnmatch

    items = {n: e for n, e in sorted(zoo.entries().items()) if not pattern or fnmatch.fnmatch(n, pattern)}
    if as_json:
        click.echo(json.dumps(items, ensure_ascii=False, indent=2))
        return
    if not items:
        click.echo(f"your zoo ({zoo.home()}) is empty: `medzoo train` or `medzoo pull` adds models")
        return
    click.echo(table(["name", "recipe", "method", "base", "source", "path"],
                     [[n, e["recipe"], e["method"], e["base_model"], e.get("source", ""), e["path"]]
                      for n, e in items.items()]))


def recipe_info(cat, reg, r: Recipe) -> dict:
    tmpl = cat.templates[r.template]
    query, history = EXAMPLE
    info = recipe_row(cat, reg, r)
    info.update({
        "description": r.description, "upstream": r.upstream, "fixes": list(r.fixes),
        "training": recipes.training_defaults(r),
        "method_params": {m: recipes.method_params(cat, r, m) for m in r.methods},
        "generation": dict(r.generation),
        "template_example": {"name": tmpl.name, "plugin": cat.origin[("templates", tmpl.name)],
                             "single_turn": tmpl.render(query),
                             "with_history": tmpl.render(query, history) if tmpl.history_turn else None},
        "datasets_detail": [dict(asdict(cat.datasets[d]), plugin=cat.origin[("datasets", d)]) for d in r.datasets],
        "bases": {b: dict(asdict(cat.base_models[b]), plugin=cat.origin[("base_models", b)])
                  for b in (r.base_model, r.modern_base)},
        "profiles_detail": [],
    })
    for p in r.profiles:
        prof = cat.profiles[p]
        run = recipes.resolve(cat, r, profile=p)
        base = cat.base_models[prof.base_model or r.base_model]
        est = memory.estimate(base, prof, r.default_method, run["method_params"], run["training"])
        info["profiles_detail"].append({
            "name": p, "plugin": cat.origin[("profiles", p)], "description": prof.description,
            "devices": prof.devices, "memory_gb": prof.memory_gb, "precision": prof.precision,
            "quantization": prof.quantization, "micro_batch": run["training"]["micro_batch"],
            "grad_accum": run["training"]["grad_accum"], "base_model": base.name,
            "method": r.default_method, "imposes": dict(prof.training), "estimate": est.as_dict()})
    info["card"] = None
    if r.card:
        meta, body = cards.read(cards.card_path(r))
        info["card"] = {"file": r.card, "meta": meta, "body": body}
    return info


@click.command("info")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def info_cmd(name, as_json):
    """Everything about one recipe (or a model in your local zoo): card, defaults, template, memory.

    \b
    Examples:
      medzoo info bentsao
      medzoo info medqa-chatglm --json
    """
    cat, reg = load()
    warn_failures(cat)
    if name not in cat.recipes and name not in cat.aliases and name in zoo.entries():
        return local_info(name, as_json)
    r = host.require(cat, name)
    info = recipe_info(cat, reg, r)
    if as_json:
        click.echo(json.dumps(info, ensure_ascii=False, indent=2, default=str))
        return
    echo_info(info)


def local_info(name, as_json):
    _, folder, manifest = zoo.get(name)
    card_path = Path(folder) / "README.md"
    card = card_path.read_text(encoding="utf-8") if card_path.is_file() else "(no card)"
    if as_json:
        click.echo(json.dumps({"name": name, "path": str(folder), "manifest": manifest, "card": card},
                              ensure_ascii=False, indent=2))
        return
    click.echo(f"{name}  ({folder})")
    for key in ("recipe", "method", "base_model", "source", "layout"):
        if key in manifest:
            click.echo(f"  {key}: {manifest[key]}")
    click.echo("")
    click.echo(card)


def echo_info(info: dict) -> None:
    e = click.echo
    e(f"{info['name']}: {info['title']}")
    e(f"  plugin: {info['plugin']}    upstream: {info['upstream'] or '-'}")
    if info["variant_of"]:
        e(f"  variant of: {info['variant_of']}")
    e(f"  {info['description']}")
    e("\nBase models")
    for role, key in (("seed", info["base_model"]), ("modern", info["modern_base"])):
        b = info["bases"][key]
        rev = f"@{b['revision'][:10]}" if b["revision"] else ""
        e(f"  {role:6} {key}: {b['hub_id']}{rev}  ({b['architecture']}, {b['params_b']}B"
          f"{', remote code upstream' if not b['native'] else ''})  [plugin {b['plugin']}]")
    e("\nTuning methods (hyper-parameters)")
    for m, params in info["method_params"].items():
        star = " (default)" if m == info["default_method"] else ""
        e(f"  {m}{star}: " + ", ".join(f"{k}={v}" for k, v in params.items()))
    e("\nTraining defaults")
    e("  " + ", ".join(f"{k}={v}" for k, v in info["training"].items() if v is not None))
    if info["generation"]:
        e("\nGeneration defaults")
        e("  " + ", ".join(f"{k}={v}" for k, v in info["generation"].items()))
    t = info["template_example"]
    e(f"\nPrompt template {t['name']} [plugin {t['plugin']}], rendered on an example:")
    e(_indent(t["single_turn"]))
    if t["with_history"]:
        e("  with one turn of history:")
        e(_indent(t["with_history"]))
    e("\nDatasets")
    for d in info["datasets_detail"]:
        rows = f", {d['rows']} rows" if d["rows"] else ""
        e(f"  {d['name']} [{d['format']}] from {d['source']}{rows}; sample: {d['sample'] or '-'}  [plugin {d['plugin']}]")
        e(f"    {d['description']}")
    e("\nHardware profiles (memory estimate per device, default method)")
    for p in info["profiles_detail"]:
        est = p["estimate"]
        quant = f" {p['quantization']}" if p["quantization"] else ""
        e(f"  {p['name']}: {p['devices']}×{p['memory_gb']} GB {p['precision']}{quant}, micro-batch "
          f"{p['micro_batch']} × accumulation {p['grad_accum']}, base {p['base_model']}  [plugin {p['plugin']}]")
        if p["imposes"]:
            e("    sets " + ", ".join(f"{k}={v}" for k, v in p["imposes"].items()))
        e(f"    needs ≈ {est['total_gb']} GB of {est['budget_gb']} GB: weights {est['weights_gb']}, trainable "
          f"{est['trainable_gb']} ({est['trainable_params']:,} params), optimizer {est['optimizer_gb']}, "
          f"activations {est['activations_gb']}, overhead {est['overhead_gb']}"
          f"{'' if est['fits'] else '  -- DOES NOT FIT'}")
    if info["fixes"]:
        e("\nDefects of the original fixed here")
        for fix in info["fixes"]:
            e(f"  - {fix}")
    e(f"\nPublished checkpoints: {', '.join(info['checkpoints']) or 'none'}")
    if info["card"]:
        e(f"\nCard (cards/{info['card']['file']})")
        e(info["card"]["body"].strip())


def _indent(text: str) -> str:
    return "\n".join("    │ " + line for line in text.split("\n"))


@click.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def plugins_cmd(as_json):
    """List loaded plugins (built-in or installed: version, where from) and any that failed.

    \b
    Examples:
      medzoo plugins
      medzoo plugins --json
    """
    cat = host.catalog()
    counts = {}
    for (kind, _), plugin in cat.origin.items():
        counts.setdefault(plugin, {}).setdefault(kind, 0)
        counts[plugin][kind] += 1
    if as_json:
        click.echo(json.dumps({"plugins": [dict(asdict(p), registers=counts.get(p.name, {})) for p in cat.plugins],
                               "failed": [asdict(f) for f in cat.failures]}, ensure_ascii=False, indent=2))
        return
    click.echo(table(["plugin", "kind", "distribution", "version", "registers", "module", "location"],
                     [[p.name, "built-in" if p.builtin else "installed", p.distribution, p.version,
                       ", ".join(f"{n} {k}" for k, n in counts.get(p.name, {}).items()) or "-", p.module, p.location]
                      for p in cat.plugins]))
    if cat.failures:
        click.echo("\nFailed:")
        for f in cat.failures:
            click.echo(f"  {f.plugin}: {f.reason}")


COMMANDS = {"list": list_cmd, "info": info_cmd, "plugins": plugins_cmd}
