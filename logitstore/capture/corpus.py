"""Reading a corpus and packing it into the fixed sequences the teacher sees.

Two steps, both streaming:

- `read_documents` turns files (plain text, JSON Lines, Parquet) into `Document`s, with a
  `source` that points back at the file and line (or row) each came from, and a
  `CorpusError` naming the file and line/row for anything it cannot read. JSON Lines and
  Parquet rows may be chat rows (`messages`, or `prompt` / `completion`; chat.py).
- `tokenize_and_pack` tokenizes the documents in batches and cuts the token stream into
  sequences of at most `max_len` tokens, recording for every sequence which runs of which
  documents it holds (`Piece`s; these become the store's Parquet sequence manifest), and
  computing the corpus fingerprint over the documents actually used. Chat rows are rendered
  with the tokenizer's chat template and carry a loss mask (the positions with soft labels).

This module does not import torch: the tokenizer is any Hugging Face tokenizer object.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from logitstore.capture.chat import TrainOn, chat_messages, render_chat
from logitstore.errors import CorpusError

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES

# Parquet rows per batch: big enough that pyarrow's per-batch overhead vanishes, small enough
# that a file with long documents never sits in memory whole.
_PARQUET_BATCH_ROWS = 1024

Packing = Literal["packed", "document", "packed-documents"]


def document_positions(piece_starts: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Each token's position in [start, stop) inside its document run: counted from the run's
    first token, or from `start` when the run began earlier. int64 [stop - start].

    `piece_starts` are the sorted token offsets where runs of one document begin (the manifest's
    `seq_token_offset` inside a sequence, or its global `token_start`), including one at or
    before `start`. In a packed-documents store these are the teacher's position ids, and where
    they restart its attention restarted too.
    """
    tokens = np.arange(start, stop, dtype=np.int64)
    run_start = np.asarray(piece_starts, dtype=np.int64)[np.searchsorted(piece_starts, tokens, side="right") - 1]
    return tokens - np.maximum(run_start, start)


@dataclass(frozen=True)
class Document:
    """One document of the corpus.

    `doc_id` is a running index over all files, in order (empty documents are skipped and
    get no id). `source` is ``"path:LINE"`` for text and JSON Lines files (1-based line of
    the document's first line) and ``"path:row N"`` for Parquet (0-based row, as pyarrow
    and pandas count), with the path exactly as given. A chat row has its `messages` (role, content) and, as its
    `text`, their compact JSON (what the fingerprint covers).
    """

    doc_id: int
    source: str
    text: str
    messages: tuple[dict[str, str], ...] | None = None


def read_documents(
    paths: Sequence[str | Path], *, text_field: str = "text", messages_field: str = "messages"
) -> Iterator[Document]:
    """Yield the documents of `paths`, file after file, streaming.

    Formats, by suffix:

    - ``.txt``: documents are paragraphs separated by one or more blank (or whitespace-only)
      lines; the newlines inside a paragraph are kept. Line endings are normalized to
      ``"\\n"`` so that a CRLF file has the same fingerprint as its LF twin.
    - ``.jsonl`` / ``.json``: JSON Lines, one object per non-empty line, whose `text_field`
      must be a string; or, without that field, a chat row, with `messages_field` (a list of
      {role, content}) or a `prompt` string (and its `completion`).
    - ``.parquet``: a `text_field` column of strings, read in row batches; or, without that
      column, chat rows, in a `messages_field` column (a list of {role, content} structs) or a
      `prompt` column (and a `completion` one).

    A UTF-8 byte order mark at the start of a text or JSON Lines file is ignored. Documents
    whose text is empty or whitespace-only are skipped. Every file is checked to exist and
    to have a supported suffix before the first document is yielded, so a typo in the last
    path fails at once rather than after the first file has been tokenized.

    Raises `CorpusError` naming the file and line or row for anything unreadable, and at the
    end if no file held a non-empty document.
    """
    if isinstance(paths, (str, Path)):
        # A bare string would otherwise be iterated character by character.
        paths = [paths]
    if not paths:
        raise CorpusError("no corpus files given; pass at least one .txt, .jsonl or .parquet file")
    for path in paths:
        _check_file(Path(path))

    doc_id = 0
    for path in paths:
        shown = str(path)
        suffix = Path(path).suffix.lower()
        if suffix in TEXT_SUFFIXES:
            records = _read_txt(Path(path), shown)
        elif suffix in JSONL_SUFFIXES:
            records = _read_jsonl(Path(path), shown, text_field, messages_field)
        else:
            records = _read_parquet(Path(path), shown, text_field, messages_field)
        in_file = skipped = 0
        for source, text, messages in records:
            if messages is None and not text.strip():
                skipped += 1
                continue
            yield Document(doc_id=doc_id, source=source, text=text, messages=messages)
            doc_id += 1
            in_file += 1
        logger.debug("%s: %d documents (%d empty skipped)", shown, in_file, skipped)
    if doc_id == 0:
        names = ", ".join(str(p) for p in paths)
        raise CorpusError(f"the corpus is empty: no non-empty document in {names}")


def _check_file(path: Path) -> None:
    if path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise CorpusError(
            f"{path}: unsupported corpus file type {path.suffix or '(no suffix)'!r}; "
            f"supported: {', '.join(SUPPORTED_SUFFIXES)}"
        )
    if not path.exists():
        raise CorpusError(f"{path}: corpus file not found")
    if not path.is_file():
        raise CorpusError(f"{path}: not a regular file; pass corpus files, not directories")


def _decoded_lines(path: Path, shown: str) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, line without its terminator), decoding UTF-8 strictly.

    Read in binary so that a bad byte can be reported with its byte offset in the file.
    """
    offset = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise CorpusError(
                    f"{shown}:{lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte offset "
                    f"{offset + e.start} of the file); re-encode the file as UTF-8"
                ) from None
            offset += len(raw)
            yield lineno, line.rstrip("\r\n")


# (source, text, messages of a chat row or None)
_Record = tuple[str, str, tuple[dict[str, str], ...] | None]


def _chat_record(source: str, messages: list[dict[str, str]]) -> _Record:
    return source, json.dumps(messages, ensure_ascii=False, separators=(",", ":")), tuple(messages)


def _read_txt(path: Path, shown: str) -> Iterator[_Record]:
    paragraph: list[str] = []
    first_line = 0
    for lineno, line in _decoded_lines(path, shown):
        if line.strip():
            if not paragraph:
                first_line = lineno
            paragraph.append(line)
        elif paragraph:
            yield f"{shown}:{first_line}", "\n".join(paragraph), None
            paragraph = []
    if paragraph:
        yield f"{shown}:{first_line}", "\n".join(paragraph), None


def _read_jsonl(path: Path, shown: str, text_field: str, messages_field: str) -> Iterator[_Record]:
    for lineno, line in _decoded_lines(path, shown):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            hint = " (.json files are read as JSON Lines: one object per line)" if path.suffix == ".json" else ""
            raise CorpusError(f"{shown}:{lineno}: malformed JSON: {e.msg} at column {e.colno}{hint}") from None
        except (ValueError, RecursionError) as e:  # an integer of thousands of digits, nesting too deep
            raise CorpusError(f"{shown}:{lineno}: JSON this reader refuses: {e}") from None
        if not isinstance(record, dict):
            raise CorpusError(
                f"{shown}:{lineno}: expected a JSON object with a {text_field!r} field, got {type(record).__name__}"
            )
        # The text field wins (a row with a pre-rendered text and its messages reads as before chat rows).
        messages = None if text_field in record else chat_messages(record, f"{shown}:{lineno}", messages_field)
        if messages is not None:
            yield _chat_record(f"{shown}:{lineno}", messages)
            continue
        if text_field not in record:
            present = ", ".join(repr(k) for k in record) or "none"
            raise CorpusError(
                f"{shown}:{lineno}: missing field {text_field!r} (fields present: {present}); "
                "choose the text field with text_field / --text-field, or give chat rows "
                f"{messages_field!r} (or 'prompt' and 'completion')"
            )
        text = record[text_field]
        if not isinstance(text, str):
            raise CorpusError(f"{shown}:{lineno}: field {text_field!r} must be a string, got {_json_type(text)}")
        yield f"{shown}:{lineno}", text, None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", list: "array", dict: "object"}.get(
        type(value), type(value).__name__
    )


def _read_parquet(path: Path, shown: str, text_field: str, messages_field: str) -> Iterator[_Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise CorpusError(f"{shown}: not a readable Parquet file: {e}") from None
    schema = pf.schema_arrow
    chat = [messages_field] if messages_field in schema.names else [n for n in ("prompt", "completion")
                                                                    if n in schema.names]  # fmt: skip
    if text_field not in schema.names and chat:  # as in JSON Lines, a text column wins
        yield from _parquet_chat_rows(pf, shown, chat, messages_field)
        return
    if text_field not in schema.names:
        present = ", ".join(repr(n) for n in schema.names) or "none"
        raise CorpusError(
            f"{shown}: missing column {text_field!r} (columns present: {present}); "
            "choose the text column with text_field / --text-field, or give chat rows a "
            f"{messages_field!r} column (or 'prompt' and 'completion')"
        )
    col_type = schema.field(text_field).type
    if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type) or pa.types.is_string_view(col_type)):
        raise CorpusError(f"{shown}: column {text_field!r} must hold strings, but its type is {col_type}")
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[text_field]):
            for text in batch.column(0).to_pylist():
                if text is None:
                    raise CorpusError(f"{shown}:row {row}: column {text_field!r} is null; it must be a string")
                yield f"{shown}:row {row}", text, None
                row += 1
    except pa.ArrowException as e:
        raise CorpusError(f"{shown}: cannot read Parquet data after row {row}: {e}") from None


def _parquet_chat_rows(pf: Any, shown: str, columns: list[str], messages_field: str) -> Iterator[_Record]:
    import pyarrow as pa

    row = 0
    try:
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
            for record in batch.to_pylist():
                where = f"{shown}:row {row}"
                yield _chat_record(where, chat_messages(record, where, messages_field))
                row += 1
    except pa.ArrowException as e:
        raise CorpusError(f"{shown}: cannot read Parquet data after row {row}: {e}") from None


@dataclass(frozen=True)
class Piece:
    """A run of one document's tokens inside one sequence."""

    doc_id: int
    source: str
    doc_token_offset: int  # where the run starts inside the document's token stream
    seq_token_offset: int  # where the run starts inside the sequence
    num_tokens: int
    content_sha256: str  # sha256 of the document's text (utf-8)


@dataclass(frozen=True)
class PackedSequence:
    """One sequence the teacher sees: int32 `input_ids` [L], 1 <= L <= max_len, tiled by `pieces`.
    `loss_mask`, bool [L]: the positions whose soft labels are kept (chat rows: those predicting an
    assistant token); None when every position's are."""

    input_ids: np.ndarray
    pieces: tuple[Piece, ...]
    loss_mask: np.ndarray | None = None

    def document_positions(self) -> np.ndarray:
        """Each token's position inside its document run: the position ids of a packed-documents capture."""
        return document_positions(np.array([p.seq_token_offset for p in self.pieces]), 0, len(self.input_ids))


@dataclass(frozen=True)
class PackedCorpus:
    """The packed sequences and the corpus facts the store records.

    `fingerprint`, `documents` and `sources` cover only the documents that contributed at
    least one token (all of them unless `max_tokens` cut the corpus short); `sources` are
    the file paths as given, in order of first use; `chat_documents` of them were chat rows.
    """

    sequences: list[PackedSequence]
    fingerprint: str
    sources: tuple[str, ...]
    documents: int
    tokens: int
    chat_documents: int = 0


class _Packer:
    """Accumulates document token runs into sequences of at most `max_len` tokens."""

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.sequences: list[PackedSequence] = []
        self._ids: list[np.ndarray] = []
        self._masks: list[np.ndarray | None] = []
        self._pieces: list[Piece] = []
        self._fill = 0

    def flush(self) -> None:
        if self._fill:
            ids = np.concatenate(self._ids) if len(self._ids) > 1 else self._ids[0]
            mask = None
            if any(m is not None for m in self._masks):
                mask = np.concatenate([np.ones(len(i), bool) if m is None else m
                                       for i, m in zip(self._ids, self._masks, strict=True)])
            self.sequences.append(PackedSequence(input_ids=ids, pieces=tuple(self._pieces), loss_mask=mask))
            self._ids, self._masks, self._pieces, self._fill = [], [], [], 0

    def fits(self, tokens: int) -> bool:
        """Whether `tokens` more fit in the sequence being filled."""
        return self._fill + tokens <= self.max_len

    def add(self, doc: Document, sha: str, ids: np.ndarray, mask: np.ndarray | None) -> None:
        start = 0
        while start < len(ids):
            take = min(self.max_len - self._fill, len(ids) - start)
            self._ids.append(ids[start : start + take])
            self._masks.append(None if mask is None else mask[start : start + take])
            self._pieces.append(
                Piece(
                    doc_id=doc.doc_id,
                    source=doc.source,
                    doc_token_offset=start,
                    seq_token_offset=self._fill,
                    num_tokens=take,
                    content_sha256=sha,
                )
            )
            self._fill += take
            start += take
            if self._fill == self.max_len:
                self.flush()


def tokenize_and_pack(
    docs: Iterable[Document],
    tokenizer: Any,
    *,
    max_len: int,
    packing: Packing = "packed",
    max_tokens: int | None = None,
    train_on: TrainOn = "assistant",
    batch_size: int = 256,
) -> PackedCorpus:
    """Tokenize `docs` and pack their tokens into sequences of at most `max_len` tokens.

    Tokenization: each document is encoded with the tokenizer's own special tokens
    (``add_special_tokens=True``, so a BOS is prepended if and only if the tokenizer adds
    one); then, if the tokenizer has an ``eos_token_id`` and the ids do not already end
    with it, EOS is appended so that documents stay separated once packed. Documents are
    tokenized `batch_size` at a time (fast tokenizers are much faster batched). A chat row is
    the tokens of the tokenizer's chat template (no EOS added: the template ends its turns), with
    the loss mask `train_on` asks for (`chat.render_chat`); other documents train on every position.

    Packing:

    - ``"packed"``: all documents' tokens are concatenated and cut every `max_len` tokens;
      every sequence has exactly `max_len` tokens except possibly the last.
    - ``"document"``: each document starts a new sequence; a document longer than `max_len`
      is split into `max_len`-token sequences (its last one may be shorter).
    - ``"packed-documents"``: a document starts a new sequence when it does not fit in what is
      left of the current one, so documents are never cut except those longer than `max_len`
      (split as in ``"document"``; their last run may share a sequence with what follows).
      The teacher then sees each run of a document on its own (`document_positions`).

    `max_tokens` stops packing once that many tokens are packed (the last document is
    truncated); documents after the cut are neither tokenized further nor fingerprinted.
    The corpus fingerprint is sha256 over the used documents in order, each as its UTF-8
    length (8 bytes, little endian) followed by its UTF-8 bytes.

    Raises `CorpusError` if nothing could be packed, or on invalid `max_len`/`max_tokens`.
    """
    if max_len < 1:
        raise CorpusError(f"max_len must be at least 1 token, got {max_len}")
    if max_tokens is not None and max_tokens < 1:
        raise CorpusError(f"max_tokens must be at least 1 token, got {max_tokens}")
    if packing not in get_args(Packing):
        raise CorpusError(f"unknown packing rule {packing!r}; use one of {', '.join(get_args(Packing))}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")

    eos = getattr(tokenizer, "eos_token_id", None)
    packer = _Packer(max_len)
    fingerprint = hashlib.sha256()
    sources: dict[str, None] = {}  # insertion-ordered set
    used_docs = chat_docs = trained = 0
    total = 0
    empty_docs = 0

    for batch in _batched(docs, batch_size):
        plain = [d.text for d in batch if d.messages is None]
        encoded = iter(tokenizer(plain, add_special_tokens=True, verbose=False)["input_ids"] if plain else ())
        for doc in batch:
            mask = None
            if doc.messages is not None:
                ids, mask = render_chat(tokenizer, doc.messages, train_on, doc.source)
            else:
                ids_list = next(encoded)
                if eos is not None and (not ids_list or ids_list[-1] != eos):
                    ids_list.append(eos)
                ids = np.asarray(ids_list, dtype=np.int32)
            if not len(ids):
                # Only possible for a tokenizer with no EOS whose normalizer erases the text.
                empty_docs += 1
                continue
            if max_tokens is not None:
                ids = ids[: max_tokens - total]
                mask = None if mask is None else mask[: len(ids)]
            chat_docs += doc.messages is not None
            trained += len(ids) if mask is None else int(mask.sum())
            data = doc.text.encode("utf-8")
            fingerprint.update(len(data).to_bytes(8, "little"))
            fingerprint.update(data)
            sources[doc.source.rsplit(":", 1)[0]] = None
            used_docs += 1
            if packing == "document" or (packing == "packed-documents" and not packer.fits(len(ids))):
                packer.flush()
            packer.add(doc, hashlib.sha256(data).hexdigest(), ids, mask)
            total += len(ids)
            if max_tokens is not None and total >= max_tokens:
                break
        if max_tokens is not None and total >= max_tokens:
            break
    packer.flush()

    if empty_docs:
        logger.warning("%d documents produced no tokens and were left out", empty_docs)
    if total == 0:
        raise CorpusError("the corpus produced no tokens to capture")
    if trained == 0:
        raise CorpusError("no position to train on: the chat rows (within max_tokens) hold no assistant message "
                          "(train on every token with train_on='all' / --train-on all)")
    logger.info(
        "packed %d documents into %d sequences, %d tokens (max_len=%d, packing=%s)",
        used_docs,
        len(packer.sequences),
        total,
        max_len,
        packing,
    )
    return PackedCorpus(
        sequences=packer.sequences,
        fingerprint=fingerprint.hexdigest(),
        sources=tuple(sources),
        documents=used_docs,
        tokens=total,
        chat_documents=chat_docs,
    )


def _batched(docs: Iterable[Document], n: int) -> Iterator[list[Document]]:
    batch: list[Document] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch
