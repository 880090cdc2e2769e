"""MLA decode on a GPU: one `corvus-mla` layer, batch 8, 32,768 cached tokens, bf16, against a
1 GiB device copy.

    python -m bench.mla_decode_sweep --out mla.json   # on a CUDA machine

Times one decode step of the layer (projections included) for the absorbed path (the
default implementation, and with `ops.use_impl("reference")`) and the plain one. The bytes a
step must read are the latent + RoPE-key cache (B x S x (r + dr) x 2 bytes); their rate is
given in GB/s and as a share of the copy bandwidth (bytes read + written per second).
"""

from __future__ import annotations

import argparse
import json

import torch

from bench.timing import cuda_median_ms
from hybridlm import ops
from hybridlm.config import ModelConfig
from hybridlm.layers.mla import MultiHeadLatentAttention

BATCH, CACHED = 8, 32768
DEVICE = "cuda"


def copy_gbps() -> float:
    """A 1 GiB device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randn(2**28, device="cuda")  # 1 GiB of fp32
    dst = torch.empty_like(src)
    ms = cuda_median_ms(lambda: dst.copy_(src), repeats=20, warmup=5)
    return 2 * src.numel() * 4 / ms / 1e6


def decode_step(absorb: bool):
    """A corvus-mla layer with a full random cache -> (step function, cache bytes read)."""
    config = ModelConfig.from_preset("corvus-mla", mla_absorb=absorb,
                                     max_position_embeddings=CACHED + 8)
    torch.manual_seed(0)
    mla = MultiHeadLatentAttention(config, 0).to(DEVICE, torch.bfloat16).eval()
    cache = mla.new_cache(BATCH, CACHED + 1, torch.device(DEVICE), torch.bfloat16)
    cache_tensors = [t for name, t in vars(cache).items()
                     if isinstance(t, torch.Tensor) and t.is_floating_point()]
    for tensor in cache_tensors:
        tensor.normal_()  # random latents: timing on zeros can flatter
    x = torch.randn(BATCH, 1, config.hidden_size, device=DEVICE, dtype=torch.bfloat16)
    positions = torch.arange(CACHED, CACHED + 1, device=DEVICE)

    @torch.no_grad()
    def step():
        cache.lengths.fill_(CACHED)  # every step decodes token CACHED + 1
        return mla(x, positions=positions, cache=cache)

    read = BATCH * CACHED * (config.mla_kv_rank + config.mla_rope_dim) * 2
    return step, read


def gpu_busy_ms(step, steps: int = 10) -> float:
    """The GPU's kernel time per step (torch.profiler), without the host's launch gaps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / steps / 1e3


def attention_alone(heads: int = 32, rank: int = 512, rope: int = 64):
    """The absorbed step's attention alone: nh queries against the one latent head, the value
    a view of the key (as `MultiHeadLatentAttention._attend_absorbed` calls it)."""
    kv = torch.randn(BATCH, CACHED, rank + rope, device=DEVICE, dtype=torch.bfloat16)
    q = torch.randn(BATCH, heads, 1, rank + rope, device=DEVICE, dtype=torch.bfloat16)
    k = kv.unsqueeze(1)  # (B, 1, S, r+dr)
    return lambda: ops.attention(q, k, k[..., :rank], scale=0.07), kv.numel() * 2


def kernel_sweep(copy: float) -> list[dict]:
    """The decode kernel alone at the attention's shape, over its tile and grid sizes."""
    try:
        from hybridlm.ops.latent_decode import single_head_decode
    except ImportError:  # a version of the code without the kernel
        return []
    kv = torch.randn(BATCH, CACHED, 576, device=DEVICE, dtype=torch.bfloat16)
    q = torch.randn(BATCH, 32, 576, device=DEVICE, dtype=torch.bfloat16)
    rows = []
    configs = [(keys, warps, stages, programs) for keys in (32, 64) for warps in (4, 8)
               for stages in (2, 3, 4) for programs in (1, 2)]
    for keys, warps, stages, programs in configs:
        name = f"kernel keys={keys} warps={warps} stages={stages} programs/SM={programs}"

        def step(b=keys, w=warps, s=stages, p=programs):
            return single_head_decode(q, kv, kv[..., :512], 0.07, block_keys=b, num_warps=w,
                                      num_stages=s, programs_per_sm=p)

        try:
            ms = cuda_median_ms(step, repeats=30, warmup=5)
        except Exception as err:  # a tile too large for shared memory, say
            rows.append({"name": name, "error": repr(err)[:100]})
            continue
        gbps = kv.numel() * 2 / ms / 1e6
        rows.append({"name": name, "ms": ms, "read_gb": kv.numel() * 2 / 1e9, "gbps": gbps,
                     "pct_of_copy": 100 * gbps / copy})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="mla_decode.json")
    parser.add_argument("--label", default="", help="names this code version in the table")
    parser.add_argument("--sweep", action="store_true",
                        help="also time the decode kernel alone over its tile and grid sizes")
    args = parser.parse_args()
    copy = copy_gbps()
    rows = []
    for name, absorb, impl in (("absorbed", True, "auto"), ("absorbed reference", True,
                               "reference"), ("plain", False, "auto")):
        step, read = decode_step(absorb)
        with ops.use_impl(impl):
            ms, busy = cuda_median_ms(step, repeats=50, warmup=5), gpu_busy_ms(step)
        gbps = read / ms / 1e6
        rows.append({"name": f"{args.label} {name}".strip(), "ms": ms, "read_gb": read / 1e9,
                     "gbps": gbps, "pct_of_copy": 100 * gbps / copy, "gpu_busy_ms": busy})
    for impl in ("auto", "reference"):
        step, read = attention_alone()
        with ops.use_impl(impl):
            ms = cuda_median_ms(step, repeats=50, warmup=5)
        gbps = read / ms / 1e6
        rows.append({"name": f"{args.label} attention op alone, {impl}".strip(), "ms": ms,
                     "read_gb": read / 1e9, "gbps": gbps, "pct_of_copy": 100 * gbps / copy})
    if args.sweep:
        rows += kernel_sweep(copy)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "copy_gbps": copy}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(meta)
    for row in rows:
        if "error" in row:
            print(f"{row['name']:<52} {row['error']}")
            continue
        busy = f"  (GPU busy {row['gpu_busy_ms']:.3f} ms)" if "gpu_busy_ms" in row else ""
        print(f"{row['name']:<52} {row['ms']:8.3f} ms  {row['gbps']:7.0f} GB/s  "
              f"{row['pct_of_copy']:5.1f}% of copy{busy}")


if __name__ == "__main__":
    main()
