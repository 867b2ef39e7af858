"""ChatGLM-6B (v1) on today's transformers: configuration, model, tokenizer and checkpoint loading.

Importing this package is cheap (no torch). Import the submodules where they are used:

- ``medzoo.chatglm.configuration``: ``ChatGLMConfig``
- ``medzoo.chatglm.modeling``: ``ChatGLMModel``, ``ChatGLMForConditionalGeneration``
- ``medzoo.chatglm.tokenization``: ``ChatGLMTokenizer``
- ``medzoo.chatglm.loading``: ``register()``, ``load_chatglm(...)``, ``convert_checkpoint(...)``
"""
MODEL_TYPE = "chatglm"
