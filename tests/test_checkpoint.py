import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from hybridlm import HybridLM, zipf_routing_table
from hybridlm.checkpoint import CheckpointError


def test_save_load_gives_identical_logits_and_routing(make_model, tmp_path):
    model = make_model(tr_routing="zipf", pid_scaler=True)
    model.set_routing_table(zipf_routing_table(torch.arange(97) * 3 % 11, 4))
    model.save_pretrained(tmp_path / "m")
    loaded = HybridLM.from_pretrained(tmp_path / "m").eval()
    assert loaded.config == model.config
    ids = torch.randint(0, 97, (2, 9))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    for a, b in zip(model.layers, loaded.layers, strict=True):
        assert torch.equal(a.mlp.router.table, b.mlp.router.table)
    assert loaded.lm_head.weight.data_ptr() == loaded.embed_tokens.weight.data_ptr()


def test_save_keeps_other_files_in_the_directory(make_model, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "tokenizer.json").write_text("{}")
    make_model().save_pretrained(tmp_path / "m")
    make_model().save_pretrained(tmp_path / "m")  # overwrite an existing model
    assert (tmp_path / "m" / "tokenizer.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp dirs left


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        HybridLM.from_pretrained(tmp_path / "nope")


def test_missing_weights_and_damaged_files(make_model, tmp_path):
    make_model().save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="damaged"):
        HybridLM.from_pretrained(tmp_path / "m")
    weights.unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        HybridLM.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="damaged"):
        HybridLM.from_pretrained(tmp_path / "m")


def test_missing_and_unexpected_tensors_are_listed(make_model, tmp_path):
    make_model().save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    state = load_file(str(path))
    del state["layers.1.mixer.o_proj.weight"]
    state["layers.9.extra"] = torch.zeros(2)
    state["norm.weight"] = torch.zeros(5)
    save_file(state, str(path))
    with pytest.raises(CheckpointError) as err:
        HybridLM.from_pretrained(tmp_path / "m")
    msg = str(err.value)
    assert "layers.1.mixer.o_proj.weight" in msg and "layers.9.extra" in msg
    assert "norm.weight: file (5,) vs model (32,)" in msg


def test_config_mismatch_is_reported(make_model, tmp_path):
    make_model().save_pretrained(tmp_path / "m")
    cfg_path = tmp_path / "m" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["num_hidden_layers"] = 4
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing tensors.*layers.3"):
        HybridLM.from_pretrained(tmp_path / "m")
