"""`medzoo-tiny`: the small base model the cpu-demo profile trains, built locally with no download.

A byte-level BPE tokenizer is trained with `tokenizers` on the text of every built-in recipe's bundled
sample data, then a small Llama-architecture model is initialised from a fixed seed and, optionally,
pre-trained for a few steps on the same text so that a LoRA on top has a language model to adapt. The
result is an ordinary transformers folder (config, safetensors, tokenizer) cached under
``$MEDZOO_HOME/bases/medzoo-tiny``, written to a temp folder and renamed so an interrupted build never
looks complete.
"""
from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

from medzoo import zoo

NAME = "medzoo-tiny"
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
SHAPE = {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 1024}


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def corpus() -> list[str]:
    """Every text of the built-in samples and prompt templates, in a fixed order."""
    from medzoo.data.load import read_rows

    texts = []
    root = resources.files("medzoo_plugins")
    for plugin in sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("_")):
        data = root / plugin / "data"
        if not data.is_dir():
            continue
        for f in sorted(data.iterdir(), key=lambda p: p.name):
            texts.extend(text for _, row in read_rows(Path(str(f))) if isinstance(row, dict) for text in _strings(row))
    from medzoo.host import catalog

    for template in catalog().templates.values():
        texts.append(template.render("问题", [("问题", "回答")]))
    return texts


def train_tokenizer(texts: list[str], vocab_size: int = 4000):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="right")


def build(out: Path, pretrain_steps: int = 120, seed: int = 0, texts: list[str] | None = None) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    texts = texts if texts is not None else corpus()
    tokenizer = train_tokenizer(texts)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False, **SHAPE)
    model = LlamaForCausalLM(config)
    if pretrain_steps:
        _pretrain(model, tokenizer, texts, pretrain_steps, seed)
    with zoo.atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "medzoo-tiny.json").write_text(json.dumps({"pretrain_steps": pretrain_steps, "seed": seed}))
    return out


def _pretrain(model, tokenizer, texts, steps, seed, seq_len=128, batch=16):
    """A few steps of plain language modelling on the corpus, so the tiny base is a (weak) LM of medical text."""
    import random

    import torch

    ids = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=True).input_ids + [tokenizer.eos_token_id])
    data = torch.tensor(ids)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for step in range(steps):
        starts = [rng.randrange(0, len(data) - seq_len - 1) for _ in range(batch)]
        x = torch.stack([data[s: s + seq_len] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for group in opt.param_groups:
            group["lr"] = 3e-3 * (1 - (step + 1) / steps) + 1e-4
    model.eval()


def path() -> Path:
    return Path(os.environ.get("MEDZOO_TINY") or zoo.home() / "bases" / NAME)


def ensure() -> Path:
    """The tiny base's folder, building it on first use (about half a minute on two CPU cores)."""
    folder = path()
    if not (folder / "config.json").is_file():
        build(folder)
    return folder
