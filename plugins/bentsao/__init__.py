"""BenTsao (本草, formerly HuaTuo): LLaMA-7B + LoRA on CMeKG-derived medical QA (SCIR-HI/Huatuo-Llama-Med-Chinese)."""
from medzoo import hookimpl
from medzoo.objects import DatasetSpec, PromptTemplate, Recipe

LORA = {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}
GENERATION = {"temperature": 0.1, "top_p": 0.75, "top_k": 40, "num_beams": 4, "max_new_tokens": 256}
TRAINING = {
    "epochs": 10, "lr": 3e-4, "batch": 128, "cutoff_len": 256, "val_size": 500,
    "warmup_ratio": 0.1, "scheduler": "linear", "optimizer": "adamw", "logging_steps": 8,
    "eval_steps": 32, "save_steps": 32, "save_total_limit": 5, "train_on_inputs": False,
    "load_in_8bit": False,  # finetune.py loads the base in 8-bit; its README says half precision
}
PROFILES = ("a100-80gb", "gpu-24gb", "gpu-24gb-qlora", "h100-80gb", "a100-80gb-x8-ddp", "cpu-demo")


@hookimpl
def register_prompt_templates(register):
    register(PromptTemplate(
        "bentsao-med", query="下面是一个问题，运用医学知识来正确回答提问.\n### 问题:\n{query}\n### 回答:\n",
        response_split="### 回答:", stop=("### 问题:",),
        description="templates/med_template.json (same text with and without input)"))
    register(PromptTemplate(
        "bentsao-literature",
        system="以下是描述任务的说明，编写适当地回复完成请求的响应。\n\n ### 说明:\n",
        query="{query}\n\n### 回复:\n", history_turn="<user>: {query} <bot>: {response} ",
        history_query="<user>: {query}\n\n### 回复:\n", response_split="### 回复:", stop=("### 说明:", "<user>:"),
        description="templates/literature_template.json; history inlined as <user>: … <bot>: … (infer_literature.py)"))
    register(PromptTemplate(
        "bloom-deploy", query="下面是一个问题，运用医学知识来正确回答提问.\n{query}\n### 回答：\n",
        response_split="### 回答：", stop=("### 回答：",),
        description="templates/bloom_deploy.json (Bloom and Huozi bases)"))


@hookimpl
def register_datasets(register):
    register(DatasetSpec(
        "huatuo-kg", "alpaca", "hf://wangrongsheng/Huatuo-data", package=__name__, rows=8658,
        sample="data/llama_data.sample.json", license="apache-2.0",
        description="~8k QA pairs generated with GPT-3.5 from the CMeKG knowledge graph (data/llama_data.json)"))
    register(DatasetSpec(
        "huatuo-liver-cancer", "dialogue", "hf://wangrongsheng/Huatuo-liver-cancer", package=__name__,
        rows=1000, sample="data/liver_cancer.sample.json", license="apache-2.0",
        description="multi-turn QA about 2023 liver-cancer literature (data_literature/liver_cancer.json)"))


@hookimpl
def register_recipes(register):
    fixes = ("the base loads in half precision by default (finetune.py loaded it in 8-bit while the README "
             "said half); set load_in_8bit=true to reproduce the original",
             "a non-empty `input` is appended to the question (the original template dropped it)",
             "the pad/bos/eos ids of the LLaMA mirror are taken from the tokenizer, not patched by hand")
    register(Recipe(
        "bentsao", "BenTsao 本草 (HuaTuo): LLaMA-7B + LoRA on CMeKG medical QA",
        base_model="llama-7b", modern_base="qwen2.5-7b-instruct", template="bentsao-med",
        datasets=("huatuo-kg",), methods={"lora": LORA, "qlora": LORA, "full": {}}, default_method="lora",
        training=TRAINING, profiles=PROFILES, default_profile="a100-80gb", generation=GENERATION,
        card="bentsao.md", upstream="https://github.com/SCIR-HI/Huatuo-Llama-Med-Chinese", fixes=fixes,
        package=__name__,
        description="alpaca-lora style LoRA on q_proj/v_proj; 1×A100-80GB, 10 epochs ≈ 2 h 17 min"),
        aliases=("huatuo", "bencao"))
    register(Recipe(
        "bentsao-literature", "BenTsao literature: multi-turn liver-cancer dialogues",
        base_model="llama-7b", modern_base="qwen2.5-7b-instruct", template="bentsao-literature",
        datasets=("huatuo-liver-cancer",), methods={"lora": LORA, "qlora": LORA}, default_method="lora",
        training=TRAINING, profiles=PROFILES, default_profile="a100-80gb", generation=GENERATION,
        card="bentsao-literature.md", upstream="https://github.com/SCIR-HI/Huatuo-Llama-Med-Chinese",
        variant_of="bentsao", fixes=fixes[:1], package=__name__,
        description="the literature variant: literature_template with <user>/<bot> history"))
