"""Where things are inside a store, and how each array is chunked, compressed and checksummed.

```
STORE/
  zarr.json                      root group; attributes["logitstore"] = StoreMeta
  segments/000017/               one work unit, written by exactly one writer
      input_ids/   int32  [n]          the tokens the teacher saw
      row_len/     uint8|uint16 [n]    stored slots of each token (the rest of its K are padding)
      topk_ids/    uint16|int32 [S]    indices into id_table, the tokens' stored slots one after another
      id_table/    int32  [U]          distinct stored ids of the segment, most frequent first
      topk_logp/   uint16 [S]          LogProbCodec codes of log p at T=1, per stored slot (not counts_only)
      lse/         float32 [n, n_T]    logsumexp(l / T), l = log_softmax(z), full vocabulary, per T
      seq_offsets/ int64  [m + 1]      sequence boundaries inside the segment
      counts/      uint8  [S]          sampled mode only: draws that hit each stored id
      manifest.parquet                 the document pieces of the segment's sequences
  commits/000017.json            create-only commit record; a segment exists only once this exists
  index.json, manifest.parquet   written by finalize(): all commit records / pieces in one read
```

S = sum(row_len). A token's slots are in the teacher's rank order and padding (id -1,
log-prob -inf, count 0) only ever follows them, so padding is not stored: the reader puts
it back. A counts_only store (sampled mode, T=1) has no topk_logp, and its slots are in
id_table order instead: each token's indices ascend, which pcodec codes in fewer bytes.
Format 1 stored the padded [n, K] arrays (and -1 in id_table) and had no row_len; it is
still read (`SLOT_ARRAYS`, `Store._read_segment`).

Readers find segments by probing `commits/{i}` for i < num_segments (or reading
index.json), never by listing, so a store served over plain HTTP works the same.
Every array is one shard per segment (the writer buffers the whole unit and writes each
shard once: no partial-shard read-modify-write), inner chunks of `chunk_tokens` rows
(`chunk_tokens * K` slots), pcodec inside the shard (zstd for 8-bit arrays, which pcodec
refuses), and crc32c on every inner chunk and on the shard index.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import zarr
from zarr.abc.store import Store
from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec

from logitstore.schema import CaptureSettings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from zarr.codecs.numcodecs import PCodec

SEGMENT_ARRAYS = ("input_ids", "row_len", "topk_ids", "id_table", "topk_logp", "lse", "seq_offsets")
COUNTS_ARRAY = "counts"  # sampled mode only
SLOT_ARRAYS = ("topk_ids", "topk_logp", COUNTS_ARRAY)  # one value per stored slot (format 1: [n, K])
INDEX_KEY = "index.json"
MANIFEST_KEY = "manifest.parquet"
PCODEC_LEVEL = 8
ZSTD_LEVEL = 9


def segment_arrays(capture: CaptureSettings, format_version: int) -> tuple[str, ...]:
    """The arrays every segment of a store captured with these settings holds."""
    absent = {"row_len"} if format_version < 2 else set()
    if capture.counts_only:
        absent.add("topk_logp")
    names = tuple(n for n in SEGMENT_ARRAYS if n not in absent)
    return (*names, COUNTS_ARRAY) if capture.mode == "sampled" else names


def segment_prefix(segment: int) -> str:
    return f"segments/{segment:06d}"


def commit_key(segment: int) -> str:
    return f"commits/{segment:06d}.json"


def segment_manifest_key(segment: int) -> str:
    return f"{segment_prefix(segment)}/{MANIFEST_KEY}"


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
        return cls(**json.loads(data))


def write_array(store: Store, path: str, data: np.ndarray, chunk_rows: int) -> None:
    """Create the array at `path` and write all of `data` as whole shards."""
    rows = data.shape[0]
    chunk_rows = max(1, min(chunk_rows, rows))
    chunks = (chunk_rows, *data.shape[1:])
    shards = (math.ceil(rows / chunk_rows) * chunk_rows, *data.shape[1:])
    # pcodec refuses 8-bit integers (sampled mode's counts): those get plain bytes + zstd.
    byte_sized = data.dtype.itemsize == 1
    serializer = BytesCodec() if byte_sized else PCodec(level=PCODEC_LEVEL)
    compressors = [ZstdCodec(level=ZSTD_LEVEL), Crc32cCodec()] if byte_sized else [Crc32cCodec()]
    with warnings.catch_warnings():
        # pcodec is a numcodecs codec, not (yet) in the Zarr v3 spec: zarr warns about it.
        warnings.simplefilter("ignore")
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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # zarr_format=3: without it Zarr also probes for v2 metadata keys (extra requests over HTTP).
        return zarr.open_array(store, path=path, mode="r", zarr_format=3)


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


def globalize_pieces(pieces: pa.Table, seq_start: int, token_start: int, seq_offsets: np.ndarray) -> pa.Table:
    local_seq = pieces.column("sequence").to_numpy()
    starts = token_start + seq_offsets[local_seq] + pieces.column("seq_token_offset").to_numpy()
    pieces = pieces.set_column(0, "sequence", pa.array(local_seq + seq_start, pa.int64()))
    return pieces.append_column("token_start", pa.array(starts, pa.int64()))
