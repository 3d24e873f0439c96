"""`vlmtune serve` as a user runs it: a real uvicorn process on a free loopback port, called with the official
`openai` client and plain HTTP. Answers are compared with `vlmtune chat --batch` run in this process."""
from __future__ import annotations

import base64
import http.client
import io
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from convert.convert_helpers import IMAGE, chat_generator, checkpoint, converted  # noqa: F401

from vlmtune.cli import main as cli_main

MAX_NEW = 8
KEY = "sk-test-7d1c0ffee"
DATA_URL = "data:image/jpeg;base64," + base64.b64encode(IMAGE.read_bytes()).decode()


def _png_url(width: int, height: int) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


BIG_URL = _png_url(4097, 4096)  # one row over the default --max-image-pixels (4096 x 4096); a few KB as PNG


@pytest.fixture(scope="module")
def folder(converted):  # noqa: F811
    return converted("lora", "xtuner")


def model_argv(tiny, folder) -> list[str]:
    return [str(tiny.llm), "--llava", str(folder), "--max-new-tokens", str(MAX_NEW), "--torch-dtype", "float32",
            "--device", "cpu"]


class Server:
    """`vlmtune serve` in a subprocess; its output (stdout + stderr) collected in .log."""

    def __init__(self, argv: list[str]):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        code = "import sys; from vlmtune.cli import main; sys.exit(main(sys.argv[1:]))"
        self.proc = subprocess.Popen([sys.executable, "-c", code, "serve", *argv, "--port", str(self.port)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.port}"
        for _ in range(600):
            try:
                urllib.request.urlopen(self.url + "/health", timeout=1)
                return
            except OSError:
                assert self.proc.poll() is None, "".join(self.lines)
                time.sleep(0.1)
        raise AssertionError("server did not start: " + "".join(self.lines))

    def post(self, body: bytes, key: str | None = None) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + "/v1/chat/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {key}"} if key else {})})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def close(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server(tiny, folder):
    s = Server(model_argv(tiny, folder))
    yield s
    assert s.close() == 0


def chat_batch(tiny, folder, tmp_path, records) -> list[str]:
    """Answers of `vlmtune chat --batch` (greedy) for JSONL records."""
    (tmp_path / "cat.jpg").write_bytes(IMAGE.read_bytes())
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "a.jsonl"
    assert cli_main(["chat", *model_argv(tiny, folder), "--batch", str(tmp_path / "q.jsonl"), "--output", str(out)]) == 0
    return [json.loads(line)["answer"] for line in out.read_text().splitlines()]


def ask(client, content, stream: bool, history=()) -> str:
    messages = [*history, {"role": "user", "content": content}]
    if not stream:
        r = client.chat.completions.create(model="m", messages=messages, max_tokens=MAX_NEW, temperature=0)
        assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens > 0
        return r.choices[0].message.content
    chunks = list(client.chat.completions.create(model="m", messages=messages, max_tokens=MAX_NEW, temperature=0,
                                                 stream=True))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    return "".join(c.choices[0].delta.content or "" for c in chunks)


@pytest.mark.parametrize("stream", [False, True])
def test_openai_client_answers_equal_chat_batch(server, tiny, folder, tmp_path, stream):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    want = chat_batch(tiny, folder, tmp_path, [{"prompt": "Say something."},
                                               {"image": "cat.jpg", "prompt": "What is in the image?"},
                                               {"image": ["cat.jpg", "cat.jpg"], "prompt": "Compare them."}])
    image = {"type": "image_url", "image_url": {"url": DATA_URL}}
    got = [ask(client, "Say something.", stream),
           ask(client, [image, {"type": "text", "text": "What is in the image?"}], stream),
           ask(client, [image, image, {"type": "text", "text": "Compare them."}], stream)]
    assert got == want
    assert [m.id for m in client.models.list().data] == [tiny.llm.name]


def test_concurrent_requests_share_a_batch_and_answer_as_chat_batch(server, tiny, folder, tmp_path):
    """Prompts of different lengths, with and without images, sent at once: left-padded in one batch, greedy
    answers still those of `chat --batch`."""
    records = [{"prompt": "Say something."}, {"image": "cat.jpg", "prompt": "What is in the image?"},
               {"prompt": "Write one long sentence about the weather today."}]
    want = chat_batch(tiny, folder, tmp_path, records)
    image = {"type": "image_url", "image_url": {"url": DATA_URL}}
    contents = ["Say something.", [image, {"type": "text", "text": "What is in the image?"}],
                "Write one long sentence about the weather today."]
    before = json.loads(urllib.request.urlopen(server.url + "/health").read())["batches"]
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda c: server.post(json.dumps({"messages": [{"role": "user", "content": c}],
                                                              "max_tokens": MAX_NEW, "temperature": 0}).encode()),
                            contents))
    assert [a["choices"][0]["message"]["content"] for _, a in got] == want
    assert json.loads(urllib.request.urlopen(server.url + "/health").read())["batches"] - before < 3


def test_seed_repeats_a_sampled_answer_and_stop_cuts(server):
    body = {"messages": [{"role": "user", "content": "Say something."}], "max_tokens": MAX_NEW, "temperature": 1.0,
            "seed": 7}
    first, second = (server.post(json.dumps(body).encode())[1] for _ in range(2))
    assert first["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]
    text = first["choices"][0]["message"]["content"]
    stop = text[len(text) // 2:][:2]
    cut = server.post(json.dumps({**body, "stop": [stop]}).encode())[1]["choices"][0]
    assert (cut["message"]["content"], cut["finish_reason"]) == (text[: text.index(stop)], "stop")


def test_body_cap_too_many_images_and_local_files(tiny, folder, server):
    image = {"type": "image_url", "image_url": {"url": DATA_URL}}
    code, answer = server.post(json.dumps({"messages": [{"role": "user", "content": [image] * 9}]}).encode())
    assert (code, answer["error"]["param"]) == (400, "messages")
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)  # a 33 MiB body announced
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(33 << 20))
    conn.endheaders()
    response = conn.getresponse()  # refused before the body is read
    assert response.status == 413 and "body" in json.loads(response.read())["error"]["message"]
    conn.close()
    local = {"type": "image_url", "image_url": {"url": IMAGE.as_uri()}}
    assert server.post(json.dumps({"messages": [{"role": "user", "content": [local]}]}).encode())[0] == 400


def test_multi_turn_equals_the_generator(server, tiny, folder):
    import openai

    from vlmtune.data.image import load_image

    generator = chat_generator(*model_argv(tiny, folder)[:3])
    image = load_image(IMAGE)
    first = generator.answer("What is in the image?", image, max_new_tokens=MAX_NEW)
    ids = generator.prompt_ids([("<image>\nWhat is in the image?", first), ("And its colour?", None)])
    second = generator.decode(generator.generate_ids([ids], [[image]], max_new_tokens=MAX_NEW, do_sample=False)[0])
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    history = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": DATA_URL}},
                                            {"type": "text", "text": "What is in the image?"}]},
               {"role": "assistant", "content": first}]
    assert ask(client, "And its colour?", False, history) == second


BAD = [  # (body, status, param)
    (b"{not json", 400, None),
    (json.dumps({"messages": [{"role": "robot", "content": "hi"}]}).encode(), 400, "messages[0].role"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "n": 2}).encode(), 400, "n"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "tools": []}).encode(), 400, "tools"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "logprobs": True}).encode(), 400, "logprobs"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "response_format": {}}).encode(), 400, "response_format"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": 9}).encode(), 400, "temperature"),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}]}).encode(),
     400, "messages[0].content[0].image_url.url"),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}).encode(),
     400, "messages[0].content[0].image_url.url"),
    (json.dumps({"messages": [{"role": "user", "content": "x " * 5000}]}).encode(), 400, "messages"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"},
                              {"role": "user", "content": [{"type": "image_url", "image_url": {"url": DATA_URL}}]}]}).encode(),
     400, "messages[2].content[0]"),
    (json.dumps({"messages": [{"role": "user", "content": "<image> hi"}]}).encode(), 400, "messages[0].content"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": MAX_NEW + 1}).encode(), 400, "max_tokens"),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": BIG_URL}}]}]}).encode(),
     400, "messages[0].content[0].image_url.url"),
]


@pytest.mark.parametrize("body, status, param", BAD)
def test_bad_input_is_a_4xx_naming_the_field(server, body, status, param):
    code, answer = server.post(body)
    assert (code, answer["error"]["param"]) == (status, param), answer
    assert server.post(json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode())[0] == 200


def load(server) -> str:
    """32 clients x 4 requests, every other one invalid: valid ones answer as alone, invalid ones 4xx, no 5xx;
    p50/p95 latency and valid requests/s."""
    good = json.dumps({"messages": [{"role": "user", "content": "Say something."}], "max_tokens": 4}).encode()
    want = server.post(good)[1]["choices"][0]["message"]["content"]

    def client(i: int) -> list[tuple]:
        out = []
        for k in range(4):
            body = good if (i + k) % 2 else BAD[(i + k) % len(BAD)][0]
            start = time.monotonic()
            code, answer = server.post(body)
            out.append((code, answer["choices"][0]["message"]["content"] if code == 200 else None,
                        time.monotonic() - start, body is good))
        return out

    start = time.monotonic()
    with ThreadPoolExecutor(32) as pool:
        results = [r for rs in pool.map(client, range(32)) for r in rs]
    wall = time.monotonic() - start
    assert all(code == 200 and text == want for code, text, _, ok in results if ok)
    assert all(400 <= code < 500 for code, _, _, ok in results if not ok)
    assert sum(ok for *_, ok in results) == 64
    health = json.loads(urllib.request.urlopen(server.url + "/health").read())
    assert health["status"] == "ok"
    times = sorted(t for *_, t, ok in results if ok)
    return (f"p50 {times[len(times) // 2]:.3f} s, p95 {times[int(len(times) * .95)]:.3f} s, "
            f"{len(times) / wall:.1f} valid req/s, largest batch {health['largest_batch']}")


def test_load_mixed_valid_and_invalid_batched_vs_one(server, tiny, folder):
    batched = load(server)
    assert json.loads(urllib.request.urlopen(server.url + "/health").read())["largest_batch"] > 1
    single = Server([*model_argv(tiny, folder), "--max-batch-size", "1"])
    one = load(single)
    assert single.close() == 0
    print(f"\nload, 32 clients x 4 requests (half invalid): --max-batch-size 8: {batched}; --max-batch-size 1: {one}")


def test_disconnect_cancels_and_timeout_is_an_error(tiny, folder):
    """A streaming client that goes away stops its generation; a generation over --timeout is an error."""
    s = Server([*model_argv(tiny, folder)[:-4], "--torch-dtype", "float32", "--device", "cpu",
                "--max-new-tokens", "3000", "--timeout", "3",
                "--allow-local-images", str(IMAGE.parent)])
    body = {"messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 3000}
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": True}),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    assert [response.readline().startswith(b"data: ") for _ in range(6)] == [True, False] * 3  # role + 2 deltas
    conn.close()  # the client goes away mid-answer
    deadline = time.monotonic() + 30
    while json.loads(urllib.request.urlopen(s.url + "/health").read())["cancelled"] != 1:
        assert time.monotonic() < deadline, "the generation was not cancelled"
        time.sleep(0.1)
    local = {"type": "image_url", "image_url": {"url": IMAGE.as_uri()}}  # inside --allow-local-images
    short = {"messages": [{"role": "user", "content": [local, {"type": "text", "text": "Hi"}]}], "max_tokens": 2}
    assert s.post(json.dumps(short).encode())[0] == 200
    outside = {"type": "image_url", "image_url": {"url": "file:///etc/hostname"}}
    code, answer = s.post(json.dumps({"messages": [{"role": "user", "content": [outside]}]}).encode())
    assert (code, answer["error"]["param"]) == (400, "messages[0].content[0].image_url.url")
    code, answer = s.post(json.dumps(body).encode())
    assert code == 504 and "timed out" in answer["error"]["message"]
    assert s.close() == 0


def test_api_key_and_sigterm_drain(tiny, folder):
    s = Server([*model_argv(tiny, folder), "--api-key", KEY])
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()
    assert s.post(body)[0] == 401
    assert s.post(body, key="wrong")[0] == 401
    assert urllib.request.urlopen(s.url + "/").status == 200  # the page and /health are open
    assert "<script>" in urllib.request.urlopen(s.url + "/").read().decode()
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)  # a streamed answer in flight ...
    conn.request("POST", "/v1/chat/completions", json.dumps({**json.loads(body), "stream": True, "max_tokens": MAX_NEW}),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    response = conn.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    s.proc.send_signal(signal.SIGTERM)  # ... when SIGTERM comes: it is finished, then the server exits 0
    rest = response.read().decode()
    assert rest.rstrip().endswith("data: [DONE]") and '"finish_reason": "' in rest
    assert s.proc.wait(timeout=60) == 0
    assert KEY not in "".join(s.lines)


CHROMIUM = shutil.which("chromium")
ARTIFACTS = Path(os.environ.get("VLMTUNE_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "work_dirs" / "test_artifacts"))


@pytest.mark.skipif(CHROMIUM is None or importlib.util.find_spec("playwright") is None,
                    reason="needs Debian's chromium (apt-get install chromium, scripts/setup_env.sh) and playwright")
def test_page_in_a_headless_browser(server, tmp_path):
    """Pick an image, ask, watch the answer stream in (equal to the API's), ask again, reset; a screenshot."""
    from playwright.sync_api import sync_playwright

    want = server.post(json.dumps({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": DATA_URL}}, {"type": "text", "text": "What is in the image?"}]}],
        "max_tokens": MAX_NEW, "temperature": 0}).encode())[1]["choices"][0]["message"]["content"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(server.url + "/")
        page.wait_for_function("document.getElementById('model').textContent !== '…'")
        assert page.text_content("#model") == server_model_name(server)
        assert page.input_value("#max_tokens") == str(MAX_NEW)  # the page's 256, lowered to the server's cap
        page.set_input_files("#file", str(IMAGE))
        page.wait_for_selector("#preview:not([hidden])")
        page.fill("#question", "What is in the image?")
        page.click("#send")
        page.wait_for_selector(".assistant[data-done='1']", timeout=120_000)
        assert page.text_content(".assistant") == want
        page.fill("#question", "And its colour?")
        page.click("#send")
        page.wait_for_function("document.querySelectorAll(\".assistant[data-done='1']\").length == 2", timeout=120_000)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "serve_page.png"), full_page=True)
        assert len(page.query_selector_all(".turn")) == 4
        page.click("#reset")
        assert page.query_selector_all(".turn") == [] and page.is_hidden("#preview")
        browser.close()
    assert (ARTIFACTS / "serve_page.png").stat().st_size > 1000


def server_model_name(server) -> str:
    with urllib.request.urlopen(server.url + "/v1/models") as r:
        return json.loads(r.read())["data"][0]["id"]
