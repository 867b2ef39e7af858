"""MedQA-ChatGLM: ChatGLM-6B tuned on cMedQA2 with LoRA, Freeze or P-Tuning v2 (WangRongsheng/MedQA-ChatGLM)."""
from medzoo import hookimpl
from medzoo.objects import DatasetSpec, PromptTemplate, Recipe

TRAINING = {
    "epochs": 10, "lr": 5e-5, "batch": 32 * 256, "scheduler": "cosine", "logging_steps": 500,
    "save_steps": 1000, "max_source_length": 512, "max_target_length": 512, "cutoff_len": 1024,
}
METHODS = {
    "lora": {"r": 8, "alpha": 32, "dropout": 0.1, "target_modules": ["query_key_value"]},
    "freeze": {"num_layer_trainable": 3, "name_module_trainable": "mlp"},
    "ptuning-v2": {"pre_seq_len": 16, "prefix_projection": False},
}
CHATGLM_GENERATION = {"temperature": 0.95, "top_p": 0.7, "max_new_tokens": 512, "do_sample": True}


@hookimpl
def register_prompt_templates(register):
    register(PromptTemplate(
        "chatglm-6b", query="{query}", history_turn="[Round {index}]\n问：{query}\n答：{response}\n",
        history_query="[Round {index}]\n问：{query}\n答：", stop=("[Round",),
        description="ChatGLM-6B's native chat format; [gMASK] [BOS] are added by the tokenizer"))


@hookimpl
def register_datasets(register):
    register(DatasetSpec(
        "merged-cMedQA", "prompt-query-response", "hf://wangrongsheng/cMedQA-merged", package=__name__,
        columns={"prompt": "instruction", "query": "input", "response": "output", "history": "history"},
        rows=226266, sample="data/cmedqa_merged.sample.json", license="cc-by-4.0",
        description="cMedQA2 question/answer pairs as instruction/input/output (data/bulid_cMedQA2.py)"))


@hookimpl
def register_recipes(register):
    register(Recipe(
        "medqa-chatglm", "MedQA-ChatGLM: ChatGLM-6B on cMedQA2 (LoRA, Freeze, P-Tuning v2)",
        base_model="chatglm-6b", modern_base="glm-4-9b-chat", template="chatglm-6b",
        datasets=("merged-cMedQA",), methods=METHODS, default_method="lora", training=TRAINING,
        profiles=("a100-80gb", "gpu-24gb", "h100-80gb", "cpu-demo"), default_profile="a100-80gb",
        generation=CHATGLM_GENERATION, card="medqa-chatglm.md",
        upstream="https://github.com/WangRongsheng/MedQA-ChatGLM", package=__name__,
        fixes=("Freeze computes the trainable layer ids from the model (the original hard-codes 27/26/25 "
               "for a 28-layer model)",),
        description="a fork of early ChatGLM-Efficient-Tuning; 1×A100-80GB, 27–28 h for 10 epochs"))
