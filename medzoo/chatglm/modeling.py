"""ChatGLM-6B (v1) for today's transformers, written for medzoo from the published architecture.

Module and parameter names are the original's, so the original checkpoints and the adapters trained on them load by
name::

    transformer.word_embeddings.weight                         [vocab, hidden]
    transformer.layers.{i}.input_layernorm.{weight,bias}
    transformer.layers.{i}.attention.query_key_value.{weight,bias}   [3 * hidden, hidden]
    transformer.layers.{i}.attention.dense.{weight,bias}        [hidden, hidden]
    transformer.layers.{i}.post_attention_layernorm.{weight,bias}
    transformer.layers.{i}.mlp.dense_h_to_4h.{weight,bias}      [inner_hidden, hidden]
    transformer.layers.{i}.mlp.dense_4h_to_h.{weight,bias}      [hidden, inner_hidden]
    transformer.final_layernorm.{weight,bias}
    transformer.prefix_encoder.embedding.weight                 [pre_seq_len, 2 * layers * hidden]  (P-Tuning v2)
      or, with prefix_projection: embedding [pre_seq_len, hidden] + trans.0 / trans.2 (Linear, Tanh, Linear)
    lm_head.weight                                              [vocab, hidden], no bias, not tied

The original also stores ``transformer.layers.{i}.attention.rotary_emb.inv_freq``; it is a constant, recomputed here,
and ignored when found in a checkpoint.

Numerical details, in the order the computation runs (h = hidden size, n = heads, d = h / n, L = layers):

1. Embedding: ``word_embeddings(input_ids)``. No embedding scaling, no position embedding table.
2. Positions (2-D, ``position_encoding_2d=True``). For each sequence, with pads removed and ``i`` counting its real
   tokens from 0: ``ctx`` = index of the first ``<sop>`` (bos_token_id), or the sequence length when there is none;
   ``m`` = index of the first ``[gMASK]``, else of the first ``[MASK]``. ``position_ids[i] = i`` for ``i < ctx`` and
   ``m`` for ``i >= ctx`` (unchanged when the sequence has no mask token); ``block_position_ids[i] = 0`` for
   ``i < ctx`` and ``i - ctx + 1`` for ``i >= ctx``. So ``prompt [gMASK] <sop> a b`` gets positions
   ``0..k, k, k, k`` (k = index of [gMASK]) and block positions ``0..0, 1, 2, 3``. Pads get 0 and 0 (the original
   tokenizer pads them with zeros too). Given explicitly, ``position_ids`` has the original's shape
   ``[batch, 2, seq]``. With ``position_encoding_2d=False`` positions are 1-D: ``i``, and ``m`` after ``ctx``
   only when the mask token is ``[MASK]``.
3. Attention mask (True = hidden), ``[batch, 1, q, k]``: key j is visible to query i when j is a real token and
   (j <= i or j < ctx): the prompt before ``<sop>`` is seen bidirectionally by every token, ``<sop>`` and everything
   after it is causal. Hidden scores are filled with -10000.0 (not -inf), as in the original, before the per-layer
   rescaling of step 5.
4. Each GLMBlock (``layer_id`` from 0, ``alpha = sqrt(2 * L)``)::

       x  = input_layernorm(h)                          # LayerNorm, eps = layernorm_epsilon (1e-5)
       h1 = x * alpha + attention(x)                    # the residual is the *normalised* input, scaled by alpha
       y  = post_attention_layernorm(h1)
       h2 = y * alpha + mlp(y)                          # again the normalised input, scaled by alpha

   ``mlp(y) = dense_4h_to_h(gelu(dense_h_to_4h(y)))`` with the tanh GELU
   ``0.5 x (1 + tanh(0.7978845608028654 x (1 + 0.044715 x^2)))``.
5. Attention: ``query_key_value(x)`` is viewed as ``[..., n, 3 d]`` and split into q, k, v *per head* (each head's
   slice is ``[q_h | k_h | v_h]``, not ``[Q | K | V]`` over all heads). Rotary embedding (2-D): each head vector is
   cut in halves ``[:d/2]`` and ``[d/2:]``; the first half is rotated by ``position_ids``, the second by
   ``block_position_ids``. Within a half of size r = d/2: ``inv_freq = 1 / 10000 ** (arange(0, r, 2) / r)``, rounded
   to fp16 as the original does; angles ``t * inv_freq`` are repeated as ``cat(freqs, freqs)`` and applied as
   ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x[r/2:], x[:r/2])`` (halves, not interleaved
   pairs). Angles and cos/sin are computed in fp32 and cast to the activation dtype (the original computes them in
   the model dtype; the difference is fp16 rounding of cos/sin). Keys of the P-Tuning prefix are not rotated.
   Scaling with ``coeff = layer_id + 1``: ``q = q / (sqrt(d) * coeff)``; ``scores = q @ k^T`` in the activation
   dtype; masked fill -10000.0; ``scores.float() * coeff``; softmax in fp32; probabilities cast back to the
   activation dtype; ``context = probs @ v``; heads concatenated; ``dense``.
6. ``final_layernorm``, then ``lm_head``. The loss (when ``labels`` are given) is the shifted causal cross-entropy
   over fp32 logits, ``ignore_index=-100``.

P-Tuning v2 (``pre_seq_len`` set): ``prefix_encoder(arange(pre_seq_len))`` gives ``[pre_seq_len, 2 L h]``; it is
viewed as ``[pre_seq_len, 2 L, n, d]``, dropout 0.1 (training only), and layer i uses index ``2 i`` as its prefix keys
and ``2 i + 1`` as its prefix values, placed before the sequence's keys and visible to every query. Building the model
with ``pre_seq_len`` freezes every parameter except ``transformer.prefix_encoder`` (the original left ``lm_head``
trainable only through its construction order; the published P-Tuning v2 checkpoints hold the prefix encoder only).

Generation: the KV cache is a transformers ``Cache`` (``DynamicCache`` from ``generate()``); the P-Tuning prefix is
written into it on the first step. ``prepare_inputs_for_generation`` recomputes positions and mask from the full
sequence at every step, so cached and uncached generation see the same numbers. Tokens decoded with a cache must come
after ``<sop>`` (always true in generation). Batches are padded on the left with a 2-D ``attention_mask``
(1 = token, 0 = pad); the original's 4-D boolean masks (True = hidden) and ``[batch, 2, seq]`` position ids are
accepted as well.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import LayerNorm
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from medzoo.chatglm.configuration import ChatGLMConfig

MASK_FILL = -10000.0


def gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_cos_sin(positions: torch.Tensor, dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [batch, 1, seq, dim] for integer ``positions`` [batch, seq]."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim))
    inv_freq = inv_freq.half().float()  # the original keeps inv_freq in fp16
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def glm_positions_and_mask(input_ids: torch.Tensor, padding_mask: torch.Tensor | None, config: ChatGLMConfig):
    """Position ids and the boolean attention mask (True = hidden) of GLM's prefix LM, from ``input_ids``.

    ``padding_mask`` is the usual 2-D mask (1 = token, 0 = pad), any padding side. Returns ``position_ids``
    ([batch, 2, seq], or [batch, seq] without 2-D positions) and ``mask`` [batch, 1, seq, seq].
    """
    batch, length = input_ids.shape
    device = input_ids.device
    valid = torch.ones_like(input_ids, dtype=torch.bool) if padding_mask is None else padding_mask.to(device).bool()
    index = (valid.long().cumsum(dim=1) - 1).clamp(min=0)        # position among the real tokens
    is_bos = (input_ids == config.bos_token_id) & valid
    in_context = valid & (is_bos.long().cumsum(dim=1) == 0)      # real tokens before the first <sop>
    ctx = in_context.long().sum(dim=1, keepdim=True)
    has_gmask = ((input_ids == config.gmask_token_id) & valid).any(dim=1, keepdim=True)
    mask_token = torch.where(has_gmask, config.gmask_token_id, config.mask_token_id)
    is_mask = (input_ids == mask_token) & valid
    has_mask = is_mask.any(dim=1, keepdim=True)
    mask_position = index.gather(1, is_mask.long().argmax(dim=1, keepdim=True))
    after = index >= ctx
    if config.position_encoding_2d:
        position = torch.where(has_mask & after, mask_position, index)
        block = torch.where(after, index - ctx + 1, torch.zeros_like(index))
        position_ids = torch.stack((position * valid, block * valid), dim=1)
    else:
        position = torch.where(has_mask & ~has_gmask & after, mask_position, index)
        position_ids = position * valid
    arange = torch.arange(length, device=device)
    causal = arange[None, :] <= arange[:, None]                  # [q, k]
    visible = valid[:, None, :] & (causal[None] | in_context[:, None, :])
    return position_ids, ~visible[:, None]


class PrefixEncoder(nn.Module):
    """P-Tuning v2 prefix: ``pre_seq_len`` vectors of size 2 * layers * hidden (keys and values of every layer)."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.prefix_projection = config.prefix_projection
        width = config.num_layers * config.hidden_size * 2
        if self.prefix_projection:
            self.embedding = nn.Embedding(config.pre_seq_len, config.hidden_size)
            self.trans = nn.Sequential(
                nn.Linear(config.hidden_size, config.hidden_size),
                nn.Tanh(),
                nn.Linear(config.hidden_size, width),
            )
        else:
            self.embedding = nn.Embedding(config.pre_seq_len, width)

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        out = self.embedding(prefix)
        return self.trans(out) if self.prefix_projection else out


class SelfAttention(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.position_encoding_2d = config.position_encoding_2d
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=True)

    def forward(self, x, position_ids, attention_mask, prefix_key=None, prefix_value=None, past_key_values=None,
                output_attentions=False):
        batch, length, _ = x.shape
        mixed = self.query_key_value(x).view(batch, length, self.num_heads, 3 * self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in mixed.split(self.head_dim, dim=-1))  # [b, n, s, d]
        if self.position_encoding_2d:
            half = self.head_dim // 2
            cos, sin = rotary_cos_sin(position_ids[:, 0], half, q.dtype)
            cos_b, sin_b = rotary_cos_sin(position_ids[:, 1], half, q.dtype)
            q = torch.cat((apply_rotary(q[..., :half], cos, sin), apply_rotary(q[..., half:], cos_b, sin_b)), -1)
            k = torch.cat((apply_rotary(k[..., :half], cos, sin), apply_rotary(k[..., half:], cos_b, sin_b)), -1)
        else:
            cos, sin = rotary_cos_sin(position_ids, self.head_dim, q.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        if past_key_values is not None:
            if prefix_key is not None:
                past_key_values.update(prefix_key.to(k.dtype), prefix_value.to(v.dtype), self.layer_id)
            k, v = past_key_values.update(k, v, self.layer_id)
        elif prefix_key is not None:
            k = torch.cat((prefix_key.to(k.dtype), k), dim=2)
            v = torch.cat((prefix_value.to(v.dtype), v), dim=2)

        coeff = float(self.layer_id + 1)
        q = q / (math.sqrt(self.head_dim) * coeff)
        scores = torch.matmul(q, k.transpose(-1, -2))
        scores = scores.masked_fill(attention_mask, MASK_FILL)
        probs = F.softmax(scores.float() * coeff, dim=-1).to(v.dtype)
        context = torch.matmul(probs, v).transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
        return self.dense(context), (probs if output_attentions else None)


class GLU(nn.Module):
    """The original's name for a plain GELU MLP (no gating)."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.inner_hidden_size, bias=True)
        self.dense_4h_to_h = nn.Linear(config.inner_hidden_size, config.hidden_size, bias=True)

    def forward(self, x):
        return self.dense_4h_to_h(gelu(self.dense_h_to_4h(x)))


class GLMBlock(GradientCheckpointingLayer):
    def __init__(self, config: ChatGLMConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.alpha = (2 * config.num_layers) ** 0.5
        self.input_layernorm = LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = SelfAttention(config, layer_id)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = GLU(config)

    # hidden_states and the prefix are positional so that gradient checkpointing passes their gradients on.
    def forward(self, hidden_states, prefix_key=None, prefix_value=None, *, position_ids, attention_mask,
                past_key_values=None, output_attentions=False):
        attention_input = self.input_layernorm(hidden_states)
        attention_output, probs = self.attention(attention_input, position_ids, attention_mask, prefix_key,
                                                 prefix_value, past_key_values, output_attentions)
        hidden_states = attention_input * self.alpha + attention_output
        mlp_input = self.post_attention_layernorm(hidden_states)
        return mlp_input * self.alpha + self.mlp(mlp_input), probs


class ChatGLMPreTrainedModel(PreTrainedModel):
    config_class = ChatGLMConfig
    config: ChatGLMConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLMBlock"]
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]
    _supports_sdpa = False
    _supports_flash_attn = False

    def freeze_for_prefix_tuning(self) -> None:
        """P-Tuning v2: only ``prefix_encoder`` trains (no-op without ``pre_seq_len``)."""
        if self.config.pre_seq_len is None:
            return
        for name, param in self.named_parameters():
            param.requires_grad = ".prefix_encoder." in f".{name}"


class ChatGLMModel(ChatGLMPreTrainedModel):
    def __init__(self, config: ChatGLMConfig):
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([GLMBlock(config, i) for i in range(config.num_layers)])
        self.final_layernorm = LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.gradient_checkpointing = False
        if config.pre_seq_len is not None:
            self.prefix_encoder = PrefixEncoder(config)
            self.prefix_dropout = nn.Dropout(0.1)
        self.post_init()
        self.freeze_for_prefix_tuning()

    def get_input_embeddings(self):
        return self.word_embeddings

    def set_input_embeddings(self, value):
        self.word_embeddings = value

    def get_prompt(self, batch_size: int, device, dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The P-Tuning v2 prefix as (key, value) per layer, each [batch, heads, pre_seq_len, head_dim]."""
        config = self.config
        tokens = torch.arange(config.pre_seq_len, device=device)
        prefix = self.prefix_encoder(tokens).to(dtype)
        head_dim = config.hidden_size // config.num_attention_heads
        prefix = prefix.view(config.pre_seq_len, 2 * config.num_layers, config.num_attention_heads, head_dim)
        prefix = self.prefix_dropout(prefix.unsqueeze(0).expand(batch_size, -1, -1, -1, -1))
        prefix = prefix.permute(2, 0, 3, 1, 4)  # [2 L, b, n, pre, d]
        return [(prefix[2 * i], prefix[2 * i + 1]) for i in range(config.num_layers)]

    def forward(self, input_ids=None, position_ids=None, attention_mask=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, **kwargs):
        config = self.config
        output_attentions = output_attentions if output_attentions is not None else config.output_attentions
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else config.output_hidden_states)
        use_cache = use_cache if use_cache is not None else config.use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if isinstance(past_key_values, tuple):
            raise ValueError("legacy tuple past_key_values are not supported; pass a transformers Cache")
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        batch, length = inputs_embeds.shape[:2]
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=config)
        if not use_cache:
            past_key_values = None
        prefix_len = config.pre_seq_len or 0
        cached = past_key_values.get_seq_length() if past_key_values is not None else 0
        past_tokens = max(cached - prefix_len, 0)

        if attention_mask is not None and attention_mask.dim() == 4:
            glm_mask = attention_mask.to(inputs_embeds.device).bool()
            if position_ids is None:
                raise ValueError("a 4-D attention_mask needs explicit position_ids")
        elif past_tokens == 0:
            if input_ids is None:
                raise ValueError("inputs_embeds without input_ids need explicit position_ids and a 4-D mask")
            computed_positions, glm_mask = glm_positions_and_mask(input_ids, attention_mask, config)
            position_ids = computed_positions if position_ids is None else position_ids
        else:
            # Decoding after <sop> with a cache: causal over the cached tokens, pads hidden.
            if position_ids is None:
                raise ValueError("decoding with a cache needs position_ids (generate() computes them)")
            total = past_tokens + length
            keys = torch.arange(total, device=inputs_embeds.device)
            queries = keys[past_tokens:]
            visible = (keys[None, :] <= queries[:, None])[None, None].expand(batch, 1, length, total)
            if attention_mask is not None:
                visible = visible & attention_mask[:, None, None, -total:].bool().to(visible.device)
            glm_mask = ~visible
        position_ids = position_ids.to(inputs_embeds.device)

        prefix = None
        if prefix_len and cached == 0:
            prefix = self.get_prompt(batch, inputs_embeds.device, inputs_embeds.dtype)
        if prefix_len:
            seen = torch.zeros(batch, 1, length, prefix_len, dtype=torch.bool, device=glm_mask.device)
            glm_mask = torch.cat((seen, glm_mask), dim=-1)

        hidden_states = inputs_embeds
        all_hidden = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden += (hidden_states,)
            prefix_key, prefix_value = prefix[i] if prefix is not None else (None, None)
            hidden_states, probs = layer(hidden_states, prefix_key, prefix_value, position_ids=position_ids,
                                         attention_mask=glm_mask, past_key_values=past_key_values,
                                         output_attentions=output_attentions)
            if output_attentions:
                all_attentions += (probs,)
        hidden_states = self.final_layernorm(hidden_states)
        if output_hidden_states:
            all_hidden += (hidden_states,)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=past_key_values,
                                       hidden_states=all_hidden, attentions=all_attentions)


class ChatGLMForConditionalGeneration(ChatGLMPreTrainedModel, GenerationMixin):
    def __init__(self, config: ChatGLMConfig):
        super().__init__(config)
        self.transformer = ChatGLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        self.freeze_for_prefix_tuning()

    def get_input_embeddings(self):
        return self.transformer.word_embeddings

    def set_input_embeddings(self, value):
        self.transformer.word_embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, position_ids=None, attention_mask=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, logits_to_keep: int = 0, **kwargs):
        outputs = self.transformer(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                                   past_key_values=past_key_values, inputs_embeds=inputs_embeds,
                                   use_cache=use_cache, output_attentions=output_attentions,
                                   output_hidden_states=output_hidden_states)
        hidden_states = outputs.last_hidden_state
        if logits_to_keep and labels is None:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].float()
            shift_labels = labels[:, 1:].to(shift_logits.device)
            loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, past_key_values=None,
                                      attention_mask=None, inputs_embeds=None, is_first_iteration=False,
                                      **kwargs):
        """Positions and the prefix-LM mask from the whole sequence so far, sliced to the tokens fed this step."""
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("generate() takes a 2-D attention_mask (1 = token, 0 = pad) for ChatGLM")
        position_ids, glm_mask = glm_positions_and_mask(input_ids, attention_mask, self.config)
        if next_sequence_length is not None:
            input_ids = input_ids[:, -next_sequence_length:]
            position_ids = position_ids[..., -next_sequence_length:]
            glm_mask = glm_mask[:, :, -next_sequence_length:, :]
        model_inputs = {
            "input_ids": input_ids.clone(memory_format=torch.contiguous_format),
            "position_ids": position_ids.contiguous(),
            "attention_mask": glm_mask.contiguous(),
            "past_key_values": past_key_values,
        }
        for key, value in kwargs.items():
            if key not in model_inputs and key not in ("labels", "position_ids", "cache_position"):
                model_inputs[key] = value
        return model_inputs
