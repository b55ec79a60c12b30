"""Data pipeline: corpora, tokenizers, packing, deterministic sharded iterators, bits per byte."""

from deepseek_jax.data.corpus import (Corpus, default_corpus_files, find_corpus, read_bytes, read_text,
                                      split_files, stable_unit_hash, stdlib_dir)
from deepseek_jax.data.datasets import (Datasets, build_datasets, cached_tokenize, default_cache_dir,
                                        resolve_tokenizer)
from deepseek_jax.data.iterator import TokenBatches, sequential_batches
from deepseek_jax.data.jsonl import read_records
from deepseek_jax.data.metrics import bits_per_byte, bytes_per_token
from deepseek_jax.data.packing import (TokenizedFiles, check_min_tokens, gather_windows, load_token_files,
                                       num_windows, pack_documents, token_dtype, tokenize_files)
from deepseek_jax.data.tokenizer import (ByteTokenizer, HFTokenizer, Tokenizer, check_vocab,
                                         find_tokenizer, load_tokenizer, train_bpe)

__all__ = [
    "ByteTokenizer", "Corpus", "Datasets", "HFTokenizer", "TokenBatches", "TokenizedFiles", "Tokenizer",
    "bits_per_byte", "build_datasets", "bytes_per_token", "cached_tokenize", "check_min_tokens",
    "check_vocab", "default_cache_dir", "default_corpus_files", "find_corpus", "find_tokenizer",
    "gather_windows", "load_token_files", "load_tokenizer", "num_windows", "pack_documents", "read_bytes",
    "read_records", "read_text", "resolve_tokenizer", "sequential_batches", "split_files", "stable_unit_hash", "stdlib_dir",
    "token_dtype", "tokenize_files", "train_bpe",
]
