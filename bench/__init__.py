"""Benchmarks of hybridlm against its peers, measured in the same process.

`python -m bench.all [--out results.json] [--quick] [--only NAME,...] [--device cuda|cpu]`
runs every benchmark module below and prints one table; `python -m bench.report
results.json` turns the JSON into bench/RESULTS.md. Each module has
`run(device, quick) -> list[Row]` (bench/timing.py); `bench/all.py` only collects them.

    ceilings      bf16 matmul and device copy: the rates everything else is read against
    train_187m    complexity-deep-187m training step (and its dense variant) vs HF Llama
    train_nexus   nexus-small training step
    mamba_mixer   the Mamba mixer's forward+backward vs HF MambaMixer without kernels
    moe_layer     learned and token-routed experts vs a dense SwiGLU and HF Mixtral's block
    mla_decode    corvus-mla latent-attention decode step vs the copy bandwidth

`multi_gpu_scaling.py` is a separate script (it launches training runs on several GPUs).
"""
