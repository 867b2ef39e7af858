"""QingGeng 青庚 (MedicalGPT-zh): ChatGLM-6B + LoRA with Lion on generated medical dialogues (MediaBrain-SJTU)."""
from medzoo import hookimpl
from medzoo.objects import DatasetSpec, PromptTemplate, Recipe

GENERATION = {"temperature": 0.95, "top_p": 0.7, "max_new_tokens": 512, "do_sample": True}


@hookimpl
def register_prompt_templates(register):
    register(PromptTemplate(
        "qinggeng", query="{query}",
        description="no template: tok(input) + [gMASK] + [BOS] + tok(output) + [EOP] (src/dataset.py)"))


@hookimpl
def register_datasets(register):
    register(DatasetSpec(
        "qinggeng-dialogue", "input-output", "local:unreleased", package=__name__, rows=52000,
        sample="data/dialogue.sample.json", license="apache-2.0",
        description="52k scenario dialogues in 16 categories, BELLE-style from 100 seed tasks (not released)"))
    register(DatasetSpec(
        "qinggeng-book-qa", "input-output", "local:unreleased", package=__name__, rows=130000,
        sample="data/book_qa.sample.json", license="apache-2.0",
        description="130k knowledge QA from clinical guideline passages of 28 departments (not released)"))


@hookimpl
def register_recipes(register):
    register(Recipe(
        "qinggeng", "QingGeng 青庚 (MedicalGPT-zh): ChatGLM-6B + LoRA, Lion optimizer",
        base_model="chatglm-6b", modern_base="glm-4-9b-chat", template="qinggeng",
        datasets=("qinggeng-dialogue", "qinggeng-book-qa"),
        methods={"lora": {"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": ["query_key_value"]}},
        default_method="lora",
        training={"optimizer": "lion", "lr": 1e-4, "batch": 4, "epochs": 1, "grad_accum": 1,
                  "max_grad_norm": 1.0, "warmup_steps": 5000, "scheduler": "piecewise-linear", "seed": 3407},
        profiles=("rtx3090-x4-mp", "a100-80gb", "gpu-24gb", "cpu-demo"), default_profile="rtx3090-x4-mp",
        generation=GENERATION, card="qinggeng.md", upstream="https://github.com/MediaBrain-SJTU/MedicalGPT-zh",
        package=__name__,
        fixes=("LoRA weights train in fp32 under mixed precision (the original cast them to fp16)",
               "the data-generation defect is documented, not hidden: the answer step of "
               "book_based_question_generation.py sends only the question, not passage + question"),
        description="model parallel over ≥4×RTX 3090 by device_map; inference needs ≥15 GB on one card"))
