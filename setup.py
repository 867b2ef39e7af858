"""medzoo: one registry and one CLI for Chinese medical LLM fine-tuning recipes.

Install torch first where it is missing (`make install` does): `pip install torch==2.13.0` takes the CPU
build; the ranges below are all satisfied by it, so pip never pulls a CUDA build on its own.
"""
from setuptools import find_packages, setup

BUILTIN = {  # entry-point name -> module: the built-in plugins load exactly like third-party ones
    "builtin": "medzoo.builtin",
    "bentsao": "medzoo_plugins.bentsao",
    "medqa-chatglm": "medzoo_plugins.medqa_chatglm",
    "qinggeng": "medzoo_plugins.qinggeng",
    "med-chatglm": "medzoo_plugins.med_chatglm",
}

setup(
    name="medzoo",
    version="0.1.0",
    description="A model zoo for Chinese medical language models: recipes as plugins, one CLI",
    python_requires=">=3.10",
    # plugins/ installs as `medzoo_plugins`, never as a top-level `plugins` module
    packages=find_packages(include=["medzoo", "medzoo.*"])
    + ["medzoo_plugins"] + ["medzoo_plugins." + p for p in find_packages("plugins")],
    package_dir={"medzoo_plugins": "plugins"},
    package_data={"medzoo_plugins": ["*/data/*"], "medzoo": ["assets/*"]},
    data_files=[("share/medzoo", ["registry.yaml"]), ("share/medzoo/cards", __import__("glob").glob("cards/*.md"))],
    install_requires=[
        "pluggy>=1.5",
        "click>=8.1",
        "pyyaml>=6.0",
        "torch>=2.4",
        "transformers>=5.0,<6",
        "peft>=0.17",
        "accelerate>=1.0",
        "datasets>=3.0",
        "huggingface_hub>=1.0",
        "safetensors>=0.4",
        "tokenizers>=0.21",
        "sentencepiece>=0.2",
        "gradio>=5.0",
        "matplotlib>=3.7",
    ],
    extras_require={"test": ["pytest>=8", "pytest-timeout>=2.3", "olah>=0.5", "openai>=1.40", "playwright>=1.40"]},
    entry_points={
        "console_scripts": ["medzoo = medzoo.cli:main"],
        "medzoo": [f"{name} = {module}" for name, module in BUILTIN.items()],
    },
)
