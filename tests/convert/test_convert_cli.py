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
