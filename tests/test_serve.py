"""titletune/export/serve.py (`make serve`): the pipeline's GGUF behind the OpenAI-compatible API on
127.0.0.1. The server answers /v1/completions (the training prompt) and /v1/chat/completions (the
question, through the `openai` client and the file's chat template) with llama.cpp's own greedy
answer; bad requests get 4xx and the server goes on answering."""
from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time

import pytest

from titletune.export.serve import request_problem
from titletune.testing import ENV

QUESTION = "What is Acme Kettle, 1.7 L?"


def test_request_checks():
    assert request_problem("/v1/chat/completions", b'{"messages": []}') == "messages: at least one message is needed"
    assert request_problem("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], '
                                                   b'"max_tokens": -1}').startswith("max_tokens: -1 is not allowed")
    assert request_problem("/v1/completions", b'{"prompt": "x", "max_tokens": 0}').startswith("max_tokens: 0")
    assert request_problem("/v1/completions", b'{"prompt": "x", "max_tokens": 8}') is None
    assert request_problem("/v1/completions", b"not json") == "the request body is not valid JSON"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, path: str, body) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)  # loopback, no proxy
    conn.request("POST", path, body=body if isinstance(body, bytes) else json.dumps(body),
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    status, data = response.status, response.read()
    conn.close()
    return status, json.loads(data) if data else {}


def alive(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/v1/models")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


@pytest.fixture(scope="module")
def server(pipeline_repo):
    port = free_port()
    gguf = pipeline_repo / "models/gguf/titletune-f16.gguf"
    proc = subprocess.Popen([sys.executable, "-m", "titletune.export.serve", "--gguf", str(gguf), "--host",
                             "127.0.0.1", "--port", str(port)], cwd=pipeline_repo, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while not alive(port):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "the server did not answer within 180 s"
        time.sleep(0.5)
    yield {"port": port, "gguf": gguf, "repo": pipeline_repo}
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_the_server_answers_like_llama_cpp_itself(server):
    import openai
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from titletune.export.serve import context_length
    from titletune.prompt import build_prompt

    prompt = build_prompt(AutoTokenizer.from_pretrained(server["repo"] / "models/merged"), QUESTION, "instruction")
    llm = Llama(model_path=str(server["gguf"]), n_ctx=context_length(server["gguf"]), verbose=False)
    greedy = {"max_tokens": 32, "temperature": 0, "repeat_penalty": 1.0}     # evaluate's: no repetition penalty
    direct = llm.create_completion(prompt, **greedy)["choices"][0]["text"]
    assert direct.strip()

    status, completion = post(server["port"], "/v1/completions", {"prompt": prompt, **greedy})
    assert status == 200 and completion["choices"][0]["text"] == direct

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server['port']}/v1", api_key="unused", max_retries=0,
                           timeout=120, http_client=openai.DefaultHttpxClient(trust_env=False))
    chat = client.chat.completions.create(model="titletune", messages=[{"role": "user", "content": QUESTION}],
                                          max_tokens=32, temperature=0, extra_body={"repeat_penalty": 1.0})
    assert chat.choices[0].message.content == direct      # the chat template wrote the training prompt


@pytest.mark.slow
def test_bad_requests_get_4xx_and_the_server_goes_on(server):
    port, chat = server["port"], "/v1/chat/completions"
    user = [{"role": "user", "content": QUESTION}]
    bad = [(chat, {"messages": [], "max_tokens": 8}),
           (chat, {"messages": user, "max_tokens": -1}),
           ("/v1/completions", {"prompt": "x", "max_tokens": -1}),
           ("/v1/completions", {"prompt": "Describe this product: kettle. " * 33_000, "max_tokens": 8}),   # 1 MB
           (chat, b'{"messages": [')]
    for path, body in bad:
        status, answer = post(port, path, body)
        assert 400 <= status < 500, (path, status, answer)
        assert alive(port)
    status, answer = post(port, chat, {"messages": user, "max_tokens": 4, "temperature": 0})
    assert status == 200 and answer["choices"][0]["message"]["content"]
