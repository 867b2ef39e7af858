"""Fixtures for pull/push tests: olah serving git repos built on the fly (faithful small-scale replicas of the
published checkpoints' layouts) and tests/hubserver.py for pushes, private repos and faults.

Imported by conftest.py. It sets the Hugging Face environment before huggingface_hub is first imported:
its constants (Xet, token path) are read at import time.
"""
import hashlib
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

_HF_HOME = tempfile.mkdtemp(prefix="medzoo-test-hf-home-")
os.environ["HF_HOME"] = _HF_HOME                  # never the user's token or cache
os.environ["HF_HUB_DISABLE_XET"] = "1"            # the test servers speak LFS, not Xet
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.pop("HF_TOKEN", None)
os.environ.pop("HUGGING_FACE_HUB_TOKEN", None)
if "huggingface_hub" in sys.modules:  # imported before us: set the import-time constants too
    from huggingface_hub import constants as _c

    _c.HF_HUB_DISABLE_XET = True
    _c.HF_TOKEN_PATH = os.path.join(_HF_HOME, "token")
    _c.HF_STORED_TOKENS_PATH = os.path.join(_HF_HOME, "stored_tokens")

TOKEN = "hf_medzooTestToken0123456789abcdefXYZ"   # the hubserver's only user, "alice"
CHATGLM_TINY = dict(vocab_size=300, hidden_size=32, num_layers=4, num_attention_heads=4, inner_hidden_size=64,
                    max_sequence_length=64, bos_token_id=4, eos_token_id=5, mask_token_id=6, gmask_token_id=7,
                    pad_token_id=3)
PRE_SEQ_LEN = 16


class FinetuningArguments:
    """Stands in for the original project's own argument class that `finetuning_args.bin` pickles."""

    def __init__(self, finetuning_type):
        self.finetuning_type = finetuning_type
        self.num_layer_trainable = 3
        self.name_module_trainable = "mlp"
        self.pre_seq_len = PRE_SEQ_LEN


class TrainingArguments:
    def __init__(self):
        self.per_device_train_batch_size = 32
        self.gradient_accumulation_steps = 256
        self.learning_rate = 5e-5


class Trap:
    """Unpickling it creates `path`: proof that nothing unpickled it, if the file never appears."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def git_repo(folder: Path, files: dict) -> Path:
    """A git repo whose one commit holds `files` ({path: bytes | callable(path)}). Binary files are stored as
    git-LFS pointers with the object under .git/lfs/objects, as on the Hub (olah serves them from there)."""
    folder.mkdir(parents=True)
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.org", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.org")
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=folder, check=True, env=env)
    for rel, content in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if callable(content):
            content(path)
        else:
            path.write_bytes(content)
        data = path.read_bytes()
        if rel.endswith((".bin", ".safetensors", ".pt", ".png")):
            oid = hashlib.sha256(data).hexdigest()
            obj = folder / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
            obj.parent.mkdir(parents=True, exist_ok=True)
            obj.write_bytes(data)
            path.write_text(f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {len(data)}\n")
    for cmd in (["git", "add", "-A"], ["git", "commit", "-q", "-m", "upload"]):
        subprocess.run(cmd, cwd=folder, check=True, env=env)
    return folder


def _json(data) -> bytes:
    import json

    return json.dumps(data, indent=2).encode()


def _torch_save(state):
    import torch

    return lambda path: torch.save(state, path)


def _run_files(method: str) -> dict:
    """What every MedQA-ChatGLM upload carries besides the weights: two pickles and three training logs."""
    return {
        "finetuning_args.bin": pickle.dumps(FinetuningArguments(method)),
        "training_args.bin": pickle.dumps(TrainingArguments()),
        "trainer_state.json": _json({"epoch": 10.0, "global_step": 40, "log_history": [
            {"epoch": 5.0, "learning_rate": 2.5e-5, "loss": 2.31, "step": 20},
            {"epoch": 10.0, "learning_rate": 0.0, "loss": 1.87, "step": 40}]}),
        "train_results.json": _json({"epoch": 10.0, "train_loss": 2.09, "train_runtime": 98000.5,
                                     "train_samples_per_second": 1.2}),
        "all_results.json": _json({"epoch": 10.0, "train_loss": 2.09, "train_runtime": 98000.5,
                                   "train_samples_per_second": 1.2}),
    }


@pytest.fixture(scope="session")
def seed_checkpoints(tmp_path_factory):
    """The published checkpoints at tiny scale, as the objects they were made from: {name: dict}."""
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import LlamaConfig, LlamaForCausalLM

    from medzoo.chatglm.configuration import ChatGLMConfig
    from medzoo.chatglm.modeling import ChatGLMForConditionalGeneration

    torch.manual_seed(0)
    out = {}
    glm_config = ChatGLMConfig(**CHATGLM_TINY)
    glm = ChatGLMForConditionalGeneration(glm_config).eval()
    lora = get_peft_model(glm, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, target_modules=["query_key_value"],
                                          init_lora_weights=False, task_type="CAUSAL_LM"))
    lora_state = {k: v.clone() for k, v in get_peft_model_state_dict(lora).items()}
    out["chatglm_config"] = glm_config
    out["lora_state"] = lora_state
    full = ChatGLMForConditionalGeneration(glm_config).state_dict()
    layers = glm_config.num_layers
    out["freeze_state"] = {k: (v + 0.1 * torch.randn_like(v)).contiguous() for k, v in full.items()
                           if any(k.startswith(f"transformer.layers.{i}.mlp.") for i in range(layers - 3, layers))}
    prefix_model = ChatGLMForConditionalGeneration(ChatGLMConfig(**CHATGLM_TINY, pre_seq_len=PRE_SEQ_LEN))
    out["prefix_state"] = {k: torch.randn_like(v) for k, v in prefix_model.state_dict().items()
                           if "prefix_encoder" in k}

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    bentsao = get_peft_model(llama, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                               target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                               task_type="CAUSAL_LM"))
    out["bentsao_state"] = {k: v.clone() for k, v in get_peft_model_state_dict(bentsao).items()}
    return out


@pytest.fixture(scope="session")
def olah_repos(seed_checkpoints, tmp_path_factory):
    """Git repos laid out as olah's mirrors-path wants them: <root>/models/<owner>/<name>."""
    root = tmp_path_factory.mktemp("olah-mirrors")
    models = root / "models"
    s = seed_checkpoints
    medqa_lora_config = {"base_model_name_or_path": "THUDM/chatglm-6b", "bias": "none", "enable_lora": None,
                         "fan_in_fan_out": False, "inference_mode": True, "lora_alpha": 32.0, "lora_dropout": 0.1,
                         "merge_weights": False, "modules_to_save": None, "peft_type": "LORA", "r": 8,
                         "target_modules": ["query_key_value"], "task_type": "CAUSAL_LM"}
    git_repo(models / "wangrongsheng" / "MedQA-ChatGLM-LoRA", {
        "adapter_config.json": _json(medqa_lora_config), "adapter_model.bin": _torch_save(s["lora_state"]),
        **_run_files("lora")})
    git_repo(models / "wangrongsheng" / "MedQA-ChatGLM-Freeze", {
        "adapter_model.bin": _torch_save(s["freeze_state"]), **_run_files("freeze")})
    git_repo(models / "wangrongsheng" / "MedQA-ChatGLM-PTuningV2", {
        "adapter_model.bin": _torch_save(s["prefix_state"]), **_run_files("p_tuning"),
        "training_args.bin": pickle.dumps(Trap(root / "UNPICKLED"))})
    bentsao_config = {"base_model_name_or_path": "../llama_model", "bias": "none", "enable_lora": None,
                      "fan_in_fan_out": False, "inference_mode": True, "lora_alpha": 16, "lora_dropout": 0.05,
                      "merge_weights": False, "modules_to_save": None, "peft_type": "LORA", "r": 8,
                      "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}
    bentsao_files = {"adapter_config.json": _json(bentsao_config),
                     "adapter_model.bin": _torch_save(s["bentsao_state"]),
                     "README.md": b"# lora-llama-med\n\nLoRA weights of BenTsao (no front matter).\n"}
    git_repo(models / "thinksoso" / "lora-llama-med", bentsao_files)
    git_repo(models / "someone" / "lora-copy", {k: v for k, v in bentsao_files.items() if k != "README.md"})
    git_repo(models / "someone" / "freeze-with-prefix", {
        "adapter_model.bin": _torch_save({"base_model.model." + k: v for k, v in s["freeze_state"].items()})})
    import torch

    git_repo(models / "acme" / "mystery-weights", {
        "adapter_model.bin": _torch_save({"encoder.block.0.weight": torch.ones(2, 2)}), "notes.txt": b"hello\n"})
    git_repo(models / "acme" / "just-docs", {"README.md": b"# nothing here\n", "notes.txt": b"hello\n"})
    git_repo(models / "acme" / "evil-pickle", {
        "adapter_model.bin": lambda p: p.write_bytes(pickle.dumps(FinetuningArguments("lora")))})
    return root


@pytest.fixture(scope="session")
def olah_server(olah_repos, tmp_path_factory):
    """olah in offline mode, serving the repos of `olah_repos` on a free loopback port; stopped at the end."""
    work = tmp_path_factory.mktemp("olah")
    port = free_port()
    config = work / "olah.toml"
    config.write_text(f'[basic]\nhost = "127.0.0.1"\nport = {port}\nrepos-path = "{work / "cache"}"\n'
                      f'mirrors-path = ["{olah_repos}"]\n[accessibility]\noffline = true\n')
    log = open(work / "olah.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "olah.server", "--config", str(config), "--log-path",
                             str(work / "logs")], stdout=log, stderr=subprocess.STDOUT, cwd=work)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/models/acme/just-docs/revision/main", timeout=2).read()
            break
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"olah did not start: {(work / 'olah.log').read_text()[-2000:]}")
            time.sleep(0.2)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture
def hub_server(tmp_path):
    """A fresh writable Hub (tests/hubserver.py) per test; its one user is "alice" with TOKEN."""
    from hubserver import HubServer

    server = HubServer(tmp_path / "hub-store", {TOKEN: "alice"}).start()
    yield server
    server.stop()


@pytest.fixture
def hf_env(tmp_path, monkeypatch):
    """A private Hugging Face cache per test and no token, offline mode or endpoint inherited."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    return cache


@pytest.fixture
def olah_env(hf_env, olah_server, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", olah_server)
    return olah_server


def copy_tree(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest
