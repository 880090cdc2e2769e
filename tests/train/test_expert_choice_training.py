"""Expert-choice runs: the training loss sees later tokens, so the held-out loss is causal."""

import json
import warnings

import pytest
import torch

from hybridlm import HybridLM, ModelConfig
from hybridlm.data import iter_eval_windows, load_prepared
from hybridlm.layers.moe import MoEMLP
from hybridlm.train import TrainConfig, train
from hybridlm.train.trainer import (
    NonCausalLossWarning,
    evaluate,
    warn_if_training_loss_not_causal,
)

EXPERT_CHOICE = {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 256,
                 "max_position_embeddings": 128, "mlp_pattern": "E",
                 "moe_router": "expert_choice", "moe_ec_capacity_factor": 1.0}
SEQ_LEN = 33


def widen_routed_experts(model: HybridLM) -> HybridLM:
    """At the default init the routed experts barely move the loss; widen them (and the
    gate) so that the routing rule changes the loss measurably."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, MoEMLP):
                for p in (*module.experts.parameters(), module.router.gate.weight):
                    p.normal_(0.0, 0.2)
    return model


@pytest.fixture
def val_tokens(prepared_dir):
    return load_prepared(prepared_dir).split("validation")


@pytest.fixture
def model(prepared_dir):
    vocab = load_prepared(prepared_dir).vocab_size
    torch.manual_seed(0)
    narrow = {"hidden_size": 32, "intermediate_size": 64}  # a smaller model, quick to evaluate
    config = ModelConfig.from_preset("tiny", **{**EXPERT_CHOICE, **narrow, "vocab_size": vocab})
    return widen_routed_experts(HybridLM(config)).train()


@torch.no_grad()
def loss_by_hand(model: HybridLM, tokens, batch_size: int, max_batches: int) -> float:
    """Token-weighted mean next-token loss over the evaluation windows, as the model
    routes now (no causal switch of its own)."""
    total, count = 0.0, 0
    for window in iter_eval_windows(tokens, SEQ_LEN - 1, batch_size, max_batches):
        n = window.shape[0] * (window.shape[1] - 1)
        total += float(model.eval()(window, labels=window).aux["lm_loss"]) * n
        count += n
    return total / count


def test_evaluate_reports_the_causal_loss_of_expert_choice_models(model, val_tokens):
    held_out = evaluate(model, val_tokens, SEQ_LEN, 4, 2, torch.device("cpu"))
    assert model.training and not model.is_causal  # mode and routing restored
    with model.causal_routing():
        causal = loss_by_hand(model, val_tokens, 4, 2)
    expert_choice = loss_by_hand(model, val_tokens, 4, 2)
    gap = abs(expert_choice - causal)
    assert gap > 1e-3  # the routing rule shows in the loss: the comparison has power
    assert abs(held_out - causal) < 1e-3 * gap, (held_out, causal, expert_choice)
    # causal routing is per token: the loss no longer depends on the batch it is in ...
    one_by_one = evaluate(model, val_tokens, SEQ_LEN, 1, 8, torch.device("cpu"))
    assert abs(one_by_one - held_out) < 1e-3 * gap
    # ... while expert choice's does
    assert abs(loss_by_hand(model, val_tokens, 1, 8) - expert_choice) > 1e-2 * gap


def test_the_warning_names_the_causal_loss_and_only_expert_choice_gets_it(model):
    with pytest.warns(NonCausalLossWarning, match="not a causal language-model loss.*val_loss"):
        warn_if_training_loss_not_causal(model, has_validation=True)
    with pytest.warns(NonCausalLossWarning, match="no validation split"):
        warn_if_training_loss_not_causal(model, has_validation=False)
    topk = HybridLM(ModelConfig(**{**model.config.to_dict(), "moe_router": "topk"}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_training_loss_not_causal(topk, has_validation=True)


def test_an_expert_choice_run_warns_and_labels_its_losses(prepared_dir, tmp_path, val_tokens):
    out = tmp_path / "run"
    cfg = TrainConfig(data=str(prepared_dir), out=str(out), preset="tiny",
                      model={**EXPERT_CHOICE, "hidden_size": 32, "intermediate_size": 64},
                      steps=2, global_batch_size=4,
                      seq_len=SEQ_LEN, lr=1e-2, warmup_steps=1, eval_every=2, eval_batches=2,
                      checkpoint_every=2, progress=False)
    with pytest.warns(NonCausalLossWarning, match="expert_choice"):
        result = train(cfg)
    records = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert [r["loss_causal"] for r in records] == [False, False]
    assert result.train_loss_causal is False
    # the recorded val_loss is the causal loss of the trained model
    trained = HybridLM.from_pretrained(out)
    with trained.causal_routing():
        causal = loss_by_hand(trained, val_tokens, 4, 2)
    expert_choice = loss_by_hand(trained, val_tokens, 4, 2)
    assert abs(records[-1]["val_loss"] - causal) < 1e-3 * abs(expert_choice - causal)
