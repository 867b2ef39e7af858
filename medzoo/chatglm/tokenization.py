"""``ChatGLMTokenizer``: ChatGLM-6B (v1)'s tokenizer over the sentencepiece model ``ice_text.model``.

Text handling, as the original's:

- ``\\n`` becomes ``<n>``, ``\\t`` becomes ``<|tab|>``, a run of 2..80 spaces becomes ``<|blank_N|>`` (longest runs
  first); all three are pieces of ``ice_text.model``. Decoding reverses the three rules.
- ids are sentencepiece ids plus ``num_image_tokens``. The first ChatGLM-6B revisions kept 20000 image tokens in
  front of the text (vocabulary 150528, ``<sop>`` = 150004); from April 2023 on, including revision
  ``a8ede826cf1b62bd3c78bdfb3625c7c5d2048fbd`` that MedQA-ChatGLM used, the image tokens are gone: its
  ``tokenizer_config.json`` sets ``num_image_tokens`` to 0 (vocabulary 130528, ``<sop>`` = 130004). The default
  here is 0; a ``tokenizer_config.json`` that says otherwise wins.
- ``build_inputs_with_special_tokens(a)`` is ``a [gMASK] <sop>`` and with a pair ``a [gMASK] <sop> b <eop>``; so
  ``tokenizer(prompt)`` ends with ``[gMASK] <sop>`` and the answer follows. ``eos_token`` is ``<eop>``.
- Padding is on the left by default. Unlike the original, padding returns the usual 2-D ``attention_mask``
  (1 = token, 0 = pad); ``medzoo.chatglm.modeling`` derives GLM's position ids and prefix-LM mask from the ids.
"""
from __future__ import annotations

import os
import shutil

import sentencepiece as spm
from transformers import PreTrainedTokenizer

from medzoo.objects import MedzooError

VOCAB_FILE = "ice_text.model"
MAX_BLANK = 80
SPECIAL_PIECES = ("[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>")


def blank_token(length: int) -> str:
    return f"<|blank_{length}|>"


TAB_TOKEN = "<|tab|>"
NEWLINE_TOKEN = "<n>"


class ChatGLMTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": VOCAB_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, num_image_tokens=0, max_blank_length=MAX_BLANK, do_lower_case=False,
                 remove_space=False, bos_token="<sop>", eos_token="<eop>", end_token="</s>", mask_token="[MASK]",
                 gmask_token="[gMASK]", pad_token="<pad>", unk_token="<unk>", padding_side="left", **kwargs):
        if not vocab_file or not os.path.isfile(vocab_file):
            raise MedzooError(f"{vocab_file}: the sentencepiece vocabulary ({VOCAB_FILE}) is missing")
        self.vocab_file = vocab_file
        self.sp = spm.SentencePieceProcessor()
        self.sp.Load(vocab_file)
        self.num_image_tokens = int(num_image_tokens)
        self.max_blank_length = int(max_blank_length)
        self.do_lower_case = do_lower_case
        self.remove_space = remove_space
        self.end_token = end_token
        self.gmask_token = gmask_token
        kwargs.pop("auto_map", None)
        kwargs.pop("tokenizer_class", None)
        extra = [t for t in ("[gMASK]", "[sMASK]") if t not in (mask_token,)]
        kwargs.setdefault("extra_special_tokens", extra)
        super().__init__(num_image_tokens=self.num_image_tokens, max_blank_length=self.max_blank_length,
                         do_lower_case=do_lower_case, remove_space=remove_space, bos_token=bos_token,
                         eos_token=eos_token, end_token=end_token, mask_token=mask_token, gmask_token=gmask_token,
                         pad_token=pad_token, unk_token=unk_token, padding_side=padding_side, **kwargs)

    # --- vocabulary -------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.num_image_tokens + self.sp.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        vocab = {self._convert_id_to_token(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    @property
    def gmask_token_id(self) -> int:
        return self._convert_token_to_id(self.gmask_token)

    def _convert_token_to_id(self, token: str) -> int:
        if token.startswith("<image_") and token.endswith(">") and token[7:-1].isdigit():
            return int(token[7:-1])
        return self.sp.piece_to_id(token) + self.num_image_tokens

    def _convert_id_to_token(self, index: int) -> str:
        if index < self.num_image_tokens:
            return f"<image_{index}>"
        return self.sp.id_to_piece(index - self.num_image_tokens)

    # --- text <-> pieces --------------------------------------------------------------------------------------
    def _encode_whitespace(self, text: str) -> str:
        text = text.replace("\n", NEWLINE_TOKEN).replace("\t", TAB_TOKEN)
        for length in range(self.max_blank_length, 1, -1):
            text = text.replace(" " * length, blank_token(length))
        return text

    def _decode_whitespace(self, text: str) -> str:
        text = text.replace(NEWLINE_TOKEN, "\n").replace(TAB_TOKEN, "\t")
        for length in range(2, self.max_blank_length + 1):
            text = text.replace(blank_token(length), " " * length)
        return text

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        if self.remove_space:
            text = " ".join(text.strip().split())
        if self.do_lower_case:
            text = text.lower()
        return self.sp.encode_as_pieces(self._encode_whitespace(text))

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        text_pieces = [t for t in tokens if not (t.startswith("<image_") and t.endswith(">"))]
        return self._decode_whitespace(self.sp.decode_pieces(text_pieces))

    def _decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None, **kwargs) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        # the model's embedding is larger than ice_text.model (130528 vs. the pieces it has): an id past the
        # last piece has no text, and decoding it must not end a streamed answer with an error
        size = self.num_image_tokens + self.sp.get_piece_size()
        token_ids = [i for i in token_ids if i != self.pad_token_id and 0 <= i < size]
        return super()._decode(token_ids, skip_special_tokens=skip_special_tokens,
                               clean_up_tokenization_spaces=False, **kwargs)

    # --- special tokens ---------------------------------------------------------------------------------------
    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        ids = list(token_ids_0) + [self._convert_token_to_id(self.gmask_token),
                                   self._convert_token_to_id(str(self.bos_token))]
        if token_ids_1 is not None:
            ids += list(token_ids_1) + [self._convert_token_to_id(str(self.eos_token))]
        return ids

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return 3 if pair else 2

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            special = set(self.all_special_ids)
            return [1 if i in special else 0 for i in token_ids_0]
        mask = [0] * len(token_ids_0) + [1, 1]
        if token_ids_1 is not None:
            mask += [0] * len(token_ids_1) + [1]
        return mask

    def create_token_type_ids_from_sequences(self, token_ids_0, token_ids_1=None):
        return [0] * len(self.build_inputs_with_special_tokens(token_ids_0, token_ids_1))

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        name = (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILE
        target = os.path.join(save_directory, name) if os.path.isdir(save_directory) else save_directory
        if os.path.abspath(self.vocab_file) != os.path.abspath(target):
            shutil.copyfile(self.vocab_file, target)
        return (target,)
