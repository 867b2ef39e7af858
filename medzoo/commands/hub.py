"""`medzoo pull` and `medzoo push`: the Hugging Face Hub. huggingface_hub, torch and safetensors are imported
inside the commands, never when the CLI starts."""
from __future__ import annotations

import click


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


@click.command("pull")
@click.argument("spec")
@click.option("--revision", help="Branch, tag or commit (also as REPO@REVISION). Default: the registry's, or main.")
@click.option("--method", help="For a recipe name: which published checkpoint (lora, freeze, ptuning-v2, ...).")
@click.option("--name", help="Name in your zoo. Default: the repo's name.")
@click.option("--local-dir", type=click.Path(file_okay=False), help="Write the model folder here instead of the zoo's models/.")
@click.option("--base", help="Confirm the base model (registered name or hub id) when the repo's own is not trusted.")
@click.option("--recipe", help="The recipe it belongs to, when the repo does not say.")
@click.option("--force", is_flag=True, help="Convert again even if this revision is already in your zoo.")
def pull_cmd(spec, revision, method, name, local_dir, base, recipe, force):
    """Download a checkpoint from the Hub and add it to your zoo, converted to safetensors.

    SPEC is a Hub repo (owner/name or owner/name@revision) or a recipe name (its first published checkpoint).
    Downloads use the Hugging Face cache: an interrupted pull resumes, a repeated one works offline
    (HF_HUB_OFFLINE=1). HF_ENDPOINT picks a mirror; HF_TOKEN or `huggingface-cli login` reads private repos.

    \b
    Examples:
      medzoo pull wangrongsheng/MedQA-ChatGLM-LoRA
      medzoo pull medqa-chatglm --method freeze
      medzoo pull thinksoso/lora-llama-med --name bentsao-lora
      HF_HUB_OFFLINE=1 medzoo pull wangrongsheng/MedQA-ChatGLM-LoRA
    """
    from medzoo import hub

    result = hub.pull(spec, revision=revision, method=method, name=name, local_dir=local_dir, base=base,
                      recipe=recipe, force=force)
    m = result.manifest
    if result.already:
        click.echo(f"{result.name} is already in your zoo at this revision ({m['source']}): {result.folder}")
        return
    click.echo(f"pulled {m['source']} -> {result.name}")
    click.echo(f"  recipe {m['recipe']}, method {m['method']}, layout {m['layout']}, base {m['base_model']}"
               f" ({m.get('base_model_id')})")
    for line in result.evidence:
        click.echo(f"  {line}")
    if m.get("config_overrides"):
        click.echo("  config overrides: " + ", ".join(f"{k}={v}" for k, v in m["config_overrides"].items()))
    click.echo(f"  wrote {result.folder}: {', '.join(result.written)}")
    for f, why in result.ignored:
        click.echo(f"  ignored {f}: {why}")
    click.echo(f"Next: medzoo info {result.name}")


@click.command("push")
@click.argument("model")
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private (when it does not exist yet).")
@click.option("--revision", help="Branch to push to (created from main when missing). Default: main.")
@click.option("--dry-run", is_flag=True, help="List what would be uploaded, with sizes, and upload nothing.")
@click.option("--commit-message", "-m", help="Commit message. Default: names the model, recipe and method.")
def push_cmd(model, repo_id, private, revision, dry_run, commit_message):
    """Upload a model of your zoo (a name, or a run/model folder) to the Hub repo REPO_ID.

    Uploads safetensors only, the tokenizer, config.yaml, metrics.jsonl, loss.png, medzoo.json and a model
    card rendered from the recipe's card. Pickles, links out of the folder and secrets are refused;
    checkpoints/ is never pushed. Pushing an unchanged model makes no new commit.

    \b
    Examples:
      medzoo push runs/bentsao-20261121-101500 alice/bentsao-lora --dry-run
      medzoo push bentsao-lora alice/bentsao-lora --private
    """
    from medzoo import hub

    result = hub.push(model, repo_id, private=private, revision=revision, dry_run=dry_run,
                      commit_message=commit_message)
    plan = result.plan
    if dry_run:
        click.echo(f"dry run: would upload {len(plan.uploads)} files ({_size(plan.total)}) from {plan.folder} "
                   f"to {repo_id}")
    for path, _, size in plan.uploads:
        mark = "" if dry_run else ("  (uploaded)" if path in result.changed else "  (unchanged)")
        click.echo(f"  {path}  {_size(size)}{mark}")
    for path, why in plan.skipped:
        click.echo(f"  skipped {path}: {why}")
    if dry_run:
        return
    for path in result.deleted:
        click.echo(f"  deleted {path} (no longer in the model folder)")
    if not result.changed and not result.deleted:
        click.echo(f"{repo_id} is up to date: nothing uploaded, no new commit ({result.url})")
    else:
        click.echo(f"pushed {len(result.changed)} files to {result.url} (commit {result.commit[:12]})")


COMMANDS = {"pull": pull_cmd, "push": push_cmd}
