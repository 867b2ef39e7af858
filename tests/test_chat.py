"""`medzoo chat` and the shared generation path (medzoo/generate.py)."""
import json
import shutil

import pytest
from click.testing import CliRunner

from medzoo.cli import main

QUESTION = "偏头痛有哪些症状？"


def run(*args, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input)


@pytest.fixture(scope="module")
def lora(tiny_models):
    from medzoo.modeling import load_model

    return load_model(str(tiny_models["lora"]))


def test_prompt_is_the_templates_encoding(lora):
    from medzoo import generate
    from medzoo.data.tokenize import encode_prompt

    ids = generate.encode(lora, QUESTION, [("头痛怎么办？", "休息。")])
    assert ids == encode_prompt(lora.template, lora.tokenizer, QUESTION, [("头痛怎么办？", "休息。")])
    assert lora.tokenizer.decode(ids, skip_special_tokens=True) == lora.template.render(QUESTION)


def test_recipe_defaults_and_overrides(lora):
    from medzoo import generate

    s = generate.settings(lora)
    assert (s["temperature"], s["top_p"], s["top_k"], s["num_beams"], s["max_new_tokens"]) == (0.1, 0.75, 40, 4, 256)
    assert s["do_sample"] is False  # BenTsao's infer.py: beam search without sampling
    s = generate.settings(lora, temperature=0.7, num_beams=1, max_new_tokens=9, do_sample=True)
    assert (s["temperature"], s["num_beams"], s["max_new_tokens"], s["do_sample"]) == (0.7, 1, 9, True)
    answer = generate.generate(lora, QUESTION, num_beams=1, do_sample=False, max_new_tokens=5)
    assert answer.tokens <= 5 and answer.settings["max_new_tokens"] == 5


def test_streamed_pieces_join_to_the_whole_answer(lora):
    from medzoo import generate

    gen = generate.stream(lora, QUESTION, num_beams=1, do_sample=False, max_new_tokens=40)
    pieces = list(gen)
    assert len(pieces) > 1 and "".join(pieces) == gen.answer.text
    assert generate.generate(lora, QUESTION, num_beams=1, do_sample=False, max_new_tokens=40).text == gen.answer.text
    beams = generate.stream(lora, QUESTION, num_beams=2, max_new_tokens=20)
    assert not beams.streams and len(list(beams)) == 1  # beam search answers at the end


def test_stop_strings_end_and_are_trimmed(lora):
    """A stop string ends generation and is cut from the answer: here the model's own greedy answer is used to
    pick one, so the test knows it will appear."""
    from medzoo import generate

    full = generate.generate(lora, QUESTION, num_beams=1, do_sample=False, max_new_tokens=40)
    stop = full.text[4:6]
    cut = generate.generate(lora, QUESTION, num_beams=1, do_sample=False, max_new_tokens=40, stop=(stop,))
    assert stop not in cut.text and full.text.startswith(cut.text)
    assert cut.finish_reason == "stop" and cut.tokens < full.tokens
    gen = generate.stream(lora, QUESTION, num_beams=1, do_sample=False, max_new_tokens=40, stop=(stop,))
    assert "".join(gen) == cut.text  # a stop string is never shown, not even in part


def test_template_stop_string_from_the_recipe_is_applied(lora):
    from medzoo import generate

    assert "### 问题:" in lora.template.stop
    assert generate._trim("答案。### 问题:\n下一个", lora.template.stop) == ("答案。", True)
    assert generate._held_back("答案。###", lora.template.stop) == 3


def test_chat_one_shot_and_json(tiny_models):
    r = run("chat", tiny_models["lora"], "-p", QUESTION, "--greedy", "--max-new-tokens", "20", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert {"model", "prompt", "answer", "tokens", "prompt_tokens", "finish_reason", "settings"} <= set(data)
    assert data["prompt"] == QUESTION and data["settings"]["num_beams"] == 1 and data["tokens"] <= 20
    plain = run("chat", tiny_models["lora"], "-p", QUESTION, "--greedy", "--max-new-tokens", "20")
    assert plain.exit_code == 0 and plain.output.strip() == data["answer"]


@pytest.mark.parametrize("method", ["lora", "freeze", "ptuning-v2", "full"])
def test_chat_loads_every_layout(tiny_models, method):
    r = run("chat", tiny_models[method], "-p", QUESTION, "--num-beams", "1", "--max-new-tokens", "8", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["method"] == method


def test_interactive_history_reset_exit(tiny_models, lora):
    from dataclasses import replace

    from medzoo import generate, host

    r = run("chat", tiny_models["lora"], "--greedy", "--max-new-tokens", "12",
            input="头痛怎么办？\n/reset\n/what\n" + QUESTION + "\n/exit\n不会被问到\n")
    assert r.exit_code == 0, r.output
    assert "(history cleared)" in r.output and "unknown command /what" in r.output
    assert "keeps no history" in r.output  # bentsao-med has no history slot, and chat says so
    answer = generate.generate(lora, QUESTION, num_beams=1, do_sample=False, max_new_tokens=12).text
    assert answer in r.output
    # with a template that keeps history, the second question is asked after the first turn
    literature = replace(lora, template=host.catalog().templates["bentsao-literature"])
    first = generate.generate(literature, "头痛怎么办？", num_beams=1, do_sample=False, max_new_tokens=12).text
    second = generate.generate(literature, QUESTION, [("头痛怎么办？", first)], num_beams=1, do_sample=False,
                               max_new_tokens=12).text
    assert generate.encode(literature, QUESTION, [("头痛怎么办？", first)]) != generate.encode(literature, QUESTION)
    assert second


def test_bad_input_is_one_clear_line(tiny_models, tmp_path):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_models["lora"], corrupt)
    (corrupt / "adapter" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    mismatch = tmp_path / "mismatch"
    shutil.copytree(tiny_models["lora"], mismatch)
    manifest = json.loads((mismatch / "medzoo.json").read_text())
    (mismatch / "medzoo.json").write_text(json.dumps(dict(manifest, template="no-such-template")))
    cases = [
        (("chat", "no-such-model", "-p", QUESTION), "no-such-model"),
        (("chat", corrupt, "-p", QUESTION), "corrupt"),
        (("chat", mismatch, "-p", QUESTION), "template 'no-such-template' is not registered"),
        (("chat", tiny_models["lora"], "-p", "头痛" * 3000), "prompt too long"),
        (("chat", tiny_models["lora"], "-p", "   "), "empty prompt"),
        (("chat", tiny_models["lora"], "-p", QUESTION, "--top-p", "0"), "top_p"),
        (("chat", tiny_models["lora"], "-p", QUESTION, "--device", "cuda"), "CUDA"),
        (("chat", tiny_models["lora"], "-p", QUESTION, "--load-in-8bit"), "CUDA"),
        (("chat", tiny_models["lora"], "-p", QUESTION, "--load-in-4bit", "--load-in-8bit"), "exclude"),
    ]
    for args, words in cases:
        r = run(*args)
        assert r.exit_code == 2, (args, r.output)
        assert words in r.output and "Traceback" not in r.output, (args, r.output)
        assert len([line for line in r.output.splitlines() if line.startswith("Error")]) == 1
    long = run("chat", tiny_models["lora"], "-p", "头痛" * 3000)
    assert "1024" in long.output  # names the model's context length


def test_too_long_in_a_session_does_not_end_it(tiny_models):
    r = run("chat", tiny_models["lora"], "--greedy", "--max-new-tokens", "6",
            input="头痛" * 3000 + "\n" + QUESTION + "\n")
    assert r.exit_code == 0 and "prompt too long" in r.output and r.output.count("模型>") == 2


# ---- memorisation through the trainer's real code path: the same template trains and answers -----------
EXAMPLES = [("偏头痛有哪些常见症状？", "偏头痛常见症状为单侧搏动性头痛，伴恶心呕吐。"),
            ("高血压患者饮食要注意什么？", "高血压患者应低盐饮食，规律服药。"),
            ("糖尿病如何治疗？", "糖尿病的治疗包括饮食控制、运动和药物治疗。")]
# recipe offering the method (bentsao: lora/full; medqa-chatglm: freeze/ptuning-v2), and settings that
# make the tiny base memorise three rows on a CPU
ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
TRAIN = {  # method: (recipe, settings, how many of EXAMPLES it must memorise)
    "lora": ("bentsao", ["--set", "lr=1e-2", "--set", "epochs=200", "--set", "r=16",
                         "--set", f"target_modules={ALL_LINEAR}"], 3),
    "full": ("bentsao", ["--set", "lr=2e-3", "--set", "epochs=80"], 3),
    "freeze": ("medqa-chatglm", ["--set", "lr=1e-2", "--set", "epochs=100", "--set", "num_layer_trainable=2"], 3),
    # a prefix on a frozen 2-layer model adds keys/values to two attention layers and no more: too little to
    # store three different answers (loss plateaus near 2.4 whatever the settings), enough for one. The
    # reparameterising MLP (prefix_projection, as in the P-Tuning v2 paper) makes it trainable at all.
    "ptuning-v2": ("medqa-chatglm", ["--set", "lr=1e-2", "--set", "epochs=500", "--set", "pre_seq_len=32",
                                     "--set", "prefix_projection=true", "--set", "warmup_ratio=0"], 1),
}


@pytest.mark.parametrize("method", list(TRAIN))
def test_trained_model_reproduces_what_it_memorised(tiny_base, tmp_path, method):
    recipe, settings, count = TRAIN[method]
    examples = EXAMPLES[:count]
    data = tmp_path / "memorise.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "input": "", "output": a}, ensure_ascii=False) + "\n"
                            for q, a in examples), encoding="utf-8")
    out = tmp_path / f"run-{method}"
    r = run("train", recipe, "--profile", "cpu-demo", "--method", method, "--base", tiny_base, "--data", data,
            "--val-size", "0", "--output-dir", out, "--name", f"mem-{method}", "--quiet", *settings)
    assert r.exit_code == 0, r.output
    trained = r.output
    for question, answer in examples:
        r = run("chat", f"mem-{method}", "-p", question, "--greedy", "--json")
        assert r.exit_code == 0, r.output
        assert json.loads(r.output)["answer"] == answer, (method, question, trained.replace(str(tiny_base), "BASE")[-300:])
