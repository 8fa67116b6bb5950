"""Reading the shards `layout.write_array` writes, without Zarr's per-chunk machinery.

Every array of a segment is one Zarr v3 shard: inner chunks of `chunk_rows` rows, each
pcodec (or bytes + zstd for 8-bit arrays) followed by its crc32c, then the shard index
(`n_chunks` × (offset, nbytes) little-endian uint64, then its crc32c) at the end of the
file. Zarr reads that through an asynchronous codec pipeline with tasks, buffers and
thread-pool hops for every inner chunk of every read; on one core that overhead was larger
than the decoding itself (0.52 M tokens/s against ~2 M for the decoders alone).

`ShardArray` does the same work directly: the index is fetched once (committed shards are
immutable), a run of chunks is one byte-range request, and each chunk is checked and
decoded straight into the output buffer. It understands exactly the codec chain
`layout.write_array` produces and refuses anything else by name, so the format stays a
plain Zarr store that any Zarr reader opens.
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import numcodecs
import numpy as np
import zarr
from pcodec import standalone as pcodec
from zarr.abc.store import RangeByteRequest, Store, SuffixByteRequest
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec
from zarr.codecs.bytes import Endian
from zarr.codecs.sharding import ShardingCodecIndexLocation
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

_MISSING = np.uint64(2**64 - 1)  # Zarr's index entry of a chunk that was never written
_ZSTD = numcodecs.Zstd()


class ShardFormatError(ValueError):
    """The array is not laid out as `layout.write_array` writes it (or its bytes are damaged)."""


@dataclass(frozen=True)
class ShardArray:
    """One single-shard array of a segment: where its bytes are and how to decode them."""

    name: str  # the array's name inside its segment
    key: str  # storage key of the shard file
    shape: tuple[int, ...]
    dtype: np.dtype
    chunk_rows: int
    zstd: bool  # bytes + zstd (8-bit arrays) rather than pcodec

    @classmethod
    def from_array(cls, arr: zarr.Array, path: str) -> ShardArray:
        """Check that `arr` (opened at `path`) has the layout `write_array` gives, and describe it."""
        meta = arr.metadata
        codecs = getattr(meta, "codecs", ())
        sharding = codecs[0] if len(codecs) == 1 else None
        if not isinstance(sharding, ShardingCodec):
            raise ShardFormatError(f"{path}: expected one sharding codec, found {[type(c).__name__ for c in codecs]}")
        rows = meta.shape[0]
        chunk = tuple(sharding.chunk_shape)
        shard = tuple(meta.chunk_grid.chunk_shape)
        if chunk[1:] != meta.shape[1:] or shard != (math.ceil(rows / chunk[0]) * chunk[0], *meta.shape[1:]):
            raise ShardFormatError(f"{path}: expected one shard of whole-row chunks, got shard {shard}, chunks {chunk}")
        inner = [type(c).__name__ for c in sharding.codecs]
        if inner not in (["PCodec", "Crc32cCodec"], ["BytesCodec", "ZstdCodec", "Crc32cCodec"]):
            raise ShardFormatError(f"{path}: unsupported inner codecs {inner}")
        index = sharding.index_codecs
        if (sharding.index_location != ShardingCodecIndexLocation.end or len(index) != 2
                or not isinstance(index[0], BytesCodec) or index[0].endian not in (None, Endian.little)
                or not isinstance(index[1], Crc32cCodec)):
            raise ShardFormatError(f"{path}: unsupported shard index layout")
        key = f"{path}/{meta.encode_chunk_key((0,) * len(meta.shape))}"
        return cls(name=path.rsplit("/", 1)[-1], key=key, shape=tuple(meta.shape), dtype=np.dtype(arr.dtype),
                   chunk_rows=chunk[0], zstd=inner[0] == "BytesCodec")

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.shape[0] / self.chunk_rows)

    @property
    def row_items(self) -> int:
        return math.prod(self.shape[1:])

    def index_request(self) -> SuffixByteRequest:
        return SuffixByteRequest(16 * self.n_chunks + 4)

    def parse_index(self, raw: bytes | None) -> np.ndarray:
        """The shard's index bytes → uint64 [n_chunks, 2] (offset, nbytes), checked."""
        raw = self._present(raw)
        if len(raw) != 16 * self.n_chunks + 4:
            raise ShardFormatError(f"shard {self.key} is truncated ({len(raw)} index bytes)")
        _check_crc(raw[:-4], raw[-4:], f"the index of shard {self.key}")
        index = np.frombuffer(raw, dtype="<u8", count=2 * self.n_chunks).reshape(self.n_chunks, 2)
        if np.any(index == _MISSING):
            raise ShardFormatError(f"shard {self.key} lacks chunks {np.flatnonzero(index[:, 0] == _MISSING).tolist()}")
        return index

    def span(self, index: np.ndarray, start: int, stop: int) -> tuple[int, int, RangeByteRequest]:
        """Chunks [c0, c1) holding rows [start, stop), and the one byte range covering them."""
        c0, c1 = start // self.chunk_rows, -(-stop // self.chunk_rows)
        offsets, sizes = index[c0:c1, 0], index[c0:c1, 1]
        return c0, c1, RangeByteRequest(int(offsets.min()), int((offsets + sizes).max()))

    def decode(self, index: np.ndarray, c0: int, c1: int, data: bytes | None, base: int, start: int, stop: int,
               scratch: Scratch | None = None) -> np.ndarray:
        """Rows [start, stop) from the bytes of chunks [c0, c1), which begin at file offset `base`
        (None: the shard file was not found).

        Every chunk decodes straight into one buffer of whole chunks (this thread's `scratch`
        buffer when given); the result is a view of it.
        """
        data = self._present(data)
        chunk_items = self.chunk_rows * self.row_items
        size = (c1 - c0) * chunk_items
        out = np.empty(size, self.dtype) if scratch is None else scratch.buffer(self.name, self.dtype, size)
        for i, c in enumerate(range(c0, c1)):
            offset, nbytes = int(index[c, 0]) - base, int(index[c, 1])
            if offset < 0 or offset + nbytes > len(data) or nbytes < 4:
                raise ShardFormatError(f"shard {self.key}: chunk {c} lies outside the bytes read (truncated file?)")
            # pcodec takes only a bytes object: slice the payload (one copy) and check its crc.
            payload = data[offset:offset + nbytes - 4]
            _check_crc(payload, data[offset + nbytes - 4:offset + nbytes], f"chunk {c} of shard {self.key}")
            dst = out[i * chunk_items:(i + 1) * chunk_items]
            try:
                if self.zstd:
                    decoded = np.frombuffer(_ZSTD.decode(payload), dtype=self.dtype)
                    if decoded.size != chunk_items:
                        raise ValueError(f"{decoded.size} values, expected {chunk_items}")
                    dst[:] = decoded
                else:
                    written = pcodec.simple_decompress_into(payload, dst).n_processed
                    if written != chunk_items:
                        raise ValueError(f"{written} values, expected {chunk_items}")
            except (ValueError, RuntimeError, TypeError) as e:
                raise ShardFormatError(f"chunk {c} of shard {self.key} does not decode: {e}") from None
        rows = out.reshape(-1, *self.shape[1:])
        first = c0 * self.chunk_rows
        return rows[start - first:stop - first]

    def _present(self, raw: bytes | None) -> bytes:
        if raw is None:  # Zarr would read a missing shard as fill values; here it is an error
            raise ShardFormatError(f"shard {self.key} is missing")
        return raw


class Scratch(threading.local):
    """Decode buffers reused by one thread across reads, one per array name, for arrays the
    caller consumes before its next read (`Store.read` copies or gathers every one of them
    into its block right away).

    Why: a 16384-token read decodes ~4 MB of id indices and log-prob codes. Freed right after,
    glibc returns that memory to the kernel (heap trimming) and the next read page-faults it
    back in, zeroed: ~2900 faults per read, as long as the decoding itself (measured on one core).
    """

    def buffer(self, name: str, dtype: np.dtype, size: int) -> np.ndarray:
        buf = self.__dict__.get(name)
        if buf is None or buf.dtype != dtype or buf.size < size:
            buf = self.__dict__[name] = np.empty(size, dtype)
        return buf[:size]


def _check_crc(data: bytes, stored: bytes, what: str) -> None:
    computed = np.uint32(google_crc32c.value(data)).tobytes()
    if stored != computed:
        raise ShardFormatError(f"{what}: checksum mismatch (stored {stored.hex()}, computed {computed.hex()})")


def fetch(store: Store, requests: list[tuple[str, RangeByteRequest | SuffixByteRequest]]) -> list[bytes | None]:
    """Byte ranges of several keys; None where a key does not exist. Local files are read
    here, in this thread (no event-loop hand-off, no copy: 15% of a one-core read was
    that); other stores get all requests concurrently in one event-loop round trip."""
    if isinstance(store, LocalStore):
        return [_read_local(Path(store.root) / key, request) for key, request in requests]
    prototype = default_buffer_prototype()

    async def gather() -> list[bytes | None]:
        bufs = await asyncio.gather(*(store.get(key, prototype, request) for key, request in requests))
        return [None if b is None else b.to_bytes() for b in bufs]

    return sync(gather())


def _read_local(path: Path, request: RangeByteRequest | SuffixByteRequest) -> bytes | None:
    try:
        with open(path, "rb") as f:
            if isinstance(request, SuffixByteRequest):
                f.seek(max(0, f.seek(0, os.SEEK_END) - request.suffix))
                return f.read()
            f.seek(request.start)
            return f.read(request.end - request.start)
    except FileNotFoundError:
        return None
