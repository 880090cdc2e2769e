"""`hybridlm demo`: the shipped corpus -> tokenizer -> prepared data -> tiny model -> sample.

Prints the model's held-out loss next to the loss of a unigram model of the same data, so a
reader can see at once that the model learned more than token frequencies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
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
from hybridlm.data.tokenizer import check_vocab_size
from hybridlm.eval import evaluate
from hybridlm.model import HybridLM
from hybridlm.outputs import (
    DEMO,
    PREPARED,
    RUN,
    OutputError,
    check_output_path,
    claim_output,
    identify,
    staged_dir,
)
from hybridlm.train import TrainConfig, train
from hybridlm.train.trainer import CONFIG_FILE, TrainResult


def prepare_demo_data(out: Path, vocab_size: int, overwrite: bool = False) -> Path:
    """Tokenizer + prepared splits under out/data: complete prepared data of the same
    vocabulary size there is reused; anything else there is refused (replaced with
    `overwrite`: unfinished data, or data of another vocabulary size)."""
    data_dir = out / "data"
    try:
        found = load_prepared(data_dir).vocab_size
    except (OSError, ValueError):
        claim_output(data_dir, PREPARED, overwrite=overwrite, flag="")
    else:
        if found == vocab_size:
            print(f"[demo] reusing prepared data in {data_dir}")
            return data_dir
        if not overwrite:
            raise OutputError(
                f"{data_dir} holds the demo's data prepared with --vocab-size {found}, not "
                f"{vocab_size}; pass --overwrite to prepare it again, or choose another --out")
        claim_output(data_dir, PREPARED, overwrite=True, flag="")
    t0 = time.perf_counter()
    splits = split_documents(load_documents(DEMO_CORPUS))
    sizes = {name: len(docs) for name, docs in splits.items()}
    print(f"[demo] corpus {DEMO_CORPUS.name}: documents per split {sizes}")
    tokenizer = Tokenizer.train((d.text for d in splits["train"]), vocab_size=vocab_size)
    print(f"[demo] trained a byte-level BPE tokenizer, vocab {tokenizer.vocab_size} "
          f"({time.perf_counter() - t0:.1f}s)")
    meta = prepare_dataset(splits, tokenizer, data_dir, source=str(DEMO_CORPUS.name),
                           overwrite=overwrite)
    print(f"[demo] tokens per split {meta['tokens']} ({time.perf_counter() - t0:.1f}s)")
    return data_dir


def train_demo_model(cfg: TrainConfig, model_dir: Path) -> TrainResult:
    """Train into a temporary directory beside `model_dir` that replaces it only once the run
    has finished: an interrupted demo leaves the earlier model as it was."""
    with staged_dir(model_dir, replace=True) as staging:
        result = train(dataclasses.replace(cfg, out=str(staging)))
        cfg.save(staging / CONFIG_FILE)  # the run's config names where it ends up
    return dataclasses.replace(result, out=str(model_dir))


def claim_demo(out_dir: Path, overwrite: bool) -> Path:
    """The demo writes OUT/data and OUT/model into a new or empty directory or an earlier
    demo's; an earlier demo's model is replaced only with `overwrite`, anything else never."""
    found = identify(out_dir)
    if found.kind not in (None, DEMO):
        raise OutputError(f"--out {out_dir} already holds {found.description}; the demo writes "
                          "data/ and model/ into a new or empty directory (or an earlier "
                          "demo's): choose another --out")
    model_dir = out_dir / "model"
    found = identify(model_dir)
    if found.kind == RUN and not overwrite:
        raise OutputError(f"{model_dir} already holds {found.description} of an earlier demo; "
                          "pass --overwrite to train it again, or choose another --out")
    claim_output(model_dir, RUN, overwrite=True, flag="")
    return model_dir


def run_demo(out: str, steps: int, max_minutes: float, vocab_size: int = 8192,
             prompt: str = "The state of the Union is", overwrite: bool = False) -> dict:
    """Prepare the shipped corpus into OUT/data (reused when complete) and train the tiny
    model into OUT/model; an existing OUT/model is replaced only with `overwrite`."""
    out_dir = check_output_path(out)
    data_dir = out_dir / "data"
    model_dir = out_dir / "model"
    cfg = TrainConfig(
        data=str(data_dir), out=str(model_dir), preset="tiny",
        model={"tr_routing": "zipf"}, steps=steps, global_batch_size=32, seq_len=128,
        lr=3e-3, warmup_steps=max(1, steps // 20), eval_every=max(1, steps // 4),
        eval_batches=8, checkpoint_every=max(1, steps // 2), max_minutes=max_minutes,
    )
    # Bad flags are refused before the corpus is read and a tokenizer trained (a minute).
    cfg.validate()
    check_vocab_size(vocab_size)
    claim_demo(out_dir, overwrite)
    prepare_demo_data(out_dir, vocab_size, overwrite)
    print(f"[demo] training preset 'tiny' (Zipf token routing) for up to {steps} steps "
          f"or {max_minutes} minutes")
    result = train_demo_model(cfg, model_dir)
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
