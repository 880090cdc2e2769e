"""Bad requests get OpenAI's error body with a 4xx status and a message naming the problem,
never a traceback; the server answers the next request as before. API keys; a client gone
mid-stream frees its row."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from live_server import API_KEY, MODEL_NAME

LONG = "word " * 600  # more tokens than the 512 positions of the context

BAD = {  # name: (body, status, words the message must hold, param)
    "wrong type": ({"prompt": "Hi", "max_tokens": "ten"}, 400, ["max_tokens"], "max_tokens"),
    "no prompt": ({"max_tokens": 3}, 400, ["prompt", "required"], "prompt"),
    "unknown model": ({"model": "gpt-9", "prompt": "Hi"}, 404, ["gpt-9", MODEL_NAME], "model"),
    "empty prompt": ({"prompt": ""}, 400, ["empty"], "prompt"),
    "too long": ({"prompt": LONG}, 400, ["exceeds", "512"], "prompt"),
    "long max_tokens": ({"prompt": "Hi", "max_tokens": 10**6}, 400, ["1000000", "512"],
                        "prompt"),
    "zero max_tokens": ({"prompt": "Hi", "max_tokens": 0}, 400, ["max_tokens", ">= 1"],
                        "max_tokens"),
    "temperature": ({"prompt": "Hi", "temperature": -1}, 400, ["temperature", ">= 0"],
                    "temperature"),
    "top_p": ({"prompt": "Hi", "top_p": 1.5}, 400, ["top_p", "(0, 1]"], "top_p"),
    "penalty": ({"prompt": "Hi", "presence_penalty": 3}, 400, ["presence_penalty", "[-2, 2]"],
                "presence_penalty"),
    "seed": ({"prompt": "Hi", "seed": -1}, 400, ["seed"], "seed"),
    "huge seed": ({"prompt": "Hi", "seed": 2**64}, 400, ["seed", "2**64"], "seed"),
    "five stops": ({"prompt": "Hi", "stop": list("abcde")}, 400, ["5", "at most 4"], "stop"),
    "empty stop": ({"prompt": "Hi", "stop": [""]}, 400, ["stop", "non-empty"], "stop"),
    "n=17": ({"prompt": "Hi", "n": 17}, 400, ["n=17", "[1, 16]"], "n"),
    "n=0": ({"prompt": "Hi", "n": 0}, 400, ["n=0", "[1, 16]"], "n"),
    "seed + n": ({"prompt": "Hi", "seed": 2**64 - 1, "n": 2}, 400, ["seed", "2**64"], "seed"),
    "top_k": ({"prompt": "Hi", "top_k": 0}, 400, ["top_k=0", ">= 1"], "top_k"),
    "min_p": ({"prompt": "Hi", "min_p": 1.5}, 400, ["min_p=1.5", "[0, 1]"], "min_p"),
    "repetition_penalty": ({"prompt": "Hi", "repetition_penalty": 0}, 400,
                           ["repetition_penalty=0", "> 0"], "repetition_penalty"),
    "logprobs": ({"prompt": "Hi", "logprobs": 21}, 400, ["logprobs=21", "[0, 20]"],
                 "logprobs"),
    "stream_options": ({"prompt": "Hi", "stream_options": {"include_usage": True}}, 400,
                       ["stream_options", "stream: true"], "stream_options"),
    "token id": ({"prompt": [1, 10**6]}, 400, ["1000000", "vocab_size"], "prompt"),
}


def assert_error(response: httpx.Response, status: int, words, param=None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "Traceback" not in error["message"]
    for word in words:
        assert word in error["message"], (word, error["message"])
    if param is not None:
        assert error["param"] == param, error


@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_a_bad_completion_is_refused_and_the_server_goes_on(live, case):
    body, status, words, param = case
    response = httpx.post(live.url + "/v1/completions", json={"model": MODEL_NAME, **body})
    assert_error(response, status, words, param)
    ok = httpx.post(live.url + "/v1/completions",
                    json={"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("body, words", [
    (b"{not json", ["malformed JSON"]),
    (b'{"model": "tiny-history", "messages": []}', ["messages"]),
    (b'{"model": "tiny-history", "messages": [{"role": "robot", "content": "x"}]}', ["role"]),
    (b'{"model": "tiny-history", "messages": [{"role": "user", "content": 5}]}', ["content"]),
    (b'{"model": "tiny-history", "messages": [{"role": "user", "content": "x"}], "n": 17}',
     ["n=17", "[1, 16]"]),
    (b'{"model": "tiny-history", "messages": [{"role": "user", "content": "x"}], '
     b'"top_logprobs": 2}', ["top_logprobs", "logprobs: true"]),
    (b'{"model": "tiny-history", "messages": [{"role": "user", "content": "x"}], '
     b'"logprobs": true, "top_logprobs": 21}', ["top_logprobs=21", "[0, 20]"]),
    (b'{"model": "tiny-history", "messages": [{"role": "user", "content": "x"}], '
     b'"max_completion_tokens": 0}', ["max_tokens", ">= 1"]),
], ids=["malformed", "no messages", "role", "content type", "n", "top_logprobs alone",
        "top_logprobs", "max_completion_tokens"])
def test_a_bad_chat_request_is_refused(live, body, words):
    response = httpx.post(live.url + "/v1/chat/completions", content=body,
                          headers={"content-type": "application/json"})
    assert_error(response, 400, words)


def test_an_unknown_route_is_an_openai_404(live):
    assert_error(httpx.get(live.url + "/v1/nothing"), 404, ["Not Found"])


def test_the_api_key_is_required_on_v1_routes(live_with_key):
    url = live_with_key.url
    assert_error(httpx.get(url + "/v1/models"), 401, ["missing API key"])
    assert_error(httpx.get(url + "/v1/models", headers={"Authorization": "Bearer nope"}), 401,
                 ["wrong API key"])
    wrong = openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2)
    right = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0)
    assert right.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2).usage
    assert httpx.get(url + "/health").status_code == 200  # probes need no key


def test_a_client_gone_mid_stream_frees_its_row(live):
    cancelled = []  # (request id, finished when cancelled)
    engine = live.engine
    cancel = engine.cancel

    def recording_cancel(request_id: int) -> None:
        request = engine.requests.get(request_id)
        cancelled.append((request_id, request is not None and request.finished))
        cancel(request_id)

    engine.cancel = recording_cancel
    try:
        body = {"model": MODEL_NAME, "prompt": "Once", "max_tokens": None, "stream": True,
                "temperature": 0}
        with httpx.stream("POST", live.url + "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")  # generating: now hang up
        deadline = time.monotonic() + 10
        while not cancelled or engine.running or engine.waiting:
            assert time.monotonic() < deadline, "the request still holds its row"
            time.sleep(0.02)
    finally:
        engine.cancel = cancel
    assert cancelled[0][1] is False, "it ran to its end instead of being cancelled"
    assert sorted(engine.pool.free) == [0, 1, 2, 3]  # max_batch 4: every row is free
    assert not engine.requests


def test_an_engine_failure_is_a_500_and_the_next_request_is_served(live):
    engine = live.engine
    step = engine.step

    def broken_step():
        engine.step = step  # fails once
        raise RuntimeError("boom")

    engine.step = broken_step
    body = {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 3}
    assert_error(httpx.post(live.url + "/v1/completions", json=body), 500, ["boom"])
    assert httpx.post(live.url + "/v1/completions", json=body).status_code == 200
    assert not engine.running and sorted(engine.pool.free) == [0, 1, 2, 3]
