"""Data pipeline: documents -> byte-level BPE tokenizer -> flat token files -> batches.

Typical use::

    from hybridlm.data import (DEMO_CORPUS, BatchSampler, Tokenizer, load_documents,
                               load_prepared, prepare_dataset, split_documents, unigram_loss)

    splits = split_documents(load_documents(DEMO_CORPUS))
    tok = Tokenizer.train((d.text for d in splits["train"]), vocab_size=8192)
    prepare_dataset(splits, tok, "runs/demo/data", source="demo corpus")
    data = load_prepared("runs/demo/data")
    sampler = BatchSampler(data.split("train"), batch_size=16, seq_len=256, seed=0)
    windows = sampler.batch(0)                 # (16, 257) int64: input_ids = labels
    baseline = unigram_loss(data.token_counts, data.split("validation"))
"""

from .corpus import (
    DEMO_CORPUS,
    SPLITS,
    Document,
    demo_corpus_path,
    load_documents,
    split_documents,
)
from .loader import BatchSampler, iter_eval_windows, num_eval_windows
from .prepare import PreparedData, load_prepared, prepare_dataset, token_dtype
from .tokenizer import EOS_TOKEN, EOS_TOKEN_ID, Tokenizer
from .unigram import unigram_loss, unigram_probs

__all__ = [
    "DEMO_CORPUS",
    "EOS_TOKEN",
    "EOS_TOKEN_ID",
    "SPLITS",
    "BatchSampler",
    "Document",
    "PreparedData",
    "Tokenizer",
    "demo_corpus_path",
    "iter_eval_windows",
    "load_documents",
    "load_prepared",
    "num_eval_windows",
    "prepare_dataset",
    "split_documents",
    "token_dtype",
    "unigram_loss",
    "unigram_probs",
]
