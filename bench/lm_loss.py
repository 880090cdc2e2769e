"""The LM-head loss on a GPU: plain F.linear + F.cross_entropy vs `ops.linear_cross_entropy`
(several chunk sizes) vs Liger-Kernel's fused linear cross-entropy when it is installed; then a
whole `complexity-deep-187m` forward + backward with and without `return_logits=False`; and
first the demo's sizes on the CPU (fp32, wall clock).

    python -m bench.lm_loss --out loss.json   # on a CUDA machine

Each row: median milliseconds of forward + backward (CUDA events, after warm-up), the peak
memory above what the inputs hold, and the error of the loss and gradients against the plain
twin. bf16 autocast, 8 x 2048 tokens, the 32,000-word vocabulary, as in training.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bench.timing import cuda_median_ms
from hybridlm import HybridLM, ModelConfig
from hybridlm.ops import linear_cross_entropy, linear_cross_entropy_reference

TOKENS, HIDDEN, VOCAB = 8 * 2048, 768, 32000


def peak_mib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def liger_loss():
    """Liger's fused linear cross-entropy as loss(hidden, weight, targets), or None."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    module = LigerFusedLinearCrossEntropyLoss(accum_dtype=torch.float32)
    return lambda hidden, weight, targets: module(weight, hidden, targets)


def loss_rows() -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(TOKENS, HIDDEN, device="cuda", generator=gen).requires_grad_()
    weight = (torch.randn(VOCAB, HIDDEN, device="cuda", generator=gen) * 0.02).requires_grad_()
    targets = torch.randint(0, VOCAB, (TOKENS,), device="cuda", generator=gen)
    variants = {"plain linear + cross_entropy": linear_cross_entropy_reference}
    for chunk in (None, 1024, 4096, 8192):
        variants[f"ops.linear_cross_entropy chunk={chunk or 'default'}"] = (
            lambda h, w, t, chunk=chunk: linear_cross_entropy(h, w, t, chunk_size=chunk))
    if (liger := liger_loss()) is not None:
        variants["liger FusedLinearCrossEntropy"] = liger
    reference = None
    rows = []
    for name, fn in variants.items():
        def step(fn=fn):
            hidden.grad = weight.grad = None
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = fn(hidden, weight, targets)
            loss.backward()
            return loss.detach().float(), hidden.grad.float(), weight.grad.float()

        try:
            got = step()
            ms, mib = cuda_median_ms(step), peak_mib(step)
        except Exception as err:  # a peer that fails to run is reported, not fatal
            rows.append({"name": name, "error": repr(err)[:200]})
            continue
        reference = reference or got
        errors = [float((g - r).norm() / r.norm()) for g, r in zip(got, reference, strict=True)]
        rows.append({"name": name, "ms": ms, "peak_mib": mib, "rel_err_loss_dh_dw": errors})
    return rows


def model_rows() -> list[dict]:
    """complexity-deep-187m forward + backward, B8 x T2048, bf16 autocast."""
    model = HybridLM(ModelConfig.from_preset("complexity-deep-187m")).cuda().train()
    ids = torch.randint(0, model.config.vocab_size, (8, 2048), device="cuda")
    rows = []
    for return_logits in (True, False):
        def step(return_logits=return_logits):
            model.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(ids, labels=ids, return_logits=return_logits)
            out.loss.backward()

        ms = cuda_median_ms(step, repeats=5)
        rows.append({"name": f"187m fwd+bwd return_logits={return_logits}", "ms": ms,
                     "tokens_per_s": ids.numel() / ms * 1e3, "peak_mib": peak_mib(step)})
    return rows


def cpu_rows() -> list[dict]:
    """The demo's sizes on the CPU (tiny preset: 8 x 255 tokens, H 256, V 8192), fp32."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(8 * 255, 256, generator=gen).requires_grad_()
    weight = (torch.randn(8192, 256, generator=gen) * 0.02).requires_grad_()
    targets = torch.randint(0, 8192, (8 * 255,), generator=gen)
    variants = {"cpu plain linear + cross_entropy": linear_cross_entropy_reference}
    for chunk in (None, 256, 1024, 2048):
        variants[f"cpu ops.linear_cross_entropy chunk={chunk or 'default'}"] = (
            lambda h, w, t, chunk=chunk: linear_cross_entropy(h, w, t, chunk_size=chunk))
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(7):  # interleaved, so drift in the machine's load hits every variant
        for name, fn in variants.items():
            start = time.perf_counter()
            fn(hidden, weight, targets).backward()
            times[name].append((time.perf_counter() - start) * 1e3)
    return [{"name": name, "ms": statistics.median(t[1:])} for name, t in times.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="lm_loss.json")
    args = parser.parse_args()
    rows = cpu_rows() + loss_rows() + model_rows()
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(meta)
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
