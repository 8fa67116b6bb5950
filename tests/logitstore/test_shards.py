"""`shards`: our direct shard reader against the data written and against Zarr's own reader."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.abc.store import Store
from zarr.storage import LocalStore, WrapperStore

from logitstore import layout, shards
from logitstore.shards import Scratch, ShardArray, ShardFormatError

ARRAYS = {  # name: (dtype, shape) at odd sizes: the last chunk is partial
    "ids": (np.int32, (1000,)),
    "indices": (np.uint16, (1000, 7)),
    "codes": (np.uint16, (37, 64)),
    "lse": (np.float32, (1000, 3)),
    "offsets": (np.int64, (5,)),
    "counts": (np.uint8, (1000, 5)),  # bytes + zstd rather than pcodec
}
CHUNK_ROWS = 128


def random_array(rng: np.random.Generator, dtype, shape) -> np.ndarray:
    if np.dtype(dtype).kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -(2**20)), min(info.max, 2**20), size=shape, endpoint=True).astype(dtype)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, np.ndarray]]:
    root = str(tmp_path_factory.mktemp("shards"))
    rng = np.random.default_rng(0)
    data = {name: random_array(rng, dtype, shape) for name, (dtype, shape) in ARRAYS.items()}
    store = LocalStore(root)
    for name, values in data.items():
        layout.write_array(store, name, values, CHUNK_ROWS)
    return root, data


def read_rows(store: Store, name: str, start: int, stop: int, scratch: Scratch | None = None) -> np.ndarray:
    array = ShardArray.from_array(layout.open_array(store, name), name)
    index = array.parse_index(shards.fetch(store, [(array.key, array.index_request())])[0])
    c0, c1, request = array.span(index, start, stop)
    raw = shards.fetch(store, [(array.key, request)])[0]
    return array.decode(index, c0, c1, raw, request.start, start, stop, scratch)


RANGES = [(0, 1), (0, CHUNK_ROWS), (CHUNK_ROWS - 1, CHUNK_ROWS + 1), (5, 3 * CHUNK_ROWS + 7), (-1, None)]


@pytest.mark.parametrize("name", ARRAYS)
def test_decode_equals_the_data_and_zarr(written, name: str) -> None:
    root, data = written
    values = data[name]
    n = len(values)
    z = layout.open_array(LocalStore(root, read_only=True), name)
    for a, b in [*RANGES, (n // 3, n)]:
        a, b = a % n, n if b is None else min(b, n)
        for store in (LocalStore(root, read_only=True), Counting(LocalStore(root, read_only=True))):
            got = read_rows(store, name, a, b)
            assert got.dtype == values.dtype and got.shape == values[a:b].shape
            np.testing.assert_array_equal(got, values[a:b])
            np.testing.assert_array_equal(got, z[a:b])


def test_scratch_buffers_are_reused_per_array(written) -> None:
    root, data = written
    store, scratch = LocalStore(root, read_only=True), Scratch()
    first = read_rows(store, "indices", 0, 300, scratch)
    np.testing.assert_array_equal(first, data["indices"][:300])
    second = read_rows(store, "indices", 200, 400, scratch)
    np.testing.assert_array_equal(second, data["indices"][200:400])
    assert np.shares_memory(first, second), "one buffer per array name and thread"
    other = read_rows(store, "codes", 0, 37, scratch)
    assert not np.shares_memory(other, second)


class Counting(WrapperStore[Store]):
    """Records every read: (key, byte range). Not a LocalStore, so reads take the asynchronous path."""

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.gets: list[tuple[str, object]] = []

    async def get(self, key, prototype, byte_range=None):
        self.gets.append((key, byte_range))
        return await self._store.get(key, prototype, byte_range)


def test_one_request_per_array_per_read(written) -> None:
    root, data = written
    store = Counting(LocalStore(root, read_only=True))
    array = ShardArray.from_array(layout.open_array(store, "lse"), "lse")
    store.gets.clear()
    index = array.parse_index(shards.fetch(store, [(array.key, array.index_request())])[0])
    c0, c1, request = array.span(index, 5, 3 * CHUNK_ROWS + 7)
    assert (c0, c1) == (0, 4)
    raw = shards.fetch(store, [(array.key, request)])[0]
    assert [key for key, _ in store.gets] == [array.key, array.key], "the index, then one range for 4 chunks"
    np.testing.assert_array_equal(array.decode(index, c0, c1, raw, request.start, 5, 3 * CHUNK_ROWS + 7),
                                  data["lse"][5:3 * CHUNK_ROWS + 7])


def test_foreign_layouts_are_refused(tmp_path: Path) -> None:
    store = LocalStore(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.create_array(store, name="plain", shape=(10,), dtype=np.int32, chunks=(4,))  # no shards
        zarr.create_array(store, name="two_shards", shape=(10,), dtype=np.int32, chunks=(2,), shards=(4,))
        zarr.create_array(store, name="blosc", shape=(10,), dtype=np.int32, chunks=(2,), shards=(10,),
                          compressors=[zarr.codecs.BloscCodec()])
    for name, why in [("plain", "expected one sharding codec"), ("two_shards", "expected one shard"),
                      ("blosc", "unsupported inner codecs")]:
        with pytest.raises(ShardFormatError, match=f"{name}: {why}"):
            ShardArray.from_array(layout.open_array(store, name), name)


def test_damaged_bytes_are_named(written) -> None:
    root, _ = written
    store = LocalStore(root, read_only=True)
    array = ShardArray.from_array(layout.open_array(store, "indices"), "indices")
    index = array.parse_index(shards.fetch(store, [(array.key, array.index_request())])[0])
    c0, c1, request = array.span(index, 0, CHUNK_ROWS)
    raw = bytearray(shards.fetch(store, [(array.key, request)])[0])
    raw[len(raw) // 2] ^= 0xFF
    with pytest.raises(ShardFormatError, match="chunk 0 of shard indices/c/0/0: checksum mismatch"):
        array.decode(index, c0, c1, bytes(raw), request.start, 0, CHUNK_ROWS)
    with pytest.raises(ShardFormatError, match="lies outside the bytes read"):
        array.decode(index, c0, c1, bytes(raw[:-10]), request.start, 0, CHUNK_ROWS)
    with pytest.raises(ShardFormatError, match="is missing"):
        array.parse_index(None)
    with pytest.raises(ShardFormatError, match="shard indices/c/0/0 is missing"):  # deleted after its index was read
        array.decode(index, c0, c1, None, request.start, 0, CHUNK_ROWS)
    bad_index = bytearray(shards.fetch(store, [(array.key, array.index_request())])[0])
    bad_index[3] ^= 1
    with pytest.raises(ShardFormatError, match="the index of shard indices/c/0/0: checksum mismatch"):
        array.parse_index(bytes(bad_index))
