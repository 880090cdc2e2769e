"""What sampling costs an engine step: the tokens of R rows drawn one request at a time by
the reference (`sampler.next_token`, one device read per row) against all at once by
`BatchSampler.sample` (one read per step), for greedy rows and for rows that sample with
top-k / top-p / penalties / seeds; milliseconds per step and device reads per step.

    python -m bench.sampling_step [--device cuda] [--vocab 32000] [--rows 1 8 32 128]
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager

import torch

from bench.timing import measure
from hybridlm.infer.batch_sampler import BatchSampler
from hybridlm.infer.sampler import next_token
from hybridlm.infer.sampling_params import SamplingParams

MIXES = {
    "greedy": lambda i: SamplingParams(temperature=0),
    "sampled": lambda i: SamplingParams(temperature=0.8, top_k=50, top_p=0.9,
                                        frequency_penalty=0.5,
                                        seed=i if i % 2 else None),
}
READS = ("tolist", "item", "__int__", "__float__", "__bool__")


@contextmanager
def counting_reads(counter: list[str]):
    """Count the calls that read a tensor's value back to the host."""
    originals = {name: getattr(torch.Tensor, name) for name in READS}
    for name, original in originals.items():
        setattr(torch.Tensor, name, lambda self, *a, _n=name, _o=original, **k:
                (counter.append(_n), _o(self, *a, **k))[1])
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def case(mix: str, rows: int, vocab: int, device: torch.device) -> str:
    """One table row: `rows` rows of the mix sampled by the reference and batched."""
    params = [MIXES[mix](i) for i in range(rows)]
    logits = torch.randn(rows, vocab, device=device)
    prompt = torch.randint(0, vocab, (64,), device=device)
    output = torch.randint(0, vocab, (32,), device=device)
    generators = [torch.Generator(device=device).manual_seed(i) for i in range(rows)]
    sampler = BatchSampler(rows, vocab, device)
    for row, p in enumerate(params):
        sampler.admit(row, p, prompt)

    def reference() -> None:
        for i, p in enumerate(params):
            next_token(logits[i], p, prompt, output, generators[i])

    def batched() -> None:
        sampler.sample(logits, range(rows), params, generators)

    ref_ms = measure(reference, device).median_ms
    bat_ms = measure(batched, device).median_ms
    reads_ref, reads_bat = [], []
    with counting_reads(reads_ref):
        reference()
    with counting_reads(reads_bat):
        batched()
    return (f"| {mix} | {rows} | {ref_ms:.3f} | {bat_ms:.3f} | {ref_ms / bat_ms:.1f}x | "
            f"{len(reads_ref)} | {len(reads_bat)} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 128])
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(f"device {device}, vocab {args.vocab}, torch {torch.__version__}")
    print("| mix | rows | reference ms/step | batched ms/step | speed-up | reads/step ref "
          "| reads/step batched |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for mix in MIXES:
        for rows in args.rows:
            print(case(mix, rows, args.vocab, device))


if __name__ == "__main__":
    main()
