"""`medzoo new-recipe`: scaffold an installable recipe plugin package."""
from pathlib import Path

import click

from medzoo import host


@click.command("new-recipe")
@click.argument("name")
@click.option("--from", "from_recipe", metavar="RECIPE", help="Start from an existing recipe (its template, "
              "data format and sample, methods, hyper-parameters and profiles).")
@click.option("--dir", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("."),
              show_default=True, help="Where to create the medzoo-NAME folder.")
def new_recipe(name, from_recipe, out_dir):
    """Create medzoo-NAME/, an installable recipe plugin: setup.py with the `medzoo` entry point, one module
    with the hook implementations, sample data, a card and a passing test.

    \b
    Examples:
      medzoo new-recipe my-recipe
      medzoo new-recipe my-bentsao --from bentsao
      cd medzoo-my-recipe && pip install -e . && medzoo list my-recipe
    """
    from medzoo import scaffold

    source = host.require(host.catalog(), from_recipe) if from_recipe else None
    target = scaffold.write(name, out_dir, source)
    click.echo(f"created {target}")
    click.echo(f"next: pip install -e {target} && medzoo info {name} && python -m pytest {target}/tests")


COMMANDS = {"new-recipe": new_recipe}
