"""The chat page of `zhlm serve`, driven in headless Chromium: the key it asks for, streamed
answers equal to the API's greedy ones, the conversation's history, and a refused key.

Playwright drives the system's Chromium (Debian's `chromium`; Playwright downloads no browser
here): its locators wait for the page by themselves, so the test needs no sleeps or polling.
Without Playwright or Chromium the browser tests are skipped, saying which is missing.
"""
import json
import re
import shutil

import httpx
import pytest
from test_serve import KEY, serving

from zhlm.serve import create_app

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SYSTEM = "简短回答。"
MAX_TOKENS = 16  # two turns must fit the tiny model's 128-token context
CHROMIUMS = ("chromium", "chromium-browser", "google-chrome")


@pytest.fixture(scope="module")
def base_url(model_dir):
    """`zhlm serve` with an API key."""
    with serving(create_app(model_dir, api_key=KEY)) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[test])")
    executable = next(filter(None, map(shutil.which, CHROMIUMS)), None)
    if executable is None:
        pytest.skip(f"no Chromium to drive: none of {', '.join(CHROMIUMS)} is installed (apt-get install chromium)")
    sync_api.expect.set_options(timeout=30_000)  # a busy CI machine decodes slowly
    with sync_api.sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=executable, timeout=30_000)
        except sync_api.Error as e:
            pytest.skip(f"Chromium ({executable}) cannot start: {launch_failure(e)}")
        yield browser
        browser.close()


def launch_failure(error) -> str:
    """Playwright's own line, and the last lines Chromium wrote to stderr before it died."""
    text = str(error)
    said = re.findall(r"^\[pid=\d+\]\[err\] (.*)$", text.split("Call log:")[0], re.MULTILINE)
    return "; ".join([text.strip().splitlines()[0], *said[-3:]])


@pytest.fixture
def page(browser, base_url):
    """The chat page, loaded; page.urls lists every URL it requested."""
    page = browser.new_page(viewport={"width": 1000, "height": 700})
    page.urls = []
    page.on("request", lambda request: page.urls.append(request.url))
    assert page.goto(f"{base_url}/").status == 200
    yield page
    page.close()


def test_a_server_without_a_key_is_not_asked_for_one(browser, model_dir):
    from playwright.sync_api import expect

    with serving(create_app(model_dir)) as url:
        page = browser.new_page()
        page.goto(f"{url}/")
        expect(page.locator("#model")).to_have_text(model_dir.name)  # the page has asked the server
        expect(page.locator("#key")).to_be_hidden()
        page.close()


def api_answer(base_url, messages):
    """The API's greedy answer to `messages`, not streamed."""
    body = {"messages": messages, "temperature": 0, "max_tokens": MAX_TOKENS}
    r = httpx.post(f"{base_url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def send(page, text):
    """Type `text` and press Enter; the response to the request the page made."""
    page.fill("#input", text)
    with page.expect_response("**/v1/chat/completions") as response:
        page.press("#input", "Enter")
    return response.value


def test_the_page_needs_no_key_and_everything_else_still_does(base_url):
    page = httpx.get(f"{base_url}/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "connect-src 'self'" in page.headers["content-security-policy"]  # it talks to this server only
    assert "v1/chat/completions" in page.text
    for path in ("/v1/models", "/docs", "/index.html"):
        assert httpx.get(f"{base_url}{path}", timeout=10).status_code == 401, path


def test_a_conversation_in_the_browser(page, base_url, tmp_path):
    from playwright.sync_api import expect

    expect(page.locator("#key")).to_be_visible()  # the server has a key: the page asks for it
    page.fill("#key", KEY)
    page.fill("#system", SYSTEM)
    page.fill("#temperature", "0")
    page.fill("#max-tokens", str(MAX_TOKENS))
    # With the key, the page shows the model's name.
    name = httpx.get(f"{base_url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"][0]["id"]
    expect(page.locator("#model")).to_have_text(name)
    answers = page.locator(".msg.assistant")
    history = [{"role": "system", "content": SYSTEM}]
    for turn, question in enumerate(["这个手机怎么样？", "电池耐用吗？"], 1):
        if turn == 2:  # a wrong key is refused: the error shows, and the turn is taken back to retry
            page.fill("#key", "wrong-key")
            assert send(page, question).status == 401
            expect(page.locator("#error")).to_contain_text("missing or incorrect API key")
            expect(page.locator("#input")).to_have_value(question)
            expect(page.locator(".msg.user")).to_have_count(1)
            expect(answers).to_have_count(1)
            screenshot = tmp_path / "chat_page.png"
            page.screenshot(path=screenshot)
            print(f"screenshot of the chat page: {screenshot}")
            page.fill("#key", KEY)
        history.append({"role": "user", "content": question})
        response = send(page, question)
        # The whole conversation so far goes with each question, with the page's settings.
        assert response.request.post_data_json == {"messages": history, "stream": True, "temperature": 0,
                                                   "max_tokens": MAX_TOKENS}
        assert response.status == 200, response.text()
        assert response.headers["content-type"].startswith("text/event-stream")
        expect(answers).to_have_count(turn)
        expect(page.locator("#send")).to_have_text("Send")  # the stream has ended
        expect(page.locator("#error")).to_be_hidden()
        answer = api_answer(base_url, history)
        assert answer, "an empty greedy answer would prove nothing"
        assert answers.nth(turn - 1).text_content() == answer
        history.append({"role": "assistant", "content": answer})
    assert all(url.startswith(f"{base_url}/") for url in page.urls), page.urls  # nothing from elsewhere


# Server-sent events as the server writes them, fed to the page's reader one byte at a time: a read
# may end anywhere, inside an event or inside a UTF-8 character.
READ_BYTE_BY_BYTE = """async (text) => {
  const bytes = new TextEncoder().encode(text);
  const body = new ReadableStream({start(c) { for (const b of bytes) c.enqueue(new Uint8Array([b])); c.close(); }});
  const seen = [];
  try {
    await readEvents(new Response(body), (chunk) => seen.push(chunk.choices[0].delta.content));
  } catch (e) {
    seen.push("error: " + e.message);
  }
  return seen;
}"""


def event(content):
    # As the server writes it: UTF-8 characters as they are, so that a read can end inside one.
    return f"data: {json.dumps({'choices': [{'delta': {'content': content}}]}, ensure_ascii=False)}\n\n"


def test_the_page_reads_events_cut_anywhere(page):
    assert page.evaluate(READ_BYTE_BY_BYTE, event("你好") + event("😀!") + "data: [DONE]\n\n") == ["你好", "😀!"]
    assert page.evaluate(READ_BYTE_BY_BYTE, event("半") + 'data: {"choices": [') == [
        "半", "error: the answer was cut off: the stream ended early"]
