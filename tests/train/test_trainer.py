import itertools
import json
import math

import pytest
import torch

from hybridlm import HybridLM
from hybridlm.data import Tokenizer, load_prepared, unigram_loss
from hybridlm.train import TrainConfig, train
from hybridlm.train.optim import param_groups
from hybridlm.train.schedule import warmup_cosine
from hybridlm.train.trainer import evaluate

SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 256,
         "max_position_embeddings": 128}


def test_warmup_cosine_shape():
    lrs = [warmup_cosine(s, 10, 110, 0.1) for s in range(130)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:111]))
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert lrs[110] == pytest.approx(0.1) and lrs[129] == pytest.approx(0.1)


def test_no_weight_decay_on_norms_biases_embeddings(make_model):
    model = make_model(use_dynamic_scaler=True)
    decay, no_decay = param_groups(model, 0.1)
    no_decay_ids = {id(p) for p in no_decay["params"]}
    assert id(model.embed_tokens.weight) in no_decay_ids
    assert id(model.layers[0].mixer_norm.weight) in no_decay_ids
    assert id(model.layers[0].scaler.controller.bias) in no_decay_ids
    assert id(model.layers[0].mixer.qkv_proj.weight) in {id(p) for p in decay["params"]}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1


def test_tiny_model_loss_falls_on_the_demo_corpus(prepared_dir, tmp_path):
    data = load_prepared(prepared_dir)
    cfg = TrainConfig(
        data=str(prepared_dir), out=str(tmp_path / "run"), preset="tiny",
        model_overrides={**SMALL, "routing": "zipf"}, steps=60, batch_size=8, seq_len=64,
        lr=3e-3, warmup_steps=5, eval_every=30, eval_batches=4,
    )
    result = train(cfg, progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == list(range(1, 61))
    first = sum(r["loss"] for r in records[:5]) / 5
    last = sum(r["loss"] for r in records[-5:]) / 5
    assert last < first - 0.6, (first, last)
    assert {"loss", "lr", "tokens_per_s"} <= set(records[0])
    assert "val_loss" in records[29] and "val_loss" in records[59]
    # a trained model beats a unigram model of the same data on held-out text
    val = data.split("validation")
    assert result.val_loss < unigram_loss(data.token_counts, val)
    assert math.isfinite(result.tokens_per_s) and result.steps == 60

    # the run directory is a complete model directory
    model = HybridLM.from_pretrained(tmp_path / "run")
    assert model.config.routing == "zipf" and model.config.vocab_size == data.vocab_size
    reloaded = evaluate(model, val, 64, 8, 4, torch.device("cpu"))
    assert reloaded == pytest.approx(result.val_loss, rel=1e-4)
    assert Tokenizer.from_file(tmp_path / "run").vocab_size == data.vocab_size
    # the zipf table came from the training counts
    from hybridlm import zipf_routing_table

    expected = zipf_routing_table(torch.as_tensor(data.token_counts), 4)
    assert torch.equal(model.layers[0].mlp.router.table, expected)


def test_bad_train_config_is_refused(prepared_dir, tmp_path):
    with pytest.raises(ValueError, match="steps=0"):
        train(TrainConfig(data=str(prepared_dir), out=str(tmp_path), steps=0), progress=False)
    with pytest.raises(ValueError, match="vocab_size=100 is smaller than the tokenizer's 500"):
        train(TrainConfig(data=str(prepared_dir), out=str(tmp_path / "x"), steps=1,
                          model_overrides={**SMALL, "vocab_size": 100}), progress=False)
