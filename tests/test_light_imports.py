"""`medzoo list`, `info`, `plugins` and `--help` never import the heavy libraries."""
import json
import subprocess
import sys

HEAVY = ["torch", "transformers", "peft", "gradio", "datasets", "huggingface_hub", "safetensors"]

SCRIPT = """
import json, sys
from click.testing import CliRunner
from medzoo.cli import main
for args in (["--help"], ["list"], ["list", "--json"], ["info", "bentsao"], ["plugins"], ["train", "--help"],
             ["pull", "--help"], ["chat", "--help"], ["list", "--local"]):
    result = CliRunner().invoke(main, args)
    if result.exit_code != 0 and "No such command" not in result.output:
        raise SystemExit(f"{args}: exit {result.exit_code}: {result.output}")
print(json.dumps(sorted(m for m in %r if m in sys.modules)))
"""


def test_catalog_commands_do_not_import_heavy_libraries(tmp_path):
    out = subprocess.run([sys.executable, "-c", SCRIPT % (HEAVY,)], capture_output=True, text=True, timeout=120,
                         env={"MEDZOO_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr + out.stdout
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
