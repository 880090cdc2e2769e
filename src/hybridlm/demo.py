"""`hybridlm demo`: the shipped corpus -> tokenizer -> prepared data -> tiny model -> sample.

Prints the model's held-out loss next to the loss of a unigram model of the same data, so a
reader can see at once that the model learned more than token frequencies.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from pathlib import Path

import torch

from hybridlm.data import (
    DEMO_CORPUS,
    Tokenizer,
    load_documents,
    load_prepared,
    prepare_dataset,
    split_documents,
    unigram_loss,
)
from hybridlm.model import HybridLM
from hybridlm.train import TrainConfig, train
from hybridlm.train.trainer import evaluate


def prepare_demo_data(out: Path, vocab_size: int) -> Path:
    """Tokenizer + prepared splits under out/data (skipped if already complete)."""
    data_dir = out / "data"
    if (data_dir / "meta.json").is_file():
        print(f"[demo] reusing prepared data in {data_dir}")
        return data_dir
    t0 = time.perf_counter()
    splits = split_documents(load_documents(DEMO_CORPUS))
    sizes = {name: len(docs) for name, docs in splits.items()}
    print(f"[demo] corpus {DEMO_CORPUS.name}: documents per split {sizes}")
    tokenizer = Tokenizer.train((d.text for d in splits["train"]), vocab_size=vocab_size)
    print(f"[demo] trained a byte-level BPE tokenizer, vocab {tokenizer.vocab_size} "
          f"({time.perf_counter() - t0:.1f}s)")
    meta = prepare_dataset(splits, tokenizer, data_dir, source=str(DEMO_CORPUS.name))
    print(f"[demo] tokens per split {meta['tokens']} ({time.perf_counter() - t0:.1f}s)")
    return data_dir


def run_demo(out: str, steps: int, max_minutes: float, vocab_size: int = 8192,
             prompt: str = "The state of the Union is") -> dict:
    out_dir = Path(out)
    data_dir = prepare_demo_data(out_dir, vocab_size)
    cfg = TrainConfig(
        data=str(data_dir), out=str(out_dir / "model"), preset="tiny",
        model={"routing": "zipf"}, steps=steps, global_batch_size=32, seq_len=128,
        lr=3e-3, warmup_steps=max(1, steps // 20), eval_every=max(1, steps // 4),
        eval_batches=8, checkpoint_every=max(1, steps // 2), max_minutes=max_minutes,
    )
    if (out_dir / "model").exists():
        shutil.rmtree(out_dir / "model")  # the demo always trains afresh
    print(f"[demo] training preset 'tiny' (Zipf token routing) for up to {steps} steps "
          f"or {max_minutes} minutes")
    result = train(cfg)
    model = HybridLM.from_pretrained(result.out).eval()
    data = load_prepared(data_dir)
    val_tokens = data.split("validation")
    val_loss = evaluate(model, val_tokens, cfg.seq_len, cfg.global_batch_size, 64,
                        torch.device("cpu"), contextlib.nullcontext())
    baseline = unigram_loss(data.token_counts, val_tokens)
    print()
    print(f"[demo] trained {result.steps} steps in {result.seconds / 60:.1f} min "
          f"({result.tokens_per_s:.0f} tokens/s)")
    print(f"[demo] held-out loss   {val_loss:.3f} nats/token (perplexity {math.exp(val_loss):.0f})")
    print(f"[demo] unigram model   {baseline:.3f} nats/token (perplexity {math.exp(baseline):.0f})")
    tokenizer = Tokenizer.from_file(result.out)
    ids = torch.tensor([tokenizer.encode(prompt)])
    sample = model.generate(ids, max_new_tokens=60, temperature=0.8, top_k=50,
                            eos_token_id=tokenizer.eos_token_id,
                            generator=torch.Generator().manual_seed(0))
    print(f"[demo] sample: {tokenizer.decode(sample[0].tolist(), skip_special_tokens=True)!r}")
    print(f"[demo] model saved to {result.out}; try: "
          f"hybridlm generate --model {result.out} --prompt \"...\"")
    return {"val_loss": val_loss, "unigram_loss": baseline, "steps": result.steps}
