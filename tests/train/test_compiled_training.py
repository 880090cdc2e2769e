"""`compile: true` on a GPU: the trainer's compiled model trains like the eager one.

Marked gpu (skipped without CUDA): inductor on a CPU takes minutes for the same run, and
the bf16 grouped-GEMM path under autocast exists only on CUDA.
"""

from __future__ import annotations

import json

import pytest
import torch

from hybridlm.train import TrainConfig, train

MOE = {"hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 256,
       "max_position_embeddings": 128, "mixer_pattern": "AM",
       "mlp_pattern": "TE", "moe_router": "topk", "moe_top_k": 2,
       "moe_capacity_factor": 1.25, "num_shared_experts": 1, "mamba_d_state": 8}


def losses(prepared_dir, out, compile: bool) -> list[float]:
    cfg = TrainConfig(data=str(prepared_dir), out=str(out), preset="tiny", model=dict(MOE),
                      steps=4, global_batch_size=8, seq_len=64, lr=3e-3, warmup_steps=1,
                      eval_every=4, eval_batches=2, checkpoint_every=4, progress=False,
                      device="cuda", compile=compile)
    train(cfg)
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").open()
            if "loss" in json.loads(line)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_compiled_training_step_matches_eager_on_gpu(prepared_dir, tmp_path):
    eager = losses(prepared_dir, tmp_path / "eager", compile=False)
    compiled = losses(prepared_dir, tmp_path / "compiled", compile=True)
    assert len(compiled) == len(eager) == 4
    # bf16 autocast: compiled kernels round differently, so the losses agree to bf16 noise.
    assert compiled == pytest.approx(eager, rel=2e-2)
