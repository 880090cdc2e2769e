"""Data parallelism on PyTorch's own engines, outside the model.

Under `torchrun` (RANK / WORLD_SIZE / LOCAL_RANK set) the process group is created with
NCCL on GPUs and gloo on CPUs. `wrap` applies DDP, or FSDP2 (`fully_shard` on every block,
then on the root, with a bf16 mixed-precision policy on GPU; the fp32 parts in their own fp32
groups). Model code stays single-device: the expert loads that MoE balancing sums over ranks
reach it through `HybridLM.balance_step(reduce=sum_over_ranks)`.
"""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all ranks in place (an all-reduce) and return it; unchanged when no
    process group is initialised (one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    parallel: str = "none"  # "none" | "ddp" | "fsdp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.parallel == "fsdp"

    @property
    def initialized(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.initialized:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return sum_over_ranks(tensor)

    def all_reduce_mean(self, value: float, device: torch.device) -> float:
        if not self.initialized:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The HybridLM under a DDP wrapper (FSDP2 modifies the module in place)."""
        return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model

    # --- sharded (FSDP) checkpoints through torch.distributed.checkpoint ---------------------
    def save_sharded(self, model: nn.Module, optimizer, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))

    def load_sharded(self, model: nn.Module, optimizer, path: Path) -> None:
        """Loads at any world size: DCP reshards to the current layout."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])

    def full_model_copy(self, model: nn.Module) -> nn.Module | None:
        """An unsharded CPU copy of an FSDP model on rank 0 (None elsewhere), for export."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        full = get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if not self.is_main:
            return None
        from hybridlm.model import HybridLM

        plain = HybridLM(copy.deepcopy(model.config))
        plain.load_state_dict(full, strict=False)
        return plain


def init_distributed(parallel: str) -> DistContext:
    """Create the process group when launched by torchrun; refuse a parallel mode without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if parallel == "none":
        if world > 1:
            raise ValueError(
                f"launched with WORLD_SIZE={world} but parallel='none': pass --parallel ddp|fsdp"
            )
        return DistContext()
    if "RANK" not in os.environ:
        raise ValueError(
            f"parallel={parallel!r} needs torchrun: torchrun --nproc_per_node=N "
            f"-m hybridlm.train ... --parallel {parallel}"
        )
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, parallel=parallel)


def wrap(model: nn.Module, ctx: DistContext, device: torch.device,
         param_dtype: torch.dtype | None = None) -> nn.Module:
    """DDP, or FSDP2 with the parameters gathered in `param_dtype` for the forward (default:
    bf16 on GPU, fp32 on CPU), except the parts that must stay fp32 (`shard_fsdp`)."""
    if ctx.parallel == "ddp":
        # broadcast_buffers=False: each rank keeps its own MoE load counters (summed by
        # balance_step), instead of rank 0's overwriting them at every forward.
        ids = [device.index] if device.type == "cuda" else None
        with warnings.catch_warnings():  # newer torch deprecates the name, not the behaviour
            warnings.simplefilter("ignore", FutureWarning)
            return nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                                       broadcast_buffers=False)
    if ctx.parallel == "fsdp":
        if param_dtype is None and device.type == "cuda":
            param_dtype = torch.bfloat16
        shard_fsdp(model, param_dtype)
    return model


def shard_fsdp(model: nn.Module, param_dtype: torch.dtype | None) -> None:
    """FSDP2: `fully_shard` on every block, then on the root, parameters gathered in
    `param_dtype` (None: as stored), gradients reduced in fp32.

    A module that lists `fp32_parameters` (names of its parameters or child modules: the MoE
    routers' gates, whose near-tied decisions bf16 rounding flips; Mamba's A_log, D, dt_proj
    and conv1d, which set the decays exp(delta * A)) gets them in fp32. A group holds the
    parameters of its module not already in a nested group, so each of its other children
    with parameters (Mamba's big projections) first gets a low-precision group of its own,
    then the module a group with an fp32 policy, sharded before its block, so the block's
    group takes only the rest. Parameters of the module itself that it does not list stay
    fp32 too (a group cannot split them). Parameter names are unchanged, so checkpoints load
    as before.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    low = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    # cast_forward_inputs=False: inputs keep the activation dtype; these modules cast to fp32
    # themselves where it matters (and that also holds under autocast, without FSDP).
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32,
                                cast_forward_inputs=False)
    # fully_shard replaces every parameter by a new DTensor one, dropping Python attributes.
    no_decay = {n for n, p in model.named_parameters() if getattr(p, "_no_weight_decay", False)}
    for block in model.layers:
        for module in _fp32_modules(block):
            for name, child in module.named_children():
                if name not in module.fp32_parameters and any(True for _ in child.parameters()):
                    fully_shard(child, mp_policy=low)
            fully_shard(module, mp_policy=fp32)
        fully_shard(block, mp_policy=low)
    fully_shard(model, mp_policy=low)
    for name, param in model.named_parameters():
        if name in no_decay:
            param._no_weight_decay = True


def _fp32_modules(block: nn.Module) -> list[nn.Module]:
    """The modules of `block` whose own parameters must reach the forward in fp32."""
    return [m for m in block.modules() if getattr(m, "fp32_parameters", ())]


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
