"""Corpus reading (txt / jsonl / parquet, with errors that point at the file and line) and packing."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logitstore.capture.corpus import (
    Document,
    PackedCorpus,
    document_positions,
    read_documents,
    tokenize_and_pack,
)
from logitstore.errors import CorpusError

REPO = Path(__file__).resolve().parents[2]
SHAKESPEARE = REPO / "examples" / "data" / "tinyshakespeare.txt"

DOCS = [
    "First line of one.\nSecond line of one.",
    "Ünïcödé — 漢字 and emoji 🙂",
    "a single line",
    "  indented first line\n\ttabbed second line  ",
]


def write_txt(path: Path, docs: list[str], sep: str = "\n\n", newline: str = "\n") -> Path:
    path.write_bytes((sep.join(docs) + "\n").replace("\n", newline).encode("utf-8"))
    return path


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({"id": i, field: d}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return path


def write_parquet(path: Path, docs: list[str | None], field: str = "text", row_group_size: int | None = None) -> Path:
    table = pa.table({"id": list(range(len(docs))), field: pa.array(docs, type=pa.string())})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def fingerprint_of(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def expected_ids(tokenizer: Any, text: str) -> list[int]:
    """The documented per-document tokenization, one document at a time."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    return ids


@pytest.fixture(scope="module")
def tokenizer(tiny_teacher_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_teacher_dir)


# --- reading: round trips -------------------------------------------------------------------


def test_txt_round_trip(tmp_path: Path) -> None:
    path = write_txt(tmp_path / "c.txt", DOCS)
    docs = list(read_documents([path]))
    assert [d.text for d in docs] == DOCS
    assert [d.doc_id for d in docs] == [0, 1, 2, 3]
    assert [d.source for d in docs] == [f"{path}:1", f"{path}:4", f"{path}:6", f"{path}:8"]


def test_txt_paragraph_rules(tmp_path: Path) -> None:
    # Several blank lines, whitespace-only lines, a BOM, CRLF line endings and no final newline.
    raw = "\ufeff\n\nalpha\r\nbeta\r\n\r\n   \r\n\t\r\ngamma\r\n\r\n\r\ndelta"
    path = tmp_path / "c.txt"
    path.write_bytes(raw.encode("utf-8"))
    docs = list(read_documents([path]))
    assert [d.text for d in docs] == ["alpha\nbeta", "gamma", "delta"]
    assert [d.source for d in docs] == [f"{path}:3", f"{path}:8", f"{path}:11"]


def test_jsonl_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    lines = [json.dumps({"text": DOCS[0]}), "", "   ", json.dumps({"text": DOCS[1], "x": 1})]
    lines += [json.dumps({"text": d}) for d in DOCS[2:]]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    docs = list(read_documents([path]))
    assert [d.text for d in docs] == DOCS
    assert [d.source for d in docs] == [f"{path}:1", f"{path}:4", f"{path}:5", f"{path}:6"]


def test_json_suffix_and_custom_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "c.json", DOCS, field="content")
    assert [d.text for d in read_documents([path], text_field="content")] == DOCS


def test_parquet_round_trip_across_batches(tmp_path: Path) -> None:
    # More rows than one read batch, in several row groups, so streaming boundaries are crossed.
    texts = [f"document number {i}" for i in range(2500)]
    path = write_parquet(tmp_path / "c.parquet", texts, row_group_size=700)
    docs = list(read_documents([path]))
    assert [d.text for d in docs] == texts
    assert docs[0].source == f"{path}:row 0"
    assert docs[2499].source == f"{path}:row 2499"


def test_parquet_large_string_column(tmp_path: Path) -> None:
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": pa.array(DOCS, type=pa.large_string())}), path)
    assert [d.text for d in read_documents([path])] == DOCS


def test_several_files_running_ids_and_empty_docs_skipped(tmp_path: Path) -> None:
    a = write_txt(tmp_path / "a.txt", DOCS[:2])
    b = write_jsonl(tmp_path / "b.jsonl", ["", DOCS[2], "  \n "])
    c = write_parquet(tmp_path / "c.parquet", [DOCS[3]])
    docs = list(read_documents([str(a), b, c]))
    assert [d.doc_id for d in docs] == [0, 1, 2, 3]
    assert [d.text for d in docs] == DOCS
    assert docs[2].source == f"{b}:2"
    assert docs[3].source == f"{c}:row 0"


def test_shakespeare_reads() -> None:
    docs = read_documents([SHAKESPEARE])
    first = next(docs)
    assert first.text.startswith("First Citizen:")
    assert first.source == f"{SHAKESPEARE}:1"
    assert sum(1 for _ in docs) > 1000


# --- reading: errors name the file and the line or row ----------------------------------------


def read_all(paths: list[Path], **kw: Any) -> list[Document]:
    return list(read_documents(paths, **kw))


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_non_utf8(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"bad{suffix}"
    good = '{"text": "ok"}\n' if suffix == ".jsonl" else "ok\n"
    path.write_bytes(good.encode() + good.encode() + b'{"text": "caf\xe9"}\n')
    with pytest.raises(CorpusError) as e:
        read_all([path])
    msg = str(e.value)
    assert f"{path}:3" in msg
    assert f"byte offset {2 * len(good) + 13}" in msg
    assert "UTF-8" in msg


def test_malformed_json(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "oops",\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=rf"{path}:3: malformed JSON"):
        read_all([path])


def test_json_array_file_gets_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('[\n{"text": "a"}\n]\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"bad\.json:1: malformed JSON.*JSON Lines"):
        read_all([path])


def test_json_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n["text"]\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=rf"{path}:2: expected a JSON object"):
        read_all([path])


def test_missing_field_lists_present_fields(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "x", "id": 3}\n', encoding="utf-8")
    with pytest.raises(CorpusError) as e:
        read_all([path])
    msg = str(e.value)
    assert f"{path}:2" in msg and "missing field 'text'" in msg and "'body', 'id'" in msg


def test_non_string_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": 42}\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=rf"{path}:3: field 'text' must be a string, got number"):
        read_all([path])


def test_missing_file_fails_before_reading_anything(tmp_path: Path) -> None:
    good = write_txt(tmp_path / "good.txt", DOCS)
    missing = tmp_path / "nope.jsonl"
    docs = read_documents([good, missing])
    with pytest.raises(CorpusError, match=rf"{missing}: corpus file not found"):
        next(docs)


def test_unknown_suffix(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_text("text\nhello\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"c\.csv: unsupported corpus file type '\.csv'; supported: \.txt, \.jsonl"):
        read_all([path])


def test_directory_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "dir.txt"
    d.mkdir()
    with pytest.raises(CorpusError, match="not a regular file"):
        read_all([d])


def test_no_paths() -> None:
    with pytest.raises(CorpusError, match="no corpus files"):
        read_all([])


def test_parquet_missing_column(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "c.parquet", DOCS, field="body")
    with pytest.raises(CorpusError) as e:
        read_all([path])
    msg = str(e.value)
    assert f"{path}: missing column 'text'" in msg and "'id', 'body'" in msg


def test_parquet_non_string_column(tmp_path: Path) -> None:
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3]}), path)
    with pytest.raises(CorpusError, match=rf"{path}: column 'text' must hold strings, but its type is int64"):
        read_all([path])


def test_parquet_null_row(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "c.parquet", ["a", "b", None, "d"])
    with pytest.raises(CorpusError, match=rf"{path}:row 2: column 'text' is null"):
        read_all([path])


def test_not_parquet(tmp_path: Path) -> None:
    path = tmp_path / "c.parquet"
    path.write_text("definitely not parquet", encoding="utf-8")
    with pytest.raises(CorpusError, match=rf"{path}: not a readable Parquet file"):
        read_all([path])


def test_empty_corpus(tmp_path: Path) -> None:
    a = tmp_path / "a.txt"
    a.write_text("\n\n   \n", encoding="utf-8")
    b = write_jsonl(tmp_path / "b.jsonl", ["", " "])
    with pytest.raises(CorpusError, match=rf"the corpus is empty: no non-empty document in {a}, {b}"):
        read_all([a, b])


# --- fingerprint ----------------------------------------------------------------------------


def test_fingerprint_same_across_formats(tmp_path: Path, tokenizer: Any) -> None:
    files = [
        write_txt(tmp_path / "c.txt", DOCS),
        write_txt(tmp_path / "crlf.txt", DOCS, newline="\r\n"),
        write_jsonl(tmp_path / "c.jsonl", DOCS),
        write_parquet(tmp_path / "c.parquet", DOCS),
    ]
    packed = [tokenize_and_pack(read_documents([f]), tokenizer, max_len=16) for f in files]
    assert {p.fingerprint for p in packed} == {fingerprint_of(DOCS)}
    assert len({p.tokens for p in packed}) == 1
    # How the documents are split across files does not matter either, only their order.
    half = [write_jsonl(tmp_path / "h1.jsonl", DOCS[:1]), write_parquet(tmp_path / "h2.parquet", DOCS[1:])]
    assert tokenize_and_pack(read_documents(half), tokenizer, max_len=16).fingerprint == fingerprint_of(DOCS)


def test_fingerprint_changes_with_content_and_order(tokenizer: Any) -> None:
    def fp(texts: list[str]) -> str:
        docs = [Document(i, f"mem:{i + 1}", t) for i, t in enumerate(texts)]
        return tokenize_and_pack(docs, tokenizer, max_len=8).fingerprint

    base = fp(DOCS)
    assert fp([*DOCS[:3], DOCS[3] + "!"]) != base
    assert fp([DOCS[1], DOCS[0], *DOCS[2:]]) != base
    # Length prefixes: moving text across a document boundary changes the fingerprint.
    assert fp(["ab", "c"]) != fp(["a", "bc"])


# --- packing --------------------------------------------------------------------------------


def check_tiling(pc: PackedCorpus, docs: list[Document], tokenizer: Any, max_len: int) -> None:
    """Every sequence is exactly tiled by its pieces, and pieces reproduce the documents' tokens."""
    by_id = {d.doc_id: d for d in docs}
    streams: dict[int, list[int]] = {}
    for seq in pc.sequences:
        assert seq.input_ids.dtype == np.int32 and seq.input_ids.ndim == 1
        assert 1 <= len(seq.input_ids) <= max_len
        pos = 0
        for p in seq.pieces:
            assert p.seq_token_offset == pos and p.num_tokens >= 1
            doc = by_id[p.doc_id]
            assert p.source == doc.source
            assert p.content_sha256 == hashlib.sha256(doc.text.encode()).hexdigest()
            stream = streams.setdefault(p.doc_id, [])
            assert p.doc_token_offset == len(stream)  # runs of a document are consecutive
            stream.extend(seq.input_ids[pos : pos + p.num_tokens].tolist())
            pos += p.num_tokens
        assert pos == len(seq.input_ids)
    used = sorted(streams)
    assert used == list(range(len(used)))  # a prefix of the documents, in order
    for doc_id, stream in streams.items():
        full = expected_ids(tokenizer, by_id[doc_id].text)
        if doc_id == used[-1]:
            assert stream == full[: len(stream)]  # the last one may be cut by max_tokens
        else:
            assert stream == full
    assert pc.tokens == sum(len(s.input_ids) for s in pc.sequences)
    assert pc.documents == len(used)
    assert pc.fingerprint == fingerprint_of([by_id[i].text for i in used])


WORDS = ["the", " cat", " sat", "\n", " ünï", " 42", " on", "the mat."]


@settings(max_examples=60, deadline=None)
@given(
    doc_words=st.lists(st.lists(st.sampled_from(WORDS), min_size=1, max_size=30), min_size=1, max_size=12),
    max_len=st.integers(1, 40),
    packing=st.sampled_from(["packed", "document", "packed-documents"]),
    max_tokens=st.none() | st.integers(1, 400),
    batch_size=st.integers(1, 5),
)
def test_packing_invariants(
    tokenizer: Any,
    doc_words: list[list[str]],
    max_len: int,
    packing: str,
    max_tokens: int | None,
    batch_size: int,
) -> None:
    docs = [Document(i, f"mem:{i + 1}", "".join(w)) for i, w in enumerate(doc_words)]
    pc = tokenize_and_pack(
        docs, tokenizer, max_len=max_len, packing=packing, max_tokens=max_tokens, batch_size=batch_size
    )
    check_tiling(pc, docs, tokenizer, max_len)
    total = sum(len(expected_ids(tokenizer, d.text)) for d in docs)
    assert pc.tokens == (total if max_tokens is None else min(total, max_tokens))
    lengths = [len(s.input_ids) for s in pc.sequences]
    if packing == "packed":
        assert all(n == max_len for n in lengths[:-1])
        assert len(pc.sequences) == -(-pc.tokens // max_len)
    elif packing == "packed-documents":
        for prev, seq in itertools.pairwise(pc.sequences):
            first, last = seq.pieces[0], prev.pieces[-1]
            if first.doc_token_offset > 0:  # only a document longer than max_len is cut, at max_len
                assert first.doc_id == last.doc_id and len(prev.pieces) == 1 and len(prev.input_ids) == max_len
            else:  # a new sequence starts only where the next document did not fit
                assert len(prev.input_ids) + first.num_tokens > max_len
        for seq in pc.sequences:  # positions restart at every document
            expected = np.concatenate([np.arange(p.num_tokens) for p in seq.pieces])
            np.testing.assert_array_equal(seq.document_positions(), expected)
    else:
        for seq in pc.sequences:
            assert len({p.doc_id for p in seq.pieces}) == 1
        for prev, seq in itertools.pairwise(pc.sequences):
            if seq.pieces[0].doc_id == prev.pieces[0].doc_id:
                assert len(prev.input_ids) == max_len  # only a full sequence continues a document
            else:
                assert seq.pieces[0].doc_token_offset == 0


def test_document_positions_restart_at_documents_and_at_the_window_start() -> None:
    starts = np.array([0, 3, 4, 9])
    np.testing.assert_array_equal(document_positions(starts, 0, 11), [0, 1, 2, 0, 0, 1, 2, 3, 4, 0, 1])
    # A window that starts inside a document counts from the window's start.
    np.testing.assert_array_equal(document_positions(starts, 6, 11), [0, 1, 2, 0, 1])
    np.testing.assert_array_equal(document_positions(starts, 4, 5), [0])


def test_eos_appended_once(tokenizer: Any) -> None:
    eos = tokenizer.eos_token_id
    docs = [Document(0, "m:1", "hello"), Document(1, "m:2", "bye" + tokenizer.eos_token)]
    pc = tokenize_and_pack(docs, tokenizer, max_len=100, packing="document")
    a, b = (s.input_ids.tolist() for s in pc.sequences)
    assert a[-1] == eos and a[-2] != eos
    assert b[-1] == eos and b[-2] != eos


def _word_level_tokenizer(eos: bool) -> Any:
    """A real (tiny) fast tokenizer that prepends BOS, to check the BOS/EOS rule."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, "the": 3, "cat": 4}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    kw = {"eos_token": "</s>"} if eos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", unk_token="<unk>", **kw)


def test_bos_from_tokenizer_and_eos_only_if_it_has_one() -> None:
    docs = [Document(0, "m:1", "the cat"), Document(1, "m:2", "cat dog")]
    with_eos = tokenize_and_pack(docs, _word_level_tokenizer(eos=True), max_len=100)
    assert with_eos.sequences[0].input_ids.tolist() == [0, 3, 4, 1, 0, 4, 2, 1]
    without = tokenize_and_pack(docs, _word_level_tokenizer(eos=False), max_len=100)
    assert without.sequences[0].input_ids.tolist() == [0, 3, 4, 0, 4, 2]


def test_max_tokens_cuts_and_counts_only_used_documents(tokenizer: Any) -> None:
    docs = [Document(i, f"m:{i + 1}", t) for i, t in enumerate(DOCS)]
    lens = [len(expected_ids(tokenizer, t)) for t in DOCS]
    # Cut inside the second document.
    pc = tokenize_and_pack(docs, tokenizer, max_len=7, max_tokens=lens[0] + 2)
    assert pc.tokens == lens[0] + 2 and pc.documents == 2
    assert pc.fingerprint == fingerprint_of(DOCS[:2])
    assert sum(p.num_tokens for s in pc.sequences for p in s.pieces if p.doc_id == 1) == 2
    # Cut exactly at a document boundary: the next document is not used at all.
    pc = tokenize_and_pack(docs, tokenizer, max_len=7, max_tokens=lens[0] + lens[1])
    assert pc.documents == 2 and pc.fingerprint == fingerprint_of(DOCS[:2])
    # A budget beyond the corpus takes everything.
    pc = tokenize_and_pack(docs, tokenizer, max_len=7, max_tokens=10**9)
    assert pc.tokens == sum(lens) and pc.documents == 4


def test_max_tokens_stops_reading(tokenizer: Any) -> None:
    def endless() -> Iterator[Document]:
        for i in itertools.count():
            yield Document(i, f"m:{i + 1}", f"document {i}")

    pc = tokenize_and_pack(endless(), tokenizer, max_len=10, max_tokens=100, batch_size=4)
    assert pc.tokens == 100 and len(pc.sequences) == 10


def test_sources_are_the_files_used(tmp_path: Path, tokenizer: Any) -> None:
    a = write_txt(tmp_path / "a.txt", DOCS[:2])
    b = write_parquet(tmp_path / "b.parquet", DOCS[2:])
    assert tokenize_and_pack(read_documents([a, b]), tokenizer, max_len=8).sources == (str(a), str(b))
    assert tokenize_and_pack(read_documents([a, b]), tokenizer, max_len=8, max_tokens=3).sources == (str(a),)


def test_bad_arguments_and_empty_input(tokenizer: Any) -> None:
    docs = [Document(0, "m:1", "x")]
    with pytest.raises(CorpusError, match="max_len"):
        tokenize_and_pack(docs, tokenizer, max_len=0)
    with pytest.raises(CorpusError, match="max_tokens"):
        tokenize_and_pack(docs, tokenizer, max_len=4, max_tokens=0)
    with pytest.raises(CorpusError, match="packing"):
        tokenize_and_pack(docs, tokenizer, max_len=4, packing="sorted")  # type: ignore[arg-type]
    with pytest.raises(CorpusError, match="no tokens"):
        tokenize_and_pack([], tokenizer, max_len=4)


def test_shakespeare_packs(tokenizer: Any) -> None:
    pc = tokenize_and_pack(read_documents([SHAKESPEARE]), tokenizer, max_len=256, max_tokens=5000)
    assert pc.tokens == 5000 and len(pc.sequences) == 20
    assert pc.sources == (str(SHAKESPEARE),)
    assert tokenizer.decode(pc.sequences[0].input_ids[:4].tolist()).startswith("First Citizen")
