"""`python -m hybridlm.train` for test_distributed.py's torchrun runs, which also writes what
each rank's MoE balancing saw and did (rank 1's state never reaches a file otherwise):

    python train_worker.py REPORT_DIR [--never-reduce] TRAIN_ARGS...

REPORT_DIR/rank{r}.json: {"first_local_loads": the expert loads this rank gathered in the
first step, before any reduction (one list per MoE layer), "expert_bias": {buffer name: the
bias after training}}. --never-reduce is the breakage the tests must notice: balance_step
moves the bias from the rank's own loads, never summed over ranks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hybridlm.layers.moe import MoEMLP
from hybridlm.model import HybridLM
from hybridlm.train import __main__ as train_cli
from hybridlm.train import trainer


def main(report_dir: str, *argv: str) -> int:
    wrapped: list = []  # (model, rank) of this process, caught where the trainer wraps it
    original_wrap = trainer.wrap

    def catching_wrap(model, ctx, device, *args, **kwargs):
        wrapped.append((model, ctx.rank))
        return original_wrap(model, ctx, device, *args, **kwargs)

    first_local_loads: list[list[float]] = []
    balance_step = HybridLM.balance_step
    never_reduce = argv[:1] == ("--never-reduce",)

    def recording_balance_step(self, reduce=None):
        if not first_local_loads:
            first_local_loads.extend(m.pending_load().tolist() for m in self.modules()
                                     if isinstance(m, MoEMLP))
        if never_reduce:
            reduce = lambda load: None  # the breakage: loads stay per rank
        return balance_step(self, reduce)

    trainer.wrap = catching_wrap
    HybridLM.balance_step = recording_balance_step
    code = train_cli.main(list(argv[1:] if never_reduce else argv))
    if code != 0:
        return code
    model, rank = wrapped[0]
    biases = {name: buffer.tolist() for name, buffer in model.named_buffers()
              if name.endswith("expert_bias")}
    report = {"first_local_loads": first_local_loads, "expert_bias": biases}
    Path(report_dir, f"rank{rank}.json").write_text(json.dumps(report))
    return code


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
