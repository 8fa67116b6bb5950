"""Where things are inside a store, and how each array is chunked, compressed and checksummed.

```
STORE/
  zarr.json                      root group; attributes["logitstore"] = StoreMeta
  segments/000017/               one work unit, written by exactly one writer
      input_ids/   int32  [n]          the tokens the teacher saw
      row_len/     uint8|uint16 [n]    stored slots of each token (the rest of its K are padding)
      topk_ids/    uint16|int32 [S]    indices into id_table, the tokens' stored slots one after another
      id_table/    int32  [U]          distinct stored ids of the segment, most frequent first
      topk_logp/   uint16 [S]          LogProbCodec codes of log p at T=1, per stored slot (counts_only: below)
      lse/         float32 [n, n_T]    logsumexp(l / T), l = log_softmax(z), full vocabulary, per T
      seq_offsets/ int64  [m + 1]      sequence boundaries inside the segment
      counts/      uint8  [S]          sampled mode only: draws that hit each stored id
      manifest.parquet                 the document pieces of the segment's sequences
      samples.parquet                  generated stores only: one row per sample (= sequence)
  commits/000017.json            create-only commit record; a segment exists only once this exists
  index.json, manifest.parquet   written by finalize(): all commit records / pieces in one read
```

S = sum(row_len). A token's slots are in the teacher's rank order and padding (id -1,
log-prob -inf, count 0) only ever follows them, so padding is not stored: the reader puts
it back. A counts_only store (sampled mode, T=1) has no topk_logp, and its slots are in
id_table order instead: each token's indices ascend, which pcodec codes in fewer bytes. A
counts_only store with a head of H keeps each token's first min(H, row_len) slots, the head,
in rank order with their log-probs (topk_logp holds those alone: sum(min(H, row_len)) codes)
and its drawn slots after them in id_table order.
Format 1 stored the padded [n, K] arrays (and -1 in id_table) and had no row_len; it is
still read (`SLOT_ARRAYS`, `Store._read_segment`).

Readers find segments by probing `commits/{i}` for i < num_segments (or reading
index.json), never by listing, so a store served over plain HTTP works the same.
Every array is one shard per segment (the writer buffers the whole unit and writes each
shard once: no partial-shard read-modify-write), inner chunks of `chunk_tokens` rows
(`chunk_tokens * K` slots), pcodec inside the shard (zstd for 8-bit arrays, which pcodec
refuses), and crc32c on every inner chunk and on the shard index. The Parquet manifests
carry page checksums, and index.json records the consolidated manifest's sha256.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from zarr.abc.store import Store
from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec
from zarr.codecs.numcodecs import PCodec
from zarr.errors import ZarrUserWarning

from logitstore.schema import CaptureSettings

SEGMENT_ARRAYS = ("input_ids", "row_len", "topk_ids", "id_table", "topk_logp", "lse", "seq_offsets")
COUNTS_ARRAY = "counts"  # sampled mode only
SLOT_ARRAYS = ("topk_ids", "topk_logp", COUNTS_ARRAY)  # one value per stored slot (format 1: [n, K])
INDEX_KEY = "index.json"
MANIFEST_KEY = "manifest.parquet"
SAMPLES_KEY = "samples.parquet"  # generated stores: per segment only
MANIFEST_SHA256_KEY = "manifest_sha256"  # in index.json: sha256 of the consolidated manifest.parquet
PCODEC_LEVEL = 8
ZSTD_LEVEL = 9


def segment_arrays(capture: CaptureSettings, format_version: int) -> tuple[str, ...]:
    """The arrays every segment of a store captured with these settings holds."""
    absent = {"row_len"} if format_version < 2 else set()
    if capture.logp_slots == 0:
        absent.add("topk_logp")
    names = tuple(n for n in SEGMENT_ARRAYS if n not in absent)
    return (*names, COUNTS_ARRAY) if capture.mode == "sampled" else names


def head_first_order(keys: np.ndarray, head: int) -> np.ndarray:
    """Per row [n, K], the column order that keeps the first `head` columns in place and sorts the
    rest by `keys` (stable): a counts_only token's drawn slots, ascending, behind its head."""
    drawn = np.argsort(keys[:, head:], axis=1, kind="stable") + head
    return np.concatenate([np.broadcast_to(np.arange(head), (len(keys), head)), drawn], axis=1)


def segment_prefix(segment: int) -> str:
    return f"segments/{segment:06d}"


def commit_key(segment: int) -> str:
    return f"commits/{segment:06d}.json"


def segment_manifest_key(segment: int) -> str:
    return f"{segment_prefix(segment)}/{MANIFEST_KEY}"


def segment_samples_key(segment: int) -> str:
    return f"{segment_prefix(segment)}/{SAMPLES_KEY}"


@dataclass(frozen=True)
class SegmentRecord:
    """A commit record: the proof that a segment is complete, and its sizes."""

    segment: int
    tokens: int
    sequences: int

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> SegmentRecord:
        return cls.from_dict(json.loads(data))

    @classmethod
    def from_dict(cls, record: Any) -> SegmentRecord:
        """A record from its JSON object; ValueError says what is wrong with a damaged one.
        Keys other than the three are ignored, so that a later format may add some."""
        names = ("segment", "tokens", "sequences")
        if not isinstance(record, dict) or any(type(record.get(n)) is not int for n in names):
            raise ValueError(f"a commit record needs integer {', '.join(names)}; got {str(record)[:100]}")
        if record["segment"] < 0 or record["tokens"] < 1 or record["sequences"] < 1:
            raise ValueError(f"a commit record needs a segment >= 0 and positive sizes; got {record}")
        return cls(**{n: record[n] for n in names})


def parse_index(raw: bytes) -> tuple[list[SegmentRecord], str | None]:
    """index.json's commit records, and the sha256 of manifest.parquet it records (None in
    stores finalized before it was recorded). ValueError says what is wrong with a damaged one."""
    index = json.loads(raw)
    if not isinstance(index, dict) or not isinstance(index.get("segments"), list):
        raise ValueError("it is not an object with a 'segments' list")
    sha = index.get(MANIFEST_SHA256_KEY)
    if sha is not None and not isinstance(sha, str):
        raise ValueError(f"its {MANIFEST_SHA256_KEY!r} is not a string")
    return [SegmentRecord.from_dict(r) for r in index["segments"]], sha


def write_array(store: Store, path: str, data: np.ndarray, chunk_rows: int) -> None:
    """Create the array at `path` and write all of `data` as whole shards."""
    rows = data.shape[0]
    chunk_rows = max(1, min(chunk_rows, rows))
    chunks = (chunk_rows, *data.shape[1:])
    shards = (math.ceil(rows / chunk_rows) * chunk_rows, *data.shape[1:])
    # pcodec refuses 8-bit integers (sampled mode's counts): those get plain bytes + zstd.
    byte_sized = data.dtype.itemsize == 1
    compressors = [ZstdCodec(level=ZSTD_LEVEL), Crc32cCodec()] if byte_sized else [Crc32cCodec()]
    with _pcodec_accepted():
        serializer = BytesCodec() if byte_sized else PCodec(level=PCODEC_LEVEL)
        arr = zarr.create_array(
            store,
            name=path,
            shape=data.shape,
            dtype=data.dtype,
            chunks=chunks,
            shards=shards,
            filters=None,
            serializer=serializer,
            compressors=compressors,
            fill_value=0,
            config={"write_empty_chunks": True},
            overwrite=True,
        )
    arr[...] = data


def open_array(store: Store, path: str) -> zarr.Array:
    with _pcodec_accepted():
        # zarr_format=3: without it Zarr also probes for v2 metadata keys (extra requests over HTTP).
        return zarr.open_array(store, path=path, mode="r", zarr_format=3)


@contextmanager
def _pcodec_accepted() -> Iterator[None]:
    """Zarr warns each time it builds a numcodecs codec (pcodec is not in the Zarr v3 spec),
    i.e. on every array written or opened. pcodec is this format's choice (docs/format.md),
    so exactly that warning is silenced, only where the codec is built."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Numcodecs codecs are not in the Zarr version 3 specification",
                                ZarrUserWarning)
        yield


def dumps_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, indent=1).encode()


# One row per run of one document's tokens inside one sequence.
PIECES_SCHEMA = pa.schema(
    [
        ("sequence", pa.int64()),  # index of the sequence inside its segment (global in manifest.parquet)
        ("seq_token_offset", pa.int32()),  # where the run starts inside the sequence
        ("num_tokens", pa.int32()),
        ("doc_id", pa.int64()),
        ("source", pa.string()),  # file:line or file:row N
        ("doc_token_offset", pa.int64()),  # where the run starts inside the document's tokens
        ("content_sha256", pa.string()),  # of the document's text
    ]
)

# The consolidated manifest: segment-local sequence numbers become global, and each piece
# gets its global token position.
MANIFEST_SCHEMA = PIECES_SCHEMA.append(pa.field("token_start", pa.int64()))

# A generated store's samples, one row per sequence (= one completion after its prompt).
SAMPLES_SCHEMA = pa.schema(
    [
        ("sequence", pa.int64()),  # inside its segment (global from Store.samples())
        ("prompt", pa.int64()),  # the prompt's doc_id: its row in the prompts files
        ("sample", pa.int32()),  # 0 .. n-1
        ("prompt_tokens", pa.int32()),
        ("completion_tokens", pa.int32()),
        ("finish_reason", pa.string()),  # "eos" (an end token was sampled) or "length" (max_new_tokens)
        ("teacher_logprob", pa.float64()),  # sum over the completion of the teacher's log p at T = 1
    ]
)


def check_samples(samples: pa.Table, seq_offsets: np.ndarray) -> None:
    """ValueError unless a segment's samples are one row per sequence, in order, whose prompt and
    completion tokens add up to the sequence's length."""
    lengths = np.diff(seq_offsets)
    seq = samples.column("sequence").to_numpy()
    total = samples.column("prompt_tokens").to_numpy() + samples.column("completion_tokens").to_numpy()
    if not np.array_equal(seq, np.arange(len(lengths))) or not np.array_equal(total, lengths):
        raise ValueError(f"its {len(samples)} rows are not the segment's {len(lengths)} sequences in order")


def globalize_pieces(pieces: pa.Table, seq_start: int, token_start: int, seq_offsets: np.ndarray) -> pa.Table:
    local_seq = pieces.column("sequence").to_numpy()
    starts = token_start + seq_offsets[local_seq] + pieces.column("seq_token_offset").to_numpy()
    pieces = pieces.set_column(0, "sequence", pa.array(local_seq + seq_start, pa.int64()))
    return pieces.append_column("token_start", pa.array(starts, pa.int64()))


def parquet_bytes(table: pa.Table) -> bytes:
    """A manifest as Parquet, with a CRC on every page so that readers catch most damage
    even where no sha256 of the whole file is recorded (segment manifests)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", write_page_checksum=True)
    return buf.getvalue()


def read_parquet(raw: bytes, schema: pa.Schema) -> pa.Table:
    """A manifest from its Parquet bytes; ValueError when they do not parse, fail a page
    checksum, or hold another schema or nulls. Files written before page checksums read too."""
    try:
        table = pq.read_table(io.BytesIO(raw), page_checksum_verification=True)
    except (pa.ArrowException, OSError) as e:  # pyarrow's errors (ArrowInvalid, ...) are OSError or ArrowException
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"it is not readable Parquet ({reason})") from None
    if not table.schema.equals(schema):
        columns = ", ".join(f"{f.name}: {f.type}" for f in table.schema)
        raise ValueError(f"its columns are ({columns}), not the manifest's")
    if any(column.null_count for column in table.columns):
        raise ValueError("it holds null values")
    return table


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_pieces(pieces: pa.Table, seq_offsets: np.ndarray) -> None:
    """ValueError unless a segment's pieces cover its sequences (`seq_offsets`, m + 1 bounds)
    exactly, in order: each piece inside its sequence, each starting where the last ended."""
    seq, offset, num = (pieces.column(n).to_numpy() for n in ("sequence", "seq_token_offset", "num_tokens"))
    lengths = np.diff(seq_offsets)
    if np.any((seq < 0) | (seq >= len(lengths))):
        raise ValueError(f"sequence numbers outside the segment's [0, {len(lengths)})")
    if np.any(num <= 0) or np.any(offset < 0) or np.any(offset + num > lengths[seq]):
        raise ValueError("pieces that are empty or reach outside their sequence")
    ends = np.concatenate([[0], np.cumsum(num, dtype=np.int64)])
    if not np.array_equal(seq_offsets[seq] + offset, ends[:-1]) or ends[-1] != seq_offsets[-1]:
        raise ValueError(f"pieces that do not tile the segment's {int(seq_offsets[-1])} tokens in order")
