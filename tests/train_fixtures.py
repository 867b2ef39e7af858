"""Tiny base models for the training tests: Llama (LLaMA recipes), GLM-4 (GlmForCausalLM) and the native
ChatGLM-6B of medzoo.chatglm (ChatGLM recipes), each saved as an ordinary model folder for `--base`."""
from __future__ import annotations

import shutil
from pathlib import Path

SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=2048)
CHATGLM_SPECIAL = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
CHATGLM_WHITESPACE = ["<n>", "<|tab|>"] + [f"<|blank_{i}|>" for i in range(2, 81)]


def _tokenizer_files(tiny_base: Path, folder: Path) -> None:
    for f in Path(tiny_base).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, folder / f.name)


def make_llama(tiny_base: Path, folder: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=False, **SHAPE)
    LlamaForCausalLM(config).save_pretrained(str(folder))
    _tokenizer_files(tiny_base, folder)
    return folder


def make_glm(tiny_base: Path, folder: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, GlmConfig, GlmForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    torch.manual_seed(2)
    config = GlmConfig(vocab_size=len(tok), head_dim=8, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, **SHAPE)
    GlmForCausalLM(config).save_pretrained(str(folder))
    _tokenizer_files(tiny_base, folder)
    return folder


def make_chatglm(folder: Path) -> Path | None:
    """ChatGLM-6B v1 in miniature: a sentencepiece vocabulary with ice_text.model's special pieces, trained on
    the bundled samples, and a 3-layer model with the original's tensor names."""
    try:
        from medzoo.chatglm.configuration import ChatGLMConfig
        from medzoo.chatglm.modeling import ChatGLMForConditionalGeneration
        from medzoo.chatglm.tokenization import ChatGLMTokenizer
    except ImportError:
        return None
    import sentencepiece as spm
    import torch

    from medzoo import tiny

    work = folder.parent / "spm"
    work.mkdir(parents=True, exist_ok=True)
    (work / "corpus.txt").write_text("\n".join(t.replace("\n", " ") for t in tiny.corpus()), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(work / "corpus.txt"), model_prefix=str(work / "ice_text"), vocab_size=3000, hard_vocab_limit=False,
        model_type="unigram", user_defined_symbols=CHATGLM_SPECIAL + CHATGLM_WHITESPACE, unk_id=0, bos_id=1, eos_id=2,
        pad_id=3, pad_piece="<pad>", character_coverage=1.0, remove_extra_whitespaces=False, minloglevel=2)
    tok = ChatGLMTokenizer(str(work / "ice_text.model"))
    torch.manual_seed(3)
    config = ChatGLMConfig(vocab_size=tok.vocab_size + 8, hidden_size=32, num_layers=3, num_attention_heads=4,
                           inner_hidden_size=64, max_sequence_length=2048, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id, mask_token_id=tok.mask_token_id,
                           gmask_token_id=tok.gmask_token_id, pad_token_id=tok.pad_token_id)
    ChatGLMForConditionalGeneration(config).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def make_bases(tiny_base: Path, root: Path) -> dict:
    return {"llama": make_llama(tiny_base, root / "llama"), "glm": make_glm(tiny_base, root / "glm"),
            "chatglm": make_chatglm(root / "chatglm")}
