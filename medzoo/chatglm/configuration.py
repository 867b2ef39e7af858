"""``ChatGLMConfig``: the ChatGLM-6B (v1) configuration, with the original field names.

An original ``config.json`` (model_type ``"chatglm"``) loads into it as is; its ``auto_map`` (the pointer to the
remote code) is dropped, because medzoo runs its own code and never the checkpoint's.
"""
from __future__ import annotations

from transformers import PreTrainedConfig

from medzoo.objects import MedzooError

# Fields that only ChatGLM2/ChatGLM3 configs have (they reuse model_type "chatglm" with another architecture).
_CHATGLM2_FIELDS = ("padded_vocab_size", "multi_query_attention", "kv_channels", "ffn_hidden_size",
                    "apply_residual_connection_post_layernorm", "rmsnorm")


class ChatGLMConfig(PreTrainedConfig):
    model_type = "chatglm"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "num_hidden_layers": "num_layers",
        "max_position_embeddings": "max_sequence_length",
        "intermediate_size": "inner_hidden_size",
        "layer_norm_eps": "layernorm_epsilon",
    }

    vocab_size: int = 130528          # rows of word_embeddings / lm_head (ice_text.model has 130344 pieces)
    hidden_size: int = 4096
    num_layers: int = 28
    num_attention_heads: int = 32
    layernorm_epsilon: float = 1e-5
    inner_hidden_size: int = 16384    # MLP width (dense_h_to_4h output)
    max_sequence_length: int = 2048
    bos_token_id: int | None = 130004  # <sop>: the start of the answer
    eos_token_id: int | list[int] | None = 130005  # <eop>
    mask_token_id: int = 130000       # [MASK]
    gmask_token_id: int = 130001      # [gMASK]
    pad_token_id: int | None = 3      # <pad>
    position_encoding_2d: bool = True
    pre_seq_len: int | None = None    # P-Tuning v2 prefix length; None = no prefix encoder
    prefix_projection: bool = False   # P-Tuning v2: an MLP (embedding -> trans) instead of a plain embedding
    use_cache: bool = True
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02   # random init only (tests); real weights come from the checkpoint

    def __post_init__(self, **kwargs):
        found = [key for key in _CHATGLM2_FIELDS if key in kwargs]
        if found:
            raise MedzooError(f"config.json: fields {found} belong to ChatGLM2/ChatGLM3, not ChatGLM-6B (v1); "
                              "medzoo's ChatGLM code runs only ChatGLM-6B v1 checkpoints")
        kwargs.pop("auto_map", None)
        kwargs.pop("quantization_bit", None)  # the original's int4/int8 kernels are not ported
        # Original configs name the padding id "padding_idx" in some revisions.
        if "padding_idx" in kwargs:
            self.pad_token_id = kwargs.pop("padding_idx")
        if self.hidden_size % self.num_attention_heads:
            raise MedzooError(f"config.json: hidden_size {self.hidden_size} is not a multiple of "
                              f"num_attention_heads {self.num_attention_heads}")
        if self.position_encoding_2d and (self.hidden_size // self.num_attention_heads) % 4:
            raise MedzooError("config.json: with position_encoding_2d the head size must be a multiple of 4")
        super().__post_init__(**kwargs)
