"""`medzoo merge`: fold an adapter into its base and write one standalone model folder."""
from __future__ import annotations

import json

import click

from medzoo.commands.chat import load, load_options


@click.command("merge")
@click.argument("model")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Folder to write (new or empty).")
@click.option("--max-shard-size", default="2GB", show_default=True, help="Largest safetensors shard, e.g. 2GB, 500MB.")
@click.option("--register", "register", default=None, metavar="NAME",
              help="Also add the export to your zoo under NAME (layout full).")
@click.option("--force", is_flag=True, help="Replace an existing --out folder (and a zoo NAME already taken).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@load_options
def merge_cmd(model, out, max_shard_size, register, force, as_json, device, dtype, load_in_4bit, load_in_8bit,
              trust_remote_code, base):
    """Merge MODEL's adapter into its base and write a standalone model to --out.

    LoRA/QLoRA are merged (peft merge_and_unload); Freeze and full models are exported the same way. The
    folder holds sharded safetensors, config, tokenizer, generation_config.json with the recipe's defaults
    and a model card: plain `transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads it. P-Tuning v2
    cannot be merged; it is exported as base + prefix, a folder medzoo loads.

    \b
    Examples:
      medzoo merge bentsao-run --out exports/bentsao-merged
      medzoo merge bentsao-run --out exports/bentsao-merged --register bentsao-merged
      medzoo merge runs/medqa-lora --out exports/medqa --dtype fp16 --max-shard-size 1GB
    """
    from pathlib import Path

    from medzoo import merge, zoo
    from medzoo.objects import MedzooError

    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not force:
        raise MedzooError(f"{target} exists and is not empty; choose another --out or pass --force")
    if register is not None and not zoo.NAME.match(register):
        raise MedzooError(f"--register {register!r}: a zoo name holds only letters, digits, '.', '_', '-', '@'")
    lm = load(model, device, dtype, load_in_4bit, load_in_8bit, trust_remote_code, base)
    result = merge.export(lm, target, max_shard_size=max_shard_size, register=register, replace=force)
    info = {"model": lm.name, "out": str(result.folder), "merged": result.merged, "method": result.method,
            "message": result.message, "registered": result.registered}
    if as_json:
        click.echo(json.dumps(info, ensure_ascii=False))
        return
    click.echo(f"{lm.name}: {result.message}")
    click.echo(f"wrote {result.folder}")
    if result.registered:
        click.echo(f"registered as {result.registered!r}: medzoo chat {result.registered}")
    if not result.merged and (result.folder / "adapter").is_dir():  # a ChatGLM prefix is inside the weights
        click.echo("note: plain transformers loads only the base model from this folder; use medzoo to get the "
                   "tuned model", err=True)


COMMANDS = {"merge": merge_cmd}
