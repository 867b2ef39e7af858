"""Builds the plugin manager and collects what every plugin registers into one Catalog.

Plugins are found through the ``medzoo`` entry-point group; medzoo's own defaults and the built-in recipes
load through that same group. A plugin that fails to import, raises in a hook or registers something
invalid is recorded in ``Catalog.failures`` with the reason; everything else still loads.
"""
from __future__ import annotations

import difflib
import fnmatch
import os
from dataclasses import dataclass, field
from importlib import metadata

import pluggy

from medzoo import hookspecs
from medzoo.objects import (BaseModel, DataFormat, DatasetSpec, HardwareProfile, MedzooError, PromptTemplate,
                            Recipe, RecipeError, TuningMethod)

GROUP = "medzoo"

# hook name -> (catalog attribute, the class it must register)
COLLECTORS = {
    "register_data_formats": ("formats", DataFormat),
    "register_base_models": ("base_models", BaseModel),
    "register_datasets": ("datasets", DatasetSpec),
    "register_tuning_methods": ("methods", TuningMethod),
    "register_hardware_profiles": ("profiles", HardwareProfile),
    "register_prompt_templates": ("templates", PromptTemplate),
    "register_recipes": ("recipes", Recipe),
}


@dataclass
class PluginInfo:
    name: str
    module: str
    distribution: str
    version: str
    location: str
    builtin: bool


@dataclass
class Failure:
    plugin: str
    reason: str


@dataclass
class Catalog:
    formats: dict = field(default_factory=dict)
    base_models: dict = field(default_factory=dict)
    datasets: dict = field(default_factory=dict)
    methods: dict = field(default_factory=dict)
    profiles: dict = field(default_factory=dict)
    templates: dict = field(default_factory=dict)
    recipes: dict = field(default_factory=dict)
    aliases: dict = field(default_factory=dict)
    origin: dict = field(default_factory=dict)   # (kind, name) -> plugin name
    plugins: list = field(default_factory=list)
    failures: list = field(default_factory=list)

    def recipe(self, name: str) -> Recipe:
        name = self.aliases.get(name, name)
        if name in self.recipes:
            return self.recipes[name]
        raise RecipeError(unknown("recipe", name, list(self.recipes) + list(self.aliases)))

    def get(self, kind: str, name: str):
        table = getattr(self, kind)
        if name not in table:
            raise RecipeError(unknown(kind.rstrip("s").replace("_", " "), name, list(table)))
        return table[name]

    def match(self, pattern: str | None = None) -> list[Recipe]:
        """Recipes whose name matches an fnmatch pattern (timm's list_models style), sorted by name."""
        names = sorted(self.recipes)
        if pattern:
            names = [n for n in names if fnmatch.fnmatch(n, pattern)
                     or fnmatch.fnmatch(self.recipes[n].base_model, pattern)
                     or fnmatch.fnmatch(self.recipes[n].modern_base, pattern)]
        return [self.recipes[n] for n in names]


def unknown(kind: str, name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sorted(choices)) or 'none'}"
    return f"{kind} {name!r} is not registered{hint}"


def plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    return pm


def load_entry_points(pm: pluggy.PluginManager, failures: list) -> list[PluginInfo]:
    """Import and register every plugin of the ``medzoo`` entry-point group, recording failures."""
    infos = []
    blocked = set(filter(None, os.environ.get("MEDZOO_DISABLE_PLUGINS", "").split(",")))
    # medzoo's own entry points first, so a third-party plugin that re-registers a name is the one refused
    eps = sorted(metadata.entry_points(group=GROUP),
                 key=lambda e: (e.dist is None or e.dist.metadata["Name"] != "medzoo", e.name))
    for ep in eps:
        if ep.name in blocked or pm.has_plugin(ep.name):
            continue
        dist = ep.dist
        dist_name = dist.metadata["Name"] if dist is not None else "?"
        try:
            module = ep.load()
            pm.register(module, name=ep.name)
        except Exception as exc:  # a broken plugin must not take the others down
            failures.append(Failure(ep.name, f"failed to load {ep.value}: {type(exc).__name__}: {exc}"))
            continue
        infos.append(PluginInfo(
            name=ep.name, module=ep.value, distribution=dist_name,
            version=dist.version if dist is not None else "?",
            location=os.path.dirname(getattr(module, "__file__", "") or "") or "?",
            builtin=dist_name == "medzoo"))
    return infos


def collect(pm: pluggy.PluginManager, plugins=(), failures=None) -> Catalog:
    """Call every collector hook plugin by plugin, so each object knows which plugin registered it."""
    cat = Catalog(plugins=list(plugins), failures=list(failures or []))
    for hook_name, (attr, cls) in COLLECTORS.items():
        table = getattr(cat, attr)
        for impl in getattr(pm.hook, hook_name).get_hookimpls():  # registration order
            plugin = impl.plugin_name

            def register(obj, aliases=(), _plugin=plugin, _attr=attr, _cls=cls, _table=table):
                if not isinstance(obj, _cls):
                    raise RecipeError(f"{_attr}: expected a {_cls.__name__}, got {type(obj).__name__}")
                if obj.name in _table:
                    first = cat.origin[(_attr, obj.name)]
                    raise RecipeError(f"{_attr[:-1].replace('_', ' ')} {obj.name!r} is already registered "
                                      f"by plugin {first!r}")
                _table[obj.name] = obj
                cat.origin[(_attr, obj.name)] = _plugin
                for alias in aliases:
                    cat.aliases[alias] = obj.name

            try:
                impl.function(register=register)
            except Exception as exc:
                cat.failures.append(Failure(plugin, f"{hook_name}: {type(exc).__name__}: {exc}"))
    for name in list(cat.recipes):
        problem = validate_recipe(cat, cat.recipes[name])
        if problem:
            cat.failures.append(Failure(cat.origin[("recipes", name)], f"recipe {name!r} is invalid: {problem}"))
            del cat.recipes[name]
            cat.aliases = {a: n for a, n in cat.aliases.items() if n != name}
    return cat


def validate_recipe(cat: Catalog, r: Recipe) -> str | None:
    from medzoo.recipes import TRAINING_KEYS

    refs = [("base model", r.base_model, cat.base_models), ("base model", r.modern_base, cat.base_models),
            ("template", r.template, cat.templates)]
    refs += [("dataset", d, cat.datasets) for d in r.datasets]
    refs += [("tuning method", m, cat.methods) for m in r.methods]
    refs += [("hardware profile", p, cat.profiles) for p in r.profiles]
    for kind, name, table in refs:
        if name not in table:
            return unknown(kind, name, table)
    if not r.methods:
        return "it names no tuning method"
    if r.default_method not in r.methods:
        return f"default_method {r.default_method!r} is not one of its methods {sorted(r.methods)}"
    if r.default_profile not in r.profiles:
        return f"default_profile {r.default_profile!r} is not one of its profiles {sorted(r.profiles)}"
    if not cat.base_models[r.modern_base].native:
        return f"modern_base {r.modern_base!r} is not a native transformers model"
    for p in r.profiles:
        unknown_keys = sorted(set(cat.profiles[p].training) - set(TRAINING_KEYS))
        if unknown_keys:
            return f"profile {p!r} sets unknown training key {unknown_keys[0]!r}"
    bad = sorted(set(r.training) - set(TRAINING_KEYS))
    if bad:
        return f"unknown training key {bad[0]!r}; known: {', '.join(TRAINING_KEYS)}"
    for method, params in r.methods.items():
        extra = sorted(set(params) - set(cat.methods[method].defaults))
        if extra:
            return f"method {method!r}: unknown hyper-parameter {extra[0]!r}; " \
                   f"known: {', '.join(cat.methods[method].defaults)}"
    if r.variant_of and r.variant_of not in cat.recipes:
        return unknown("parent recipe", r.variant_of, cat.recipes)
    return None


_CATALOG: Catalog | None = None


def catalog(refresh: bool = False) -> Catalog:
    """The process-wide catalog of everything the installed plugins register."""
    global _CATALOG
    if _CATALOG is None or refresh:
        pm = plugin_manager()
        failures: list = []
        infos = load_entry_points(pm, failures)
        _CATALOG = collect(pm, infos, failures)
    return _CATALOG


def catalog_with(*plugins) -> Catalog:
    """A catalog of the installed plugins plus extra plugin objects (for tests and embedding)."""
    pm = plugin_manager()
    failures: list = []
    infos = load_entry_points(pm, failures)
    for i, plugin in enumerate(plugins):
        name = getattr(plugin, "__name__", None) or type(plugin).__name__
        pm.register(plugin, name=name)
        infos.append(PluginInfo(name, name, "?", "?", "?", False))
    return collect(pm, infos, failures)


def require(cat: Catalog, name: str) -> Recipe:
    try:
        return cat.recipe(name)
    except RecipeError:
        for failure in cat.failures:
            if f"recipe {name!r}" in failure.reason:
                raise MedzooError(f"recipe {name!r} failed to load from plugin {failure.plugin!r}: "
                                  f"{failure.reason}") from None
        raise
