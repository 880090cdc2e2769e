"""Request features over a live server, with the official client: logprobs equal the
log_softmax of the model's own forward (completions' and chat's formats, plain and streamed),
n choices (a seeded choice i is the request with seed + i), the vLLM-style extra fields
top_k / min_p / repetition_penalty, and a 503 for a request that finds no free row in time."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import torch
from live_server import MODEL_NAME, load_engine
from test_serve_api import PROMPTS, client

from hybridlm import HybridLM
from hybridlm.infer.sampling_params import SamplingParams


def greedy_ids(model_dir, prompt_ids: list[int], max_tokens: int, **params) -> list[int]:
    engine = load_engine(model_dir, max_batch=1)
    out = engine.generate([prompt_ids], SamplingParams(
        max_tokens=max_tokens, temperature=0, stop_token_ids=(engine.tokenizer.eos_token_id,),
        **params))[0]
    return out.token_ids


def model_logprobs(model_dir, prompt_ids: list[int], token_ids: list[int]) -> torch.Tensor:
    """log_softmax of a full forward at the positions that predicted token_ids: (N, V)."""
    model = HybridLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + token_ids])).logits[0].float()
    return logits.log_softmax(-1)[len(prompt_ids) - 1:-1]


def test_completion_logprobs_equal_the_models_log_softmax(live, model_dir):
    tokenizer = live.engine.tokenizer
    prompt = tokenizer.encode(PROMPTS[2])
    ids = greedy_ids(model_dir, prompt, 8)
    assert len(set(ids)) >= 4, ids
    want = model_logprobs(model_dir, prompt, ids)
    api = client(live)
    got = api.completions.create(model=MODEL_NAME, prompt=PROMPTS[2], max_tokens=8,
                                 temperature=0, logprobs=3).choices[0]
    lp = got.logprobs
    assert lp.tokens == [tokenizer.decode([t]) for t in ids]
    assert lp.token_logprobs == pytest.approx([float(want[i, t]) for i, t in enumerate(ids)],
                                              abs=1e-4)
    for i, top in enumerate(lp.top_logprobs):
        best = want[i].topk(3)  # greedy: the chosen token is the first of them
        expected: dict[str, float] = {}  # ids that decode alike: the likelier one's
        for t, v in zip(best.indices.tolist(), best.values.tolist(), strict=True):
            expected.setdefault(tokenizer.decode([t]), v)
        assert top.keys() == expected.keys()
        assert [top[k] for k in expected] == pytest.approx(list(expected.values()), abs=1e-4)
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(ids))]
    chunks = list(api.completions.create(model=MODEL_NAME, prompt=PROMPTS[2], max_tokens=8,
                                         temperature=0, logprobs=3, stream=True))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    for name in ("tokens", "token_logprobs", "text_offset"):
        assert [x for s in streamed for x in getattr(s, name)] == getattr(lp, name), name
    plain = api.completions.create(model=MODEL_NAME, prompt=PROMPTS[2], max_tokens=8,
                                   temperature=0).choices[0]
    assert plain.logprobs is None and plain.text == got.text


def test_chat_logprobs_equal_the_models_log_softmax(live, model_dir):
    tokenizer = live.engine.tokenizer
    messages = [{"role": "user", "content": "Tell me a story."}]
    prompt = live.template.render_prompt(messages, tokenizer)
    ids = greedy_ids(model_dir, prompt, 6, stop=tuple(live.template.stop_strings()))
    want = model_logprobs(model_dir, prompt, ids)
    api = client(live)
    got = api.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=6,
                                      temperature=0, logprobs=True, top_logprobs=2)
    content = got.choices[0].logprobs.content
    assert [c.token for c in content] == [tokenizer.decode([t]) for t in ids]
    for i, entry in enumerate(content):
        assert entry.logprob == pytest.approx(float(want[i, ids[i]]), abs=1e-4)
        assert entry.bytes == list(entry.token.encode("utf-8"))
        best = want[i].topk(2)
        assert [t.token for t in entry.top_logprobs] == [tokenizer.decode([t]) for t in
                                                         best.indices.tolist()]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(
            best.values.tolist(), abs=1e-4)
    chunks = list(api.chat.completions.create(model=MODEL_NAME, messages=messages,
                                              max_tokens=6, temperature=0, logprobs=True,
                                              top_logprobs=2, stream=True))
    streamed = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    bare = api.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=2,
                                       temperature=0, logprobs=True)
    assert all(e.top_logprobs == [] for e in bare.choices[0].logprobs.content)


def test_n_choices_are_the_seeded_requests_seed_plus_i(live):
    api = client(live)
    kw = dict(model=MODEL_NAME, prompt=PROMPTS[3], max_tokens=10, temperature=1.2)
    got = api.completions.create(n=3, seed=11, **kw)
    assert [c.index for c in got.choices] == [0, 1, 2]
    texts = [c.text for c in got.choices]
    alone = [api.completions.create(seed=11 + i, **kw) for i in range(3)]
    assert texts == [a.choices[0].text for a in alone]
    assert len(set(texts)) == 3, texts
    assert got.usage.prompt_tokens == alone[0].usage.prompt_tokens  # the prompt counted once
    assert got.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    chunks = list(api.completions.create(n=3, seed=11, stream=True,
                                         stream_options={"include_usage": True}, **kw))
    streamed = ["".join(c.choices[0].text for c in chunks[:-1] if c.choices[0].index == i)
                for i in range(3)]
    assert streamed == texts
    assert sum(c.choices[0].finish_reason is not None for c in chunks[:-1]) == 3
    assert chunks[-1].usage.completion_tokens == got.usage.completion_tokens
    chat = api.chat.completions.create(model=MODEL_NAME, n=2, seed=3, max_tokens=6,
                                       messages=[{"role": "user", "content": "Hi"}])
    assert [c.index for c in chat.choices] == [0, 1]


def test_top_k_min_p_and_repetition_penalty_reach_the_engine(live, model_dir):
    api = client(live)
    prompt = live.engine.tokenizer.encode(PROMPTS[4])
    greedy = live.engine.tokenizer.decode(greedy_ids(model_dir, prompt, 12))
    for extra in ({"top_k": 1}, {"min_p": 1.0}):  # either keeps the likeliest token alone
        got = api.completions.create(model=MODEL_NAME, prompt=PROMPTS[4], max_tokens=12,
                                     temperature=2.0, extra_body=extra)
        assert got.choices[0].text == greedy, extra
    penalised = live.engine.tokenizer.decode(greedy_ids(model_dir, prompt, 12,
                                                        repetition_penalty=0.2))
    assert penalised != greedy
    got = api.completions.create(model=MODEL_NAME, prompt=PROMPTS[4], max_tokens=12,
                                 temperature=0, extra_body={"repetition_penalty": 0.2})
    assert got.choices[0].text == penalised


def test_a_request_finding_no_free_row_in_time_is_a_503(live_one_row, monkeypatch):
    url = live_one_row.url + "/v1/completions"
    holding, release = threading.Event(), threading.Event()
    step = live_one_row.engine.step
    # "Hi" runs greedily to the end of the context (510 tokens), >= 5 s at 10 ms a step:
    # the row stays taken until the holder hangs up.
    monkeypatch.setattr(live_one_row.engine, "step", lambda: (time.sleep(0.01), step())[1])

    def hold_the_row() -> None:
        body = {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": None, "stream": True,
                "temperature": 0}
        with httpx.stream("POST", url, json=body, timeout=60) as response:
            lines = response.iter_lines()  # held: a dropped iterator closes the stream
            next(lines)
            holding.set()
            release.wait(30)  # hang up: the row frees

    holder = threading.Thread(target=hold_the_row)
    holder.start()
    try:
        assert holding.wait(30)
        for stream in (False, True):
            response = httpx.post(url, timeout=30, json={
                "model": MODEL_NAME, "prompt": "Hi", "max_tokens": 2, "stream": stream})
            assert response.status_code == 503, response.text
            error = response.json()["error"]
            assert "queue timeout of 0.3 s" in error["message"] and "--max-batch" in (
                error["message"])
            assert error["code"] == "queue_timeout"
    finally:
        release.set()
        holder.join(30)
    ok = httpx.post(url, timeout=30, json={"model": MODEL_NAME, "prompt": "Hi",
                                           "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
