"""convert-mpnet: original fairseq MPNet checkpoints and HF MPNet directories to native checkpoints, and native
checkpoints back to the original fairseq format."""
from __future__ import annotations

import argparse
from pathlib import Path

from ._common import OneLineErrorParser, command, dashed_flags

EPILOG = """examples:
  convert-mpnet fairseq mpnet.example.pt --dict dict.txt --output-dir runs/mpnet-fairseq
  convert-mpnet hf ~/.cache/mpnet/all-mpnet-base-v2 --output-dir runs/all-mpnet-native
  convert-mpnet to-fairseq runs/tiny/checkpoints/step-00000300 --output-dir runs/tiny-fairseq

fairseq: reads the original checkpoint without fairseq installed, maps dict.txt's ids onto the HF MPNet
vocabulary (--tokenizer, default the bundled MPNet tokenizer), writes an HF MPNetForMaskedLM directory
and checks it against a plain-torch fairseq forward. hf: native checkpoints already are HF directories;
this rewrites any HF MPNet layout as ours and checks the encoder against transformers' MPNetModel.
to-fairseq: writes OUTPUT/checkpoint.pt + OUTPUT/dict.txt in the original fairseq MPNet format (what
`fairseq-train --restore-file` / MPNet.from_pretrained of microsoft/MPNet load), checks that it reads back
bit-exact and that its fairseq forward matches the model.
Each writes OUTPUT/conversion.json. OUTPUT must be new or empty (--overwrite replaces it once the new
output is complete); a directory holding a training checkpoint is never written to."""


def build_parser():
    p = OneLineErrorParser(prog="convert-mpnet", description=__doc__, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="source", required=True, parser_class=OneLineErrorParser)
    fs = sub.add_parser("fairseq", help="original fairseq MPNet checkpoint (.pt) -> native")
    fs.add_argument("checkpoint", type=Path, help="fairseq checkpoint, e.g. mpnet.example.pt")
    fs.add_argument("--dict", type=Path, required=True, help="the fairseq dict.txt the model was trained with")
    fs.add_argument("--tokenizer", type=Path, help="HF MPNet tokenizer dir (default: mpnet/resources/tokenizer)")
    fs.add_argument("--no-verify", action="store_true", help="skip the comparison with the fairseq forward")
    hf = sub.add_parser("hf", help="HF MPNet directory -> native (and verify)")
    hf.add_argument("src", type=Path, help="HF MPNet directory (MPNetForMaskedLM, MPNetModel, sentence-transformers)")
    hf.add_argument("--tokenizer", type=Path, help="tokenizer dir (default: the source's, else the bundled one)")
    hf.add_argument("--no-verify", action="store_true", help="skip the comparison with transformers' MPNetModel")
    to = sub.add_parser("to-fairseq", help="native checkpoint -> original fairseq MPNet checkpoint.pt + dict.txt")
    to.add_argument("src", type=Path, help="one of our checkpoints (or any HF MPNet directory)")
    to.add_argument("--tokenizer", type=Path, help="tokenizer dir (default: the checkpoint's, else the bundled one)")
    to.add_argument("--no-verify", action="store_true", help="skip the read-back and fairseq-forward checks")
    for parser in (fs, hf, to):
        parser.add_argument("--output-dir", type=Path, required=True, help="a new or empty directory")
        parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUTPUT (never a "
                                                                      "training checkpoint)")
    return p


@command
def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(dashed_flags(parser, argv))
    verify = not args.no_verify
    from mpnet.modeling.checkpoint import model_dir
    if args.source == "fairseq":
        from mpnet.convert.fairseq import convert_fairseq

        convert_fairseq(args.checkpoint, args.dict, args.output_dir, args.tokenizer, verify=verify,
                        overwrite=args.overwrite)
    elif args.source == "hf":
        from mpnet.convert.hf import convert_hf

        convert_hf(model_dir(args.src), args.output_dir, args.tokenizer, verify=verify, overwrite=args.overwrite)
    else:
        from mpnet.convert.to_fairseq import convert_to_fairseq

        convert_to_fairseq(args.src, args.output_dir, args.tokenizer, verify=verify, overwrite=args.overwrite)
    print(args.output_dir)


if __name__ == "__main__":
    main()
