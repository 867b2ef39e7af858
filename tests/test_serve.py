"""`medzoo serve`: the OpenAI-compatible API, tested with the real `openai` client against a real server."""
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

QUESTION = "偏头痛有哪些症状？"
GREEDY = {"temperature": 0, "max_tokens": 24}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A uvicorn server for one app in a background thread."""

    def __init__(self, app):
        from medzoo.serve import server

        self.port = free_port()
        self.server = server(app, "127.0.0.1", self.port, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def lm(tiny_models):
    from medzoo.modeling import load_model

    return load_model(str(tiny_models["lora"]))


@pytest.fixture(scope="module")
def api(lm):
    from medzoo.serve import create_app

    server = Server(create_app(lm, model_id="tiny-lora"))
    yield server
    server.stop()


@pytest.fixture()
def client(api):
    from openai import OpenAI

    return OpenAI(base_url=api.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def direct(lm, query, history=(), **settings):
    from medzoo import generate

    return generate.generate(lm, query, history, **settings).text


def test_models_and_completion_match_the_shared_generation_path(client, lm):
    assert [m.id for m in client.models.list().data] == ["tiny-lora"]
    r = client.chat.completions.create(model="tiny-lora", messages=[{"role": "user", "content": QUESTION}], **GREEDY)
    expected = direct(lm, QUESTION, temperature=0, max_new_tokens=24)
    assert expected and r.choices[0].message.content == expected
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(lm.tokenizer(lm.template.render(QUESTION)).input_ids)
    assert r.usage.completion_tokens > 0


def test_streaming_gives_the_same_answer_in_pieces(client, lm):
    stream = client.chat.completions.create(model="tiny-lora", messages=[{"role": "user", "content": QUESTION}],
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"num_beams": 1}, **GREEDY)
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    expected = direct(lm, QUESTION, temperature=0, num_beams=1, max_new_tokens=24)
    assert "".join(pieces) == expected
    assert len(pieces) > 1  # really streamed, not one block
    assert finish in ("stop", "length") and usage.completion_tokens > 0


def test_raw_sse_framing(api):
    body = {"model": "tiny-lora", "messages": [{"role": "user", "content": QUESTION}], "stream": True,
            "num_beams": 1, **GREEDY}
    with httpx.stream("POST", api.url + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0][6:])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"


def test_history_and_system_follow_the_template(client, lm):
    messages = [{"role": "system", "content": "你是医生。"}, {"role": "user", "content": "头痛怎么办？"},
                {"role": "assistant", "content": "注意休息。"}, {"role": "user", "content": QUESTION}]
    r = client.chat.completions.create(model="tiny-lora", messages=messages, **GREEDY)
    expected = direct(lm, "你是医生。\n" + QUESTION, [("头痛怎么办？", "注意休息。")], temperature=0,
                      max_new_tokens=24)
    assert r.choices[0].message.content == expected


def test_concurrent_requests_are_queued_and_all_answered(client, lm):
    expected = direct(lm, QUESTION, temperature=0, num_beams=1, max_new_tokens=24)

    def ask(i):
        kwargs = dict(model="tiny-lora", messages=[{"role": "user", "content": QUESTION}],
                      extra_body={"num_beams": 1}, **GREEDY)
        if i % 2:
            return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                stream=True, **kwargs) if c.choices)
        return client.chat.completions.create(**kwargs).choices[0].message.content

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask, range(6)))
    assert answers == [expected] * 6


def test_bad_requests_get_json_errors_and_the_server_keeps_serving(client, api):
    import openai

    user = [{"role": "user", "content": QUESTION}]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=user)
    assert e.value.body["code"] == "model_not_found" and "tiny-lora" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-lora", messages=[{"role": "user", "content": "  "}])
    assert e.value.body["code"] == "empty_prompt"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-lora", messages=[{"role": "user", "content": "头痛" * 3000}])
    assert e.value.body["code"] == "context_length_exceeded" and "1024" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-lora", messages=user + [{"role": "assistant", "content": "x"}])
    assert "last message" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-lora", messages=user, max_tokens=0)
    assert "max_new_tokens" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-lora", messages=user, n=2)
    with pytest.raises(openai.BadRequestError) as e:  # too long with stream: refused before the stream starts
        client.chat.completions.create(model="tiny-lora", messages=[{"role": "user", "content": "痛" * 3000}],
                                       stream=True)
    assert e.value.status_code == 400

    for method, path, body in [("POST", "/v1/chat/completions", b"{not json"),
                               ("POST", "/v1/chat/completions", b"[1, 2]"),
                               ("GET", "/v1/nothing-here", None), ("DELETE", "/v1/models", None)]:
        r = httpx.request(method, api.url + path, content=body, timeout=30)
        assert 400 <= r.status_code < 500, (path, r.status_code)
        error = r.json()["error"]
        assert error["message"] and "Traceback" not in r.text

    r = client.chat.completions.create(model="tiny-lora", messages=user, **GREEDY)  # still serving
    assert r.choices[0].message.content


def test_api_key(lm):
    import openai
    from openai import OpenAI

    from medzoo.serve import create_app

    server = Server(create_app(lm, api_key="s3cret", model_id="tiny-lora"))
    try:
        r = httpx.get(server.url + "/v1/models", timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = OpenAI(base_url=server.url + "/v1", api_key="s3cret", max_retries=0, timeout=120)
        assert good.models.list().data[0].id == "tiny-lora"
    finally:
        server.stop()


def test_serve_command_binds_localhost(tiny_models, tiny_base):
    port = free_port()
    env = dict(os.environ, MEDZOO_TINY=str(tiny_base))
    proc = subprocess.Popen([sys.executable, "-m", "medzoo.cli", "serve", str(tiny_models["freeze"]),
                             "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "medzoo serve did not come up"
                time.sleep(0.5)
        assert r.json()["data"][0]["id"] == "freeze"
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120,
                       json={"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 8})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
        host = socket.gethostbyname(socket.gethostname())
        if host != "127.0.0.1":  # bound to loopback only: another address of this machine is refused
            with pytest.raises(httpx.TransportError):
                httpx.get(f"http://{host}:{port}/v1/models", timeout=5)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_refuses_bad_models_before_binding(tiny_models, tmp_path):
    import shutil

    from click.testing import CliRunner

    from medzoo.cli import main

    bad = tmp_path / "bad"
    shutil.copytree(tiny_models["lora"], bad)
    (bad / "adapter" / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    for model, words in [("no-such-model", "no-such-model"), (str(bad), "corrupt")]:
        r = CliRunner().invoke(main, ["serve", model, "--port", str(free_port())])
        assert r.exit_code == 2 and words in r.output and "Traceback" not in r.output
