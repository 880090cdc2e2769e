"""Bad config values through the real `hybridlm` entry point: `--set`, flags, run files and a
model directory's config.json. Each ends in one line naming the field and the value, exit 2,
no traceback, and every directory involved exactly as it was."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cli_errors import assert_one_line_error
from hybridlm import HybridLM, ModelConfig

TINY = dict(hidden_size=32, num_hidden_layers=1, intermediate_size=64, vocab_size=600)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """An existing directory passed as --out: a failed command must leave it alone."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("a finished run's notes")
    return run


def train(run: Path, *args: str) -> list:
    return ["train", "--data", run.parent / "no-data", "--out", run, *args]


SET_CASES = {  # argv after `train --data D --out RUN` -> words of the one-line error
    "lr=nan": (["--set", "lr=nan"], ["--set lr=nan", "lr='nan'", "must be a number"]),
    "lr=.inf": (["--set", "lr=.inf"], ["lr=inf", "finite"]),
    "--lr nan": (["--lr", "nan"], ["lr=nan", "finite"]),
    "--max-minutes inf": (["--max-minutes", "inf"], ["max_minutes=inf", "finite"]),
    "steps=true": (["--set", "steps=true"], ["steps=True", "integer", "bool"]),
    "steps=2.5": (["--set", "steps=2.5"], ["steps=2.5", "integer", "float"]),
    "--steps 0": (["--steps", "0"], ["steps=0", ">= 1"]),
    "seed=-1": (["--set", "seed=-1"], ["seed=-1", "2**63"]),
    "compile=1": (["--set", "compile=1"], ["compile=1", "true or false"]),
    "restart_steps=5": (["--set", "restart_steps=5"], ["restart_steps=5", "list of integers"]),
    "restart_steps=[true]": (["--set", "restart_steps=[true]"], ["restart_steps[0]=True"]),
    "restarts without steps": (["--set", "schedule=restarts"],
                               ["restart_steps=[]", "schedule='restarts'"]),
    "stepz=3": (["--set", "stepz=3"], ["unknown training field 'stepz'",
                                       "did you mean 'steps'"]),
    "no =": (["--set", "lr"], ["--set expects key=value", "lr"]),
    "model=[1,2]": (["--set", "model=[1,2]"], ["model must be a mapping", "list"]),
    "model.num_experts=abc": (["--set", "model.num_experts=abc"],
                              ["model.num_experts='abc'", "integer"]),
    "model.rope_theta=.nan": (["--set", "model.rope_theta=.nan"],
                              ["model.rope_theta=nan", "finite"]),
    "model.attn_qk_norm=yes?": (["--set", "model.attn_qk_norm=maybe"],
                               ["model.attn_qk_norm='maybe'", "true or false"]),
    "model.num_experts_per_layer=[4, true]": (
        ["--set", "model.num_experts_per_layer=[4, true]"],
        ["model.num_experts_per_layer[1]=True", "integer"]),
    "model.hiden_size": (["--set", "model.hiden_size=64"],
                         ["unknown model field 'hiden_size'", "did you mean 'hidden_size'"]),
    "model.num_experts=3": (["--set", "model.num_experts=3"],
                            ["preset 'tiny'", "num_experts=3", "intermediate_size=1024"]),
    "model.mixer_pattern=AX": (["--set", "model.mixer_pattern=AX"],
                               ["mixer_pattern='AX'", "unknown letters ['X']"]),
    "model.mlp_pattern=DS": (["--set", "model.mlp_pattern=DS"],
                             ["mlp_pattern='DS'", "unknown letters ['S']"]),
}


@pytest.mark.parametrize("case", SET_CASES)
def test_bad_set_and_flag_values(case, run_dir, capsys):
    args, words = SET_CASES[case]
    assert_one_line_error(train(run_dir, *args), *words, capsys=capsys, unchanged=[run_dir])


RUN_FILES = {  # run file name and text -> words of the one-line error
    "model is a list": ("run.yaml", "model: [1, 2]\n", ["run.yaml", "model must be a mapping",
                                                        "list"]),
    "restart_steps a scalar": ("run.yaml", "schedule: restarts\nrestart_steps: 5\n",
                               ["run.yaml", "restart_steps=5", "list of integers"]),
    "model int field true": ("run.yaml", "model:\n  num_experts: true\n",
                             ["model.num_experts=True", "integer"]),
    "model unknown field": ("run.yaml", "model:\n  num_expert: 2\n",
                            ["unknown model field 'num_expert'", "'num_experts'"]),
    "lr .nan": ("run.yaml", "lr: .nan\n", ["lr=nan", "finite"]),
    "steps a string": ("run.yaml", "steps: '10'\n", ["steps='10'", "integer", "string"]),
    "unknown field": ("run.yaml", "stepz: 3\n", ["unknown training field 'stepz'", "'steps'"]),
    "a list, not a mapping": ("run.yaml", "- lr: 1\n", ["run.yaml", "must hold a mapping"]),
    "not YAML": ("run.yaml", "lr: [unclosed\n", ["run.yaml", "not valid YAML/JSON"]),
    "JSON NaN": ("run.json", '{"lr": NaN}', ["run.json", "lr='NaN'", "must be a number"]),
    "JSON bool seed": ("run.json", '{"seed": false}', ["seed=False", "integer", "bool"]),
    "JSON huge float": ("run.json", '{"lr": 1e999}', ["lr=inf", "finite"]),
}


@pytest.mark.parametrize("case", RUN_FILES)
def test_bad_run_files(case, run_dir, tmp_path, capsys):
    name, text, words = RUN_FILES[case]
    config = tmp_path / "configs" / name
    config.parent.mkdir()
    config.write_text(text)
    assert_one_line_error(train(run_dir, "--config", config), *words, capsys=capsys,
                          unchanged=[run_dir, config.parent])


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tmp_path_factory.mktemp("saved") / "model"
    HybridLM(ModelConfig.from_preset("tiny", **TINY)).save_pretrained(model)
    return model


CONFIG_JSON = {  # how config.json is damaged -> words of the one-line error
    "int field true": (lambda c: {**c, "hidden_size": True}, ["hidden_size=True", "integer"]),
    "int field a string": (lambda c: {**c, "num_experts": "4"}, ["num_experts='4'", "integer"]),
    "int field a float": (lambda c: {**c, "vocab_size": 600.0}, ["vocab_size=600.0"]),
    "float field NaN": (lambda c: {**c, "rope_theta": float("nan")},  # json writes NaN
                        ["rope_theta=nan", "finite"]),
    "bool field 1": (lambda c: {**c, "tie_word_embeddings": 1},
                     ["tie_word_embeddings=1", "true or false"]),
    "out of range": (lambda c: {**c, "moe_ema_decay": 1.0},
                     ["moe_ema_decay=1.0", "[0, 1)"]),
    "unknown field": (lambda c: {**{k: v for k, v in c.items() if k != "hidden_size"},
                                 "hiden_size": 32},
                      ["unknown ModelConfig field 'hiden_size'", "did you mean 'hidden_size'"]),
    "a list": (lambda c: [c], ["ModelConfig must be a mapping", "list"]),
}


def damaged_copy(saved_model: Path, tmp_path: Path, damage) -> Path:
    model = tmp_path / "model"
    shutil.copytree(saved_model, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(damage(config)))
    return model


@pytest.mark.parametrize("case", CONFIG_JSON)
def test_generate_on_a_model_whose_config_json_is_bad(case, saved_model, tmp_path, capsys):
    damage, words = CONFIG_JSON[case]
    model = damaged_copy(saved_model, tmp_path, damage)
    assert_one_line_error(["generate", "--model", model, "--prompt", "hi"], "config.json",
                          *words, capsys=capsys, unchanged=[model])


def test_train_from_a_model_whose_config_json_is_bad(saved_model, prepared_dir, tmp_path,
                                                     capsys):
    model = damaged_copy(saved_model, tmp_path, CONFIG_JSON["int field true"][0])
    out = tmp_path / "out"
    assert_one_line_error(["train", "--data", prepared_dir, "--out", out, "--set",
                           f"init_from={model}", "--seq-len", "32"],
                          "config.json", "hidden_size=True", capsys=capsys,
                          unchanged=[model, prepared_dir])
    assert not out.exists()


def test_sft_from_a_model_whose_config_json_is_bad(saved_model, small_tokenizer, tmp_path,
                                                   capsys):
    model = damaged_copy(saved_model, tmp_path, CONFIG_JSON["float field NaN"][0])
    small_tokenizer.save(model)
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"prompt": f"{i}?", "response": f"{i}."}) + "\n"
                             for i in range(8)))
    out = tmp_path / "out"
    assert_one_line_error(["sft", "--model", model, "--data", chats, "--out", out,
                           "--batch-size", "2", "--seq-len", "32"],
                          "config.json", "rope_theta=nan", capsys=capsys, unchanged=[model])
    assert not out.exists()


def test_sft_refuses_model_overrides(saved_model, run_dir, capsys):
    # the model directory decides the shape; an override would be silently dropped
    assert_one_line_error(["sft", "--model", saved_model, "--data", "chats.jsonl", "--out",
                           run_dir, "--set", "model.tr_routing=zipf"],
                          "model overrides ['tr_routing'] have no effect", capsys=capsys,
                          unchanged=[run_dir, saved_model])
