"""The OpenAI API over a live server, with the official client: greedy answers equal
Engine.generate on the same model directory, streamed or not, alone or among 32 requests;
usage counts; /v1/models, /health, /metrics."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from live_server import MODEL_NAME, load_engine

from hybridlm.infer.sampling_params import SamplingParams

PROMPTS = ["Once upon a time", "The king said", "In the morning the", "She opened the door",
           "A small dog", "Far away, there was"]


def client(live, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key=kwargs.pop("api_key", "none"),
                         max_retries=0, timeout=60, **kwargs)


def expected(model_dir, prompt_ids: list[int], max_tokens: int | None, stop=()) -> tuple:
    """(text, token count, finish_reason) that a fresh engine gives the prompt greedily."""
    engine = load_engine(model_dir, max_batch=1)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, stop=tuple(stop),
                            stop_token_ids=(engine.tokenizer.eos_token_id,))
    out = engine.generate([prompt_ids], params)[0]
    reason = "length" if out.finish_reason == "context" else out.finish_reason
    return out.text, len(out.token_ids), reason


def test_completion_equals_the_engine_alone_plain_and_streamed(live, model_dir):
    api = client(live)
    ids = live.engine.tokenizer.encode(PROMPTS[0])
    text, count, reason = expected(model_dir, ids, 24)
    assert len(set(live.engine.tokenizer.encode(text))) > 3, "greedy output is not varied"
    got = api.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=24,
                                 temperature=0)
    assert got.choices[0].text == text and got.choices[0].finish_reason == reason
    assert (got.usage.prompt_tokens, got.usage.completion_tokens,
            got.usage.total_tokens) == (len(ids), count, len(ids) + count)
    chunks = list(api.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=24,
                                         temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == reason
    body = {"model": MODEL_NAME, "prompt": PROMPTS[0], "max_tokens": 3, "stream": True}
    with httpx.stream("POST", live.url + "/v1/completions", json=body) as response:
        raw = [json.loads(line[6:]) for line in response.iter_lines()
               if line.startswith("data: {")]
    assert raw and not any("usage" in c for c in raw)  # only when stream_options asks
    chunks = list(api.completions.create(
        model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks[:-1]) == text
    assert chunks[-2].choices[0].finish_reason == reason
    assert chunks[-1].choices == [] and all(c.usage is None for c in chunks[:-1])
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (
        len(ids), count)


def test_token_id_prompts_and_stop_strings(live, model_dir):
    ids = live.engine.tokenizer.encode(PROMPTS[1])
    text, _, _ = expected(model_dir, ids, 24)
    stop = text[len(text) // 2:][:2]
    cut, _, reason = expected(model_dir, ids, 24, stop=[stop])
    got = client(live).completions.create(model=MODEL_NAME, prompt=ids, max_tokens=24,
                                          temperature=0, stop=[stop])
    assert got.choices[0].text == cut and len(cut) < len(text) and reason == "stop"
    assert got.choices[0].finish_reason == "stop"


def test_chat_renders_the_template_and_equals_the_engine(live, model_dir):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Tell me a story."}]
    prompt = live.template.render_prompt(messages, live.engine.tokenizer)
    text, count, reason = expected(model_dir, prompt, 20, live.template.stop_strings())
    api = client(live)
    got = api.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=20,
                                      temperature=0)
    assert got.choices[0].message.content == text and got.choices[0].finish_reason == reason
    assert got.choices[0].message.role == "assistant"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(prompt), count)
    chunks = list(api.chat.completions.create(model=MODEL_NAME, messages=messages,
                                              max_tokens=20, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == reason
    usage = list(api.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True}))[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == count


def test_32_concurrent_requests_each_get_their_answer_alone(live, model_dir):
    api = client(live)
    jobs = [(PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)), 6 + i % 5)
            for i in range(32)]

    def ask(job):
        prompt, max_tokens = job
        return api.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens,
                                      temperature=0).choices[0].text

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, jobs))
    assert len(answers) == 32 and all(answers)
    for (prompt, max_tokens), answer in zip(jobs, answers, strict=True):
        ids = live.engine.tokenizer.encode(prompt)
        assert answer == expected(model_dir, ids, max_tokens)[0], prompt


def test_models_health_and_metrics(live):
    assert [m.id for m in client(live).models.list()] == [MODEL_NAME]
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}
    before = httpx.get(live.url + "/metrics").text
    client(live).completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=3,
                                    temperature=0)
    after = httpx.get(live.url + "/metrics").text
    for name in ("hybridlm_requests_total", "hybridlm_prompt_tokens_total",
                 "hybridlm_generation_tokens_total", "hybridlm_time_to_first_token_seconds_count"):
        assert metric(after, name) > metric(before, name), name
    assert metric(after, "hybridlm_requests_running") == 0
    assert metric(after, "hybridlm_requests_waiting") == 0


def metric(text: str, name: str) -> float:
    """A metric's value, summed over its labels."""
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(name) and line[len(name)] in " {"]
    if not values:
        pytest.fail(f"{name} not in /metrics:\n{text}")
    return sum(values)
