"""Med-ChatGLM: full fine-tuning of ChatGLM-6B on CMeKG-derived QA (SCIR-HI/Med-ChatGLM)."""
from medzoo import hookimpl
from medzoo.objects import DatasetSpec, PromptTemplate, Recipe

GENERATION = {"temperature": 0.95, "top_p": 0.7, "max_new_tokens": 256, "do_sample": True}


@hookimpl
def register_prompt_templates(register):
    register(PromptTemplate(
        "med-chatglm", query="问题：{query}\n回答: ", response_split="回答: ", stop=("问题：",),
        description="run_clm.py's training format, used for inference too (infer.py used 答案：)"))


@hookimpl
def register_datasets(register):
    register(DatasetSpec(
        "huatuo-kg-context", "context-target", "hf://wangrongsheng/Huatuo-data", package=__name__, rows=8658,
        columns={"context": "instruction", "target": "output"},  # the Hub copy is instruction/input/output
        sample="data/train.sample.txt", license="apache-2.0",
        description="BenTsao's CMeKG-derived QA as {context, target} lines (data/train.txt)"))


@hookimpl
def register_recipes(register):
    register(Recipe(
        "med-chatglm", "Med-ChatGLM: full fine-tuning of ChatGLM-6B on CMeKG medical QA",
        base_model="chatglm-6b", modern_base="glm-4-9b-chat", template="med-chatglm",
        datasets=("huatuo-kg-context",), methods={"full": {}, "lora": {"target_modules": ["query_key_value"]}},
        default_method="full",
        training={"batch": 16, "micro_batch": 8, "grad_accum": 2, "lr": 5e-5, "epochs": 3, "scheduler": "linear",
                  "warmup_ratio": 0.1, "cutoff_len": 256, "adam_epsilon": 1e-3, "seed": 2023, "save_steps": 0},
        profiles=("a100-80gb", "h100-80gb", "gpu-24gb", "cpu-demo"), default_profile="a100-80gb",
        generation=GENERATION, card="med-chatglm.md", upstream="https://github.com/SCIR-HI/Med-ChatGLM",
        package=__name__,
        fixes=("one template for training and inference: 问题：{q}\\n回答:  (infer.py asked with 答案：, "
               "which the model never saw, causing run-on answers)",
               "a context that already carries the template is not wrapped twice"),
        description="run_clm.py on transformers 4.27.1, gradient checkpointing; A100-80GB, ≥32 GB recommended"))
