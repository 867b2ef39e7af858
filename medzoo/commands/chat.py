"""`medzoo chat`: talk to any model of the zoo in the terminal. Also holds the loading and generation options
that `web`, `serve` and `merge` share, so every command spells them the same way."""
from __future__ import annotations

import json
import sys
import warnings

import click

from medzoo.objects import MedzooError


def load_options(f):
    """--device --dtype --load-in-4bit --load-in-8bit --trust-remote-code --base."""
    options = [
        click.option("--device", default="auto", show_default=True,
                     help="cpu, cuda, cuda:N or mps; auto picks CUDA when there is one."),
        click.option("--dtype", default="auto", show_default=True,
                     help="auto (bf16/fp16 on CUDA, fp32 on CPU), bf16, fp16 or fp32."),
        click.option("--load-in-4bit", is_flag=True, help="Load the base in 4-bit NF4 (CUDA + bitsandbytes)."),
        click.option("--load-in-8bit", is_flag=True, help="Load the base in 8-bit (CUDA + bitsandbytes)."),
        click.option("--trust-remote-code", is_flag=True,
                     help="Allow the base model's own Python code from the Hub (never on by default)."),
        click.option("--base", default=None, help="Use this base (catalog name, hub id or folder) instead of the "
                                                  "one the model names."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def generation_options(f):
    """--temperature --top-p --top-k --num-beams --max-new-tokens --do-sample/--greedy (default: the recipe's)."""
    options = [
        click.option("--temperature", type=float, default=None, help="Sampling temperature (recipe default)."),
        click.option("--top-p", type=float, default=None, help="Nucleus sampling mass (recipe default)."),
        click.option("--top-k", type=int, default=None, help="Top-k sampling (recipe default)."),
        click.option("--num-beams", type=int, default=None,
                     help="Beam search width; only 1 streams (recipe default)."),
        click.option("--max-new-tokens", type=int, default=None, help="Longest answer in tokens (recipe default)."),
        click.option("--do-sample/--greedy", "do_sample", default=None,
                     help="Sample, or pick the likeliest token (with --greedy, beams default to 1)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def overrides(temperature, top_p, top_k, num_beams, max_new_tokens, do_sample) -> dict:
    """Generation settings given on the command line (None = the recipe's default)."""
    if do_sample is False and num_beams is None:
        num_beams = 1  # --greedy means one deterministic answer, token by token (and streamed)
    return {"temperature": temperature, "top_p": top_p, "top_k": top_k, "num_beams": num_beams,
            "max_new_tokens": max_new_tokens, "do_sample": do_sample}


def load(model, device="auto", dtype="auto", load_in_4bit=False, load_in_8bit=False, trust_remote_code=False,
         base=None):
    """Load MODEL (a zoo name, a model folder or a recipe) with the shared options."""
    if load_in_4bit and load_in_8bit:
        raise MedzooError("--load-in-4bit and --load-in-8bit exclude each other")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    from medzoo.modeling import load_model

    quantization = "nf4" if load_in_4bit else "int8" if load_in_8bit else None
    with warnings.catch_warnings():  # peft calls a transformers API deprecated for v6; nothing a user can do
        warnings.simplefilter("ignore", FutureWarning)
        return load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                          quantization=quantization, base=base)


def describe(lm) -> str:
    m = lm.manifest
    return (f"{lm.name}: recipe {m.get('recipe')}, method {m.get('method')}, base {m.get('base_model')}, "
            f"template {lm.template.name}")


HELP = "/reset clears the history, /exit (or Ctrl-D) quits."


@click.command("chat")
@click.argument("model")
@click.option("-p", "--prompt", default=None, help="Answer this one question and exit.")
@click.option("--json", "as_json", is_flag=True, help="With -p: print one JSON object instead of the streamed text.")
@generation_options
@load_options
def chat_cmd(model, prompt, as_json, temperature, top_p, top_k, num_beams, max_new_tokens, do_sample,
             device, dtype, load_in_4bit, load_in_8bit, trust_remote_code, base):
    """Chat with MODEL in the terminal: a model of your zoo (name or folder), or a recipe's base model.

    The recipe's own prompt template frames every question (and the history, where the template keeps one);
    generation settings default to the recipe's and can be overridden. Tokens stream as they are generated
    (beam search answers at the end).

    \b
    Examples:
      medzoo chat bentsao-run
      medzoo chat runs/bentsao-20261121-101500 -p "偏头痛有哪些症状？" --greedy
      medzoo chat bentsao-run -p "高血压患者能吃什么水果？" --json
      medzoo chat medqa-chatglm --device cuda --load-in-4bit
    """
    if as_json and prompt is None:
        raise click.UsageError("--json needs -p/--prompt (one question, one JSON answer)")
    if prompt is not None and not prompt.strip():
        raise MedzooError("empty prompt: ask a question")
    settings = overrides(temperature, top_p, top_k, num_beams, max_new_tokens, do_sample)
    lm = load(model, device, dtype, load_in_4bit, load_in_8bit, trust_remote_code, base)
    from medzoo import generate

    generate.settings(lm, **settings)  # bad settings fail now, not at the first question
    if prompt is not None:
        if as_json:
            answer = generate.generate(lm, prompt, **settings).as_dict()
            click.echo(json.dumps({"model": lm.name, "recipe": lm.manifest.get("recipe"),
                                   "method": lm.manifest.get("method"), "template": lm.template.name,
                                   "prompt": prompt, "answer": answer.pop("text"), **answer}, ensure_ascii=False))
        else:
            say(lm, prompt, (), settings)
        return
    interactive(lm, settings)


def say(lm, query, history, settings) -> str:
    """Stream the answer to stdout; return it."""
    from medzoo import generate

    gen = generate.stream(lm, query, history, **settings)
    for piece in gen:
        click.echo(piece, nl=False)
        sys.stdout.flush()
    click.echo("")
    return gen.answer.text


def interactive(lm, settings):
    from medzoo import generate

    click.echo(describe(lm))
    notes = [HELP]
    if lm.template.history_turn is None:
        notes.append(f"Template {lm.template.name} keeps no history: each question is answered on its own.")
    if generate.settings(lm, **settings)["num_beams"] > 1:
        notes.append("Beam search cannot stream: answers appear when complete (--num-beams 1 streams).")
    click.echo("\n".join(notes))
    history: list[tuple[str, str]] = []
    while True:
        try:
            query = input("\n用户> ").strip()
        except (EOFError, KeyboardInterrupt):
            click.echo("")
            return
        if not query:
            continue
        if query in ("/exit", "/quit"):
            return
        if query == "/reset":
            history.clear()
            click.echo("(history cleared)")
            continue
        if query.startswith("/"):
            click.echo(f"unknown command {query.split()[0]}; {HELP}")
            continue
        click.echo("模型> ", nl=False)
        try:
            answer = say(lm, query, history, settings)
        except MedzooError as exc:
            click.echo(f"\nError: {exc}", err=True)
            continue
        except KeyboardInterrupt:
            click.echo("\n(interrupted)")
            continue
        history.append((query, answer))


COMMANDS = {"chat": chat_cmd}
