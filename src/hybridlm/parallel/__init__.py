"""Parallelism applied to a built model from outside it: process groups, DDP / FSDP2
wrapping, sharded checkpoints, and the cross-rank sums that MoE balancing needs (passed to
`HybridLM.balance_step(reduce=...)`). The model code itself stays single-device."""

from hybridlm.parallel.data_parallel import (
    DistContext,
    init_distributed,
    shard_fsdp,
    shutdown,
    sum_over_ranks,
    wrap,
)

__all__ = ["DistContext", "init_distributed", "shard_fsdp", "shutdown", "sum_over_ranks", "wrap"]
