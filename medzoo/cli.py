"""The `medzoo` command. Each subcommand lives in medzoo/commands/<name>.py; none imports torch at module level,
so `medzoo --help`, `list`, `info` and `plugins` stay fast."""
from __future__ import annotations

import importlib
import sys

import click

from medzoo import __version__
from medzoo.objects import MedzooError

COMMANDS = {  # command name -> module in medzoo.commands (each defines `command`)
    "list": "catalog", "info": "catalog", "plugins": "catalog", "new-recipe": "scaffold",
    "train": "train", "pull": "hub", "push": "hub", "rm": "local",
    "chat": "chat", "web": "web", "merge": "merge", "serve": "serve",
}


class Group(click.Group):
    """Loads each command module on first use; a module not written yet simply adds no command."""

    def list_commands(self, ctx):
        return [name for name in COMMANDS if self.get_command(ctx, name) is not None]

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        try:
            module = importlib.import_module(f"medzoo.commands.{COMMANDS[name]}")
        except ModuleNotFoundError as exc:
            if exc.name == f"medzoo.commands.{COMMANDS[name]}":
                return None
            raise
        return getattr(module, "COMMANDS", {}).get(name)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MedzooError as exc:
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(2)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="medzoo")
def main():
    """medzoo: a model zoo for Chinese medical language models.

    \b
    Examples:
      medzoo list
      medzoo list "*chatglm*"
      medzoo info bentsao
      medzoo train bentsao --profile cpu-demo
      medzoo pull wangrongsheng/MedQA-ChatGLM-LoRA
    """


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
