"""Data pipeline: documents -> byte-level BPE tokenizer -> token shards -> batches.

Typical use::

    from hybridlm.data import (DEMO_CORPUS, Tokenizer, WindowSampler, load_documents,
                               load_prepared, prepare_corpus, split_documents, unigram_loss)

    splits = split_documents(load_documents(DEMO_CORPUS))
    tok = Tokenizer.train((d.text for d in splits["train"]), vocab_size=8192)
    tok.save("runs/demo/tok")
    prepare_corpus([DEMO_CORPUS], "runs/demo/tok", "runs/demo/data", workers=4)
    data = load_prepared("runs/demo/data")
    sampler = WindowSampler(data.split("train"), seq_len=256, global_batch=16, seed=0)
    windows = sampler.batch(0)                 # (16, 257) int64: input_ids = labels
    shard_of_rank1 = sampler.batch(0, rank=1, world_size=2)   # rows 8..15 of the above
    baseline = unigram_loss(data.token_counts, data.split("validation"))

:func:`prepare_dataset` writes the same layout from documents already split in memory.
"""

from .corpus import (
    DEMO_CORPUS,
    SPLITS,
    Document,
    demo_corpus_path,
    iter_input,
    list_input_files,
    load_documents,
    split_documents,
)
from .loader import WindowSampler, iter_eval_windows, num_eval_windows
from .prepare import corpus_fingerprint, default_workers, prepare_corpus, prepare_dataset
from .shards import DEFAULT_SHARD_TOKENS, PreparedData, load_prepared, token_dtype
from .stream import TokenStream
from .tokenizer import EOS_TOKEN, EOS_TOKEN_ID, Tokenizer
from .unigram import unigram_loss, unigram_probs

__all__ = [
    "DEFAULT_SHARD_TOKENS",
    "DEMO_CORPUS",
    "EOS_TOKEN",
    "EOS_TOKEN_ID",
    "SPLITS",
    "Document",
    "PreparedData",
    "TokenStream",
    "Tokenizer",
    "WindowSampler",
    "corpus_fingerprint",
    "default_workers",
    "demo_corpus_path",
    "iter_eval_windows",
    "iter_input",
    "list_input_files",
    "load_documents",
    "load_prepared",
    "num_eval_windows",
    "prepare_corpus",
    "prepare_dataset",
    "split_documents",
    "token_dtype",
    "unigram_loss",
    "unigram_probs",
]
