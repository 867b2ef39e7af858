"""The registry, the plugin host and `medzoo list/info/plugins`, driven by what is registered."""
import importlib
import json
import shutil
import sys
import textwrap

import pytest
from click.testing import CliRunner

from medzoo import cards, host, memory, recipes, registry
from medzoo.cli import main
from medzoo.objects import DatasetSpec, MedzooError, PromptTemplate, Recipe
from medzoo import hookimpl

CAT = host.catalog()
SEEDS = ["bentsao", "bentsao-literature", "medqa-chatglm", "qinggeng", "med-chatglm"]


def run(*args):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result


def test_seed_recipes_are_registered_by_their_plugins():
    assert set(SEEDS) <= set(CAT.recipes)
    assert not CAT.failures, CAT.failures
    for name in SEEDS:
        assert CAT.origin[("recipes", name)] == name.replace("-literature", "")
    builtin = {p.name for p in CAT.plugins if p.builtin}
    assert {"builtin", "bentsao", "medqa-chatglm", "qinggeng", "med-chatglm"} <= builtin
    assert all(p.distribution == "medzoo" for p in CAT.plugins if p.builtin)


@pytest.mark.parametrize("name", sorted(CAT.recipes))
def test_every_recipe_resolves_and_has_a_valid_card(name):
    r = CAT.recipes[name]
    assert CAT.base_models[r.modern_base].native
    for method in r.methods:
        run_cfg = recipes.resolve(CAT, r, method=method)
        t = run_cfg["training"]
        assert t["micro_batch"] * t["grad_accum"] <= max(t["batch"], t["micro_batch"])
    for profile in r.profiles:
        prof = CAT.profiles[profile]
        run_cfg = recipes.resolve(CAT, r, profile=profile)
        base = CAT.base_models[prof.base_model or r.base_model]
        est = memory.estimate(base, prof, r.default_method, run_cfg["method_params"], run_cfg["training"])
        assert est.total_gb > est.weights_gb > 0
    meta, body = cards.read(cards.card_path(r))
    assert "medical" in meta["tags"] and meta["language"] == ["zh"]
    for fix in r.fixes:  # every fixed defect is named in the card
        assert any(word in body for word in fix.split()[:3]), fix


def test_seed_hyper_parameters_match_the_originals():
    b = CAT.recipes["bentsao"]
    assert dict(b.methods["lora"]) == {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}
    assert (b.training["batch"], b.training["epochs"], b.training["lr"], b.training["cutoff_len"]) == (128, 10, 3e-4, 256)
    assert b.generation == {"temperature": 0.1, "top_p": 0.75, "top_k": 40, "num_beams": 4, "max_new_tokens": 256}
    m = CAT.recipes["medqa-chatglm"]
    assert set(m.methods) == {"lora", "freeze", "ptuning-v2"}
    assert m.methods["lora"]["alpha"] == 32 and m.methods["ptuning-v2"]["pre_seq_len"] == 16
    assert m.training["batch"] == 32 * 256 and m.training["scheduler"] == "cosine"
    q = CAT.recipes["qinggeng"]
    assert (q.training["optimizer"], q.training["warmup_steps"], q.training["seed"]) == ("lion", 5000, 3407)
    assert q.default_profile == "rtx3090-x4-mp" and CAT.profiles["rtx3090-x4-mp"].placement == "model-parallel"
    c = CAT.recipes["med-chatglm"]
    assert c.default_method == "full" and c.training["adam_epsilon"] == 1e-3
    assert CAT.templates["med-chatglm"].render("胃痛怎么办？") == "问题：胃痛怎么办？\n回答: "


def test_chatglm_template_renders_rounds_like_the_original():
    t = CAT.templates["chatglm-6b"]
    assert t.render("你好") == "你好"
    assert t.render("头痛怎么办", [("发烧了", "多喝水")]) == "[Round 0]\n问：发烧了\n答：多喝水\n[Round 1]\n问：头痛怎么办\n答："


def test_list_table_json_and_glob():
    out = run("list").output
    for name in SEEDS:
        assert name in out
    assert "wangrongsheng/MedQA-ChatGLM-LoRA" in out
    rows = json.loads(run("list", "--json").output)
    assert {r["name"] for r in rows} >= set(SEEDS)
    chatglm = {r["name"] for r in json.loads(run("list", "*chatglm*", "--json").output)}
    assert chatglm == {"medqa-chatglm", "med-chatglm", "qinggeng"}  # qinggeng matches by base model
    assert "no recipe matches" in run("list", "nothing*").output


def test_info_shows_card_template_datasets_memory_and_origin():
    out = run("info", "bentsao").output
    assert "### 回答:" in out and "下面是一个问题" in out          # template rendered on an example
    assert "huatuo-kg [alpaca]" in out and "[plugin bentsao]" in out
    assert "cpu-demo" in out and "needs ≈" in out and "optimizer" in out
    assert "thinksoso/lora-llama-med" in out
    assert "never use its answers for diagnosis" in out        # the card body
    info = json.loads(run("info", "medqa-chatglm", "--json").output)
    assert info["template_example"]["with_history"].startswith("[Round 0]")
    assert {p["name"] for p in info["profiles_detail"]} == set(CAT.recipes["medqa-chatglm"].profiles)


def test_unknown_recipe_suggests_the_closest():
    result = CliRunner().invoke(main, ["info", "bentso"])
    assert result.exit_code == 2
    assert "did you mean 'bentsao'?" in result.output and "Traceback" not in result.output


def test_alias_resolves():
    assert CAT.recipe("huatuo").name == "bentsao"


def test_plugins_command_lists_builtin_plugins():
    out = run("plugins").output
    assert "built-in" in out and "medqa-chatglm" in out
    data = json.loads(run("plugins", "--json").output)
    assert data["failed"] == []


# --- bad plugins: a broken one is named with the reason, the rest still list -------------------------

class Good:
    @hookimpl
    def register_prompt_templates(self, register):
        register(PromptTemplate("extra-t", query="Q:{query}\nA:"))

    @hookimpl
    def register_recipes(self, register):
        base = CAT.recipes["bentsao"]
        register(Recipe("extra-recipe", "an extra recipe", base_model="llama-7b", modern_base="qwen2.5-7b-instruct",
                        template="extra-t", datasets=("huatuo-kg",), methods={"lora": {"r": 4}},
                        default_method="lora", training={"epochs": 1}, profiles=base.profiles,
                        default_profile="cpu-demo"))


class Duplicate:
    @hookimpl
    def register_recipes(self, register):
        register(CAT.recipes["bentsao"])


class Invalid:
    @hookimpl
    def register_recipes(self, register):
        register(Recipe("broken", "x", base_model="llama-7b", modern_base="qwen2.5-7b-instruct", template="nope",
                        datasets=("huatuo-kg",), methods={"lora": {}}, default_method="lora", training={},
                        profiles=("cpu-demo",), default_profile="cpu-demo"))


class BadKey:
    @hookimpl
    def register_recipes(self, register):
        register(Recipe("badkey", "x", base_model="llama-7b", modern_base="qwen2.5-7b-instruct",
                        template="bentsao-med", datasets=("huatuo-kg",), methods={"lora": {"rank": 8}},
                        default_method="lora", training={}, profiles=("cpu-demo",), default_profile="cpu-demo"))


class Raises:
    @hookimpl
    def register_datasets(self, register):
        raise RuntimeError("database offline")


def test_throwaway_plugin_registers_a_recipe():
    cat = host.catalog_with(Good())
    assert cat.recipe("extra-recipe").template == "extra-t"
    assert cat.origin[("recipes", "extra-recipe")] == "Good"


@pytest.mark.parametrize("plugin, reason", [
    (Duplicate(), "recipe 'bentsao' is already registered by plugin 'bentsao'"),
    (Invalid(), "recipe 'broken' is invalid: template 'nope' is not registered"),
    (BadKey(), "unknown hyper-parameter 'rank'"),
    (Raises(), "register_datasets: RuntimeError: database offline"),
])
def test_bad_plugins_are_named_and_the_rest_still_load(plugin, reason):
    cat = host.catalog_with(plugin)
    failures = [f for f in cat.failures if f.plugin == type(plugin).__name__]
    assert failures and reason in failures[0].reason, cat.failures
    assert set(SEEDS) <= set(cat.recipes)
    assert "broken" not in cat.recipes and "badkey" not in cat.recipes


@pytest.fixture
def broken_entry_point(tmp_path):
    """A real installed distribution whose plugin module fails to import, found through entry points."""
    site = tmp_path / "site"
    dist = site / "medzoo_broken-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: medzoo-broken\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[medzoo]\nbroken = medzoo_broken_plugin\n")
    (site / "medzoo_broken_plugin.py").write_text("import does_not_exist_anywhere\n")
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    yield
    sys.path.remove(str(site))
    importlib.invalidate_caches()
    host.catalog(refresh=True)


def test_plugin_that_fails_to_import_is_reported(broken_entry_point):
    cat = host.catalog(refresh=True)
    [failure] = [f for f in cat.failures if f.plugin == "broken"]
    assert "No module named 'does_not_exist_anywhere'" in failure.reason
    result = CliRunner().invoke(main, ["plugins"])
    assert "Failed:" in result.output and "broken" in result.output
    listing = CliRunner().invoke(main, ["list"])
    assert listing.exit_code == 0 and "bentsao" in listing.output
    assert "warning: plugin 'broken'" in listing.output


# --- registry.yaml and cards: errors with file and line -----------------------------------------------

def write_registry(tmp_path, monkeypatch, text):
    path = tmp_path / "registry.yaml"
    path.write_text(textwrap.dedent(text))
    monkeypatch.setenv("MEDZOO_REGISTRY", str(path))
    return path


@pytest.mark.parametrize("text, expected", [
    ("recipes:\n  - bentsao\n  - bentso\n", "registry.yaml:3: recipe 'bentso' is not registered; did you mean 'bentsao'?"),
    ("recipes: [bentsao]\ncheckpoints:\n  - repo_id: a/b\n    recipe: bentsao\n    method: freeze\n    base_model: llama-7b\n",
     "registry.yaml:5: method 'freeze' is not offered by recipe 'bentsao'"),
    ("checkpoints:\n  - repo_id: not-a-repo\n    recipe: bentsao\n    method: lora\n    base_model: llama-7b\n",
     "registry.yaml:2: repo_id 'not-a-repo' is not of the form owner/name"),
    ("checkpoints:\n  - repo_id: a/b\n    recipe: bentsao\n    method: lora\n", "registry.yaml:2: checkpoint is missing field 'base_model'"),
    ("checkpoints:\n  - repo_id: a/b\n    recipe: bentsao\n    method: lora\n    base_model: llama-7b\n    layout: zip\n",
     "registry.yaml:6: layout 'zip' is not one of"),
    ("checkpoints:\n  - repo_id: a/b\n    recipe: bentsao\n    method: lora\n    base_model: llama-7b\n"
     "  - repo_id: a/b\n    recipe: bentsao\n    method: lora\n    base_model: llama-7b\n", "registry.yaml:6: checkpoint 'a/b' is listed twice"),
    ("recipes: [bentsao\n", "registry.yaml:1: not valid YAML"),
    ("colour: blue\n", "registry.yaml:1: unknown key 'colour'"),
])
def test_malformed_registry_names_file_and_line(tmp_path, monkeypatch, text, expected):
    path = write_registry(tmp_path, monkeypatch, text)
    before = path.read_text()
    result = CliRunner().invoke(main, ["list"])
    assert result.exit_code == 2
    assert expected in result.output, result.output
    assert path.read_text() == before  # reading never rewrites the registry


def test_shipped_registry_is_valid():
    reg = registry.load(CAT)
    assert set(reg.recipes) == set(SEEDS)
    assert {c.method for c in reg.checkpoints_of("medqa-chatglm")} == {"lora", "freeze", "ptuning-v2"}
    assert reg.checkpoint("thinksoso/lora-llama-med").base_model == "llama-7b"


@pytest.mark.parametrize("card, expected", [
    ("no front matter\n", "bentsao.md:1: a model card must start with '---'"),
    ("---\nlanguage: [zh]\nlicense: x\n", "bentsao.md:1: the front matter opened here is never closed"),
    ("---\nlanguage: [zh]\nlicense: [x\n---\n", "bentsao.md:3: front matter is not valid YAML"),
    ("---\nlanguage: [zh]\nlicense: x\nbase_model: b\nlibrary_name: peft\ntags: medical\ndatasets: []\n---\n",
     "bentsao.md:6: 'tags' must be a list"),
    ("---\nlanguage: [zh]\n---\nbody\n", "bentsao.md:1: front matter is missing 'license'"),
])
def test_malformed_card_names_file_and_line(tmp_path, monkeypatch, card, expected):
    data = tmp_path / "data"
    shutil.copytree(registry.data_root() / "cards", data / "cards")
    shutil.copy(registry.data_root() / "registry.yaml", data / "registry.yaml")
    (data / "cards" / "bentsao.md").write_text(card)
    monkeypatch.setenv("MEDZOO_DATA", str(data))
    result = CliRunner().invoke(main, ["info", "bentsao"])
    assert result.exit_code == 2 and expected in result.output, result.output


def test_set_overrides_are_checked():
    r = CAT.recipes["bentsao"]
    resolved = recipes.resolve(CAT, r, overrides={"lr": 1e-3, "r": 16})
    assert resolved["training"]["lr"] == 1e-3 and resolved["method_params"]["r"] == 16
    with pytest.raises(MedzooError, match="setting 'lrr' is not registered; did you mean 'lr'"):
        recipes.resolve(CAT, r, overrides={"lrr": 1})
    assert recipes.parse_value("3e-4") == 3e-4 and recipes.parse_value('["q_proj"]') == ["q_proj"]
    assert recipes.parse_value("yes") is True and recipes.parse_value("cosine") == "cosine"


def test_global_batch_is_kept_by_the_profile():
    r = CAT.recipes["bentsao"]
    for profile in r.profiles:
        t = recipes.resolve(CAT, r, profile=profile)["training"]
        prof = CAT.profiles[profile]
        devices = prof.devices if prof.placement in ("ddp", "fsdp") else 1
        assert t["micro_batch"] * t["grad_accum"] * devices == prof.training.get("batch", 128)


def test_demo_profile_imposes_its_settings_but_the_user_wins():
    r = CAT.recipes["bentsao"]
    t = recipes.resolve(CAT, r, profile="cpu-demo")["training"]
    assert (t["batch"], t["lr"], t["epochs"], t["grad_accum"]) == (16, 2e-3, 3, 2)
    assert recipes.resolve(CAT, r, profile="cpu-demo", overrides={"lr": 1e-4})["training"]["lr"] == 1e-4
    assert recipes.resolve(CAT, r, profile="a100-80gb")["training"]["lr"] == 3e-4


def test_a_users_warmup_ratio_replaces_the_recipes_warmup_steps():
    q = CAT.recipes["qinggeng"]
    t = recipes.resolve(CAT, q, overrides={"warmup_ratio": 0.1})["training"]
    assert (t["warmup_steps"], t["warmup_ratio"]) == (0, 0.1)
    both = recipes.resolve(CAT, q, overrides={"warmup_ratio": 0.1, "warmup_steps": 10})["training"]
    assert (both["warmup_steps"], both["warmup_ratio"]) == (10, 0.1)
    assert recipes.resolve(CAT, q)["training"]["warmup_steps"] == 5000


def test_memory_estimate_orders_methods_sensibly():
    base, prof = CAT.base_models["llama-7b"], CAT.profiles["a100-80gb"]
    training = {"cutoff_len": 256, "micro_batch": 4}
    lora = memory.estimate(base, prof, "lora", {"r": 8, "target_modules": ["q_proj", "v_proj"]}, training)
    full = memory.estimate(base, prof, "full", {}, training)
    qlora = memory.estimate(base, CAT.profiles["gpu-24gb-qlora"], "qlora", {"r": 8}, training)
    assert lora.trainable_params == 32 * 8 * (4096 * 2) * 2  # layers × r × (in+out) × 2 targets
    assert qlora.weights_gb < lora.weights_gb < full.weights_gb
    assert full.total_gb > 80 and not full.fits and lora.fits and qlora.fits
    ptuning = memory.estimate(CAT.base_models["chatglm-6b"], prof, "ptuning-v2", {"pre_seq_len": 16}, training)
    assert ptuning.trainable_params == 16 * 229376  # the published prefix_encoder's shape


def test_zoo_index_survives_and_rejects_bad_names(tmp_path):
    from medzoo import zoo

    folder = tmp_path / "m"
    folder.mkdir()
    zoo.write_manifest(folder, {"recipe": "bentsao", "method": "lora", "base_model": "medzoo-tiny"})
    zoo.register("my-model", folder)
    assert zoo.get("my-model")[1] == folder.resolve()
    with pytest.raises(MedzooError, match="may hold only"):
        zoo.register("bad name!", folder)
    with pytest.raises(MedzooError, match="did you mean 'my-model'"):
        zoo.get("my-modle")
    zoo.index_path().write_text("{not json")
    with pytest.raises(MedzooError, match="zoo.json: the local zoo index is unreadable"):
        zoo.entries()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


class Everything:
    """A plugin that uses every hook: its own format, base model, method, profile, template, data set, recipe."""

    @hookimpl
    def register_data_formats(self, register):
        from medzoo.objects import DataFormat
        register(DataFormat("qa-pair", ("q", "a"), "tests.test_catalog:qa_pair", "q/a rows"))

    @hookimpl
    def register_base_models(self, register):
        from medzoo.objects import BaseModel
        register(BaseModel("mini-qwen", "Qwen/Qwen2.5-0.5B-Instruct", "qwen2", 0.49, 24, 896, 4864, 14, 2, 151936,
                           mlp_matrices=3))

    @hookimpl
    def register_tuning_methods(self, register):
        from medzoo.objects import TuningMethod
        register(TuningMethod("dora", "medzoo.train.methods:apply_lora", {"r": 8, "alpha": 16, "dropout": 0.0,
                                                                          "target_modules": ["q_proj"]}))

    @hookimpl
    def register_hardware_profiles(self, register):
        from medzoo.objects import HardwareProfile
        register(HardwareProfile("l4-24gb", 1, 24, "bf16", micro_batch=8))

    @hookimpl
    def register_datasets(self, register):
        register(DatasetSpec("qa-set", "qa-pair", "local:data.jsonl", package="tests"))

    @hookimpl
    def register_prompt_templates(self, register):
        register(PromptTemplate("qa", query="Q: {query}\nA: ", response_split="A: "))

    @hookimpl
    def register_recipes(self, register):
        register(Recipe("qa-recipe", "all hooks", base_model="mini-qwen", modern_base="mini-qwen", template="qa",
                        datasets=("qa-set",), methods={"dora": {"r": 4}}, default_method="dora",
                        training={"batch": 16}, profiles=("l4-24gb",), default_profile="l4-24gb"),
                 aliases=("qa",))


def qa_pair(row):
    return {"query": row["q"], "response": row["a"], "history": []}


def test_a_plugin_can_provide_every_kind_of_object():
    cat = host.catalog_with(Everything())
    assert not [f for f in cat.failures if f.plugin == "Everything"], cat.failures
    r = cat.recipe("qa")
    assert cat.origin[("formats", "qa-pair")] == cat.origin[("base_models", "mini-qwen")] == "Everything"
    assert cat.origin[("methods", "dora")] == cat.origin[("profiles", "l4-24gb")] == "Everything"
    resolved = recipes.resolve(cat, r)
    assert resolved["method_params"] == {"r": 4, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj"]}
    assert resolved["training"]["grad_accum"] == 2
    from medzoo.objects import resolve
    assert resolve(cat.formats["qa-pair"].normalize)({"q": "x", "a": "y"})["response"] == "y"
    est = memory.estimate(cat.base_models["mini-qwen"], cat.profiles["l4-24gb"], "dora", resolved["method_params"],
                          resolved["training"])
    assert est.trainable_params == 24 * 4 * (896 + 896)
