"""`medzoo new-recipe`: write an installable recipe plugin package, from scratch or from an existing recipe."""
from __future__ import annotations

import json
import keyword
import re
from importlib import resources
from pathlib import Path
from pprint import pformat

from medzoo import host, zoo
from medzoo.objects import MedzooError

NAME = re.compile(r"^[a-z][a-z0-9-]*[a-z0-9]$")

STARTER_ROWS = [
    {"instruction": "高血压患者日常饮食需要注意什么？", "input": "",
     "output": "高血压患者应限制食盐摄入，每日不超过5克；多吃新鲜蔬菜水果和全谷物，少吃腌制食品和动物内脏；"
               "戒烟限酒，控制体重，并按医嘱规律服药、监测血压。"},
    {"instruction": "糖尿病有哪些典型症状？", "input": "",
     "output": "典型症状为“三多一少”：多饮、多食、多尿和体重下降，部分患者还会出现乏力、视物模糊、皮肤瘙痒等。"
               "确诊需检测空腹血糖、餐后血糖或糖化血红蛋白。"},
    {"instruction": "感冒发烧时可以吃抗生素吗？", "input": "",
     "output": "普通感冒多由病毒引起，抗生素对病毒无效，不建议自行服用。可多休息、多饮水，体温超过38.5℃时可用"
               "对乙酰氨基酚等退热药；若出现高热不退、脓痰等细菌感染迹象，应就医由医生判断。"},
    {"instruction": "缺铁性贫血应该挂哪个科？", "input": "",
     "output": "一般挂血液科或内科。医生会查血常规、血清铁蛋白等明确诊断，并寻找缺铁原因，如消化道出血或月经过多。"},
]


def module_name(name: str) -> str:
    return "medzoo_" + name.replace("-", "_")


def _literal(value) -> str:
    return pformat(value, width=100, sort_dicts=False)


def render(name: str, source=None) -> dict[str, str]:
    """The files of a new plugin package, {relative path: text}. `source` is a Recipe to start from."""
    if not NAME.match(name) or keyword.iskeyword(name):
        raise MedzooError(f"recipe name {name!r}: use lower-case letters, digits and '-', e.g. 'my-recipe'")
    cat = host.catalog()
    if name in cat.recipes or name in cat.aliases:
        raise MedzooError(f"recipe {name!r} already exists (plugin {cat.origin.get(('recipes', name), '?')!r}); "
                          "choose another name")
    mod = module_name(name)
    template_name = f"{name}-template"
    dataset_name = f"{name}-data"
    if source is not None:
        tmpl = cat.templates[source.template]
        src_dataset = cat.datasets[source.datasets[0]]
        data_format = src_dataset.format
        sample_text = _sample_of(src_dataset)
        sample_file = "data/sample" + (Path(src_dataset.sample).suffix if src_dataset.sample else ".json")
        template_args = {k: getattr(tmpl, k) for k in ("query", "system", "history_turn", "history_query",
                                                       "response_split", "stop") if getattr(tmpl, k)}
        methods, default_method = {k: dict(v) for k, v in source.methods.items()}, source.default_method
        training, profiles = dict(source.training), list(source.profiles)
        default_profile, generation = source.default_profile, dict(source.generation)
        base_model, modern_base = source.base_model, source.modern_base
        origin = f"Started from medzoo recipe `{source.name}` ({source.title})."
    else:
        data_format, sample_file = "alpaca", "data/sample.jsonl"
        sample_text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in STARTER_ROWS)
        template_args = {"query": "下面是一个医学问题，请给出准确、简明的回答。\n### 问题:\n{query}\n### 回答:\n",
                         "response_split": "### 回答:", "stop": ("### 问题:",)}
        methods = {"lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}}
        default_method, training = "lora", {"epochs": 3, "lr": 2e-4, "batch": 32, "cutoff_len": 512}
        profiles, default_profile = ["gpu-24gb", "a100-80gb", "cpu-demo"], "gpu-24gb"
        generation = {"temperature": 0.3, "top_p": 0.85, "max_new_tokens": 256}
        base_model, modern_base = "qwen2.5-7b-instruct", "qwen2.5-7b-instruct"
        origin = "Written from medzoo's starter template."
    template_kw = ", ".join(f"{k}={v!r}" for k, v in template_args.items())
    files = {}
    files["setup.py"] = f'''from setuptools import setup

setup(
    name="medzoo-{name}",
    version="0.1.0",
    description="medzoo recipe plugin: {name}",
    packages=["{mod}"],
    package_data={{"{mod}": ["data/*", "card.md"]}},
    install_requires=["medzoo"],
    entry_points={{"medzoo": ["{name} = {mod}"]}},
)
'''
    files[f"{mod}/__init__.py"] = f'''"""medzoo recipe plugin `{name}`. {origin}

Every hook receives a `register` callback; medzoo imports this module through the `medzoo` entry point.
Run it: `medzoo info {name}`, `medzoo train {name} --profile cpu-demo`.
"""
from medzoo import hookimpl
from medzoo.objects import DatasetSpec, PromptTemplate, Recipe

METHODS = {_literal(methods)}

TRAINING = {_literal(training)}

GENERATION = {_literal(generation)}


@hookimpl
def register_prompt_templates(register):
    register(PromptTemplate({template_name!r}, {template_kw}))


@hookimpl
def register_datasets(register):
    register(DatasetSpec({dataset_name!r}, {data_format!r}, source="local:{sample_file}", package=__name__,
                         sample={sample_file!r}, description="replace with your data set"))


@hookimpl
def register_recipes(register):
    register(Recipe(
        {name!r}, "{name}: describe your recipe in one line",
        base_model={base_model!r}, modern_base={modern_base!r}, template={template_name!r},
        datasets=({dataset_name!r},), methods=METHODS, default_method={default_method!r}, training=TRAINING,
        profiles={tuple(profiles)!r}, default_profile={default_profile!r}, generation=GENERATION,
        card="card.md", package=__name__))
'''
    files[f"{mod}/{sample_file}"] = sample_text
    files[f"{mod}/card.md"] = f'''---
language:
- zh
license: apache-2.0
base_model: {cat.base_models[base_model].hub_id}
library_name: peft
tags:
- medical
- medzoo
- {name}
datasets:
- {dataset_name}
---
# {name}

{origin} Describe the data, the hyper-parameters and their source, the hardware it was trained on, and
its limits. Research use only; not for clinical decisions.
'''
    files[f"tests/test_{mod}.py"] = f'''"""Checks that the plugin loads into medzoo and its sample data fits its format and template."""
import json
from importlib import resources

from medzoo import host
from medzoo.objects import resolve


def test_recipe_is_registered():
    cat = host.catalog(refresh=True)
    assert not [f for f in cat.failures if f.plugin == {name!r}], cat.failures
    recipe = cat.recipe({name!r})
    assert recipe.template == {template_name!r}
    assert cat.origin[("recipes", {name!r})] == {name!r}


def test_sample_rows_fit_the_format_and_template():
    cat = host.catalog()
    spec = cat.datasets[{dataset_name!r}]
    raw = (resources.files(spec.package) / spec.sample).read_text(encoding="utf-8")
    try:
        rows = json.loads(raw)
    except ValueError:  # JSON lines
        rows = [json.loads(line) for line in raw.splitlines() if line.strip()]
    normalize = resolve(cat.formats[spec.format].normalize)
    template = cat.templates[{template_name!r}]
    assert rows, "the sample data is empty"
    for row in rows:
        conv = normalize(row)
        assert conv["response"].strip()
        assert conv["query"] in template.render(conv["query"], conv["history"])
'''
    files["README.md"] = f'''# medzoo-{name}

A [medzoo](https://github.com/) recipe plugin. {origin}

```bash
pip install -e .
medzoo list "{name}"
medzoo info {name}
python -m pytest tests
```
'''
    return files


def _sample_of(spec) -> str:
    if not spec.sample:
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in STARTER_ROWS)
    path = resources.files(spec.package) / spec.sample
    if not path.is_file():
        raise MedzooError(f"{path}: the sample data of dataset {spec.name!r} is missing")
    return path.read_text(encoding="utf-8")


def write(name: str, out_dir: Path, source=None) -> Path:
    """Write the package to out_dir/medzoo-<name>; refuses to overwrite, writes all or nothing."""
    target = Path(out_dir) / f"medzoo-{name}"
    if target.exists():
        raise MedzooError(f"{target}: already exists; choose another name or directory")
    files = render(name, source)
    with zoo.atomic_dir(target) as tmp:
        for rel, text in files.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    return target
