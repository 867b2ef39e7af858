"""`medzoo web`: a gradio chat page for one model of the zoo."""
from __future__ import annotations

import click

from medzoo.commands.chat import describe, load, load_options
from medzoo.objects import MedzooError


def parse_auth(value: str | None):
    if value is None:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise MedzooError("--auth: expected USER:PASSWORD")
    return user, password


@click.command("web")
@click.argument("model")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; 0.0.0.0 opens the page to your network (use --auth then).")
@click.option("--port", default=7860, show_default=True, type=click.IntRange(1, 65535), help="Port to listen on.")
@click.option("--share", is_flag=True, help="Also publish a temporary public gradio.live link (off by default).")
@click.option("--auth", default=None, metavar="USER:PASSWORD", envvar="MEDZOO_WEB_AUTH",
              help="Require this login (or set MEDZOO_WEB_AUTH).")
@load_options
def web_cmd(model, host, port, share, auth, device, dtype, load_in_4bit, load_in_8bit, trust_remote_code, base):
    """A web chat page for MODEL: streaming answers, history, generation sliders, example questions, and a
    side-by-side mode that asks the base model the same question.

    \b
    Examples:
      medzoo web bentsao-run
      medzoo web bentsao-run --port 7861 --auth doctor:s3cret
      medzoo web runs/medqa-lora --device cuda --load-in-8bit
    """
    credentials = parse_auth(auth)
    lm = load(model, device, dtype, load_in_4bit, load_in_8bit, trust_remote_code, base)
    from medzoo import webui

    demo = webui.build(lm, base=webui.Base(lm, device, dtype, trust_remote_code))
    click.echo(f"web demo of {describe(lm)}")
    click.echo(f"  http://{host}:{port}/{'  (login required)' if credentials else ''}")
    if host not in ("127.0.0.1", "localhost", "::1") and not credentials:
        click.echo("warning: the page is reachable beyond this machine without --auth", err=True)
    webui.launch(demo, host=host, port=port, share=share, auth=credentials)


COMMANDS = {"web": web_cmd}
