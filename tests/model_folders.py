"""Model folders of every layout (docs/model-folder.md) built directly on a tiny base, without the trainer:
for tests of loading, chat, merge and serve that must not depend on training."""
import json
from pathlib import Path

MANIFEST = {"format": 1, "recipe": "bentsao", "base_model": "medzoo-tiny", "template": "bentsao-med",
            "source": "test", "created": "2026-01-01T00:00:00"}


def _manifest(folder: Path, method: str, layout: str, **extra) -> Path:
    (folder / "medzoo.json").write_text(json.dumps(dict(MANIFEST, method=method, layout=layout, **extra)))
    return folder


def make_all(base: Path, root: Path, seed: int = 1) -> dict:
    import torch
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    out = {}

    model = AutoModelForCausalLM.from_pretrained(base)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj",
                                                                                "down_proj"],
                                            init_lora_weights=False, task_type="CAUSAL_LM"))
    with torch.no_grad():  # strong enough to change greedy answers, so tuned and base can be told apart
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.mul_(4)
    (root / "lora").mkdir()
    lora.save_pretrained(root / "lora" / "adapter")
    out["lora"] = _manifest(root / "lora", "lora", "peft")

    model = AutoModelForCausalLM.from_pretrained(base)
    prefix = get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for p in prefix.prompt_encoder.parameters():
            p.normal_(0, 0.5)
    (root / "ptuning").mkdir()
    prefix.save_pretrained(root / "ptuning" / "adapter")
    out["ptuning-v2"] = _manifest(root / "ptuning", "ptuning-v2", "peft")

    model = AutoModelForCausalLM.from_pretrained(base)
    last = model.config.num_hidden_layers - 1
    state = {k: (v + 0.05 * torch.randn_like(v)).contiguous() for k, v in model.state_dict().items()
             if k.startswith(f"model.layers.{last}.mlp.")}
    (root / "freeze").mkdir()
    save_file(state, str(root / "freeze" / "trainable.safetensors"))
    out["freeze"] = _manifest(root / "freeze", "freeze", "freeze")

    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    (root / "full").mkdir()
    model.save_pretrained(root / "full" / "model")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(base).save_pretrained(root / "full" / "model")
    out["full"] = _manifest(root / "full", "full", "full")
    return out
