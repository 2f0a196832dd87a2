#!/usr/bin/env python
"""Rebuild mpnet/resources/corpus/austen.txt.gz, the small real English corpus embedded in the package.

Source: Jane Austen's six completed novels (public domain; Project Gutenberg texts) as packaged in the Debian
package r-cran-janeaustenr (MIT packaging by Julia Silge). The package stores each novel as an R character
vector (one element per printed line) inside an R lazy-load database (data/Rdata.rdx + data/Rdata.rdb); the
pure-Python `rdata` package decodes it, so R is not needed.

Output format (what `preprocess-mpnet` reads by default): UTF-8 text, gzip, one document per blank-line-separated
block. A document is one chapter: its paragraphs (each a single line, wrapped lines joined by spaces) separated by
single newlines. Chapter and volume headings are dropped; front matter is kept only when it is real prose (the
"Advertisement" preface of Northanger Abbey). Gutenberg's _italic_ underscores are removed.

    python scripts/build_embedded_corpus.py                 # apt-get download the .deb into a temp dir
    python scripts/build_embedded_corpus.py --deb FILE.deb  # use a .deb you already have

Needs: apt-get (Debian/Ubuntu) unless --deb is given, dpkg-deb, and `pip install rdata`.
"""
from __future__ import annotations

import argparse
import gzip
import re
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

from corpus_readers import chapters_from_paragraphs  # scripts/corpus_readers.py

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "mpnet" / "resources" / "corpus" / "austen.txt.gz"
PACKAGE = "r-cran-janeaustenr"
# Object names in the R package, in publication order.
BOOKS = ["sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion"]
HEADING = re.compile(r"^\s*(chapter|volume)\b", re.IGNORECASE)


def fetch_deb(workdir: Path) -> Path:
    subprocess.run(["apt-get", "download", PACKAGE], cwd=workdir, check=True)
    return next(workdir.glob(f"{PACKAGE}_*.deb"))


def read_lazyload_db(data_dir: Path) -> dict[str, list[str]]:
    """Decode R's lazy-load database: the .rdx index maps names to (offset, length) in the .rdb; each record is
    a 4-byte big-endian uncompressed length followed by a zlib stream holding one serialized R object."""
    import rdata
    from rdata.conversion import convert
    from rdata.parser import parse_data

    index = rdata.read_rds(str(data_dir / "Rdata.rdx"))
    blob = (data_dir / "Rdata.rdb").read_bytes()
    books = {}
    for name, (offset, length) in index["variables"].items():
        record = blob[offset : offset + length]
        (size,) = struct.unpack(">I", record[:4])
        payload = zlib.decompress(record[4:])
        assert len(payload) == size, f"{name}: corrupt record"
        books[str(name)] = [str(line) for line in convert(parse_data(payload))]
    return books


def paragraphs(lines: list[str]) -> list[str]:
    """Blank-line-separated paragraphs, each re-flowed into one line."""
    out, current = [], []
    for line in lines + [""]:
        if line.strip():
            current.append(line.strip())
        elif current:
            out.append(" ".join(current).replace("_", ""))
            current = []
    return out


def is_chapter_heading(para: str) -> bool:
    return bool(HEADING.match(para)) and len(para) < 60  # a heading line, not prose that starts with "Chapter"


def chapters(lines: list[str]) -> list[str]:
    """One document per chapter: paragraphs between headings joined by newlines."""
    docs = chapters_from_paragraphs(paragraphs(lines), heading=is_chapter_heading)
    # The title page (a few short lines) is not a document; a real preface (Northanger Abbey) is.
    if docs and sum(len(p) for p in docs[0]) < 300:
        docs = docs[1:]
    return ["\n".join(doc) for doc in docs]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deb", type=Path, help=f"an already downloaded {PACKAGE} .deb")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        deb = args.deb.resolve() if args.deb else fetch_deb(tmp)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp / "root")], check=True)
        data_dir = next((tmp / "root").glob("usr/lib/R/site-library/janeaustenr/data"))
        books = read_lazyload_db(data_dir)

    docs = []
    for name in BOOKS:
        book_docs = chapters(books[name])
        print(f"{name}: {len(book_docs)} documents, {sum(map(len, book_docs)):,} characters", file=sys.stderr)
        docs.extend(book_docs)

    text = "\n\n".join(docs) + "\n"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0 and no file name in the header: rebuilding gives byte-identical output.
    with open(args.output, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as f:
        f.write(text.encode("utf-8"))
    print(f"wrote {args.output} ({len(docs)} documents, {len(text):,} characters, "
          f"{args.output.stat().st_size:,} bytes gzipped)", file=sys.stderr)


if __name__ == "__main__":
    main()
