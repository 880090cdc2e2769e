"""The loss of a global batch split into micro-batches (and ranks) weighs every supervised
token equally, as one big batch does, however unevenly SFT rows are supervised.

Run as a script under torchrun, this file is also the worker of the two-rank test."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hybridlm import HybridLM, ModelConfig
from hybridlm.parallel import DistContext
from hybridlm.train.trainer import backward_global_batch

ROWS, SEQ, VOCAB = 4, 16, 61
# Supervised tokens per row: very uneven, as SFT rows with short and long responses are.
SUPERVISED = (2, 13, 5, 1)


def build_model(**overrides) -> HybridLM:
    fields = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                  num_experts=4, max_position_embeddings=32, mlp_pattern="D")
    config = ModelConfig(**{**fields, **overrides})
    torch.manual_seed(0)
    return HybridLM(config).train()


def build_batch() -> dict[str, torch.Tensor]:
    """4 packed rows (2 examples each): input_ids, labels, segment_ids (ROWS, SEQ). Row r's
    labels are trained on its last SUPERVISED[r] tokens, plus the first token of its second
    example, whose label is set but which nothing may predict (a segment start)."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (ROWS, SEQ), generator=generator)
    labels = torch.full_like(input_ids, -100)
    segment_ids = torch.zeros_like(input_ids)
    for row, count in enumerate(SUPERVISED):
        labels[row, SEQ - count:] = input_ids[row, SEQ - count:]
        segment_ids[row, SEQ // 2:] = 1
        labels[row, SEQ // 2] = input_ids[row, SEQ // 2]
    return {"input_ids": input_ids, "labels": labels, "segment_ids": segment_ids}


def rows(batch: dict[str, torch.Tensor], index) -> dict[str, torch.Tensor]:
    return {k: v[index] for k, v in batch.items()}


def one_row_micro_batches(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    return [rows(batch, slice(i, i + 1)) for i in range(batch["input_ids"].shape[0])]


def gradients(model: HybridLM) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()
            if p.grad is not None}


def one_big_batch_gradients(model: HybridLM, batch) -> tuple[float, dict[str, torch.Tensor]]:
    """The reference: the token-mean loss of the whole batch in one forward."""
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), gradients(model)


def mean_of_means_gradients(model: HybridLM, parts) -> dict[str, torch.Tensor]:
    """What averaging each micro-batch's own token mean gives (the weighting to avoid)."""
    model.zero_grad()
    for part in parts:
        (model(**part).loss / len(parts)).backward()
    return gradients(model)


def relative_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest |a - b| over all parameters, relative to the largest |b|."""
    assert a.keys() == b.keys()
    gap = max(float((a[k] - b[k]).abs().max()) for k in a)
    return gap / max(float(b[k].abs().max()) for k in b)


def test_the_batch_is_uneven_enough_to_tell_the_weightings_apart():
    model, batch = build_model(), build_batch()
    _, reference = one_big_batch_gradients(model, batch)
    assert relative_gap(mean_of_means_gradients(model, one_row_micro_batches(batch)),
                        reference) > 0.1


def test_accumulated_micro_batches_give_the_gradient_of_one_big_batch():
    model, batch = build_model(), build_batch()
    loss, reference = one_big_batch_gradients(model, batch)
    model.zero_grad()
    reported, _ = backward_global_batch(model, one_row_micro_batches(batch), DistContext(),
                                        torch.device("cpu"))
    assert relative_gap(gradients(model), reference) < 1e-5
    assert reported == pytest.approx(loss, rel=1e-6)


def test_aux_losses_keep_their_per_micro_batch_weight():
    """MoE aux (balance) losses are per micro-batch statistics: the mean of them is added,
    while the next-token loss is the token mean of the whole batch."""
    model = build_model(mlp_pattern="E", moe_balance="aux_loss", moe_aux_loss_coef=0.5)
    batch = build_batch()
    parts = one_row_micro_batches(batch)
    model.zero_grad()
    lm = model(**batch).lm_loss  # routing is per token (no capacity): same as per micro-batch
    aux = torch.stack([model(**part).aux["aux_loss"] for part in parts]).mean()
    assert aux.item() > 0.05 * lm.item()  # large enough to notice a wrong weight
    (lm + aux).backward()
    reference = gradients(model)
    model.zero_grad()
    reported, _ = backward_global_batch(model, parts, DistContext(), torch.device("cpu"))
    assert relative_gap(gradients(model), reference) < 1e-5
    assert reported == pytest.approx((lm + aux).item(), rel=1e-6)


def test_a_batch_without_targets_gives_zero_gradient_not_nan():
    model, batch = build_model(), build_batch()
    batch["labels"].fill_(-100)
    reported, _ = backward_global_batch(model, one_row_micro_batches(batch), DistContext(),
                                        torch.device("cpu"))
    assert reported == 0.0
    assert all(float(g.abs().max()) == 0.0 for g in gradients(model).values())


# --- two ranks (gloo) -----------------------------------------------------------------------
PARALLEL = ("ddp", "fsdp")


def rank_worker(out_dir: str) -> None:
    """Each of 2 ranks takes 2 rows of the batch as 2 micro-batches, under DDP then FSDP;
    rank 0 writes the full gradients and the reported loss of each."""
    import torch.distributed as dist

    from hybridlm.parallel import init_distributed, shutdown, wrap

    for parallel in PARALLEL:  # one process group (created by the first call) serves both
        ctx = init_distributed(parallel)
        model = wrap(build_model(), ctx, torch.device("cpu"))
        mine = rows(build_batch(), slice(2 * ctx.rank, 2 * ctx.rank + 2))
        share, _ = backward_global_batch(model, one_row_micro_batches(mine), ctx,
                                         torch.device("cpu"))
        loss = ctx.all_reduce_mean(share, torch.device("cpu"))
        grads = {}
        for name, p in model.named_parameters():
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad  # FSDP
            grads[name.removeprefix("module.")] = grad.detach().clone()
        if ctx.rank == 0:
            torch.save({"loss": loss, "grads": grads}, Path(out_dir) / f"{parallel}.pt")
        dist.barrier()
    shutdown()


def test_two_ranks_give_the_gradient_of_one_big_batch(tmp_path):
    """DDP and FSDP average gradients over ranks; the ranks' token sums must add up."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           __file__, str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    loss, reference = one_big_batch_gradients(build_model(), build_batch())
    for parallel in PARALLEL:
        result = torch.load(tmp_path / f"{parallel}.pt")
        assert relative_gap(result["grads"], reference) < 1e-5, parallel
        assert result["loss"] == pytest.approx(loss, rel=1e-6), parallel


if __name__ == "__main__":
    rank_worker(*sys.argv[1:])
