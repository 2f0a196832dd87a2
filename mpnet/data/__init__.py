"""The data side of pretraining: tokenizer, corpus -> binarized shards, fixed-size blocks, the MPNet collator.

    tok = load_tokenizer("default")                          # the committed MPNet WordPiece tokenizer
    meta = preprocess_corpus(EMBEDDED_CORPUS, "data/austen") # -> train/valid .bin shards + metadata.json
    blocks = TokenBlocks("data/austen", "train", block_size=512)
    collator = MPNetCollator(meta["vocab_size"], meta["pad_token_id"], meta["mask_token_id"], meta["special_token_ids"])
    batch = collator([blocks[i] for i in range(8)], step=0, rank=0)

See docs/data.md for the formats and rules.
"""
from .blocks import TokenBlocks
from .collator import MPNetCollator
from .corpus import EMBEDDED_CORPUS, iter_documents, list_sources
from .preprocess import preprocess_corpus, resolve_data
from .shards import is_preprocessed, read_metadata
from .tokenizer import (DEFAULT_TOKENIZER_DIR, load_tokenizer, special_token_ids, tokenizer_identity,
                        train_sentencepiece, word_starts)

__all__ = [
    "load_tokenizer", "tokenizer_identity", "special_token_ids", "word_starts", "train_sentencepiece",
    "preprocess_corpus", "is_preprocessed", "resolve_data", "read_metadata", "iter_documents", "list_sources",
    "TokenBlocks", "MPNetCollator", "DEFAULT_TOKENIZER_DIR", "EMBEDDED_CORPUS",
]
