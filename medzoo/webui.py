"""The web demo (``medzoo web``): a gradio chat page for one model of the zoo, like the seed projects' demos.

Answers stream in (beam search answers at the end), the conversation keeps its history in the recipe's
template, sliders set the generation settings (starting at the recipe's defaults), example questions come
from the recipe's bundled sample data, and a side-by-side mode asks the base model the same question —
for a peft model by switching the adapter off (``disable_adapter``), so the base is not loaded twice.
"""
from __future__ import annotations

from medzoo.objects import MedzooError

FIXED_EXAMPLES = ("偏头痛有哪些常见症状？", "高血压患者在饮食上需要注意什么？", "糖尿病患者可以吃水果吗？",
                  "孩子发烧38.5度怎么办？", "胃溃疡应该如何治疗？")


def examples(lm, limit: int = 6) -> list[str]:
    """Questions from the recipe's bundled sample data, else a fixed list."""
    from medzoo import host
    from medzoo.data.load import load_registered

    found: list[str] = []
    cat = host.catalog()
    for name in (lm.recipe.datasets if lm.recipe else ()):
        spec = cat.datasets.get(name)
        if spec is None or not spec.sample:
            continue
        try:
            conversations = load_registered(spec, use_sample=True, skip_bad_rows=True).conversations
        except MedzooError:
            continue
        for conv in conversations:
            query = (conv.get("query") or "").strip()
            if query and len(query) <= 80 and query not in found:
                found.append(query)
            if len(found) >= limit:
                return found
    return found or list(FIXED_EXAMPLES[:limit])


class Base:
    """The base model for side-by-side answers: the same weights with the adapter off for peft models, a
    separately loaded base otherwise (loaded on first use)."""

    def __init__(self, lm, device=None, dtype=None, trust_remote_code=False):
        self.lm, self.device, self.dtype, self.trust = lm, device, dtype, trust_remote_code
        self.loaded = None
        method = lm.manifest.get("method")
        self.available = method != "base"
        self.shared = hasattr(lm.model, "disable_adapter")  # peft: the base is the same model, adapter off
        self.label = f"基座模型 {lm.manifest.get('base_model')}" if self.available else ""

    def model(self):
        """(LoadedModel, use_base flag) to generate with."""
        if self.shared:
            return self.lm, True
        if self.loaded is None:
            from dataclasses import replace

            from medzoo.modeling import load_base

            manifest = self.lm.manifest
            base = manifest.get("base_model_id") if manifest.get("merged") else manifest.get("base_model")
            model, tokenizer = load_base(base, device=self.device, dtype=self.dtype,
                                         revision=manifest.get("base_revision"), trust_remote_code=self.trust)
            model.eval()
            self.loaded = replace(self.lm, model=model, tokenizer=tokenizer, name=str(base),
                                  manifest=dict(manifest, method="base"))
        return self.loaded, False


def _messages(history: list[tuple[str, str]]) -> list[dict]:
    out = []
    for query, answer in history:
        out += [{"role": "user", "content": query}, {"role": "assistant", "content": answer}]
    return out


def build(lm, *, base: Base | None = None, title: str | None = None):
    """The gradio Blocks page for ``lm``."""
    import gradio as gr

    from medzoo import generate

    defaults = generate.settings(lm)
    base = base or Base(lm)
    m = lm.manifest
    title = title or f"medzoo · {lm.name}"
    keeps_history = lm.template.history_turn is not None

    def answer(query, history, base_history, compare, temperature, top_p, top_k, num_beams, max_new_tokens,
               do_sample):
        query = (query or "").strip()
        settings = dict(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                        num_beams=int(num_beams), max_new_tokens=int(max_new_tokens), do_sample=bool(do_sample))
        history, base_history = list(history or []), list(base_history or [])
        if not query:
            gr.Warning("请输入问题 (empty prompt: ask a question)")
            yield "", _messages(history), history, _messages(base_history), base_history
            return
        try:
            gen = generate.stream(lm, query, history, **settings)
            text = ""
            for piece in gen:
                text += piece
                yield "", _messages(history + [(query, text)]), history, _messages(base_history), base_history
            history.append((query, gen.answer.text))
            if compare and base.available:
                base_lm, use_base = base.model()
                gen = generate.stream(base_lm, query, base_history, use_base=use_base, **settings)
                text = ""
                for piece in gen:
                    text += piece
                    yield "", _messages(history), history, _messages(base_history + [(query, text)]), base_history
                base_history.append((query, gen.answer.text))
        except MedzooError as exc:  # a toast on the page; the question stays in the box to edit
            gr.Warning(str(exc))
            yield query, _messages(history), history, _messages(base_history), base_history
            return
        yield "", _messages(history), history, _messages(base_history), base_history

    def clear():
        return "", [], [], [], []

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"# {title}\n"
                    f"配方 recipe **{m.get('recipe')}** · 方法 method **{m.get('method')}** · "
                    f"基座 base **{m.get('base_model')}** · 模板 template **{lm.template.name}**"
                    + ("" if keeps_history else "（此模板不保留对话历史：每个问题单独回答）")
                    + "\n\n*仅供研究演示，不能替代医生的诊断。For research demos only; not medical advice.*")
        history = gr.State([])
        base_history = gr.State([])
        with gr.Row():
            chatbot = gr.Chatbot(label=f"微调模型 {lm.name}", elem_id="tuned-chat", height=420)
            base_chat = gr.Chatbot(label=base.label or "基座模型", elem_id="base-chat", height=420,
                                   visible=False)
        query = gr.Textbox(label="问题 Question", placeholder="输入医学问题，按回车发送", elem_id="query",
                           lines=1, max_lines=6)
        with gr.Row():
            send = gr.Button("发送 Send", variant="primary", elem_id="send")
            reset = gr.Button("清空 Clear", elem_id="clear")
            compare = gr.Checkbox(label="与基座模型对比 Compare with the base model", value=False,
                                  interactive=base.available, elem_id="compare")
        with gr.Accordion("生成参数 Generation settings", open=False):
            with gr.Row():
                temperature = gr.Slider(0.0, 2.0, value=float(defaults["temperature"]), step=0.05,
                                        label="temperature")
                top_p = gr.Slider(0.05, 1.0, value=float(defaults["top_p"]), step=0.05, label="top_p")
                top_k = gr.Slider(0, 100, value=int(defaults["top_k"]), step=1, label="top_k")
            with gr.Row():
                num_beams = gr.Slider(1, 8, value=int(defaults["num_beams"]), step=1,
                                      label="num_beams (1 streams)")
                max_new_tokens = gr.Slider(1, 2048, value=int(defaults["max_new_tokens"]), step=1,
                                           label="max_new_tokens")
                do_sample = gr.Checkbox(value=bool(defaults["do_sample"]), label="do_sample")
        gr.Examples(examples=[[q] for q in examples(lm)], inputs=[query], label="示例问题 Examples")

        inputs = [query, history, base_history, compare, temperature, top_p, top_k, num_beams, max_new_tokens,
                  do_sample]
        outputs = [query, chatbot, history, base_chat, base_history]
        gr.on([query.submit, send.click], answer, inputs, outputs, api_name="ask")
        reset.click(clear, None, outputs, api_name="clear")
        compare.change(lambda on: gr.update(visible=bool(on)), compare, base_chat)
    return demo


def launch(demo, *, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           auth: tuple[str, str] | None = None, block: bool = True):
    """Serve the page. ``block=False`` returns at once (tests); the caller closes ``demo`` then."""
    demo.queue(default_concurrency_limit=1)  # one model, one answer at a time; others wait their turn
    return demo.launch(server_name=host, server_port=port, share=share, auth=auth, prevent_thread_lock=not block,
                       inbrowser=False, show_error=True, quiet=not block)
