"""`medzoo serve`: an OpenAI-compatible HTTP API for one model of the zoo."""
from __future__ import annotations

import os

import click

from medzoo.commands.chat import describe, load, load_options


@click.command("serve")
@click.argument("model")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; 0.0.0.0 exposes the API to your network (use --api-key then).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="Port to listen on.")
@click.option("--api-key", default=None, envvar="MEDZOO_API_KEY",
              help="Require 'Authorization: Bearer KEY' (or set MEDZOO_API_KEY).")
@click.option("--name", "model_id", default=None, help="The model id clients send (default: the zoo name).")
@load_options
def serve_cmd(model, host, port, api_key, model_id, device, dtype, load_in_4bit, load_in_8bit, trust_remote_code,
              base):
    """Serve MODEL over an OpenAI-compatible API: GET /v1/models, POST /v1/chat/completions (stream or not).

    Messages are framed by the recipe's own template (earlier turns become the history, a system message is
    put before the question); generation defaults are the recipe's, and a request's temperature, top_p,
    max_tokens (plus top_k, num_beams, repetition_penalty) override them. Requests are answered one at a time.

    \b
    Examples:
      medzoo serve bentsao-run --port 8000
      curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "bentsao-run", "messages": [{"role": "user", "content": "偏头痛有哪些症状？"}]}'
      python -c "from openai import OpenAI; c = OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='-'); \\
        print(c.chat.completions.create(model='bentsao-run', messages=[{'role': 'user', 'content': '头痛'}]))"
      MEDZOO_API_KEY=secret medzoo serve bentsao-run --host 0.0.0.0
    """
    from medzoo import serve

    lm = load(model, device, dtype, load_in_4bit, load_in_8bit, trust_remote_code, base)
    app = serve.create_app(lm, api_key=api_key, model_id=model_id)
    click.echo(f"serving {describe(lm)}")
    click.echo(f"  http://{host}:{port}/v1  (model id {model_id or lm.name!r}"
               f"{', API key required' if api_key else ''})", err=False)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        click.echo("warning: listening beyond this machine without --api-key", err=True)
    serve.server(app, host, port, log_level=os.environ.get("MEDZOO_LOG_LEVEL", "info")).run()


COMMANDS = {"serve": serve_cmd}
