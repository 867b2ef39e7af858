"""ChatGLM-6B (v1) on today's transformers: configuration, model, tokenizer and checkpoint loading.

Importing this package is cheap (no torch). Import the submodules where they are used:

- ``medzoo.chatglm.configuration``: ``ChatGLMConfig``
- ``medzoo.chatglm.modeling``: ``ChatGLMModel``, ``ChatGLMForConditionalGeneration``
- ``medzoo.chatglm.tokenization``: ``ChatGLMTokenizer``
- ``medzoo.chatglm.loading``: ``register()``, ``load_chatglm(...)``, ``convert_checkpoint(...)``
"""
MODEL_TYPE = "chatglm"

_LAZY = {"load_chatglm": "loading", "register": "loading", "convert_checkpoint": "loading",
         "ChatGLMConfig": "configuration", "ChatGLMForConditionalGeneration": "modeling",
         "ChatGLMModel": "modeling", "ChatGLMTokenizer": "tokenization"}


def __getattr__(name):
    """``medzoo.chatglm.load_chatglm`` etc., imported (with torch) only when first used."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
