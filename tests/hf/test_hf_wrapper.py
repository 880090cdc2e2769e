"""hybridlm model directories opened by HF transformers (hybridlm.hf): AutoModelForCausalLM
and pipeline give hybridlm's logits and greedy tokens, generate() decodes through hybridlm's
own caches (GQA, MLA latent, Mamba state), and the tokenizer's chat template renders what
`hybridlm generate --chat` renders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="the optional `hf` extra (transformers) is not installed")

from hybridlm import HybridLM, ModelConfig  # noqa: E402
from hybridlm.chat import ChatTemplate  # noqa: E402
from hybridlm.checkpoint import CheckpointError, load_config  # noqa: E402
from hybridlm.hf import HybridLMCache, HybridLMForCausalLM, HybridLMTokenizerFast, load  # noqa: E402

AutoModelForCausalLM = transformers.AutoModelForCausalLM
AutoTokenizer = transformers.AutoTokenizer

# mixer_pattern, mlp_pattern: every mixer alone, and a mixed stack with token routing (T) and
# a learned MoE (E)
STACKS = {"gqa": ("A", "D"), "mla": ("L", "D"), "mamba": ("M", "D"), "mixed": ("ALM", "TED")}
NEW_TOKENS = 12
PROMPT = "The history of"
FIXTURES = Path(__file__).parents[1] / "fixtures" / "legacy_model_dirs"


def history_config(vocab_size: int, mixers: str, mlps: str) -> ModelConfig:
    """conftest.tiny_config's shape (its name is not importable from every test folder),
    made history-dependent as conftest.make_history_model does (untied, init std 0.3)."""
    return ModelConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                       num_experts=4, max_position_embeddings=64, mixer_pattern=mixers,
                       mlp_pattern=mlps, tie_word_embeddings=False, initializer_range=0.3)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, small_tokenizer) -> dict[str, Path]:
    """One saved history-dependent model directory per stack (config.json, weights,
    tokenizer.json); see conftest.make_history_model for why these settings."""
    dirs = {}
    for name, (mixers, mlps) in STACKS.items():
        config = history_config(small_tokenizer.vocab_size, mixers, mlps)
        torch.manual_seed(0)
        directory = tmp_path_factory.mktemp(name)
        HybridLM(config).eval().save_pretrained(directory)
        small_tokenizer.save(directory)
        dirs[name] = directory
    return dirs


def prompt_ids(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer.encode(PROMPT)])  # (1, T0)


def reference_greedy(directory: Path, ids: torch.Tensor) -> torch.Tensor:
    model = HybridLM.from_pretrained(directory).eval()
    return model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=0)


@pytest.mark.parametrize("stack", STACKS)
def test_auto_model_gives_hybridlms_logits(model_dirs, small_tokenizer, stack):
    directory = model_dirs[stack]
    model = AutoModelForCausalLM.from_pretrained(directory)
    assert type(model) is HybridLMForCausalLM and not model.training
    ids = torch.tensor([small_tokenizer.encode("Once upon a time, in a land")])
    with torch.no_grad():
        expected = HybridLM.from_pretrained(directory).eval()(ids).logits
        got = model(ids).logits
        masked = model(ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(masked, expected, rtol=0, atol=0)


@pytest.mark.parametrize("stack", STACKS)
def test_generate_equals_hybridlm_greedy_through_hybridlms_caches(model_dirs, small_tokenizer,
                                                                  stack, monkeypatch):
    directory = model_dirs[stack]
    ids = prompt_ids(small_tokenizer)
    expected = reference_greedy(directory, ids)
    assert len(set(expected[0, ids.shape[1]:].tolist())) >= 4  # the model reads its history
    model = AutoModelForCausalLM.from_pretrained(directory)
    fed = []  # (columns fed, cache given) per forward of the wrapped HybridLM
    forward = HybridLM.forward

    def recording(self, input_ids, *args, cache=None, **kwargs):
        fed.append((input_ids.shape[1], cache is not None))
        return forward(self, input_ids, *args, cache=cache, **kwargs)

    monkeypatch.setattr(HybridLM, "forward", recording)
    out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert out.tolist() == expected.tolist()
    # one prefill of the prompt, then one token per step, each continuing hybridlm's cache
    assert fed == [(ids.shape[1], True)] + [(1, True)] * (NEW_TOKENS - 1)


def test_generate_stops_at_eos_as_hybridlm_does(model_dirs, small_tokenizer):
    directory = model_dirs["mixed"]
    ids = prompt_ids(small_tokenizer)
    model = AutoModelForCausalLM.from_pretrained(directory)
    assert model.generation_config.eos_token_id == 0  # <|endoftext|>, as `hybridlm generate`
    greedy = reference_greedy(directory, ids)[0, ids.shape[1]:].tolist()
    stop = greedy[5]  # a token it emits: taken as the eos, generation ends there
    expected = HybridLM.from_pretrained(directory).eval().generate(
        ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=stop)
    assert expected.shape[1] < ids.shape[1] + NEW_TOKENS
    out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=stop)
    assert out.tolist() == expected.tolist()


@pytest.mark.parametrize(("stack", "breakage"), [
    ("gqa", "kv_cache_forgets"), ("mla", "mla_cache_forgets"),
    ("mamba", "mamba_ssm_state_dropped"), ("mamba", "mamba_conv_state_dropped"),
    ("mixed", "positions_restart_at_0"),
])
def test_a_cache_that_loses_the_history_changes_generate(model_dirs, small_tokenizer, stack,
                                                         breakage, break_cache):
    """The cache really carries the history: with the cache used as it should be, generate
    equals a decode that recomputes every step from scratch (use_cache=False); with one of
    its states broken, it does not."""
    model = AutoModelForCausalLM.from_pretrained(model_dirs[stack])
    ids = prompt_ids(small_tokenizer)
    uncached = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=False)
    cached = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert cached.tolist() == uncached.tolist()
    break_cache(breakage)
    broken = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert broken.tolist() != uncached.tolist()


@pytest.mark.parametrize("stack", STACKS)
def test_pipeline_text_equals_hybridlm_greedy_text(model_dirs, small_tokenizer, stack):
    directory = model_dirs[stack]
    expected = reference_greedy(directory, prompt_ids(small_tokenizer))
    generator = transformers.pipeline("text-generation", model=str(directory))
    assert isinstance(generator.model, HybridLMForCausalLM)
    assert isinstance(generator.tokenizer, HybridLMTokenizerFast)
    text = generator(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)[0]["generated_text"]
    assert text == small_tokenizer.decode(expected[0].tolist(), skip_special_tokens=True)


def test_a_left_padded_batch_gives_each_row_its_own_greedy_tokens(model_dirs, small_tokenizer,
                                                                  break_cache):
    directory = model_dirs["mixed"]
    prompts = ["The history of", "A very long time ago, the people of the north"]
    tokenizer = AutoTokenizer.from_pretrained(directory)
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    assert not bool(batch["attention_mask"].all())  # the rows really are padded (left)
    model = AutoModelForCausalLM.from_pretrained(directory)
    out = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
    new = out[:, batch["input_ids"].shape[1]:]
    for row, prompt in enumerate(prompts):
        alone = reference_greedy(directory, torch.tensor([small_tokenizer.encode(prompt)]))
        assert new[row].tolist() == alone[0, -NEW_TOKENS:].tolist()
    break_cache("positions_of_row_0")  # rows numbered as if they had one length
    broken = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert broken.tolist() != out.tolist()


def test_generate_refuses_beam_search(model_dirs, small_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(model_dirs["gqa"])
    with pytest.raises(NotImplementedError, match="num_beams=2"):
        model.generate(prompt_ids(small_tokenizer), max_new_tokens=3, num_beams=2,
                       do_sample=False)


def test_bad_generate_and_load_arguments_are_refused_by_name(model_dirs, small_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(model_dirs["gqa"])
    ids = prompt_ids(small_tokenizer)  # 64 positions (tiny_config)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings=64"):
        model.generate(ids, max_new_tokens=65 - ids.shape[1], do_sample=False)
    with pytest.raises(ValueError, match="device_map='auto'"):
        AutoModelForCausalLM.from_pretrained(model_dirs["gqa"], device_map="auto")
    with pytest.raises(ValueError, match="past_key_values must be a HybridLMCache"):
        model(ids, past_key_values=transformers.DynamicCache())


def test_forward_returns_hybridlms_cache_to_continue_from(model_dirs, small_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(model_dirs["mixed"])
    ids = torch.tensor([small_tokenizer.encode("Once upon a time, in a land far away")])
    with torch.no_grad():
        whole = model(ids).logits
        first = model(ids[:, :5], use_cache=True)
        assert isinstance(first.past_key_values, HybridLMCache)
        rest = model(ids[:, 5:], past_key_values=first.past_key_values, use_cache=True)
    assert rest.past_key_values.get_seq_length() == ids.shape[1]
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), whole,
                               rtol=1e-5, atol=1e-5)


# --- tokenizer and chat template -------------------------------------------------------------
CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is a cache?"},
    {"role": "assistant", "content": "Memory of the past."},
    {"role": "user", "content": "And a \"state\"?\nSay it in one line."},
]


@pytest.mark.parametrize("template", [
    ChatTemplate(),
    ChatTemplate(system="### System ¶\n", user="{{ user }} \"q\" \\n ", assistant="<A>: 🙂\t",
                 turn_end="\n\n"),
], ids=["default", "custom"])
def test_apply_chat_template_renders_what_generate_chat_renders(model_dirs, small_tokenizer,
                                                                template, tmp_path):
    directory = tmp_path / "m"
    shutil.copytree(model_dirs["gqa"], directory)
    template.save(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert isinstance(tokenizer, HybridLMTokenizerFast)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|endoftext|>", 0)
    # `hybridlm generate --chat` renders one user turn with render_prompt (cli.cmd_generate)
    for messages in (CONVERSATION[1:2], CONVERSATION):
        text = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=True)
        rendered = template.render_prompt(messages, small_tokenizer)
        assert text == small_tokenizer.decode(rendered)
    full = CONVERSATION[:3]  # ends with an assistant turn, closed by eos
    text = tokenizer.apply_chat_template(full, tokenize=False)
    assert text == small_tokenizer.decode(template.render(full, small_tokenizer)[0])


def test_the_default_template_also_gives_generate_chats_token_ids(model_dirs, small_tokenizer):
    """The same ids too, where the markers end on a pre-tokenizer boundary (the default's
    end in a newline); `generate --chat` encodes marker and content apart, so a content
    ending in spaces before a newline marker could merge differently when encoded whole."""
    tokenizer = AutoTokenizer.from_pretrained(model_dirs["gqa"])
    for messages in (CONVERSATION[1:2], CONVERSATION):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                            return_dict=False)
        assert list(ids) == ChatTemplate().render_prompt(messages, small_tokenizer)


def test_the_tokenizer_encodes_and_decodes_as_hybridlms(model_dirs, small_tokenizer):
    tokenizer = AutoTokenizer.from_pretrained(model_dirs["gqa"])
    text = "  Leading spaces,\ttabs, emoji 🙂 and <|endoftext|> inside."
    ids = small_tokenizer.encode(text)
    assert tokenizer(text)["input_ids"] == ids  # no special tokens added
    assert tokenizer.decode(ids) == small_tokenizer.decode(ids) == text


# --- files --------------------------------------------------------------------------------------
def test_config_json_names_its_model_type_and_round_trips(model_dirs, tmp_path):
    directory = model_dirs["mixed"]
    assert json.loads((directory / "config.json").read_text())["model_type"] == "hybridlm"
    model = AutoModelForCausalLM.from_pretrained(directory)
    model.save_pretrained(tmp_path / "again")
    again = HybridLM.from_pretrained(tmp_path / "again")
    assert again.config == load_config(directory)
    for name, tensor in HybridLM.from_pretrained(directory).state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


def test_a_foreign_model_type_is_refused_by_name(model_dirs, tmp_path):
    directory = tmp_path / "m"
    shutil.copytree(model_dirs["gqa"], directory)
    data = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**data, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type='llama'"):
        load_config(directory)


@pytest.mark.parametrize("name", ["token_routed", "mixed"])
def test_directories_without_model_type_open_through_hybridlm_hf_load(name):
    directory = FIXTURES / name
    assert "model_type" not in json.loads((directory / "config.json").read_text())
    with pytest.raises(ValueError, match="model_type"):  # nothing for AutoConfig to go on
        transformers.AutoConfig.from_pretrained(directory)
    model = load(directory)
    expected = json.loads((directory / "expected_logits.json").read_text())
    with torch.no_grad():
        logits = model(torch.tensor(expected["input_ids"])).logits
    torch.testing.assert_close(logits, torch.tensor(expected["logits"]), atol=1e-5, rtol=0)


def test_a_directory_converted_from_hf_generates_with_its_own_eos(tmp_path):
    """`hybridlm convert --from-hf` output (a Llama tokenizer, eos </s> named by
    tokenizer_config.json) opens with AutoModelForCausalLM and stops where hybridlm does."""
    from convert_helpers import save_hf_model
    from hybridlm.convert.command import convert_from_hf
    from hybridlm.data import Tokenizer

    save_hf_model(tmp_path / "hf", "llama")
    convert_from_hf(tmp_path / "hf", tmp_path / "ours")
    eos = Tokenizer.from_file(tmp_path / "ours").eos_token_id
    assert eos != 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert model.generation_config.eos_token_id == eos
    assert AutoTokenizer.from_pretrained(tmp_path / "ours").eos_token_id == eos
    ids = torch.tensor([[5, 9, 13, 2, 7]])
    expected = HybridLM.from_pretrained(tmp_path / "ours").eval().generate(
        ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos)
    assert model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False).tolist() == (
        expected.tolist())
