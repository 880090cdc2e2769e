"""Generation stops at stop strings (the chat template's role markers, plain text a model can
write), so `generate --chat` prints the reply, not a next turn the model invents."""

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from hybridlm.chat import ChatTemplate
from hybridlm.cli import main
from hybridlm.infer.generate import cut_at_stop_strings, generate
from hybridlm.layers.cache_rows import RowLengths
from hybridlm.model import ModelCache

REPLY = "Five."
INVENTED = "<|user|>\nAnd six plus one?"


@dataclass
class ScriptLog(RowLengths):
    """The ScriptedModel's "cache": which script each row follows (its row of the engine's
    pool) and how long its prompt was, so the model knows how many tokens it produced."""

    rows: torch.Tensor  # (B,) long
    prompt_lengths: torch.Tensor  # (B,) long

    def _rows(self) -> torch.Tensor:
        return self.rows

    def reset_rows(self, rows: torch.Tensor) -> None:
        super().reset_rows(rows)
        self.prompt_lengths.index_fill_(0, rows, 0)


class ScriptedModel:
    """A stand-in for HybridLM whose greedy continuation of the prompt in row i is
    `scripts[i]` token after token (then eos): the continuation we need, with a real
    tokenizer. It speaks the model's cache protocol the engine uses (`new_cache`, forwards
    with `input_lengths` that advance the cache's lengths); generate gives prompt i row i."""

    def __init__(self, scripts: list[list[int]], eos: int, vocab: int) -> None:
        self.scripts, self.eos, self.vocab = scripts, eos, vocab
        self.config = SimpleNamespace(max_position_embeddings=512, vocab_size=vocab)
        self.training = False

    def check_causal(self) -> None:
        pass

    def new_cache(self, batch: int, max_len: int) -> ModelCache:
        rows = torch.arange(batch)
        log = ScriptLog(rows=rows, prompt_lengths=torch.zeros_like(rows))
        return ModelCache([log], torch.zeros_like(rows))

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def __call__(self, input_ids: torch.Tensor, cache: ModelCache,
                 input_lengths: torch.Tensor) -> SimpleNamespace:
        log = cache.layers[0]
        starting = cache.lengths == 0  # rows fed their prompt (in one chunk: generate's)
        log.prompt_lengths[starting] = input_lengths[starting]  # writes through to the pool
        cache.lengths = log.lengths = cache.lengths + input_lengths
        produced = (cache.lengths - log.prompt_lengths).tolist()  # tokens generated so far
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for i, (row, n, fed) in enumerate(zip(log.rows.tolist(), produced,
                                              input_lengths.tolist(), strict=True)):
            if fed:
                script = self.scripts[row]
                logits[i, fed - 1, script[n] if n < len(script) else self.eos] = 1.0
        return SimpleNamespace(logits=logits)

    def generate(self, input_ids, max_new_tokens, **kwargs):
        return generate(self, input_ids, max_new_tokens, **kwargs)


def scripted(tokenizer, *texts: str) -> ScriptedModel:
    return ScriptedModel([tokenizer.encode(t) for t in texts], tokenizer.eos_token_id,
                         tokenizer.vocab_size)


def new_text(tokenizer, out: torch.Tensor, prompt_length: int, row: int = 0) -> str:
    return tokenizer.decode(out[row, prompt_length:].tolist())


def test_a_row_stops_on_the_token_that_completes_a_stop_string(small_tokenizer):
    tok = small_tokenizer
    model = scripted(tok, REPLY + INVENTED)
    prompt = torch.tensor([tok.encode("<|user|>\nWhat is two plus three?\n<|assistant|>\n")])
    stops = ChatTemplate().stop_strings()
    out = generate(model, prompt, 40, do_sample=False, eos_token_id=tok.eos_token_id,
                   stop_strings=stops, tokenizer=tok)
    text = new_text(tok, out, prompt.shape[1])
    assert "<|user|>" in text and "And six" not in text
    # the last token completed the marker: without it, no marker yet
    assert "<|user|>" not in tok.decode(out[0, prompt.shape[1]:-1].tolist())
    assert cut_at_stop_strings(text, stops) == REPLY
    # the marker inside the prompt does not stop anything
    assert tok.encode("<|user|>")[0] in prompt[0].tolist()


def test_without_stop_strings_the_model_runs_on_into_an_invented_turn(small_tokenizer):
    """The failure the stop strings prevent (a check that the script does what it says)."""
    tok = small_tokenizer
    model = scripted(tok, REPLY + INVENTED)
    prompt = torch.tensor([tok.encode("Hi")])
    out = generate(model, prompt, 40, do_sample=False, eos_token_id=tok.eos_token_id)
    assert new_text(tok, out, prompt.shape[1]).startswith(REPLY + INVENTED)


def test_stopped_rows_are_padded_while_others_go_on(small_tokenizer):
    tok = small_tokenizer
    model = scripted(tok, "Yes.<|user|>\nmore words here", "A longer reply without markers")
    prompt = torch.tensor([[5], [7]])  # one token each
    out = generate(model, prompt, 40, do_sample=False, eos_token_id=tok.eos_token_id,
                   stop_strings=["<|user|>"], tokenizer=tok)
    first = out[0, 1:].tolist()
    stopped_at = len(tok.encode("Yes.<|user|>"))
    assert tok.decode(first[:stopped_at]) == "Yes.<|user|>"
    assert set(first[stopped_at:]) == {tok.eos_token_id}
    assert tok.decode(out[1, 1:].tolist(), skip_special_tokens=True) == (
        "A longer reply without markers")


def test_cut_at_the_earliest_stop_string():
    assert cut_at_stop_strings("ab<|system|>c<|user|>", ["<|user|>", "<|system|>"]) == "ab"
    assert cut_at_stop_strings("no markers", ["<|user|>"]) == "no markers"


def test_stop_strings_are_the_templates_role_markers():
    custom = ChatTemplate(system="### System:\n", user="### User:\n", assistant="### Bot:\n")
    assert custom.stop_strings() == ["### System:", "### User:", "### Bot:"]
    assert ChatTemplate().stop_strings() == ["<|system|>", "<|user|>", "<|assistant|>"]


def test_bad_stop_strings_are_refused(small_tokenizer):
    model = scripted(small_tokenizer, REPLY)
    prompt = torch.tensor([[1]])
    for bad in ("<|user|>", [], [""]):
        with pytest.raises(ValueError, match="stop_strings"):
            generate(model, prompt, 3, do_sample=False, eos_token_id=0, stop_strings=bad,
                     tokenizer=small_tokenizer)
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, prompt, 3, do_sample=False, eos_token_id=0, stop_strings=["x"])
    with pytest.raises(ValueError, match="eos_token_id"):
        generate(model, prompt, 3, do_sample=False, stop_strings=["x"],
                 tokenizer=small_tokenizer)


def test_generate_chat_prints_the_reply_without_the_invented_turn(small_tokenizer, tmp_path,
                                                                  monkeypatch, capsys):
    from hybridlm.model import HybridLM

    small_tokenizer.save(tmp_path)
    model = scripted(small_tokenizer, REPLY + INVENTED)
    monkeypatch.setattr(HybridLM, "from_pretrained", classmethod(lambda cls, path: model))
    assert main(["generate", "--model", str(tmp_path), "--chat", "--prompt",
                 "What is two plus three?", "--greedy", "--max-new-tokens", "40"]) == 0
    assert capsys.readouterr().out == REPLY + "\n"
