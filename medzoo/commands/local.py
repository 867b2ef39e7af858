"""`medzoo rm`: remove a model from your local zoo."""
from __future__ import annotations

import click

from medzoo import zoo


@click.command("rm")
@click.argument("names", nargs=-1, required=True)
@click.option("--keep-files", is_flag=True, help="Only drop the zoo entry; leave the folder on disk.")
def rm_cmd(names, keep_files):
    """Remove models from your zoo. Folders the zoo owns (pulled into $MEDZOO_HOME) are deleted; a run folder
    elsewhere (e.g. under ./runs) is only unlisted.

    \b
    Examples:
      medzoo rm MedQA-ChatGLM-LoRA
      medzoo rm my-run --keep-files
    """
    for name in names:
        folder = zoo.remove(name, delete_files=not keep_files)
        kept = keep_files or folder.exists()
        click.echo(f"removed {name} from your zoo" + (f" (files kept at {folder})" if kept else f" and deleted {folder}"))


COMMANDS = {"rm": rm_cmd}
