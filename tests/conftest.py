"""Shared test set-up. Every test gets its own MEDZOO_HOME; heavy fixtures are per session.

Helpers' fixture modules are imported at the bottom so each area keeps its own file.
"""
import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
ARTIFACTS = TESTS / "artifacts"
sys.path.insert(0, str(TESTS))


@pytest.fixture(autouse=True)
def medzoo_home(tmp_path, monkeypatch):
    """A private local zoo per test, so tests never see each other's models or the user's."""
    home = tmp_path / "medzoo-home"
    monkeypatch.setenv("MEDZOO_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """The cpu-demo base (medzoo-tiny), built once per session and shared through MEDZOO_TINY."""
    from medzoo import tiny

    folder = tmp_path_factory.mktemp("tiny") / tiny.NAME
    tiny.build(folder, pretrain_steps=20)
    os.environ["MEDZOO_TINY"] = str(folder)
    return folder


# --- model folders of every layout on the tiny base (issue 5: chat/web/merge/serve tests) ---------------
@pytest.fixture(scope="session")
def tiny_models(tiny_base, tmp_path_factory):
    """{method: model folder} for lora / freeze / ptuning-v2 / full on medzoo-tiny, per docs/model-folder.md,
    with random (non-zero) trained weights so each differs from the base."""
    from model_folders import make_all

    return make_all(tiny_base, tmp_path_factory.mktemp("tiny-models"))


# --- Hub: olah + tests/hubserver.py for pull/push (issue 4) ---------------------------------------------
from hub_fixtures import *  # noqa: E402,F401,F403


# --- training (issue 3): tiny Llama / GLM-4 / native ChatGLM-6B bases for `medzoo train --base` -----------------
@pytest.fixture(scope="session")
def train_bases(tiny_base, tmp_path_factory):
    """{"llama", "glm", "chatglm"}: folders of 3-layer, hidden-32 random models (ChatGLM None when
    medzoo.chatglm is missing); Llama and GLM share medzoo-tiny's tokenizer."""
    from train_fixtures import make_bases

    return make_bases(tiny_base, tmp_path_factory.mktemp("train-bases"))
