"""Sharded safetensors (model-0000i-of-0000N.safetensors + index) and meta-device loading."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hybridlm import HybridLM, ModelConfig, zipf_routing_table
from hybridlm.checkpoint import CheckpointError, check_weights, load_weights
from hybridlm.checkpoint_shards import parse_size
from hybridlm.config import PRESETS

SHARD = 6_000  # bytes: the tiny mixed model below (~190 kB) spreads over many shards


def mixed_model(tied: bool, seed: int = 0) -> HybridLM:
    """A, L and M mixers over T, E and D MLPs, with mu guidance, a fitted routing table and a
    moved selection bias: every kind of saved tensor a model has."""
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, num_experts=4, max_position_embeddings=64,
        mixer_pattern="ALM", mlp_pattern="TED", moe_balance="aux_free", mla_kv_rank=16,
        mla_rope_dim=8, tie_word_embeddings=tied, initializer_range=0.2,
    )
    model = HybridLM(config).eval()
    model.set_routing_table(zipf_routing_table(torch.arange(97) * 3 % 11, 4))
    model.layers[1].mlp.router.expert_bias.copy_(torch.tensor([0.5, -0.25, 0.0, 1.0]))
    return model


def saved_state(model: HybridLM) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint holds, tied lm_head included (compared as a name too)."""
    return model.state_dict()


def files(directory):
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("tied", [True, False])
def test_sharded_round_trip_gives_identical_tensors_and_logits(tmp_path, tied):
    model = mixed_model(tied)
    model.save_pretrained(tmp_path / "m", max_shard_size=SHARD)
    shards = [n for n in files(tmp_path / "m") if n.startswith("model-")]
    assert len(shards) > 3 and "model.safetensors" not in files(tmp_path / "m")
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                      for i in range(1, len(shards) + 1)]
    loaded = HybridLM.from_pretrained(tmp_path / "m").eval()
    before, after = saved_state(model), saved_state(loaded)
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].dtype == after[name].dtype, name
        assert torch.equal(before[name], after[name]), name
    ids = torch.randint(0, 97, (2, 11))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    shares = loaded.lm_head.weight.data_ptr() == loaded.embed_tokens.weight.data_ptr()
    assert shares == tied
    assert loaded.lm_head.weight is loaded.embed_tokens.weight or not tied


def test_unsaved_buffers_are_computed_after_a_meta_device_load(tmp_path):
    model = mixed_model(tied=True)
    model(torch.randint(0, 97, (1, 5)))  # counts some load, which is not saved
    model.save_pretrained(tmp_path / "m", max_shard_size=SHARD)
    loaded = HybridLM.from_pretrained(tmp_path / "m")
    fresh = mixed_model(tied=True)
    saved = set(loaded.state_dict())
    unsaved = {n: b for n, b in loaded.named_buffers() if n not in saved}
    assert {n.rsplit(".", 1)[1] for n in unsaved} == {"inv_freq", "load_since_balance"}
    for name, buffer in unsaved.items():
        assert not buffer.is_meta and buffer.dtype == fresh.get_buffer(name).dtype, name
        assert torch.equal(buffer, fresh.get_buffer(name)), name
    assert all(not t.is_meta for t in loaded.parameters())
    marks = {n: p.__dict__ for n, p in fresh.named_parameters() if p.__dict__}
    assert set(marks) == {"layers.2.mixer.A_log", "layers.2.mixer.D"}  # no weight decay
    assert {n: p.__dict__ for n, p in loaded.named_parameters() if p.__dict__} == marks


def test_index_file_format(tmp_path):
    model = mixed_model(tied=True)
    model.save_pretrained(tmp_path / "m", max_shard_size=SHARD)
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert set(index) == {"metadata", "weight_map"}
    expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert set(index["weight_map"]) == set(expected)  # tied lm_head stored once, as embed
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in expected.values())
    for shard in set(index["weight_map"].values()):
        names = {n for n, f in index["weight_map"].items() if f == shard}
        with safe_open(str(tmp_path / "m" / shard), framework="pt") as opened:
            assert set(opened.keys()) == names
        size = sum(expected[n].numel() * expected[n].element_size() for n in names)
        assert size <= SHARD or len(names) == 1  # only a single oversized tensor exceeds it


def test_a_model_within_the_shard_size_is_one_file(tmp_path, make_model):
    make_model().save_pretrained(tmp_path / "m")
    assert files(tmp_path / "m") == ["config.json", "model.safetensors"]


def test_a_new_save_replaces_the_weights_of_either_layout_and_keeps_other_files(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "tokenizer.json").write_text("{}")
    (out / "notes-model-00001.txt").write_text("mine")
    mixed_model(tied=True, seed=1).save_pretrained(out, max_shard_size=SHARD)
    many = [n for n in files(out) if n.startswith("model-")]
    mixed_model(tied=True, seed=2).save_pretrained(out, max_shard_size=4 * SHARD)
    fewer = [n for n in files(out) if n.startswith("model-")]
    assert 1 < len(fewer) < len(many) and not set(fewer) & set(many)  # no stale shard left
    final = mixed_model(tied=True, seed=3)
    final.save_pretrained(out)
    assert files(out) == ["config.json", "model.safetensors", "notes-model-00001.txt",
                          "tokenizer.json"]
    assert (out / "notes-model-00001.txt").read_text() == "mine"
    loaded = HybridLM.from_pretrained(out)
    assert all(torch.equal(a, b) for a, b in zip(saved_state(final).values(),
                                                 saved_state(loaded).values(), strict=True))
    final.save_pretrained(out, max_shard_size=SHARD)  # and back: the single file goes
    assert "model.safetensors" not in files(out) and "tokenizer.json" in files(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp dirs left


def test_both_layouts_in_one_directory_are_refused(tmp_path):
    mixed_model(tied=True).save_pretrained(tmp_path / "m", max_shard_size=SHARD)
    mixed_model(tied=True).save_pretrained(tmp_path / "single")
    (tmp_path / "single" / "model.safetensors").rename(tmp_path / "m" / "model.safetensors")
    with pytest.raises(CheckpointError, match="both model.safetensors and model.safetensors"):
        HybridLM.from_pretrained(tmp_path / "m")


def test_missing_shard_is_named(tmp_path):
    mixed_model(tied=True).save_pretrained(tmp_path / "m", max_shard_size=SHARD)
    shard = sorted((tmp_path / "m").glob("model-00002-of-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shards that are missing: \\['{shard.name}'\\]"):
        HybridLM.from_pretrained(tmp_path / "m")


def test_index_naming_a_tensor_its_shard_lacks_is_named(tmp_path):
    mixed_model(tied=True).save_pretrained(tmp_path / "m", max_shard_size=SHARD)
    path = tmp_path / "m" / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    first = index["weight_map"]["norm.weight"]
    index["weight_map"]["layers.7.ghost.weight"] = first
    path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"do not hold: {{'{first}': "
                                              r"\['layers.7.ghost.weight'\]}"):
        HybridLM.from_pretrained(tmp_path / "m")


def test_missing_and_unexpected_keys_of_a_sharded_checkpoint_are_named(tmp_path):
    mixed_model(tied=True).save_pretrained(tmp_path / "m", max_shard_size=SHARD)
    path = tmp_path / "m" / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    shard = index["weight_map"].pop("layers.2.mixer.A_log")
    state = load_file(str(tmp_path / "m" / shard))
    state["layers.9.extra"] = torch.zeros(2)
    save_file(state, str(tmp_path / "m" / shard))
    index["weight_map"]["layers.9.extra"] = shard
    path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as err:
        HybridLM.from_pretrained(tmp_path / "m")
    assert "missing tensors ['layers.2.mixer.A_log']" in str(err.value)
    assert "unexpected tensors ['layers.9.extra']" in str(err.value)
    assert "model.safetensors.index.json does not match config.json" in str(err.value)


def test_damaged_index_and_truncated_shard(tmp_path):
    model = mixed_model(tied=True)
    model.save_pretrained(tmp_path / "m", max_shard_size=SHARD)
    shard = sorted((tmp_path / "m").glob("model-00003-of-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=f"{shard.name} is damaged"):
        check_weights(model, tmp_path / "m")  # found from the headers, as a resume does
    (tmp_path / "m" / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="index.json is damaged: KeyError"):
        HybridLM.from_pretrained(tmp_path / "m")


def test_load_weights_into_an_existing_model_reads_shards(tmp_path):
    trained = mixed_model(tied=False, seed=1)
    trained.save_pretrained(tmp_path / "m", max_shard_size=SHARD)
    model = mixed_model(tied=False, seed=2)
    load_weights(model, tmp_path / "m")  # the trainer's resume path
    assert all(torch.equal(a, b) for a, b in zip(saved_state(trained).values(),
                                                 saved_state(model).values(), strict=True))


def test_load_in_bfloat16_casts_weights_but_not_what_layers_keep_in_fp32(tmp_path):
    model = mixed_model(tied=True)
    model.save_pretrained(tmp_path / "m", max_shard_size=SHARD)
    loaded = HybridLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    kept = {"mixer.A_log", "mixer.D", "mixer.dt_proj.weight", "mixer.dt_proj.bias",
            "mixer.conv1d.weight", "mixer.conv1d.bias", "mlp.router.gate.weight"}
    parameters = {name for name, _ in loaded.named_parameters(remove_duplicate=False)}
    assert {f"layers.2.{n}" for n in kept if "mixer" in n} <= parameters
    assert "layers.1.mlp.router.gate.weight" in parameters
    for name, tensor in saved_state(loaded).items():
        original = saved_state(model)[name]
        fp32 = name not in parameters or name.split(".", 2)[-1] in kept  # buffers: as built
        want = original.dtype if fp32 else torch.bfloat16
        assert tensor.dtype == want, name
        assert torch.equal(tensor, original.to(want)), name
    assert loaded.layers[0].mixer.rope.inv_freq.dtype == torch.float32  # computed, as built
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    ids = torch.randint(0, 97, (1, 7))
    assert torch.allclose(loaded(ids).logits.float(), model(ids).logits, atol=0.3)
    with pytest.raises(ValueError, match="dtype='bfloat16' is not a floating torch dtype"):
        HybridLM.from_pretrained(tmp_path / "m", dtype="bfloat16")


@pytest.mark.parametrize("value, size", [(1234, 1234), ("5GB", 5 * 10**9),
                                         ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30),
                                         ("1.5 kb", 1500), ("64B", 64)])
def test_max_shard_size_forms(value, size):
    assert parse_size(value) == size


@pytest.mark.parametrize("value", ["5 parsecs", "GB", "", 0, -1, "0MB", True, 1.5, None])
def test_bad_max_shard_size_is_refused_before_writing(tmp_path, make_model, value):
    with pytest.raises(ValueError, match=r"max_shard_size=.*(not a size|positive).*\"5GB\""):
        make_model().save_pretrained(tmp_path / "m", max_shard_size=value)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_on_meta_and_its_unsaved_buffers_have_a_source(name):
    """Each buffer a checkpoint does not carry is computed by its layer's derived_buffers(),
    equal to what the layer builds (checked on a tiny variant with the same layer kinds)."""
    with torch.device("meta"):
        model = HybridLM(ModelConfig.from_preset(name))
    saved = set(model.state_dict())
    for buffer_name, _ in model.named_buffers():
        if buffer_name not in saved:
            owner = model.get_submodule(buffer_name.rpartition(".")[0])
            assert buffer_name.rpartition(".")[2] in owner.derived_buffers(), buffer_name


@pytest.mark.parametrize("name", ["tiny", "jamba-tiny", "nexus-tiny"])
def test_small_presets_round_trip_through_shards(tmp_path, name):
    torch.manual_seed(0)
    model = HybridLM(ModelConfig.from_preset(name)).eval()
    model.save_pretrained(tmp_path / "m", max_shard_size="4MB")
    assert (tmp_path / "m" / "model.safetensors.index.json").is_file()
    loaded = HybridLM.from_pretrained(tmp_path / "m").eval()
    fresh = dict(model.named_buffers())
    for buffer_name, buffer in loaded.named_buffers():
        assert torch.equal(buffer, fresh[buffer_name]), buffer_name
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_a_loaded_model_does_not_read_its_file_after_loading(tmp_path):
    """safetensors maps files: a model that kept tensors backed by the file would change when
    the file is rewritten in place (or crash when it is truncated)."""
    model = mixed_model(tied=False)
    model.save_pretrained(tmp_path / "m")
    loaded = HybridLM.from_pretrained(tmp_path / "m")  # fp32 file into fp32: no cast
    weights = tmp_path / "m" / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as file:  # zero the tensor data in place, header kept
        file.seek(size // 2)
        file.write(bytes(size - size // 2))
    for name, tensor in saved_state(model).items():
        assert torch.equal(saved_state(loaded)[name], tensor), name


def test_a_run_dir_gets_the_shards_of_its_last_checkpoint(tmp_path):
    from hybridlm.train.trainer import copy_final_model

    model = mixed_model(tied=True)
    model.save_pretrained(tmp_path / "step", max_shard_size=SHARD)
    (tmp_path / "run").mkdir()
    copy_final_model(tmp_path / "step", tmp_path / "run", [])
    assert files(tmp_path / "run") == files(tmp_path / "step")
    ids = torch.randint(0, 97, (1, 5))
    assert torch.equal(HybridLM.from_pretrained(tmp_path / "run").eval()(ids).logits,
                       model(ids).logits)
