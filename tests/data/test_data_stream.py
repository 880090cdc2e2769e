"""TokenStream: a read-only 1-D view over token shards."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from hybridlm.data import TokenStream

LENGTHS = [7, 1, 30, 2, 19, 41]


def _shards(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 60000, size=n).astype(np.uint16) for n in LENGTHS]


@pytest.fixture(params=["memory", "files"])
def stream_and_ref(request: pytest.FixtureRequest, tmp_path: Path):
    shards = _shards()
    ref = np.concatenate(shards)
    if request.param == "memory":
        return TokenStream(shards), ref
    paths = []
    for i, shard in enumerate(shards):
        paths.append(tmp_path / f"shard_{i:05d}.bin")
        shard.tofile(paths[-1])
    return TokenStream(paths, dtype=np.uint16, lengths=LENGTHS, max_open=2), ref


def test_basics(stream_and_ref) -> None:
    stream, ref = stream_and_ref
    assert len(stream) == stream.size == ref.size and stream.shape == (ref.size,)
    assert stream.dtype == np.uint16 and stream.ndim == 1 and stream.num_shards == 6
    np.testing.assert_array_equal(stream.shard_starts, np.cumsum([0, *LENGTHS[:-1]]))
    np.testing.assert_array_equal(stream.to_numpy(), ref)
    np.testing.assert_array_equal(np.asarray(stream), ref)
    np.testing.assert_array_equal(np.concatenate(list(stream.iter_chunks(5))), ref)


def test_int_and_slice_indexing(stream_and_ref) -> None:
    stream, ref = stream_and_ref
    for i in [0, 6, 7, 8, 37, 38, len(ref) - 1, -1, -len(ref), np.int64(20)]:
        assert stream[i] == ref[i]
    for bad in (len(ref), -len(ref) - 1):
        with pytest.raises(IndexError):
            stream[bad]
    for sl in [slice(None), slice(3, 40), slice(5, 9), slice(8, 8), slice(-10, None),
               slice(40, 3), slice(1, 90, 3), slice(None, None, -1), slice(50, 2, -7),
               slice(38, 40), slice(0, 1000)]:
        np.testing.assert_array_equal(stream[sl], ref[sl], err_msg=str(sl))


def test_integer_array_indexing(stream_and_ref) -> None:
    stream, ref = stream_and_ref
    rng = np.random.default_rng(1)
    for shape in [(1,), (50,), (4, 9), (3, 5, 2)]:
        idx = rng.integers(-len(ref), len(ref), size=shape)
        got = stream[idx]
        assert got.shape == shape and got.dtype == np.uint16
        np.testing.assert_array_equal(got, ref[idx])
    np.testing.assert_array_equal(stream[[3, 3, 99]], ref[[3, 3, 99]])
    np.testing.assert_array_equal(stream[np.array([], dtype=np.int64)], ref[[]])
    mask = ref % 2 == 0
    np.testing.assert_array_equal(stream[mask], ref[mask])
    with pytest.raises(IndexError):
        stream[np.array([0, len(ref)])]
    with pytest.raises(IndexError):
        stream[np.array([0.5])]
    with pytest.raises(TypeError):
        stream["a"]


def test_windows_across_boundaries(stream_and_ref) -> None:
    stream, ref = stream_and_ref
    starts = np.arange(0, len(ref) - 12)
    windows = stream.windows(starts, 12)
    assert windows.shape == (starts.size, 12)
    np.testing.assert_array_equal(windows, ref[starts[:, None] + np.arange(12)])
    np.testing.assert_array_equal(stream.read(5, 41), ref[5:41])  # spans four shards
    with pytest.raises(IndexError):
        stream.windows([len(ref) - 11], 12)
    with pytest.raises(IndexError):
        stream.read(3, len(ref) + 1)


def test_pickles_without_its_maps(stream_and_ref) -> None:
    stream, ref = stream_and_ref
    stream[len(ref) - 1]  # map a shard
    copy = pickle.loads(pickle.dumps(stream))
    np.testing.assert_array_equal(copy.to_numpy(), ref)


def test_single_shard_and_empty(tmp_path: Path) -> None:
    arr = np.arange(20, dtype=np.uint32)
    arr.tofile(tmp_path / "s.bin")
    stream = TokenStream([tmp_path / "s.bin"], dtype=np.uint32, lengths=[20])
    assert isinstance(stream.to_numpy(), np.memmap)
    np.testing.assert_array_equal(stream[[[1, 2], [3, 19]]], [[1, 2], [3, 19]])
    empty = TokenStream([], dtype=np.uint16)
    assert len(empty) == 0 and empty.to_numpy().shape == (0,) and empty[0:5].size == 0
    with pytest.raises(IndexError):
        empty[0]


def test_construction_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dtype is required"):
        TokenStream([])
    with pytest.raises(ValueError, match="lengths are required"):
        TokenStream([tmp_path / "x.bin"], dtype=np.uint16)
    with pytest.raises(ValueError, match="non-empty"):
        TokenStream([np.zeros(0, dtype=np.uint16)])
    (tmp_path / "x.bin").write_bytes(b"\0" * 6)
    stream = TokenStream([tmp_path / "x.bin"], dtype=np.uint16, lengths=[4])
    with pytest.raises(ValueError, match="should hold 4"):
        stream[0]
