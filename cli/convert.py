"""convert-mpnet: import original fairseq MPNet checkpoints, or HF MPNet directories, as native checkpoints."""
from __future__ import annotations

import argparse
from pathlib import Path

from ._common import OneLineErrorParser, command

EPILOG = """examples:
  convert-mpnet fairseq mpnet.example.pt --dict dict.txt --output-dir runs/mpnet-fairseq
  convert-mpnet hf ~/.cache/mpnet/all-mpnet-base-v2 --output-dir runs/all-mpnet-native

fairseq: reads the original checkpoint without fairseq installed, maps dict.txt's ids onto the HF MPNet
vocabulary (--tokenizer, default the bundled MPNet tokenizer), writes an HF MPNetForMaskedLM directory
and checks it against a plain-torch fairseq forward. hf: native checkpoints already are HF directories;
this rewrites any HF MPNet layout as ours and checks the encoder against transformers' MPNetModel.
Each writes OUTPUT/conversion.json."""


def build_parser():
    p = OneLineErrorParser(prog="convert-mpnet", description=__doc__, epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="source", required=True, parser_class=OneLineErrorParser)
    fs = sub.add_parser("fairseq", help="original fairseq MPNet checkpoint (.pt) -> native")
    fs.add_argument("checkpoint", type=Path, help="fairseq checkpoint, e.g. mpnet.example.pt")
    fs.add_argument("--dict", type=Path, required=True, help="the fairseq dict.txt the model was trained with")
    fs.add_argument("--output-dir", type=Path, required=True)
    fs.add_argument("--tokenizer", type=Path, help="HF MPNet tokenizer dir (default: mpnet/resources/tokenizer)")
    fs.add_argument("--no-verify", action="store_true", help="skip the comparison with the fairseq forward")
    hf = sub.add_parser("hf", help="HF MPNet directory -> native (and verify)")
    hf.add_argument("src", type=Path, help="HF MPNet directory (MPNetForMaskedLM, MPNetModel, sentence-transformers)")
    hf.add_argument("--output-dir", type=Path, required=True)
    hf.add_argument("--tokenizer", type=Path, help="tokenizer dir (default: the source's, else the bundled one)")
    hf.add_argument("--no-verify", action="store_true", help="skip the comparison with transformers' MPNetModel")
    return p


@command
def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.source == "fairseq":
        from mpnet.convert.fairseq import convert_fairseq

        convert_fairseq(args.checkpoint, args.dict, args.output_dir, args.tokenizer, verify=not args.no_verify)
    else:
        from mpnet.convert.hf import convert_hf

        convert_hf(args.src, args.output_dir, args.tokenizer, verify=not args.no_verify)
    print(args.output_dir)


if __name__ == "__main__":
    main()
