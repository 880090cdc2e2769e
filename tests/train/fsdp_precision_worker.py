"""Run under torchrun (gloo, CPU) by test_fsdp_precision.py: shard small hybrid models with
FSDP2 and a bf16 parameter policy, and record what every parameter looks like inside the
forward, while FSDP has it gathered.

    python -m torch.distributed.run --nproc_per_node=2 fsdp_precision_worker.py OUT RUNS

RUNS is a JSON list of {"model": ModelConfig overrides, "fp32_groups": bool}; fp32_groups
false is the breakage to detect: every parameter under the one bf16 policy. OUT/rank{r}.json
gets, per run, each parameter's dtypes seen while gathered, whether the gathered value equals
the fp32 original (exactly, or rounded to bf16), the losses of two training steps and the
parameters still marked `_no_weight_decay` after sharding.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from hybridlm import HybridLM, ModelConfig
from hybridlm.parallel import data_parallel as distributed
from hybridlm.parallel import init_distributed, shutdown, wrap
from hybridlm.train.optim import build_optimizer


def watch_gathered_params(
    model: torch.nn.Module, original: dict[str, torch.Tensor]
) -> tuple[dict, list]:
    """Forward pre-hooks on every module that record each parameter found gathered (a plain
    tensor, not a DTensor shard) at that moment: {name: {dtypes, exact, bf16_rounded}}, and
    the hook handles."""
    seen: dict[str, dict] = {}

    def record(module_name: str, module: torch.nn.Module) -> None:
        for name, param in module.named_parameters(remove_duplicate=False):
            if isinstance(param, DTensor):
                continue  # still sharded: its group is gathered later, by its own hook
            full = f"{module_name}.{name}" if module_name else name
            value = param.detach()
            entry = seen.setdefault(full, {"dtypes": set(), "exact": True, "bf16_rounded": True})
            entry["dtypes"].add(str(value.dtype))
            ref = original[full]
            entry["exact"] &= bool(torch.equal(value.float(), ref))
            entry["bf16_rounded"] &= bool(torch.equal(value.float(), ref.bfloat16().float()))

    # Appended after FSDP's own (prepended) pre-hook, so this module's group is gathered.
    handles = [module.register_forward_pre_hook(lambda mod, args, name=name: record(name, mod))
               for name, module in model.named_modules()]
    return seen, handles


def run(overrides: dict, fp32_groups: bool, ctx) -> dict:
    torch.manual_seed(0)
    model = HybridLM(ModelConfig(**overrides)).train()
    # The init holds values bf16 cannot express, so a bf16 round trip shows in `exact`.
    original = {n: p.detach().clone()
                for n, p in model.named_parameters(remove_duplicate=False)}
    fp32_modules = distributed._fp32_modules
    if not fp32_groups:
        distributed._fp32_modules = lambda block: []
    try:
        wrap(model, ctx, torch.device("cpu"), param_dtype=torch.bfloat16)
    finally:
        distributed._fp32_modules = fp32_modules
    seen, handles = watch_gathered_params(model, original)
    no_decay = sorted(n for n, p in model.named_parameters()
                      if getattr(p, "_no_weight_decay", False))
    optimizer = build_optimizer(model, lr=1e-3)
    generator = torch.Generator().manual_seed(1 + ctx.rank)
    ids = torch.randint(0, overrides["vocab_size"], (2, 16), generator=generator)
    losses = []
    for step in range(2):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step == 0:  # values are compared with the init: record the first forward only
            for handle in handles:
                handle.remove()
    for entry in seen.values():
        entry["dtypes"] = sorted(entry["dtypes"])
    return {"params": seen, "losses": losses, "no_weight_decay": no_decay}


def main(out: str, runs: str) -> None:
    ctx = init_distributed("fsdp")
    results = [run(r["model"], r["fp32_groups"], ctx) for r in json.loads(runs)]
    Path(out, f"rank{ctx.rank}.json").write_text(json.dumps(results))
    shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
