"""preprocess-mpnet: text corpus (or a fairseq data-bin) -> binarized train/valid shards for pretrain-mpnet."""
from __future__ import annotations

import argparse
import logging

from mpnet_cli._common import command, dashed_flags

EPILOG = """\
inputs:
  Files or directories (searched recursively). .txt / .txt.gz: one document per blank-line-separated block
  (or one per line with --line-per-document). .jsonl / .jsonl.gz: one JSON object per line, the document in
  --text-field. A folder that Hugging Face datasets saved (save_to_disk): each row's --text-field; a
  DatasetDict with a validation split keeps its own split. 'embedded' = the bundled Jane Austen corpus.
  --from-fairseq DATA_BIN instead: a fairseq-preprocess output directory (dict.txt, train/valid .bin + .idx),
  imported without fairseq: dict.txt's symbols are mapped onto --tokenizer's ids, blank lines separate
  documents (every line is one with --line-per-document), the train/valid split is the data-bin's own.

output (DIR):
  train.bin valid.bin          token ids, numpy uint16 (uint32 when the vocabulary exceeds 65536)
  train.idx.npy valid.idx.npy  document boundaries (int64 offsets)
  tokenizer/                   the tokenizer, HF format
  metadata.json                tokenizer identity, vocab size, special ids, counts; checked by pretrain-mpnet
  DIR is written to a temporary directory and renamed at the end; an existing DIR is never touched unless
  --overwrite is given (and then replaced only once the new output is complete).

examples:
  preprocess-mpnet embedded --output-dir data/austen
  preprocess-mpnet corpus/ --output-dir data/mine --sentencepiece-vocab-size 32000 --workers 16
  preprocess-mpnet dump.jsonl.gz --output-dir data/web --text-field content
  preprocess-mpnet saved/mydata --output-dir data/mine --text-field body
  preprocess-mpnet --from-fairseq data-bin/wikitext --output-dir data/wikitext
"""

# Options of raw text only: None on the command line means "not given" (refused with --from-fairseq).
TEXT_DEFAULTS = {"valid_fraction": 0.02, "text_field": "text", "seed": 0}


def build_parser():
    p = argparse.ArgumentParser(
        prog="preprocess-mpnet", description=__doc__, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="corpus files or directories ('embedded' for the bundled corpus)")
    p.add_argument("--from-fairseq", metavar="DATA_BIN",
                   help="import a fairseq data-bin directory (fairseq-preprocess --only-source output) instead")
    p.add_argument("--output-dir", "-o", required=True, metavar="DIR", help="where the shards go (must not exist or be empty)")
    p.add_argument("--tokenizer", default="default", metavar="SPEC",
                   help="'default' (the MPNet WordPiece tokenizer), an HF tokenizer directory, or a sentencepiece "
                        ".model file (default: %(default)s)")
    p.add_argument("--sentencepiece-vocab-size", type=int, metavar="N",
                   help="train a unigram sentencepiece model of N pieces on the training documents and use it "
                        "(special tokens <s>=0 <pad>=1 </s>=2 <unk>=3 <mask>=4); overrides --tokenizer")
    p.add_argument("--valid-fraction", type=float, metavar="F",
                   help="fraction of documents held out for validation, chosen by a seeded hash of each "
                        f"document (default: {TEXT_DEFAULTS['valid_fraction']})")
    p.add_argument("--workers", type=int, default=2, metavar="N", help="tokenizer processes (default: %(default)s)")
    p.add_argument("--text-field", metavar="F",
                   help=f"the field holding the text in JSONL rows and saved HF datasets "
                        f"(default: {TEXT_DEFAULTS['text_field']})")
    p.add_argument("--line-per-document", action="store_true", help="in text files, every non-empty line is a document (with --from-fairseq: every line of the data-bin)")
    p.add_argument("--seed", type=int, help=f"seed of the train/valid split (default: {TEXT_DEFAULTS['seed']})")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


@command
def main(argv=None):
    from mpnet.errors import UserError

    parser = build_parser()
    args = parser.parse_args(dashed_flags(parser, argv))
    if args.sentencepiece_vocab_size is not None and args.sentencepiece_vocab_size < 8:
        raise UserError(f"--sentencepiece-vocab-size must be at least 8, got {args.sentencepiece_vocab_size}")
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")

    # The library logs a one-line summary for pretrain-mpnet's on-the-fly preprocessing; this command
    # prints its own, fuller one below instead (one summary, not two).
    logging.getLogger("mpnet.data.preprocess").setLevel(logging.WARNING)
    if args.from_fairseq:
        meta = _from_fairseq(args)
    elif not args.inputs:
        raise UserError("give the corpus: INPUT... (files or directories), or --from-fairseq DATA_BIN")
    else:
        meta = _from_text(args)
    docs, tokens = meta["num_documents"], meta["num_tokens"]
    print(f"wrote {args.output_dir}: tokenizer {meta['tokenizer']}, {meta['dtype']}; "
          f"train {docs['train']:,} documents / {tokens['train']:,} tokens, "
          f"valid {docs['valid']:,} documents / {tokens['valid']:,} tokens")
    return 0


def _from_text(args) -> dict:
    from mpnet.data import preprocess_corpus  # after parsing: --help stays fast

    for name, default in TEXT_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    return preprocess_corpus(
        args.inputs, args.output_dir, tokenizer=args.tokenizer, valid_fraction=args.valid_fraction,
        workers=args.workers, text_field=args.text_field, sentencepiece_vocab_size=args.sentencepiece_vocab_size,
        seed=args.seed, line_per_document=args.line_per_document, overwrite=args.overwrite,
        progress=not args.no_progress)


def _from_fairseq(args) -> dict:
    from mpnet.errors import UserError

    if args.inputs:
        raise UserError("give either INPUT... (raw text) or --from-fairseq DATA_BIN, not both")
    text_only = ("sentencepiece_vocab_size", *TEXT_DEFAULTS)
    given = ["--" + name.replace("_", "-") for name in text_only if getattr(args, name) is not None]
    if given:
        raise UserError(f"{', '.join(given)} only apply to raw text; a fairseq data-bin is tokenized and split already")
    from mpnet.data.fairseq_data import convert_fairseq_data

    return convert_fairseq_data(args.from_fairseq, args.output_dir, tokenizer=args.tokenizer,
                                line_per_document=args.line_per_document, overwrite=args.overwrite,
                                progress=not args.no_progress)


if __name__ == "__main__":
    # Call main through the package module so error lines say "preprocess", not "__main__".
    from mpnet_cli.preprocess import main as _main

    _main()
