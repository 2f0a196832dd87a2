"""Tokenizers: the committed MPNet WordPiece tokenizer, any HF tokenizer directory, or a sentencepiece model.

Whatever comes in, `load_tokenizer` returns a transformers fast tokenizer with the four tokens the MPNet
objective needs (`pad`, `mask`, `bos` = <s>, `eos` = </s>) set, and `tokenizer_identity` names its vocabulary
so that training can refuse data that was tokenized with something else.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from mpnet.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "resources" / "tokenizer"
SENTENCEPIECE_FILE = "sentencepiece.model"  # not "tokenizer.model": transformers would try to re-convert that name
# MPNet's layout of the special tokens; a sentencepiece model we train gets <s> <pad> </s> <unk> as ids 0-3.
MPNET_SPECIAL_TOKENS = {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
                        "mask_token": "<mask>"}


def load_tokenizer(spec="default"):
    """spec: "default" (the committed MPNet tokenizer) | an HF tokenizer directory | a sentencepiece .model file |
    a preprocessed data directory (uses its tokenizer/ copy). Loads offline only: hub names are not accepted."""
    from transformers import AutoTokenizer

    path = DEFAULT_TOKENIZER_DIR if str(spec) == "default" else Path(spec).expanduser()
    if path.is_dir() and (path / "metadata.json").is_file() and (path / "tokenizer").is_dir():
        path = path / "tokenizer"
    if path.is_file() and path.suffix == ".model":
        tok = _from_sentencepiece(path)
    elif path.is_dir():
        if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
            raise UserError(f"tokenizer directory {path} holds no tokenizer.json, tokenizer_config.json or vocab.txt")
        try:
            # trust_remote_code=False: a pattern checkpoint's config names custom code (mpnet/hub.py); without the
            # flag transformers would ask at a terminal whether to run it, for the tokenizer, which needs none
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as err:
            raise UserError(f"could not load the tokenizer in {path}: {str(err).splitlines()[0]}") from None
    else:
        raise UserError(f"tokenizer not found: {spec} (give 'default', an HF tokenizer directory or a "
                        f"sentencepiece .model file)")
    _ensure_special_tokens(tok)
    return tok


def checkpoint_tokenizer(checkpoint):
    """A model directory's own tokenizer; a checkpoint without tokenizer files gets the default MPNet
    tokenizer (with a note), which is what every checkpoint this project writes carries."""
    checkpoint = Path(checkpoint)
    if not any((checkpoint / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        log.info("%s has no tokenizer files; using the default MPNet tokenizer in %s", checkpoint, DEFAULT_TOKENIZER_DIR)
        return load_tokenizer("default")
    return load_tokenizer(checkpoint)


def _ensure_special_tokens(tok):
    """Set pad/mask/bos/eos, reusing BERT-style tokens ([CLS]/[SEP]) where present, adding MPNet's otherwise."""
    wanted = {}
    if tok.bos_token is None:
        wanted["bos_token"] = tok.cls_token or MPNET_SPECIAL_TOKENS["bos_token"]
    if tok.eos_token is None:
        wanted["eos_token"] = tok.sep_token or MPNET_SPECIAL_TOKENS["eos_token"]
    for key in ("pad_token", "mask_token"):
        if getattr(tok, key) is None:
            wanted[key] = MPNET_SPECIAL_TOKENS[key]
    if wanted:
        added = tok.add_special_tokens(wanted)
        log.info("tokenizer: set %s (%d new tokens)", ", ".join(f"{k}={v}" for k, v in wanted.items()), added)


def _from_sentencepiece(path: Path):
    """Wrap a sentencepiece .model as a transformers fast tokenizer, encoding exactly as sentencepiece does."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

    proto = import_protobuf().ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as err:  # protobuf raises its own DecodeError
        raise UserError(f"{path} is not a sentencepiece model ({err})") from None
    vocab = [(piece.piece, piece.score) for piece in proto.pieces]
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    if backend is None:
        raise UserError(f"{path}: unsupported sentencepiece model type")
    pieces = {piece.piece for piece in proto.pieces}
    special = {key: tok for key, tok in MPNET_SPECIAL_TOKENS.items() if tok in pieces}
    if proto.trainer_spec.unk_piece in pieces:
        special["unk_token"] = proto.trainer_spec.unk_piece
    # model_max_length: MPNet's longest input (514 positions less the two padding offsets), as the committed MPNet
    # tokenizer says; transformers' default for a tokenizer without one is 1e30, which truncation=True then ignores.
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=512, **special)
    # Our own special tokens (control pieces) are never produced from text by sentencepiece; the HF tokenizer
    # matches them literally, and <mask> swallows the space before it as MPNet's does.
    bos, eos = tok.bos_token, tok.eos_token
    if bos is not None and eos is not None:
        tok.backend_tokenizer.post_processor = TemplateProcessing(
            single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B {eos}",
            special_tokens=[(bos, tok.convert_tokens_to_ids(bos)), (eos, tok.convert_tokens_to_ids(eos))])
    return tok


def train_sentencepiece(text_file, model_prefix, vocab_size, workers=1, seed=0):
    """Train a unigram sentencepiece model with MPNet-style specials: <s>=0 <pad>=1 </s>=2 <unk>=3 <mask>=4.

    text_file holds one paragraph per line. <mask> is a control symbol: it is never produced from text.
    hard_vocab_limit=False lets a small corpus end up with a smaller vocabulary instead of failing.
    Returns the path of the .model file."""
    import sentencepiece as spm

    spm.set_random_generator_seed(int(seed) + 1)  # paragraph sampling/shuffling reproducible
    spm.SentencePieceTrainer.train(
        input=str(text_file), model_prefix=str(model_prefix), vocab_size=int(vocab_size), model_type="unigram",
        character_coverage=0.9999, hard_vocab_limit=False, num_threads=max(1, int(workers)),
        bos_id=0, pad_id=1, eos_id=2, unk_id=3, bos_piece="<s>", pad_piece="<pad>", eos_piece="</s>",
        unk_piece="<unk>", control_symbols=["<mask>"],
        # Bounded memory on big corpora: sample at most 2M paragraphs; keep long paragraphs (default cap 4192 bytes).
        input_sentence_size=2_000_000, shuffle_input_sentence=True, max_sentence_length=1 << 16,
        minloglevel=2)
    return Path(f"{model_prefix}.model")


def special_token_ids(tok) -> list[int]:
    """Every id a collator must never draw as a random replacement: declared specials plus special added tokens."""
    ids = set(tok.all_special_ids)
    ids.update(i for i, t in tok.added_tokens_decoder.items() if t.special)
    return sorted(int(i) for i in ids)


def tokenizer_identity(tok) -> str:
    """A name for the tokenizer's behaviour, e.g. 'wordpiece-30527-3f2a9c0d1e4b': model type, vocabulary size and a
    hash of the backend's vocabulary, normalizer, pre-tokenizer and special tokens. Equal for copies of the same
    tokenizer wherever they live; different when any id would differ. (Truncation/padding settings are ignored.)"""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
        kind = state.get("model", {}).get("type", "unknown").lower()
    else:  # a slow (python) tokenizer: its vocabulary is the best description we have
        state = {"vocab": sorted(tok.get_vocab().items(), key=lambda kv: kv[1])}
        kind = type(tok).__name__.lower()
    state["special_tokens"] = {k: str(v) for k, v in sorted(tok.special_tokens_map.items())}
    blob = json.dumps(state, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return f"{kind}-{len(tok)}-{hashlib.sha256(blob).hexdigest()[:12]}"


def word_starts(tok) -> np.ndarray:
    """Bool array over the vocabulary for whole-word masking: True where a token begins a word.

    WordPiece continuations start with '##'; sentencepiece/BPE word beginnings start with '▁' or 'Ġ'. Special
    tokens are always their own word."""
    vocab_size = len(tok)
    tokens = tok.convert_ids_to_tokens(list(range(vocab_size)))
    sentencepiece_style = any(t.startswith(("▁", "Ġ")) for t in tokens if t)
    if sentencepiece_style:
        starts = np.array([bool(t) and t.startswith(("▁", "Ġ")) for t in tokens])
    else:
        starts = np.array([not (t or "").startswith("##") for t in tokens])
    starts[special_token_ids(tok)] = True
    return starts


def save_tokenizer(tok, directory, sentencepiece_model=None):
    """Save an HF-format copy (plus the sentencepiece .model it came from, if any) that load_tokenizer reads back."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(directory))
    if sentencepiece_model is not None:
        (directory / SENTENCEPIECE_FILE).write_bytes(Path(sentencepiece_model).read_bytes())
    return directory

