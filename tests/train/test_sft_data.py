"""SFT data: records, chat template, packing, batches, and a short fine-tuning run."""

import json
from pathlib import Path

import pytest
import torch

from hybridlm.train.sft_data import (
    CHAT_TEMPLATE_FILE,
    IGNORE_INDEX,
    ChatTemplate,
    SFTBatches,
    count_truncated,
    load_sft_dataset,
    pack_examples,
    read_sft_records,
    record_to_messages,
)

CHAT = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What colour is the sky?"},
    {"role": "assistant", "content": "Blue, on a clear day."},
    {"role": "user", "content": "And grass?"},
    {"role": "assistant", "content": "Green."},
]


def _write_jsonl(path: Path, records: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --- template ------------------------------------------------------------------------------------
def test_render_trains_exactly_the_assistant_contents_and_their_eos(small_tokenizer):
    tok, template = small_tokenizer, ChatTemplate()
    ids, mask = template.render(CHAT, tok)
    assert len(ids) == len(mask)
    trained = [i for i, m in zip(ids, mask, strict=True) if m]
    eos = tok.eos_token_id
    assert trained == [*tok.encode("Blue, on a clear day."), eos, *tok.encode("Green."), eos]
    context = [i for i, m in zip(ids, mask, strict=True) if not m]
    assert tok.decode(context) == (
        "<|system|>\nYou answer briefly.\n<|user|>\nWhat colour is the sky?\n<|assistant|>\n"
        "<|user|>\nAnd grass?\n<|assistant|>\n"
    )
    assert tok.decode(ids) == (
        "<|system|>\nYou answer briefly.\n<|user|>\nWhat colour is the sky?\n<|assistant|>\n"
        "Blue, on a clear day.<|endoftext|><|user|>\nAnd grass?\n<|assistant|>\nGreen."
        "<|endoftext|>"
    )
    # Markers are plain text: no token outside the tokenizer's vocabulary, and eos appears
    # only where an assistant turn ends.
    assert max(ids) < tok.vocab_size
    assert [i for i, t in enumerate(ids) if t == eos] == [
        i for i, (t, m) in enumerate(zip(ids, mask, strict=True)) if m and t == eos
    ]


def test_render_prompt_is_a_token_exact_prefix_of_the_training_render(small_tokenizer):
    tok, template = small_tokenizer, ChatTemplate()
    prompt = template.render_prompt(CHAT[:4], tok)
    ids, mask = template.render(CHAT, tok)
    marker = tok.encode("<|assistant|>\n")
    assert ids[: len(prompt)] == prompt
    assert prompt[-len(marker):] == marker and not any(mask[len(prompt) - len(marker):len(prompt)])
    assert ids[len(prompt):] == [*tok.encode("Green."), tok.eos_token_id]
    assert all(mask[len(prompt):])
    first = template.render_prompt(CHAT[:2], tok)  # the same for a single turn
    assert ids[: len(first)] == first and not any(mask[: len(first)])


def test_template_save_load_round_trip(tmp_path, small_tokenizer):
    assert ChatTemplate.load(tmp_path) == ChatTemplate()  # no file: the default
    custom = ChatTemplate(system="### System:\n", user="### User:\n",
                          assistant="### Assistant:\n", turn_end="\n\n")
    file = custom.save(tmp_path / "model")
    assert file == tmp_path / "model" / CHAT_TEMPLATE_FILE
    assert json.loads(file.read_text()) == custom.to_dict()
    loaded = ChatTemplate.load(tmp_path / "model")
    assert loaded == custom
    assert ChatTemplate.load(file) == custom
    assert loaded.render(CHAT, small_tokenizer) == custom.render(CHAT, small_tokenizer)
    assert loaded.render(CHAT, small_tokenizer) != ChatTemplate().render(CHAT, small_tokenizer)
    # Saved next to the tokenizer, both load from the same directory.
    small_tokenizer.save(tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [
        CHAT_TEMPLATE_FILE, "tokenizer.json"]


def test_partial_template_file_keeps_the_other_defaults(tmp_path):
    (tmp_path / CHAT_TEMPLATE_FILE).write_text(json.dumps({"user": "Q: "}))
    assert ChatTemplate.load(tmp_path) == ChatTemplate(user="Q: ")


@pytest.mark.parametrize(("content", "match"), [
    ('{"user": "Q: ", "bot": "A: "}', "unknown keys"),
    ('{"assistant": ""}', "must not be empty"),
    ('{"turn_end": 3}', "must be a string"),
    ('{"assistant": "<|endoftext|>"}', "must not contain"),
    ("[1, 2]", "JSON object"),
    ("{not json", "invalid JSON"),
])
def test_bad_template_files_raise(tmp_path, content: str, match: str):
    (tmp_path / CHAT_TEMPLATE_FILE).write_text(content)
    with pytest.raises(ValueError, match=match):
        ChatTemplate.load(tmp_path)


def test_render_refuses_a_conversation_without_assistant_turn(small_tokenizer):
    with pytest.raises(ValueError, match="no assistant turn"):
        ChatTemplate().render(CHAT[:2], small_tokenizer)


# --- records -------------------------------------------------------------------------------------
def test_prompt_response_record_equals_the_chat(tmp_path, small_tokenizer):
    pair = {"prompt": "Name a prime.", "response": "Seven."}
    chat = {"messages": [{"role": "user", "content": "Name a prime."},
                         {"role": "assistant", "content": "Seven."}]}
    assert record_to_messages(pair) == record_to_messages(chat)
    records = read_sft_records(_write_jsonl(tmp_path / "d.jsonl", [pair, "", chat, "   "]))
    assert len(records) == 2 and records[0] == records[1]
    template = ChatTemplate()
    assert template.render(records[0], small_tokenizer) == template.render(
        chat["messages"], small_tokenizer)


def test_extra_keys_are_ignored():
    record = {"id": 3, "messages": [{"role": "user", "content": "hi", "name": "x"},
                                    {"role": "assistant", "content": "hello"}]}
    assert record_to_messages(record) == [{"role": "user", "content": "hi"},
                                          {"role": "assistant", "content": "hello"}]


@pytest.mark.parametrize(("bad", "match"), [
    ({"prompt": "only a prompt"}, "no 'response'"),
    ({"response": "only a response"}, "no 'prompt'"),
    ({"prompt": 1, "response": "x"}, "'prompt' must be a string"),
    ({"text": "plain"}, "neither 'messages' nor 'prompt'/'response'"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "unknown role 'robot'"),
    ({"messages": [{"role": "user"}]}, "no 'content'"),
    ({"messages": [{"content": "hi"}]}, "no 'role'"),
    ({"messages": [{"role": "user", "content": ["hi"]},
                   {"role": "assistant", "content": "x"}]}, "content must be a string"),
    ({"messages": ["hi"]}, "must be an object"),
    ({"messages": [{"role": "assistant", "content": "x"}], "prompt": "p"}, "both"),
    ([1, 2], "must be a JSON object"),
    ("{broken", "invalid JSON"),
])
def test_bad_records_raise_with_the_line_number(tmp_path, bad, match: str):
    good = {"prompt": "a", "response": "b"}
    path = _write_jsonl(tmp_path / "d.jsonl", [good, "", good, bad, good])
    with pytest.raises(ValueError, match=match) as info:
        read_sft_records(path)
    assert "line 4" in str(info.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_sft_records(tmp_path / "absent.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no records"):
        read_sft_records(tmp_path / "empty.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    with pytest.raises(ValueError, match="no records"):
        read_sft_records(tmp_path / "blank.jsonl")


# --- packing -------------------------------------------------------------------------------------
def _random_examples(n: int, seed: int, max_len: int = 40) -> list[tuple[list[int], list[bool]]]:
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        length = int(torch.randint(2, max_len, (1,), generator=g))
        prompt = int(torch.randint(1, length, (1,), generator=g))
        ids = torch.randint(1, 500, (length,), generator=g).tolist()
        examples.append((ids, [False] * prompt + [True] * (length - prompt)))
    return examples


def test_pack_invariants():
    seq_len = 32
    examples = _random_examples(60, seed=0)  # some longer than seq_len
    examples.append(([5, 6, 7], [True, False, False]))  # only its first label: nothing trains
    rows = pack_examples(examples, seq_len)
    again = pack_examples(examples, seq_len)  # deterministic
    assert len(again) == len(rows) and all(
        torch.equal(getattr(a, k), getattr(b, k))
        for a, b in zip(rows, again, strict=True) for k in ("input_ids", "labels", "segment_ids")
    )
    seen = []
    for row in rows:
        for t in (row.input_ids, row.labels, row.segment_ids):
            assert t.shape == (seq_len,) and t.dtype == torch.long
        seg = row.segment_ids.tolist()
        assert seg == sorted(seg) and seg[0] == 0  # contiguous segments 0, 1, ...
        starts = [0] + [t for t in range(1, seq_len) if seg[t] != seg[t - 1]]
        assert all(row.labels[t] == IGNORE_INDEX for t in starts)
        pad = row.pad_tokens
        if pad:
            assert set(seg[seq_len - pad:]) == {row.num_examples}  # padding: its own segment
            assert row.labels[seq_len - pad:].eq(IGNORE_INDEX).all()
            assert row.input_ids[seq_len - pad:].eq(0).all()
        assert max(seg) == row.num_examples - (0 if pad else 1)
        for s in range(row.num_examples):
            where = row.segment_ids == s
            seen.append((row.input_ids[where].tolist(), row.labels[where].tolist()))
    # Every example with something to train is packed once, truncated to seq_len, and its
    # labels are its ids exactly where the mask is set (never on the first token).
    expected = []
    for ids, mask in examples:
        ids, mask = ids[:seq_len], mask[:seq_len]
        if any(mask[1:]):
            labels = [IGNORE_INDEX] + [t if m else IGNORE_INDEX
                                       for t, m in zip(ids[1:], mask[1:], strict=True)]
            expected.append((ids, labels))
    assert sorted(seen) == sorted(expected)
    assert count_truncated(examples, seq_len) == sum(len(e[0]) > seq_len for e in examples) > 0
    # Best-fit packing leaves little room: fewer rows than one per example, well filled.
    tokens = sum(len(ids) for ids, _ in expected)
    assert len(rows) < len(expected) and tokens / (len(rows) * seq_len) > 0.85


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="seq_len"):
        pack_examples([([1, 2], [True, True])], 1)
    with pytest.raises(ValueError, match="mask"):
        pack_examples([([1, 2, 3], [True, True])], 8)


def test_load_sft_dataset_stats(tmp_path, small_tokenizer):
    records = [{"prompt": f"Question {i}?", "response": "Answer " * (i % 5 + 1)}
               for i in range(30)]
    records.append({"messages": CHAT})
    records.append({"prompt": "long " * 200, "response": "cut"})  # prompt alone > seq_len
    path = _write_jsonl(tmp_path / "d.jsonl", records)
    seq_len = 48
    rendered = [ChatTemplate().render(m, small_tokenizer) for m in read_sft_records(path)]
    truncated = sum(len(ids) > seq_len for ids, _ in rendered)
    skipped = sum(not any(mask[1:seq_len]) for _, mask in rendered)
    assert 2 <= truncated < 30 and skipped >= 1  # the long prompt leaves nothing to train
    rows, stats = load_sft_dataset(path, small_tokenizer, ChatTemplate(), seq_len=seq_len)
    assert stats.examples == 32 and stats.truncated == truncated and stats.skipped == skipped
    assert stats.rows == len(rows)
    assert stats.supervised_tokens == sum(int((r.labels != IGNORE_INDEX).sum()) for r in rows)
    assert stats.tokens + stats.pad_tokens == seq_len * len(rows)
    assert sum(r.num_examples for r in rows) == 32 - skipped
    assert 0 < stats.fill <= 1 and stats.to_dict()["supervised_tokens"] > 0


# --- batches -------------------------------------------------------------------------------------
def _rows(n: int = 10, seq_len: int = 16):
    return pack_examples(_random_examples(n * 4, seed=1, max_len=seq_len), seq_len)


def test_batches_are_deterministic_and_cover_each_epoch():
    rows = _rows()
    n = len(rows)
    a, b = SFTBatches(rows, batch_size=2, seed=3), SFTBatches(rows, batch_size=2, seed=3)
    for step in (0, 1, 7, 100):
        ba, bb = a.batch(step), b.batch(step)
        assert set(ba) == {"input_ids", "labels", "segment_ids"}
        for key in ba:
            assert ba[key].dtype == torch.long and ba[key].shape == (2, 16)
            assert torch.equal(ba[key], bb[key])
    epoch = [int(i) for step in range(n // 2) for i in a.indices(step)]
    if n % 2 == 0:
        assert sorted(epoch) == list(range(n))
    assert len(set(epoch)) == len(epoch)
    other = SFTBatches(rows, batch_size=2, seed=4)
    assert any(not torch.equal(a.batch(s)["input_ids"], other.batch(s)["input_ids"])
               for s in range(5))
    row = int(a.indices(0)[0])
    assert torch.equal(a.batch(0)["labels"][0], rows[row].labels)


def test_rank_slices_partition_the_global_batch():
    batches = SFTBatches(_rows(), batch_size=6, seed=0)
    for step in (0, 5):
        whole = batches.batch(step)
        for world in (1, 2, 3, 6):
            parts = [batches.batch(step, rank=r, world_size=world) for r in range(world)]
            for key in whole:
                assert torch.equal(torch.cat([p[key] for p in parts]), whole[key])
    with pytest.raises(ValueError, match="divisible"):
        batches.batch(0, rank=0, world_size=4)
    with pytest.raises(ValueError, match="rank"):
        batches.batch(0, rank=2, world_size=2)


# --- end to end ----------------------------------------------------------------------------------
def test_a_few_steps_of_sft_lower_the_response_loss(tmp_path, make_model, small_tokenizer):
    tok = small_tokenizer
    colours = ["red", "green", "blue", "yellow", "black", "white"]
    things = ["apple", "leaf", "sky", "sun", "night", "snow"]
    records = [{"prompt": f"What colour is the {t}?", "response": f"The {t} is {c}."}
               for t, c in zip(things, colours, strict=True)] * 4
    path = _write_jsonl(tmp_path / "sft.jsonl", records)
    rows, stats = load_sft_dataset(path, tok, ChatTemplate(), seq_len=128)
    assert stats.rows * 2 <= stats.examples  # several examples per row
    model = make_model(vocab_size=tok.vocab_size, mixer_pattern="AM", num_hidden_layers=2,
                       max_position_embeddings=128, mamba_d_state=4).train()
    batches = SFTBatches(rows, batch_size=4, seed=0)
    probe = SFTBatches(rows, batch_size=len(rows), seed=0).batch(0)  # every row

    def response_loss() -> float:
        with torch.no_grad():
            return model(**probe).loss.item()

    before = response_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for step in range(20):
        b = batches.batch(step)
        loss = model(b["input_ids"], labels=b["labels"], segment_ids=b["segment_ids"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = response_loss()
    assert after < 0.5 * before, (before, after)
