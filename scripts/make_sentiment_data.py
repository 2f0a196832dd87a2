#!/usr/bin/env python3
"""Build the SST-2-like sentiment task from real movie-review sentences, in the GLUE SST-2 layout.

Source: the `vaderSentiment==3.3.2` source distribution on PyPI (MIT licence, (c) 2016 C.J. Hutto) ships
additional_resources/hutto_ICWSM_2014.tar.gz, whose movieReviewSnippets_GroundTruth.txt holds 10,605
sentence-level snippets from rottentomatoes.com (the Pang & Lee movie reviews that SST was also built
from), each with the mean sentiment rating of at least 20 human raters on a -4..+4 scale
("ID<TAB>MEAN-RATING<TAB>TEXT").

Labels: 1 if the mean rating is > 0, 0 if it is < 0; the 37 snippets rated exactly 0 are dropped (neither
positive nor negative), as are exact duplicate sentences after the first (so no sentence is in both
splits). Split: a fixed, seeded (seed 13) 90/10 shuffle into train.tsv and dev.tsv, written as GLUE SST-2
files ("sentence<TAB>label" with a header). Tabs and line breaks inside a snippet become spaces.

    python scripts/make_sentiment_data.py [OUTPUT_DIR]        # default data/sentiment

needs network access to PyPI (pip download) once; `--sdist FILE` uses an already downloaded
vaderSentiment-3.3.2.tar.gz instead. Writes OUTPUT_DIR/train.tsv, dev.tsv and SOURCE.md (provenance,
licence and counts).
"""
from __future__ import annotations

import argparse
import io
import random
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "vaderSentiment==3.3.2"
SNIPPETS = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
SEED = 13
DEV_FRACTION = 0.1


def download_sdist(dest: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
                    "--dest", str(dest), PACKAGE], check=True)
    found = sorted(dest.glob("vaderSentiment-3.3.2.tar.gz")) or sorted(dest.glob("vader*3.3.2*"))
    if not found:
        sys.exit(f"make_sentiment_data: error: pip download did not produce the {PACKAGE} source archive in {dest}")
    return found[0]


def read_snippets(sdist: Path) -> tuple[list[tuple[str, float]], str]:
    """(text, mean rating) pairs from the nested archive, and the package's licence text."""
    with tarfile.open(sdist) as outer:
        names = outer.getnames()
        inner_name = next((n for n in names if n.endswith("additional_resources/hutto_ICWSM_2014.tar.gz")), None)
        licence_name = next((n for n in names if n.endswith("LICENSE.txt")), None)
        if inner_name is None:
            sys.exit(f"make_sentiment_data: error: {sdist} has no additional_resources/hutto_ICWSM_2014.tar.gz")
        inner_bytes = outer.extractfile(inner_name).read()
        licence = outer.extractfile(licence_name).read().decode("utf-8") if licence_name else ""
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        raw = inner.extractfile(SNIPPETS).read().decode("utf-8")
    snippets = []
    for line in raw.splitlines():  # CRLF line ends in the original
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        text = " ".join("\t".join(parts[2:]).split())
        snippets.append((text, float(parts[1])))
    return snippets, licence


def build(snippets: list[tuple[str, float]]):
    seen, examples, zeros, duplicates = set(), [], 0, 0
    for text, score in snippets:
        if score == 0:
            zeros += 1
            continue
        if text in seen:
            duplicates += 1
            continue
        seen.add(text)
        examples.append((text, int(score > 0)))
    random.Random(SEED).shuffle(examples)
    n_dev = round(DEV_FRACTION * len(examples))
    return examples[n_dev:], examples[:n_dev], {"snippets": len(snippets), "zero_rated_dropped": zeros,
                                                 "duplicates_dropped": duplicates}


def write_tsv(path: Path, rows):
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        handle.write("sentence\tlabel\n")
        for text, label in rows:
            handle.write(f"{text}\t{label}\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", nargs="?", default="data/sentiment", type=Path)
    parser.add_argument("--sdist", type=Path, help="an already downloaded vaderSentiment-3.3.2.tar.gz")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        sdist = args.sdist or download_sdist(Path(tmp))
        snippets, licence = read_snippets(sdist)
    train, dev, counts = build(snippets)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    write_tsv(args.output_dir / "train.tsv", train)
    write_tsv(args.output_dir / "dev.tsv", dev)
    positives = lambda rows: sum(label for _, label in rows)  # noqa: E731
    (args.output_dir / "SOURCE.md").write_text(f"""# Sentiment (SST-2-like) task

Built by scripts/make_sentiment_data.py from `{PACKAGE}` (PyPI source distribution),
additional_resources/hutto_ICWSM_2014.tar.gz, {SNIPPETS}: movie-review sentences from
rottentomatoes.com rated -4..+4 by at least 20 people (Hutto & Gilbert, ICWSM 2014).

- label 1 = mean rating > 0, label 0 = mean rating < 0
- dropped: {counts['zero_rated_dropped']} snippets rated exactly 0, {counts['duplicates_dropped']} duplicate sentences
- split: seed {SEED}, {int(100 * (1 - DEV_FRACTION))}/{int(100 * DEV_FRACTION)}: train {len(train)} ({positives(train)} positive),
  dev {len(dev)} ({positives(dev)} positive)
- layout: GLUE SST-2 (sentence<TAB>label, with a header)

## Licence (vaderSentiment, MIT)

{licence.strip()}
""")
    print(f"wrote {args.output_dir}/train.tsv ({len(train)}) and dev.tsv ({len(dev)}); "
          f"dropped {counts['zero_rated_dropped']} zero-rated and {counts['duplicates_dropped']} duplicate snippets")


if __name__ == "__main__":
    main()
