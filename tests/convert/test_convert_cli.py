"""`hybridlm convert` on the command line: output policy (--out, --overwrite), one-line errors,
and the optional transformers import."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cli_errors import assert_one_line_error, snapshot
from convert_helpers import save_hf_model
from hybridlm.cli import main
from hybridlm.config import ModelConfig
from hybridlm.convert import convert_from_hf, convert_to_hf
from hybridlm.convert.common import ConvertError, require_transformers
from hybridlm.model import HybridLM


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "hf"
    save_hf_model(path, "llama")
    return path


def test_convert_writes_a_model_and_refuses_to_overwrite_it_unless_told(hf_dir, tmp_path,
                                                                          capsys):
    out = tmp_path / "ours"
    assert main(["convert", "--from-hf", str(hf_dir), "--out", str(out)]) == 0
    assert "Llama" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors",
                                                "tokenizer.json", "tokenizer_config.json"}
    assert_one_line_error(["convert", "--from-hf", str(hf_dir), "--out", str(out)],
                          "--overwrite", str(out), capsys=capsys, unchanged=[out])
    assert main(["convert", "--from-hf", str(hf_dir), "--out", str(out), "--overwrite"]) == 0


def test_convert_never_writes_over_other_files(hf_dir, tmp_path, capsys):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        assert_one_line_error(["convert", "--from-hf", str(hf_dir), "--out", str(out), *extra],
                              "notes.txt", capsys=capsys, unchanged=[out])


def test_a_refused_model_is_one_line_and_writes_nothing(tmp_path, capsys):
    src = tmp_path / "mu"
    HybridLM(ModelConfig.from_preset("tiny", num_hidden_layers=2, vocab_size=300,
                                     hidden_size=64, intermediate_size=64)).save_pretrained(src)
    out = tmp_path / "hf"
    assert_one_line_error(["convert", "--to-hf", str(src), "--out", str(out)],
                          "mu guidance", "token routing", capsys=capsys, unchanged=[src])
    assert not out.exists()


def test_a_directory_without_config_is_refused(tmp_path, capsys):
    assert_one_line_error(["convert", "--from-hf", str(tmp_path), "--out", str(tmp_path / "o")],
                          "config.json", "nothing is downloaded", capsys=capsys)


def test_a_refused_hf_field_is_one_line_and_writes_nothing(tmp_path, capsys):
    src = tmp_path / "hf"
    save_hf_model(src, "llama")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "attention_bias": True}))
    before = snapshot(src)
    assert_one_line_error(["convert", "--from-hf", str(src), "--out", str(tmp_path / "o")],
                          "attention_bias=True", "not supported", capsys=capsys)
    assert snapshot(src) == before and not (tmp_path / "o").exists()


def test_without_transformers_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers fails
    with pytest.raises(ConvertError, match=r"pip install 'hybridlm\[hf\]'"):
        require_transformers()


def test_importing_hybridlm_and_its_cli_does_not_import_transformers():
    code = ("import sys, hybridlm, hybridlm.cli, hybridlm.convert; "
            "print('transformers' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False"


def test_an_hf_chat_template_is_carried_both_ways_and_the_summary_says_so(tmp_path):
    transformers = pytest.importorskip("transformers")
    save_hf_model(tmp_path / "hf", "llama")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf_tok.chat_template = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
    hf_tok.save_pretrained(tmp_path / "hf")
    summary = convert_from_hf(tmp_path / "hf", tmp_path / "ours")
    assert "generate --chat uses chat_template.json" in summary
    convert_to_hf(tmp_path / "ours", tmp_path / "back")
    messages = [{"role": "user", "content": "the lazy fox"}]
    back = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    assert back.apply_chat_template(messages, tokenize=False) == hf_tok.apply_chat_template(
        messages, tokenize=False)
