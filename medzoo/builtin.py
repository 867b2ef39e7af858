"""medzoo's defaults, registered as a plugin like any other: data formats, tuning methods, hardware
profiles and the base models the seed recipes use."""
from medzoo import hookimpl
from medzoo.objects import BaseModel, DataFormat, HardwareProfile, TuningMethod

F = "medzoo.data.formats:"
M = "medzoo.train.methods:"


@hookimpl
def register_data_formats(register):
    register(DataFormat("alpaca", ("instruction", "output"), F + "alpaca",
                        "instruction/input/output rows (BenTsao, alpaca-lora); optional history",
                        {"instruction": "偏头痛有哪些症状？", "input": "", "output": "偏头痛常见症状为单侧搏动性头痛……"}))
    register(DataFormat("cmedqa2", ("question", "answer"), F + "cmedqa2",
                        "cMedQA2 question/answer pairs (MedQA-ChatGLM's source)",
                        {"question": "孩子发烧38.5度怎么办？", "answer": "可以先物理降温……"}))
    register(DataFormat("prompt-query-response", ("prompt", "response"), F + "prompt_query_response",
                        "dataset_info.json column mapping {prompt, query, response, history} (MedQA-ChatGLM)",
                        {"prompt": "高血压患者能吃什么水果？", "query": "", "response": "……", "history": []}))
    register(DataFormat("input-output", ("input", "output"), F + "input_output",
                        "a JSON list of {input, output} (QingGeng)",
                        {"input": "医生，我最近总是失眠。", "output": "失眠可能与……"}))
    register(DataFormat("context-target", ("context", "target"), F + "context_target",
                        "JSON lines of {context, target} (Med-ChatGLM)",
                        {"context": "问题：胃溃疡怎么治疗？\n回答: ", "target": "胃溃疡的治疗……"}))
    register(DataFormat("dialogue", ("turns",), F + "dialogue",
                        "multi-turn dialogues: turns = [{user, bot}, ...] (BenTsao literature)",
                        {"turns": [{"user": "肝癌早期有什么症状？", "bot": "……"}, {"user": "如何筛查？", "bot": "……"}]}))


@hookimpl
def register_tuning_methods(register):
    register(TuningMethod("lora", M + "apply_lora",
                          {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]},
                          "low-rank adapters on the named linear layers (peft)"))
    register(TuningMethod("qlora", M + "apply_qlora",
                          {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]},
                          "LoRA over a 4-bit NF4 base (bitsandbytes, CUDA only)", needs_cuda=True))
    register(TuningMethod("freeze", M + "apply_freeze",
                          {"num_layer_trainable": 3, "name_module_trainable": "mlp"},
                          "train only the last N layers' named modules"))
    register(TuningMethod("ptuning-v2", M + "apply_ptuning",
                          {"pre_seq_len": 16, "prefix_projection": False},
                          "P-Tuning v2: trainable key/value prefixes in every layer (peft prefix tuning)",
                          mergeable=False))
    register(TuningMethod("full", M + "apply_full", {}, "every parameter is trained"))


@hookimpl
def register_hardware_profiles(register):
    register(HardwareProfile("a100-80gb", 1, 80, "bf16", micro_batch=16,
                             description="1×A100-80GB, as BenTsao, MedQA-ChatGLM and Med-ChatGLM trained"))
    register(HardwareProfile("rtx3090-x4-mp", 4, 24, "fp16", micro_batch=4, placement="model-parallel",
                             description="4×RTX 3090 24 GB, the model spread over the cards (QingGeng)"))
    register(HardwareProfile("gpu-24gb", 1, 24, "fp16", micro_batch=4, gradient_checkpointing=True,
                             description="one 24 GB card (RTX 3090/4090, A10), gradient checkpointing"))
    register(HardwareProfile("gpu-24gb-qlora", 1, 24, "bf16", quantization="nf4", micro_batch=4,
                             gradient_checkpointing=True, description="one 24 GB card, 4-bit NF4 base"))
    register(HardwareProfile("h100-80gb", 1, 80, "bf16", micro_batch=16,
                             description="1×H100-80GB, bf16, SDPA"))
    register(HardwareProfile("a100-80gb-x8-ddp", 8, 80, "bf16", micro_batch=16, placement="ddp",
                             description="8×A100-80GB data parallel (torchrun)"))
    # a demo, not a reproduction: the tiny model on a few hundred sample rows needs more, smaller steps
    # (the seeds' global batch of 128 would give two optimizer steps an epoch) to learn visibly in minutes
    register(HardwareProfile("cpu-demo", 1, 8, "fp32", micro_batch=8, device="cpu",
                             base_model="medzoo-tiny",
                             training={"batch": 16, "lr": 2e-3, "epochs": 3, "val_size": 0.1, "warmup_ratio": 0.05},
                             description="any laptop CPU: a tiny model built locally, minutes not hours"))


@hookimpl
def register_base_models(register):
    register(BaseModel("chatglm-6b", "zai-org/chatglm-6b", "chatglm", 6.2, 28, 4096, 16384, 32, 32, 130528,
                       revision="a8ede826cf1b62bd3c78bdfb3625c7c5d2048fbd", native=False,
                       note="ChatGLM-6B v1 (formerly THUDM/chatglm-6b); remote code only upstream"))
    register(BaseModel("llama-7b", "baffo32/decapoda-research-llama-7B-hf", "llama", 6.74, 32, 4096, 11008,
                       32, 32, 32000, mlp_matrices=3,
                       note="mirror of decapoda-research/llama-7b-hf; its bos/eos/pad ids are broken and patched"))
    register(BaseModel("glm-4-9b-chat", "zai-org/glm-4-9b-chat-hf", "glm", 9.4, 40, 4096, 13696, 32, 2,
                       151552, mlp_matrices=3, note="GLM-4, native transformers GlmForCausalLM"))
    register(BaseModel("qwen2.5-7b-instruct", "Qwen/Qwen2.5-7B-Instruct", "qwen2", 7.62, 28, 3584, 18944,
                       28, 4, 152064, mlp_matrices=3, note="native transformers Qwen2ForCausalLM"))
    register(BaseModel("medzoo-tiny", "local:medzoo-tiny", "llama", 0.004, 2, 128, 352, 4, 2, 4000,
                       mlp_matrices=3, note="built locally by the cpu-demo profile: tokenizer trained on the "
                                            "bundled sample data, random init"))
