"""`medzoo train <recipe>`: fine-tune as a seed recipe did, with any of its settings changed.

Only click, the standard library and light medzoo modules at import time; torch loads inside the command.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click

from medzoo import recipes
from medzoo.objects import MedzooError


def _overrides(pairs: tuple[str, ...]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise MedzooError(f"--set {pair!r}: expected key=value")
        out[key.strip()] = recipes.parse_value(value)
    return out


def _relaunch(nproc: int, ctx: click.Context, output_dir: Path) -> int:
    """Run this same command under torch.distributed.run with `nproc` processes (gloo on CPU, nccl on CUDA)."""
    params = ctx.params
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "medzoo.cli", "train", params["recipe"], "--output-dir", str(output_dir)]
    flags = {p.name: p.opts[0] for p in ctx.command.params if isinstance(p, click.Option)}
    for key, value in params.items():
        if key in ("recipe", "output_dir", "nproc", "dry_run") or value in (None, False, ()):
            continue
        flag = flags[key]
        if value is True:
            argv.append(flag)
        elif isinstance(value, tuple):
            for v in value:
                argv += [flag, str(v)]
        else:
            argv += [flag, str(value)]
    env = dict(os.environ, MEDZOO_LAUNCHED="1")
    return subprocess.call(argv, env=env)


@click.command("train")
@click.argument("recipe")
@click.option("--base", help="Base model: a catalog name, hub id or local folder (default: the recipe's, or the profile's).")
@click.option("--data", help="Datasets or files, comma-separated, each optionally NAME:RATIO (default: the recipe's).")
@click.option("--sample", is_flag=True, help="Train on each dataset's bundled sample (cpu-demo always does).")
@click.option("--method", help="Tuning method (default: the recipe's): lora, qlora, freeze, ptuning-v2, full.")
@click.option("--profile", help="Hardware profile, or 'auto' to pick the best for this machine.")
@click.option("--epochs", type=float, help="Passes over the training data.")
@click.option("--lr", type=float, help="Peak learning rate.")
@click.option("--seed", type=int, help="Random seed (data order, initialisation).")
@click.option("--val-size", type=float, help="Held-out rows (>= 1) or fraction (< 1).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Any training key or method parameter, repeatable (e.g. --set r=16 --set cutoff_len=512).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML file of recipe settings.")
@click.option("--output-dir", type=click.Path(file_okay=False), help="Run folder (default runs/<recipe>-<time>).")
@click.option("--name", help="Name in the local zoo (default: the run folder's name).")
@click.option("--max-steps", type=int, help="Stop after N optimizer steps (quick runs).")
@click.option("--resume", is_flag=True, help="Continue the run in --output-dir (default: the recipe's latest run).")
@click.option("--skip-bad-rows", is_flag=True, help="Skip malformed data rows (and count them) instead of failing.")
@click.option("--nproc", type=int, default=1, show_default=True, help="Processes (GPUs) for data-parallel training.")
@click.option("--strategy", type=click.Choice(["ddp", "fsdp", "deepspeed"]), help="With --nproc > 1 (default ddp).")
@click.option("--report-to", help="tensorboard, wandb (comma-separated) or none.")
@click.option("--trust-remote-code", is_flag=True, help="Allow the base model's own Python code to run.")
@click.option("--dry-run", is_flag=True, help="Print the resolved run and its memory estimate; load nothing.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def command(recipe, base, data, sample, method, profile, epochs, lr, seed, val_size, sets, config_file, output_dir,
            name, max_steps, resume, skip_bad_rows, nproc, strategy, report_to, trust_remote_code, dry_run, quiet):
    """Fine-tune RECIPE (bentsao, medqa-chatglm, qinggeng, med-chatglm, ...) as the seed project did.

    Settings come from the recipe, then --config, then --epochs/--lr/--seed/--val-size, then --set.
    The run folder gets the trained weights, config.yaml, metrics.jsonl, loss.png and a model card, and
    is added to your local zoo once complete (`medzoo list --local`).

    \b
    Examples:
      medzoo train bentsao --profile cpu-demo
      medzoo train bentsao --profile cpu-demo --dry-run
      medzoo train bentsao --profile cpu-demo --set r=16 --set cutoff_len=128 --max-steps 5
      medzoo train medqa-chatglm --method freeze --profile cpu-demo --set num_layer_trainable=1
      medzoo train bentsao --profile auto --data huatuo-kg,my.jsonl:0.5
      medzoo train bentsao --resume --output-dir runs/bentsao-20261121-101500
      medzoo train bentsao --profile cpu-demo --nproc 2
    """
    from medzoo.train import run as train_run

    if val_size is not None and val_size >= 1:
        val_size = int(val_size)
    if resume:
        folder = Path(output_dir) if output_dir else train_run.latest_run(recipe)
        run = train_run.load_run_config(folder)
        if run.get("recipe") != host_recipe(recipe):
            raise MedzooError(f"--resume: {folder} is a run of {run.get('recipe')!r}, not {recipe!r}")
    else:
        run = train_run.plan(recipe, method=method, profile=profile, overrides=_overrides(sets),
                             config_file=config_file, base=base, data=data, sample=sample, epochs=epochs, lr=lr,
                             seed=seed, val_size=val_size, max_steps=max_steps)
        folder = Path(output_dir) if output_dir else train_run.default_output_dir(run["recipe"])
    if dry_run:
        click.echo(train_run.dry_run_text(run), nl=False)
        return
    if nproc > 1 and "LOCAL_RANK" not in os.environ:
        raise SystemExit(_relaunch(nproc, click.get_current_context(), folder))
    from medzoo.train.loop import INTERRUPTED, Interrupted

    try:
        result = train_run.execute(run, folder, name=name, resume=resume, skip_bad_rows=skip_bad_rows,
                                   trust_remote_code=trust_remote_code, report_to=report_to, strategy=strategy,
                                   progress=not quiet, echo=lambda m: click.echo(m, err=True))
    except Interrupted as exc:
        click.echo(f"interrupted: checkpoint saved in {exc.checkpoint}; continue with "
                   f"`medzoo train {recipe} --resume --output-dir {folder}`", err=True)
        raise SystemExit(INTERRUPTED) from None
    if result.name:
        click.echo(f"saved {result.folder} as {result.name!r} in your zoo; try: medzoo chat {result.name} -p \"…\"")


def host_recipe(name: str) -> str:
    from medzoo import host

    return host.require(host.catalog(), name).name


COMMANDS = {"train": command}
