"""The data layer: bundled samples, file reading with line numbers, bad rows, mixing, splitting, tokenization.

Registry-driven: every registered dataset's sample must load through its format. Tokenization is checked
with real tokenizers trained here on the sample texts (a Llama-like one that puts BOS in front, and a
ChatGLM-like one that appends ``[gMASK] <sop>``).
"""
import csv
import json

import pytest

from medzoo.data import formats
from medzoo.data.load import load_data, load_file, load_registered, parse_data, repeats, split, to_dataset
from medzoo.data.tokenize import IGNORE_INDEX, encode_example, encode_prompt, tokenize_dataset
from medzoo.host import catalog
from medzoo.objects import MedzooError

CAT = catalog()
GOOD = [{"instruction": f"问题{i}：高血压患者要注意什么？", "input": "", "output": f"回答{i}：低盐饮食，规律服药。",
         "history": []} for i in range(4)]


# ---------------------------------------------------------------- samples of every registered dataset
@pytest.mark.parametrize("name", sorted(CAT.datasets))
def test_sample_loads_through_its_format(name):
    spec = CAT.datasets[name]
    assert spec.sample, f"dataset {name!r} ships no sample"
    loaded = load_registered(spec, use_sample=True, catalog=CAT)
    assert loaded.skipped == 0 and len(loaded.conversations) >= 100
    for conv in loaded.conversations:
        assert conv["query"].strip() and conv["response"].strip()
        assert conv["_line"] >= 1 and conv["_file"].endswith(spec.sample.split("/")[-1])
    rows = len(loaded.conversations)
    distinct = {(c["query"], c["response"], json.dumps(c["history"])) for c in loaded.conversations}
    assert len(distinct) > 0.9 * rows  # varied rows, not one row repeated


def test_samples_keep_their_originals_shape():
    conv = {n: load_registered(CAT.datasets[n], use_sample=True, catalog=CAT).conversations for n in CAT.datasets}
    assert all(2 <= len(c["history"]) + 1 <= 4 for c in conv["huatuo-liver-cancer"])
    with_history = sum(bool(c["history"]) for c in conv["merged-cMedQA"]) / len(conv["merged-cMedQA"])
    assert 0.05 < with_history < 0.3
    assert not any(c["query"].startswith("问题：") for c in conv["huatuo-kg-context"])  # bare questions


def test_full_data_that_is_not_released_is_refused():
    with pytest.raises(MedzooError, match="qinggeng-dialogue.*not available"):
        load_registered(CAT.datasets["qinggeng-dialogue"], use_sample=False, catalog=CAT)


# ---------------------------------------------------------------- bad rows name file, line and field
def write(tmp_path, kind, rows, raw=None):
    """Write rows as a JSON list (one object over several lines), JSON lines or CSV; ``raw`` replaces the
    text of one row (index -> text). Returns (path, the line where each row starts)."""
    path = tmp_path / f"data.{ {'json': 'json', 'jsonl': 'jsonl', 'csv': 'csv'}[kind] }"
    raw = raw or {}
    starts = []
    if kind == "csv":
        lines = ["instruction,input,output,history"]
        for i, row in enumerate(rows):
            starts.append(len(lines) + 1)
            if i in raw:
                lines.append(raw[i])
                continue
            cells = [row.get(k, "") for k in ("instruction", "input", "output")] + [json.dumps(row.get("history", []))]
            out = []
            csv.writer(_Lines(out)).writerow(cells)
            lines.append(out[0].rstrip("\r\n"))
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif kind == "jsonl":
        lines = [raw.get(i) or json.dumps(r, ensure_ascii=False) for i, r in enumerate(rows)]
        starts = list(range(1, len(rows) + 1))
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    else:
        text, line = "[\n", 2
        for i, row in enumerate(rows):
            chunk = raw.get(i) or json.dumps(row, ensure_ascii=False, indent=1)
            starts.append(line)
            text += chunk + (",\n" if i < len(rows) - 1 else "\n")
            line += chunk.count("\n") + 1
        path.write_text(text + "]\n", encoding="utf-8")
    return path, starts


class _Lines:
    def __init__(self, out):
        self.out = out

    def write(self, s):
        self.out.append(s)


BAD = {  # problem -> (row for JSON kinds, raw CSV line, expected message)
    "missing field": ({"instruction": "头痛怎么办？", "input": ""}, "头痛怎么办？,", "field 'output': missing"),
    "wrong type": ({"instruction": "头痛怎么办？", "output": {"text": "休息"}}, '头痛怎么办？,,休息,5',
                   None),
    "empty answer": ({"instruction": "头痛怎么办？", "output": "   "}, "头痛怎么办？,,   ,[]", "field 'output': is empty"),
    "broken JSON": (None, '头痛怎么办？,,休息,"[[""a"", ""b""]"', None),
}


@pytest.mark.parametrize("kind", ["json", "jsonl", "csv"])
@pytest.mark.parametrize("problem", sorted(BAD))
def test_bad_row_names_file_line_and_field(tmp_path, kind, problem):
    row, csv_line, message = BAD[problem]
    rows = GOOD[:2] + [row or GOOD[0]] + GOOD[2:]
    raw = {}
    if kind == "csv":
        raw[2] = csv_line
    elif row is None:
        raw[2] = '{"instruction": "头痛怎么办？", "output": "休息"'  # the closing brace is lost
    path, starts = write(tmp_path, kind, rows, raw)
    if message is None:
        message = {("wrong type", "csv"): "field 'history': expected a list",
                   ("broken JSON", "csv"): "field 'history': not valid JSON"}.get(
            (problem, kind), "field 'output': expected text, got dict" if problem == "wrong type" else "not valid JSON")
    with pytest.raises(MedzooError) as err:
        load_file(path, "alpaca", catalog=CAT)
    assert str(err.value).startswith(f"{path}:{starts[2]}: {message}"), str(err.value)
    assert "\n" not in str(err.value)

    loaded = load_file(path, "alpaca", skip_bad_rows=True, catalog=CAT)
    assert loaded.skipped == 1 and loaded.problems[0].startswith(f"{path}:{starts[2]}:")
    assert [c["_line"] for c in loaded.conversations] == [s for i, s in enumerate(starts) if i != 2]
    assert [c["response"] for c in loaded.conversations] == [r["output"] for i, r in enumerate(rows) if i != 2]


def test_csv_row_with_extra_cells_and_history_cells(tmp_path):
    path, starts = write(tmp_path, "csv", GOOD[:1] + [dict(GOOD[1], history=[["上次问的", "上次答的"]])] + GOOD[2:],
                         raw={2: "a,,b,[],extra"})
    with pytest.raises(MedzooError, match=rf"^{path}:{starts[2]}: 1 more cells than the header"):
        load_file(path, catalog=CAT)
    loaded = load_file(path, skip_bad_rows=True, catalog=CAT)
    assert loaded.conversations[1]["history"] == [["上次问的", "上次答的"]]


def test_json_list_that_is_not_closed(tmp_path):
    path = tmp_path / "cut.json"
    path.write_text("[\n" + json.dumps(GOOD[0], ensure_ascii=False) + ",\n", encoding="utf-8")
    with pytest.raises(MedzooError, match=rf"^{path}:3: not valid JSON: the list is not closed"):
        load_file(path, catalog=CAT)


def test_history_pairs_are_checked(tmp_path):
    path, starts = write(tmp_path, "jsonl", GOOD[:1] + [dict(GOOD[1], history=[["只有问题"]])])
    with pytest.raises(MedzooError, match=rf"^{path}:2: field 'history\[0\]': expected a \[query, response\] pair"):
        load_file(path, catalog=CAT)


# ---------------------------------------------------------------- formats, columns, --data parsing
@pytest.mark.parametrize("row,fmt", [
    ({"instruction": "q", "input": "", "output": "a"}, "alpaca"),
    ({"question": "q", "answer": "a"}, "cmedqa2"),
    ({"input": "q", "output": "a"}, "input-output"),
    ({"context": "q", "target": "a"}, "context-target"),
    ({"prompt": "q", "query": "", "response": "a"}, "prompt-query-response"),
    ({"turns": [{"user": "q", "bot": "a"}]}, "dialogue"),
])
def test_format_is_inferred_from_fields(tmp_path, row, fmt):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    conv = load_file(path, catalog=CAT).conversations[0]
    assert (conv["query"], conv["response"]) == ("q", "a")
    assert parse_data(f"{path}:{fmt}", CAT)[0].format == fmt


def test_unknown_fields_and_names_are_errors(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"q": "x", "a": "y"}\n', encoding="utf-8")
    with pytest.raises(MedzooError, match=rf"^{path}:1: fields \['a', 'q'\] match no registered data format"):
        load_file(path, catalog=CAT)
    with pytest.raises(MedzooError, match="'no-such-format' is not a registered data format"):
        parse_data(f"{path}:no-such-format", CAT)
    with pytest.raises(MedzooError, match="did you mean 'huatuo-kg'"):
        parse_data("huatuo-gk", CAT)
    with pytest.raises(MedzooError, match="'x' after '\\*' is not a number"):
        parse_data("huatuo-kg*x", CAT)


def test_column_mapping(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps([{"问": "胃痛怎么办？", "答": "先规律饮食。", "补充": "饭后痛"}], ensure_ascii=False),
                    encoding="utf-8")
    columns = {"instruction": "问", "input": "补充", "output": "答"}
    conv = load_file(path, columns=columns, catalog=CAT).conversations[0]
    assert conv["query"] == "胃痛怎么办？\n饭后痛" and conv["response"] == "先规律饮食。"
    path.write_text(json.dumps([{"问": "胃痛怎么办？", "答": ""}], ensure_ascii=False), encoding="utf-8")
    with pytest.raises(MedzooError, match=rf"^{path}:1: field '答': is empty"):  # the file's own column name
        load_file(path, "alpaca", columns=columns, catalog=CAT)


def test_merged_cmedqa_columns_reach_the_prompt_query_response_format():
    spec = CAT.datasets["merged-cMedQA"]
    assert spec.format == "prompt-query-response" and spec.columns["prompt"] == "instruction"
    convs = load_registered(spec, use_sample=True, catalog=CAT).conversations
    raw = json.loads((__import__("importlib").resources.files(spec.package) / spec.sample).read_text("utf-8"))
    assert [c["query"] for c in convs] == [formats.join(r["instruction"], r["input"]) for r in raw]
    assert [c["history"] for c in convs] == [r["history"] for r in raw]


def test_context_already_wrapped_in_the_med_chatglm_template_is_unwrapped():
    assert formats.context_target({"context": "问题：胃溃疡怎么治疗？\n回答: ", "target": "t"})["query"] == "胃溃疡怎么治疗？"
    assert formats.context_target({"context": "胃溃疡怎么治疗？", "target": "t"})["query"] == "胃溃疡怎么治疗？"


# ---------------------------------------------------------------- mixing and validation split
def many(tmp_path, name, n):
    path = tmp_path / name
    path.write_text("".join(json.dumps({"input": f"{name} 问题 {i}", "output": f"回答 {i}"}, ensure_ascii=False) + "\n"
                            for i in range(n)), encoding="utf-8")
    return str(path)


def test_mixing_ratios(tmp_path):
    a, b = many(tmp_path, "a.jsonl", 100), many(tmp_path, "b.jsonl", 40)
    data = load_data(f"{a}*0.5,{b}*2.5", catalog=CAT, seed=7)
    assert data.counts == {f"{a}*0.5": 50, f"{b}*2.5": 100} and len(data.train) == 150
    files = data.train["_file"]
    assert files.count(a) == 50 and files.count(b) == 100
    assert len({(f, ln) for f, ln in zip(files, data.train["_line"]) if f == a}) == 50  # a subset, no repeats
    again = load_data(f"{a}*0.5,{b}*2.5", catalog=CAT, seed=7)
    assert again.train["_line"] == data.train["_line"]
    assert repeats(10, 2.0, 0) == list(range(10)) and len(repeats(10, 1.5, 0)) == 5 and repeats(10, 1.0, 0) == []


def test_validation_split_sizes_and_no_leak_through_repeats(tmp_path):
    a, b = many(tmp_path, "a.jsonl", 100), many(tmp_path, "b.jsonl", 20)
    data = load_data([a, f"{b}*3"], val_size=12, seed=1, catalog=CAT)
    assert len(data.val) == 12
    train_rows = set(zip(data.train["_file"], data.train["_line"]))
    val_rows = set(zip(data.val["_file"], data.val["_line"]))
    assert not train_rows & val_rows
    assert len(train_rows) + len(val_rows) == 120
    b_train = sum(1 for f in data.train["_file"] if f == b)
    assert b_train == 3 * sum(1 for f, _ in train_rows if f == b)

    ds = to_dataset(load_file(a, catalog=CAT).conversations)
    assert len(split(ds, 0.1, seed=3)[1]) == 10 and split(ds, 0, seed=3)[1] is None
    assert split(ds, 10, seed=3)[1]["_line"] == split(ds, 10, seed=3)[1]["_line"]
    assert split(ds, 10, seed=3)[1]["_line"] != split(ds, 10, seed=4)[1]["_line"]
    with pytest.raises(MedzooError, match="val_size 100 is not less than the 100 rows"):
        split(ds, 100, seed=3)


def test_skipped_rows_are_counted_across_sources(tmp_path):
    a = many(tmp_path, "a.jsonl", 10)
    path, _ = write(tmp_path, "jsonl", GOOD + [{"instruction": "x", "output": ""}])
    data = load_data([a, str(path)], skip_bad_rows=True, catalog=CAT)
    assert data.skipped == 1 and len(data.train) == 14 and data.problems[0].startswith(f"{path}:5:")
    with pytest.raises(MedzooError, match=rf"^{path}:5: field 'output': is empty"):
        load_data([a, str(path)], catalog=CAT)


# ---------------------------------------------------------------- tokenization
def _train_tokenizer(suffix: bool):
    """A small byte-level BPE trained on the bundled samples; Llama-like (BOS in front) or ChatGLM-like
    (``[gMASK] <sop>`` after the prompt, ``<eop>`` as eos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    for spec in CAT.datasets.values():
        for conv in load_registered(spec, use_sample=True, catalog=CAT).conversations[:60]:
            texts += [conv["query"], conv["response"]]
    specials = ["<unk>", "<pad>", "<s>", "</s>", "[gMASK]", "<sop>", "<eop>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1500, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    ids = {s: tok.token_to_id(s) for s in specials}
    if suffix:
        tok.post_processor = processors.TemplateProcessing(
            single="$A [gMASK] <sop>", special_tokens=[("[gMASK]", ids["[gMASK]"]), ("<sop>", ids["<sop>"])])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<sop>", eos_token="<eop>", pad_token="<pad>",
                                       unk_token="<unk>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", ids["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def llama_tok():
    return _train_tokenizer(suffix=False)


@pytest.fixture(scope="module")
def glm_tok():
    return _train_tokenizer(suffix=True)


def _convs(name, n=40):
    return load_registered(CAT.datasets[name], use_sample=True, catalog=CAT).conversations[:n]


@pytest.mark.parametrize("template,dataset,tok", [
    ("bentsao-med", "huatuo-kg", "llama_tok"), ("bentsao-literature", "huatuo-liver-cancer", "llama_tok"),
    ("chatglm-6b", "merged-cMedQA", "glm_tok"), ("qinggeng", "qinggeng-book-qa", "glm_tok"),
    ("med-chatglm", "huatuo-kg-context", "glm_tok")])
def test_encode_example_masks_exactly_the_prompt(request, template, dataset, tok):
    tok = request.getfixturevalue(tok)
    tpl = CAT.templates[template]
    for conv in _convs(dataset, 30 if dataset != "merged-cMedQA" else 300):
        ex = encode_example(tpl, tok, conv, cutoff_len=4096)
        prompt = encode_prompt(tpl, tok, conv["query"], conv["history"])  # one source of truth
        n = len(prompt)
        assert ex["input_ids"][:n] == prompt
        assert ex["labels"][:n] == [IGNORE_INDEX] * n
        assert ex["labels"][n:] == ex["input_ids"][n:] and IGNORE_INDEX not in ex["labels"][n:]
        assert ex["input_ids"][-1] == tok.eos_token_id and ex["input_ids"].count(tok.eos_token_id) == 1
        assert tok.decode(ex["input_ids"][n:-1]) == conv["response"]
        if tok is request.getfixturevalue("glm_tok"):
            assert prompt[-2:] == tok.convert_tokens_to_ids(["[gMASK]", "<sop>"])
        else:
            assert prompt[0] == tok.bos_token_id
        for _, past_answer in conv["history"]:  # earlier answers are prompt, not loss
            assert past_answer in tok.decode(prompt)
        whole = encode_example(tpl, tok, conv, cutoff_len=4096, train_on_inputs=True)
        assert whole["labels"] == whole["input_ids"] == ex["input_ids"]


def test_cutoff_len_is_a_row_error(llama_tok):
    tpl, conv = CAT.templates["bentsao-med"], _convs("huatuo-kg", 1)[0]
    n = len(encode_example(tpl, llama_tok, conv, cutoff_len=4096)["input_ids"])
    assert len(encode_example(tpl, llama_tok, conv, cutoff_len=n)["input_ids"]) == n
    with pytest.raises(formats.RowError, match=rf"field 'output': {n} tokens with the prompt exceed cutoff_len {n - 1}"):
        encode_example(tpl, llama_tok, conv, cutoff_len=n - 1)


def test_source_and_target_truncation(llama_tok, glm_tok):
    tpl = CAT.templates["bentsao-literature"]
    conv = next(c for c in _convs("huatuo-liver-cancer", 200) if len(c["history"]) == 2)
    ex = encode_example(tpl, llama_tok, conv, cutoff_len=4096, max_source_length=20, max_target_length=10)
    n = ex["labels"].count(IGNORE_INDEX)
    assert n == 20 + 1 and ex["input_ids"][0] == llama_tok.bos_token_id  # BOS is not counted
    assert llama_tok.decode(ex["input_ids"][1:n]).endswith("\n\n### 回复:\n")  # the answer marker survives
    assert len(ex["input_ids"]) - n == 10 + 1 and ex["input_ids"][-1] == llama_tok.eos_token_id
    assert encode_example(tpl, llama_tok, conv, 4096, max_source_length=10_000) == encode_example(tpl, llama_tok, conv, 4096)

    tpl = CAT.templates["chatglm-6b"]
    conv = next(c for c in _convs("merged-cMedQA", 300) if len(c["history"]) == 2)
    later = [tuple(p) for p in conv["history"][1:]]
    # a limit the prompt without its oldest turn fits in drops that turn whole
    limit = len(glm_tok(tpl.render(conv["query"], later), add_special_tokens=False).input_ids)
    cut = encode_example(tpl, glm_tok, conv, cutoff_len=4096, max_source_length=limit)
    assert cut["input_ids"][:cut["labels"].count(IGNORE_INDEX)] == encode_prompt(tpl, glm_tok, conv["query"], later)
    tight = encode_example(tpl, glm_tok, conv, cutoff_len=4096, max_source_length=3)
    prompt = tight["input_ids"][:tight["labels"].count(IGNORE_INDEX)]
    assert len(prompt) == 3 + 2 and prompt[-2:] == glm_tok.convert_tokens_to_ids(["[gMASK]", "<sop>"])


def test_tokenize_dataset_reports_file_and_line(tmp_path, llama_tok):
    path, _ = write(tmp_path, "jsonl", GOOD + [dict(GOOD[0], output="很长的回答。" * 80)])
    data = load_data(str(path), catalog=CAT)
    tpl = CAT.templates["bentsao-med"]
    with pytest.raises(MedzooError, match=rf"^{path}:5: field 'output': \d+ tokens with the prompt exceed cutoff_len 128"):
        tokenize_dataset(data.train, tpl, llama_tok, 128)
    out = tokenize_dataset(data.train, tpl, llama_tok, 128, skip_bad_rows=True, cache_dir=tmp_path / "cache")
    assert out.skipped == 1 and out.problems[0].startswith(f"{path}:5:")
    assert len(out.dataset) == 4 and set(out.dataset.column_names) == {"input_ids", "labels", "length", "_file", "_line"}
    first = out.dataset[0]
    conv = load_file(path, catalog=CAT).conversations[first["_line"] - 1]
    assert first["input_ids"] == encode_example(tpl, llama_tok, conv, 128)["input_ids"]
    assert first["length"] == len(first["input_ids"])
    assert list((tmp_path / "cache").glob("tokenized-*.arrow"))


def test_tokenize_dataset_in_two_processes_matches_one(llama_tok):
    from medzoo.data.load import load_registered

    ds = to_dataset(load_registered(CAT.datasets["huatuo-kg"], use_sample=True, catalog=CAT).conversations[:60])
    tpl = CAT.templates["bentsao-med"]
    one = tokenize_dataset(ds, tpl, llama_tok, 256, num_proc=1).dataset
    two = tokenize_dataset(ds, tpl, llama_tok, 256, num_proc=2).dataset
    assert one["input_ids"] == two["input_ids"] and one["labels"] == two["labels"]


# ---------------------------------------------------------------- history rendering of the seed templates
def test_chatglm_6b_history_rendering():
    tpl = CAT.templates["chatglm-6b"]
    assert tpl.render("头痛怎么办？") == "头痛怎么办？"
    assert tpl.render("要吃药吗？", [("头痛怎么办？", "先休息。"), ("还晕呢？", "测个血压。")]) == (
        "[Round 0]\n问：头痛怎么办？\n答：先休息。\n[Round 1]\n问：还晕呢？\n答：测个血压。\n[Round 2]\n问：要吃药吗？\n答：")


def test_bentsao_literature_history_rendering():
    tpl = CAT.templates["bentsao-literature"]
    head = "以下是描述任务的说明，编写适当地回复完成请求的响应。\n\n ### 说明:\n"
    assert tpl.render("肝癌如何筛查？") == head + "肝癌如何筛查？\n\n### 回复:\n"
    conv = next(c for c in _convs("huatuo-liver-cancer", 200) if len(c["history"]) == 2)
    (q0, a0), (q1, a1) = conv["history"]
    assert tpl.render(conv["query"], conv["history"]) == (
        f"{head}<user>: {q0} <bot>: {a0} <user>: {q1} <bot>: {a1} <user>: {conv['query']}\n\n### 回复:\n")
    # the bentsao-med template keeps no history: only the current question is asked
    assert CAT.templates["bentsao-med"].render("q", [("a", "b")]) == CAT.templates["bentsao-med"].render("q")
