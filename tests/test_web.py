"""`medzoo web`: the gradio page in a real headless browser (Debian's chromium driven by playwright), plus its
streaming endpoint through gradio's own client. `bash tools/install-test-deps.sh` installs both."""
import shutil
import socket
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from medzoo.cli import main

ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
QUESTION = "偏头痛有哪些症状？"
SETTINGS = {"num_beams": 1, "do_sample": False, "max_new_tokens": 48}  # greedy: one answer to compare with


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lm(tiny_models):
    from medzoo.modeling import load_model

    loaded = load_model(str(tiny_models["lora"]))
    return replace(loaded, generation=dict(loaded.generation, **SETTINGS))  # the page starts from these


@pytest.fixture(scope="module")
def page_url(lm):
    from medzoo import webui

    demo = webui.build(lm)
    webui.launch(demo, port=free_port(), block=False)
    yield demo.local_url
    demo.close()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"chromium missing at {CHROMIUM}: run `bash tools/install-test-deps.sh`")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


def expected(lm, use_base=False):
    from medzoo import generate

    return generate.generate(lm, QUESTION, use_base=use_base, **SETTINGS).text


def last_bot_text(page, chat_id):
    return page.locator(f'#{chat_id} [data-testid="bot"]').last.inner_text().strip()


def ask(page, question):
    box = page.locator("#query textarea")
    box.fill(question)
    box.press("Enter")


def test_page_streams_an_answer_in_chinese(browser, page_url, lm):
    page = browser.new_page(viewport={"width": 1280, "height": 900}, locale="zh-CN")
    page.goto(page_url)
    page.locator("#query textarea").wait_for(timeout=60_000)
    assert "bentsao-med" in page.content() and "示例问题" in page.content()
    # record every text the tuned chat shows while the answer arrives
    page.evaluate("""() => {
        window.seen = [];
        const root = document.querySelector('#tuned-chat');
        new MutationObserver(() => {
            const bots = root.querySelectorAll('[data-testid="bot"]');
            if (bots.length) window.seen.push(bots[bots.length - 1].innerText.trim());
        }).observe(root, {subtree: true, childList: true, characterData: true});
    }""")
    ask(page, QUESTION)
    want = expected(lm)
    page.wait_for_function("want => window.seen.includes(want)", arg=want, timeout=120_000)
    assert last_bot_text(page, "tuned-chat") == want
    assert QUESTION in page.locator("#tuned-chat").inner_text()
    seen = [s for s in page.evaluate("window.seen") if s]
    assert any(want.startswith(s) and s != want for s in seen), seen  # partial answers were shown: streamed
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-chat.png"), full_page=True)
    page.close()


def test_side_by_side_asks_the_base_without_the_adapter(browser, page_url, lm):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(page_url)
    page.locator("#query textarea").wait_for(timeout=60_000)
    page.locator("#compare input").check()
    page.locator("#base-chat").wait_for(state="visible", timeout=30_000)
    ask(page, QUESTION)
    base_want = expected(lm, use_base=True)
    page.wait_for_function(
        "want => { const b = document.querySelectorAll('#base-chat [data-testid=bot]');"
        " return b.length && b[b.length - 1].innerText.trim() === want; }", arg=base_want, timeout=120_000)
    assert last_bot_text(page, "tuned-chat") == expected(lm)
    assert base_want != expected(lm)  # the adapter really was switched off for the base column
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-side-by-side.png"), full_page=True)
    page.close()


def test_bad_prompts_show_a_message_and_the_page_keeps_working(browser, page_url, lm):
    page = browser.new_page()
    page.goto(page_url)
    page.locator("#query textarea").wait_for(timeout=60_000)
    ask(page, "头痛" * 3000)
    page.get_by_text("prompt too long").first.wait_for(timeout=60_000)
    assert "Traceback" not in page.content()
    ask(page, QUESTION)
    want = expected(lm)
    page.wait_for_function(
        "want => { const b = document.querySelectorAll('#tuned-chat [data-testid=bot]');"
        " return b.length && b[b.length - 1].innerText.trim() === want; }", arg=want, timeout=120_000)
    page.close()


def test_streaming_endpoint_yields_partial_answers(page_url, lm):
    from gradio_client import Client

    client = Client(page_url, verbose=False)
    job = client.submit(QUESTION, False, 0.0, 0.75, 40, 1, 48, False, api_name="/ask")
    final = job.result(timeout=120)
    texts = [out[1][-1]["content"][0]["text"] for out in job.outputs() if out[1]]
    assert final[1][-1]["content"][0]["text"] == expected(lm)
    assert len(set(texts)) > 2  # many intermediate updates, not one final block


def test_auth_and_localhost(lm):
    import httpx

    from medzoo import webui

    demo = webui.build(lm)
    webui.launch(demo, port=free_port(), block=False, auth=("doctor", "s3cret"))
    try:
        assert demo.local_url.startswith("http://127.0.0.1:")
        assert demo.share_url is None
        assert httpx.get(demo.local_url + "config", timeout=30).status_code == 401
        with httpx.Client(base_url=demo.local_url, timeout=30) as http:
            assert http.post("login", data={"username": "doctor", "password": "wrong"}).status_code >= 400
            assert http.post("login", data={"username": "doctor", "password": "s3cret"}).status_code == 200
            assert http.get("config").status_code == 200
    finally:
        demo.close()


def test_web_command_errors(tiny_models):
    for args, words in [(["web", "no-such-model"], "no-such-model"),
                        (["web", str(tiny_models["lora"]), "--auth", "nopassword"], "USER:PASSWORD")]:
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 2 and words in r.output and "Traceback" not in r.output
