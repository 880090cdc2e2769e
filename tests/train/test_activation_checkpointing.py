"""activation_checkpointing: the same losses, gradients and expert loads as without it, with
fewer activations kept for backward."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.utils.checkpoint

from hybridlm import HybridLM, ModelConfig
from hybridlm.train.activation_checkpointing import checkpoint_blocks


def mixed_model() -> HybridLM:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, num_experts=4,
                         max_position_embeddings=64, mixer_pattern="AM", mlp_pattern="TE",
                         moe_balance="aux_free", mamba_d_state=4, mamba_chunk_size=8)
    return HybridLM(config).train()


def saved_bytes_and_step(model: HybridLM, ids: torch.Tensor):
    """Bytes of the tensors autograd keeps for backward, the loss and the gradients."""
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return sum(saved), out.loss.detach(), grads


def test_checkpointed_blocks_give_the_same_step_and_keep_fewer_activations():
    plain = mixed_model()
    checkpointed = copy.deepcopy(plain)
    checkpoint_blocks(checkpointed.layers)
    checkpoint_blocks(checkpointed.layers)  # applying twice changes nothing
    ids = torch.randint(0, 64, (2, 48), generator=torch.Generator().manual_seed(0))
    plain_bytes, plain_loss, plain_grads = saved_bytes_and_step(plain, ids)
    # the whole forward runs again (torch may otherwise stop recomputing once it has what
    # backward needs, which would hide a side effect repeated late in the block)
    with torch.utils.checkpoint.set_checkpoint_early_stop(False):
        ckpt_bytes, ckpt_loss, ckpt_grads = saved_bytes_and_step(checkpointed, ids)
    torch.testing.assert_close(ckpt_loss, plain_loss)
    assert ckpt_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    assert ckpt_bytes < plain_bytes / 3, (ckpt_bytes, plain_bytes)
    # the recomputing pass does not count the learned-MoE loads a second time
    for mine, theirs in zip(checkpointed.layers, plain.layers, strict=True):
        if hasattr(theirs.mlp, "pending_load"):
            assert torch.equal(mine.mlp.pending_load(), theirs.mlp.pending_load())
            assert theirs.mlp.pending_load().sum() > 0
    assert [k for k in checkpointed.state_dict()] == [k for k in plain.state_dict()]


def test_the_trainer_checkpoints_blocks_and_refuses_it_with_compile(prepared_dir, tmp_path,
                                                                    monkeypatch):
    from hybridlm.config_check import ConfigError
    from hybridlm.train import TrainConfig, train, trainer

    applied = []

    def recording(blocks):
        applied.append(len(blocks))
        checkpoint_blocks(blocks)

    monkeypatch.setattr(trainer, "checkpoint_blocks", recording)

    with pytest.raises(ConfigError, match="activation_checkpointing"):
        TrainConfig(data=str(prepared_dir), out=str(tmp_path / "x"), compile=True,
                    activation_checkpointing=True)
    losses = {}
    for flag in (False, True):
        out = tmp_path / f"run{flag}"
        cfg = TrainConfig(data=str(prepared_dir), out=str(out), preset="tiny",
                          model={"mixer_pattern": "AM", "mlp_pattern": "TE", "num_hidden_layers": 2,
                                 "moe_balance": "aux_free"},
                          steps=3, global_batch_size=4, seq_len=32, warmup_steps=1, eval_every=3,
                          eval_batches=1, checkpoint_every=3, progress=False, device="cpu",
                          activation_checkpointing=flag)
        train(cfg)
        losses[flag] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").open()
                        if "loss" in json.loads(line)]
    assert applied == [2]  # once, for the checkpointed run's two blocks
    assert len(losses[True]) == 3
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
