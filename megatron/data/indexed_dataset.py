"""Indexed token datasets: Megatron's `.bin/.idx` files, byte for byte.

A dataset is a pair of files sharing a prefix. `<prefix>.bin` is the raw concatenation
of every item (a sentence or a whole document of token ids, one numpy dtype throughout);
`<prefix>.idx` says where each item starts. Two index formats exist:

mmap (``MMIDIDX``, little-endian)::

    b"MMIDIDX\\x00\\x00"  uint64 version=1  uint8 dtype code
    uint64 N (items)  uint64 D (doc_idx entries)
    int32 sizes[N]  int64 pointers[N] (byte offsets into .bin)  int64 doc_idx[D]

lazy / cached (``TNTIDX``)::

    b"TNTIDX\\x00\\x00"  uint64 version=1  uint64 dtype code  uint64 element size
    uint64 N (items)  uint64 S (len(sizes))  uint64 D (doc_idx entries)
    int64 dim_offsets[N+1]  int64 data_offsets[N+1] (in elements)  int64 sizes[S]
    int64 doc_idx[D]

Item i of the TNTIDX format has shape sizes[dim_offsets[i]:dim_offsets[i+1]]. In both,
documents are ranges of items: document d is items doc_idx[d] .. doc_idx[d+1]-1, and
doc_idx starts at 0.

Dtype codes: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16.

Readers check the header, the version, the dtype code and the file lengths when they
open a dataset and raise `IndexedDatasetError` naming the file: the `.bin` must be exactly
as long as the index describes (longer means it belongs to another dataset).
`check_document_ends` samples a few documents for end-of-document tokens that the index
does not put at document ends. Builders write to
`<name>.tmp` and rename on `finalize()`, index last, so an interrupted run never leaves
files under the final names; `abort()` (or leaving a `with` block by an exception)
removes the temporary files.

This module does not import torch; `add_item` accepts torch tensors all the same.
"""

from __future__ import annotations

import array
import functools
import os
import shutil
import struct
import sys
from typing import Any, Callable

import numpy as np

dtypes: dict[int, type] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}

_MMAP_MAGIC = b"MMIDIDX\x00\x00"
_LAZY_MAGIC = b"TNTIDX\x00\x00"
_MMAP_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, N, D
_LAZY_HEADER = struct.Struct("<8sQQQQQQ")  # magic, version, code, element size, N, S, D
_WRITE_BUFFER = 1 << 22  # builders buffer 4 MiB before touching the disk
_COPY_CHUNK = 1 << 24
_WARMUP_CHUNK = 100 * (1 << 20)


class IndexedDatasetError(ValueError):
    """A `.bin/.idx` pair that is missing, corrupt, truncated or of the wrong format."""


# ------------------------------------------------------------------------------ helpers


def code(dtype: Any) -> int:
    """The index-file code of a numpy dtype (see `dtypes`)."""
    dt = np.dtype(dtype)
    for k, v in dtypes.items():
        if np.dtype(v) == dt:
            return k
    raise ValueError(f"dtype {dt} cannot be stored in an indexed dataset (codes: {dtypes})")


def best_fitting_dtype(vocab_size: int | None = None) -> type:
    """uint16 when every token id fits (vocab_size < 65500), else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.uint16
    return np.int32


def index_file_path(prefix_path: str) -> str:
    return prefix_path + ".idx"


def data_file_path(prefix_path: str) -> str:
    return prefix_path + ".bin"


def _log(message: str) -> None:
    """Print from global rank 0 only, without importing torch."""
    torch = sys.modules.get("torch")
    if (
        torch is not None
        and torch.distributed.is_available()
        and torch.distributed.is_initialized()
    ):
        if torch.distributed.get_rank() != 0:
            return
    elif os.environ.get("RANK", "0") != "0":
        return
    print(message, flush=True)


def _warmup_file(path: str) -> None:
    """Read a file once so its pages sit in the OS cache before training touches them."""
    _log(f"    warming up {path} ...")
    with open(path, "rb") as stream:
        while stream.read(_WARMUP_CHUNK):
            pass


@functools.cache
def _needs_range_check(src: np.dtype, dst: np.dtype) -> tuple[int, int] | None:
    """Bounds of integer `dst` when casting from `src` can lose values, else None."""
    if dst.kind not in "iu" or np.can_cast(src, dst, "safe"):
        return None
    info = np.iinfo(dst)
    return int(info.min), int(info.max)


def _to_dtype(data: Any, dtype: np.dtype, where: str) -> np.ndarray:
    """`data` (array, list or tensor) as a C-contiguous array of `dtype`.

    Integer targets are range-checked: a token id that does not fit is an error, never a
    silent wrap-around.
    """
    if not isinstance(data, np.ndarray):
        if hasattr(data, "detach"):
            data = data.detach().cpu().numpy()  # torch tensor
        data = np.asarray(data)
    if data.dtype == dtype:
        return data if data.flags.c_contiguous else np.ascontiguousarray(data)
    bounds = _needs_range_check(data.dtype, dtype) if data.size else None
    if bounds is not None:
        if data.dtype.kind == "f" and not np.all(np.mod(data, 1) == 0):
            raise ValueError(f"{where}: non-integral values cannot be stored as {dtype}")
        lo, hi = data.min(), data.max()
        if lo < bounds[0] or hi > bounds[1]:
            raise ValueError(
                f"{where}: value {lo if lo < bounds[0] else hi} does not fit in {dtype}"
            )
    return np.ascontiguousarray(data.astype(dtype))


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError as e:
        raise IndexedDatasetError(f"{path}: cannot open ({e.strerror})") from None


def _check_doc_idx(path: str, doc_idx: np.ndarray, num_items: int) -> None:
    if doc_idx.size == 0:
        return
    if doc_idx[0] < 0 or doc_idx[-1] > num_items or np.any(np.diff(doc_idx) < 0):
        raise IndexedDatasetError(
            f"{path}: corrupt document index (must rise from 0 to at most {num_items})"
        )


def _check_data_size(prefix: str, needed: int, itemsize: int, num_docs: int) -> None:
    """`<prefix>.bin` must hold exactly the `needed` bytes that `<prefix>.idx` describes.

    A shorter file is truncated; a longer one belongs to another dataset (or was appended
    to), and reading it through this index would give shifted, meaningless tokens.
    """
    idx, bin_path = index_file_path(prefix), data_file_path(prefix)
    size = _file_size(bin_path)
    if size == needed:
        return
    if size < needed:
        raise IndexedDatasetError(
            f"{bin_path}: truncated data file, {size} bytes but {idx} describes {needed}"
        )
    extra = size - needed
    hint = "the two files come from different datasets; rebuild both together"
    if num_docs > 0 and extra == num_docs * itemsize:
        hint = (
            "exactly one token more per document: the index sizes leave out each "
            "document's end-of-document token (a known preprocessing bug); rebuild both with "
            "tools/preprocess_data.py"
        )
    raise IndexedDatasetError(
        f"{bin_path}: {size} bytes, {extra} more than the {needed} that {idx} describes: {hint}"
    )


class _DocumentsMixin:
    """`doc_idx` accessors shared by every reader (Megatron's get/set_doc_idx)."""

    _doc_idx: np.ndarray

    @property
    def doc_idx(self) -> np.ndarray:
        return self._doc_idx

    def get_doc_idx(self) -> np.ndarray:
        return self._doc_idx

    def set_doc_idx(self, doc_idx_: np.ndarray) -> None:
        self._doc_idx = doc_idx_

    def size(self, index: int) -> int:
        return int(self.sizes[index])

    def num_tokens(self, index: int) -> int:
        return int(self.sizes[index])


# ------------------------------------------------------------------------------ builders


class _AtomicBuilder:
    """Writes `<out_file>.tmp` and `<index_file>.tmp`, renamed into place by `_commit`.

    Use as a context manager: leaving the block by an exception, or without calling
    `finalize()`, removes the temporary files. `abort()` does the same explicitly.
    """

    def __init__(self, out_file: str) -> None:
        self._out_file = out_file
        self._tmp_data = out_file + ".tmp"
        self._tmp_index: str | None = None
        self._moved_data = False
        self._data_file = open(self._tmp_data, "wb", buffering=_WRITE_BUFFER)  # noqa: SIM115
        self._state = "open"

    def _check_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"{self._out_file}: builder already {self._state}")

    def _write(self, arr: np.ndarray) -> None:
        self._data_file.write(memoryview(arr.reshape(-1)).cast("B"))

    def _write_doc(self, tensor: Any, sizes: Any, dtype: Any) -> np.ndarray:
        """Write a document's concatenated items in one go; return its item lengths (int64)."""
        self._check_open()
        arr = _to_dtype(tensor, np.dtype(dtype), self._out_file).reshape(-1)
        lens = np.asarray(sizes, dtype=np.int64).reshape(-1)
        if int(lens.sum()) != arr.size or (lens.size and lens.min() < 0):
            raise ValueError(
                f"{self._out_file}: add_doc sizes sum to {int(lens.sum())}, tokens hold {arr.size}"
            )
        self._write(arr)
        return lens

    def _copy_data_from(self, path: str) -> None:
        with open(path, "rb") as src:
            shutil.copyfileobj(src, self._data_file, _COPY_CHUNK)

    def abort(self) -> None:
        """Discard everything written so far; no file is left under any name."""
        if self._state == "finalized":
            return
        self._data_file.close()
        for path in (self._tmp_data, self._tmp_index):
            if path is not None and os.path.exists(path):
                os.remove(path)
        if self._moved_data and os.path.exists(self._out_file):
            os.remove(self._out_file)
        self._state = "aborted"

    def _commit(self, index_file: str, write_index: Callable[[Any], None]) -> None:
        """Close the data file, write the index, then rename data and index (index last)."""
        self._check_open()
        self._data_file.close()
        self._tmp_index = index_file + ".tmp"
        try:
            with open(self._tmp_index, "wb") as f:
                write_index(f)
            if os.path.exists(index_file):
                os.remove(index_file)  # a stale index must never pair with the new data
            os.replace(self._tmp_data, self._out_file)
            self._moved_data = True
            os.replace(self._tmp_index, index_file)
        except BaseException:
            self.abort()
            raise
        self._state = "finalized"

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._state == "open":
            self.abort()

    def __del__(self) -> None:
        try:
            if getattr(self, "_state", None) == "open":
                self.abort()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class MMapIndexedDatasetBuilder(_AtomicBuilder):
    """Writes an MMIDIDX dataset: `add_item`/`add_doc`, `end_document`, then `finalize`.

    `out_file` is the `.bin` path; `finalize(index_file)` takes the `.idx` path.
    """

    def __init__(self, out_file: str, dtype: Any = np.int64) -> None:
        self._dtype = np.dtype(dtype).type
        code(self._dtype)
        super().__init__(out_file)
        self._sizes = array.array("q")
        self._doc_idx = array.array("q", [0])

    @property
    def dtype(self) -> type:
        return self._dtype

    def add_item(self, tensor: Any) -> None:
        """Append one item (any shape; stored flattened)."""
        self._check_open()
        arr = _to_dtype(tensor, np.dtype(self._dtype), self._out_file)
        self._write(arr)
        self._sizes.append(arr.size)

    def add_doc(self, tensor: Any, sizes: Any) -> None:
        """Append a whole document: `tensor` is its items concatenated, `sizes` their lengths.

        One write for the document, then its end is recorded as by `end_document()`.
        """
        lens = self._write_doc(tensor, sizes, self._dtype)
        self._sizes.frombytes(lens.tobytes())
        self._doc_idx.append(len(self._sizes))

    def end_document(self) -> None:
        self._check_open()
        self._doc_idx.append(len(self._sizes))

    def merge_file_(self, another_file: str) -> None:
        """Append every item and document of the MMIDIDX dataset at prefix `another_file`."""
        self._check_open()
        index = MMapIndexedDataset.Index(index_file_path(another_file), skip_warmup=True)
        if np.dtype(index.dtype) != np.dtype(self._dtype):
            raise ValueError(
                f"{index_file_path(another_file)}: dtype {np.dtype(index.dtype)} differs from "
                f"the output's {np.dtype(self._dtype)}"
            )
        itemsize = np.dtype(self._dtype).itemsize
        _check_data_size(
            another_file, index.num_bytes(itemsize), itemsize, len(index.doc_idx) - 1
        )
        offset = len(self._sizes)
        self._sizes.frombytes(np.asarray(index.sizes, dtype=np.int64).tobytes())
        self._doc_idx.frombytes((offset + np.asarray(index.doc_idx[1:], np.int64)).tobytes())
        self._copy_data_from(data_file_path(another_file))

    def finalize(self, index_file: str) -> None:
        """Write the index and move both files to their final names."""
        sizes = np.frombuffer(self._sizes, dtype=np.int64)
        doc_idx = np.frombuffer(self._doc_idx, dtype=np.int64)
        if sizes.size and sizes.max() > np.iinfo(np.int32).max:
            self.abort()
            raise ValueError(f"{self._out_file}: an item holds more than 2**31-1 elements")

        def write(f) -> None:
            MMapIndexedDataset.Index.write_index(f, self._dtype, sizes, doc_idx)

        self._commit(index_file, write)


class IndexedDatasetBuilder(_AtomicBuilder):
    """Writes a TNTIDX (lazy/cached) dataset; items keep their shapes."""

    def __init__(self, out_file: str, dtype: Any = np.int32) -> None:
        self.dtype = np.dtype(dtype).type
        code(self.dtype)
        super().__init__(out_file)
        self.element_size = np.dtype(self.dtype).itemsize
        self.data_offsets = array.array("q", [0])  # in elements
        self.dim_offsets = array.array("q", [0])
        self.sizes = array.array("q")
        self.doc_idx = array.array("q", [0])

    def add_item(self, tensor: Any) -> None:
        self._check_open()
        arr = _to_dtype(tensor, np.dtype(self.dtype), self._out_file)
        self._write(arr)
        self.data_offsets.append(self.data_offsets[-1] + arr.size)
        self.sizes.extend(arr.shape)
        self.dim_offsets.append(self.dim_offsets[-1] + arr.ndim)

    def add_doc(self, tensor: Any, sizes: Any) -> None:
        """Append a document of 1-D items (`tensor` concatenated, `sizes` their lengths)."""
        lens = self._write_doc(tensor, sizes, self.dtype)
        self.data_offsets.frombytes((self.data_offsets[-1] + np.cumsum(lens)).tobytes())
        self.dim_offsets.frombytes((self.dim_offsets[-1] + np.arange(1, lens.size + 1)).tobytes())
        self.sizes.frombytes(lens.tobytes())
        self.doc_idx.append(len(self.sizes))

    def end_document(self) -> None:
        self._check_open()
        self.doc_idx.append(len(self.sizes))

    def merge_file_(self, another_file: str) -> None:
        """Append every item and document of the TNTIDX dataset at prefix `another_file`."""
        self._check_open()
        other = IndexedDataset(another_file)
        if np.dtype(other.dtype) != np.dtype(self.dtype):
            raise ValueError(
                f"{index_file_path(another_file)}: dtype {np.dtype(other.dtype)} differs from "
                f"the output's {np.dtype(self.dtype)}"
            )
        doc_offset = len(self.sizes)
        self.data_offsets.frombytes((self.data_offsets[-1] + other.data_offsets[1:]).tobytes())
        self.dim_offsets.frombytes((self.dim_offsets[-1] + other.dim_offsets[1:]).tobytes())
        self.sizes.frombytes(np.asarray(other.sizes, np.int64).tobytes())
        self.doc_idx.frombytes((doc_offset + other.doc_idx[1:]).tobytes())
        self._copy_data_from(data_file_path(another_file))

    def finalize(self, index_file: str) -> None:
        def write(f) -> None:
            num_items = len(self.data_offsets) - 1
            f.write(_LAZY_MAGIC)
            f.write(struct.pack("<Q", 1))
            f.write(struct.pack("<QQ", code(self.dtype), self.element_size))
            f.write(struct.pack("<QQ", num_items, len(self.sizes)))
            f.write(struct.pack("<Q", len(self.doc_idx)))
            for values in (self.dim_offsets, self.data_offsets, self.sizes, self.doc_idx):
                f.write(np.frombuffer(values, dtype=np.int64).astype("<i8").tobytes())

        self._commit(index_file, write)


# ------------------------------------------------------------------------------ TNTIDX readers


class IndexedDataset(_DocumentsMixin):
    """Reader of the TNTIDX format: the index in memory, items read from disk on demand."""

    _HDR_MAGIC = _LAZY_MAGIC

    def __init__(self, path: str) -> None:
        self.path = path
        self.data_file = None
        self.read_index(path)

    def read_index(self, path: str) -> None:
        """Parse and check `<path>.idx` (header, version, dtype, lengths) and `<path>.bin`."""
        idx_path = index_file_path(path)
        size = _file_size(idx_path)
        with open(idx_path, "rb") as f:
            head = f.read(_LAZY_HEADER.size)
            if head[:8] != _LAZY_MAGIC:
                hint = " (an mmap index: use impl 'mmap')" if head[:9] == _MMAP_MAGIC else ""
                raise IndexedDatasetError(f"{idx_path}: not a TNTIDX index file{hint}")
            if len(head) < _LAZY_HEADER.size:
                raise IndexedDatasetError(f"{idx_path}: truncated header ({size} bytes)")
            _, version, dcode, elem, n, s, d = _LAZY_HEADER.unpack(head)
            if version != 1:
                raise IndexedDatasetError(f"{idx_path}: unsupported version {version} (expected 1)")
            if dcode not in dtypes:
                raise IndexedDatasetError(f"{idx_path}: unknown dtype code {dcode}")
            self.dtype = dtypes[dcode]
            self.element_size = elem
            if elem != np.dtype(self.dtype).itemsize:
                raise IndexedDatasetError(
                    f"{idx_path}: element size {elem} does not match dtype {np.dtype(self.dtype)}"
                )
            needed = _LAZY_HEADER.size + 8 * (2 * (n + 1) + s + d)
            if size < needed:
                raise IndexedDatasetError(
                    f"{idx_path}: truncated index, {size} bytes but the header announces "
                    f"{n} items needing {needed}"
                )
            body = np.fromfile(f, dtype="<i8", count=2 * (n + 1) + s + d).astype(np.int64)
        self._len, self.s = n, s
        self.dim_offsets = body[: n + 1]
        self.data_offsets = body[n + 1 : 2 * (n + 1)]
        self.sizes = body[2 * (n + 1) : 2 * (n + 1) + s]
        self._doc_idx = body[2 * (n + 1) + s :]
        if self.dim_offsets[-1] != s or np.any(np.diff(self.data_offsets) < 0):
            raise IndexedDatasetError(f"{idx_path}: corrupt offsets")
        _check_doc_idx(idx_path, self._doc_idx, s)
        needed = int(self.data_offsets[-1]) * elem
        _check_data_size(path, needed, elem, len(self._doc_idx) - 1)

    def read_data(self, path: str) -> None:
        self.data_file = open(data_file_path(path), "rb", buffering=0)  # noqa: SIM115

    def check_index(self, i: int) -> int:
        if i < 0:
            i += self._len
        if i < 0 or i >= self._len:
            raise IndexError(f"{self.path}: index {i} out of range [0, {self._len})")
        return i

    def _read(self, start: int, count: int) -> np.ndarray:
        """`count` elements from element offset `start` of the data file."""
        if self.data_file is None:
            self.read_data(self.path)
        out = np.empty(count, dtype=self.dtype)
        self.data_file.seek(start * self.element_size)
        self.data_file.readinto(out)
        return out

    def __getitem__(self, idx):
        if isinstance(idx, (int, np.integer)):
            i = self.check_index(int(idx))
            shape = self.sizes[self.dim_offsets[i] : self.dim_offsets[i + 1]]
            start, stop = self.data_offsets[i], self.data_offsets[i + 1]
            return self._read(int(start), int(stop - start)).reshape(shape)
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                raise ValueError("slices into an indexed dataset must be contiguous")
            if stop <= start:
                return []
            first = int(self.data_offsets[start])
            flat = self._read(first, int(self.data_offsets[stop]) - first)
            counts = np.diff(self.data_offsets[start : stop + 1])
            parts = np.split(flat, np.cumsum(counts)[:-1])
            dims = self.dim_offsets
            return [
                part.reshape(self.sizes[dims[i] : dims[i + 1]])
                for i, part in zip(range(start, stop), parts)
            ]
        raise TypeError(f"indexed dataset indices must be int or slice, not {type(idx).__name__}")

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Elements [offset, offset + length) of item idx, flattened."""
        i = self.check_index(int(idx))
        item_len = int(self.data_offsets[i + 1] - self.data_offsets[i])
        length = item_len - offset if length is None else length
        if offset < 0 or length < 0 or offset + length > item_len:
            raise IndexError(f"{self.path}: [{offset}, +{length}) outside item {i} of {item_len}")
        return self._read(int(self.data_offsets[i]) + offset, length)

    def __len__(self) -> int:
        return self._len

    def __getstate__(self):
        state = self.__dict__.copy()
        state["data_file"] = None
        return state

    def __del__(self) -> None:
        if getattr(self, "data_file", None) is not None:
            self.data_file.close()

    @staticmethod
    def exists(path: str) -> bool:
        return os.path.exists(index_file_path(path)) and os.path.exists(data_file_path(path))

    @property
    def supports_prefetch(self) -> bool:
        return False


class IndexedCachedDataset(IndexedDataset):
    """TNTIDX reader that keeps `prefetch`ed items in one in-memory buffer."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.cache: np.ndarray | None = None
        self.cache_index: dict[int, int] = {}

    @property
    def supports_prefetch(self) -> bool:
        return True

    def prefetch(self, indices) -> None:
        """Load exactly the items `indices` into memory (replacing the previous cache)."""
        indices = sorted({self.check_index(int(i)) for i in indices})
        if all(i in self.cache_index for i in indices):
            return
        total = sum(int(self.data_offsets[i + 1] - self.data_offsets[i]) for i in indices)
        self.cache = np.empty(total, dtype=self.dtype)
        self.cache_index.clear()
        pos = 0
        for i in indices:
            n = int(self.data_offsets[i + 1] - self.data_offsets[i])
            self.cache_index[i] = pos
            self.cache[pos : pos + n] = self._read(int(self.data_offsets[i]), n)
            pos += n
        if self.data_file is not None:
            self.data_file.close()
            self.data_file = None

    def __getitem__(self, idx):
        if isinstance(idx, (int, np.integer)):
            i = self.check_index(int(idx))
            if i not in self.cache_index:
                return super().__getitem__(i)
            shape = self.sizes[self.dim_offsets[i] : self.dim_offsets[i + 1]]
            n = int(self.data_offsets[i + 1] - self.data_offsets[i])
            pos = self.cache_index[i]
            return self.cache[pos : pos + n].copy().reshape(shape)
        if isinstance(idx, slice):
            return [self[i] for i in range(*idx.indices(len(self)))]
        raise TypeError(f"indexed dataset indices must be int or slice, not {type(idx).__name__}")


# ------------------------------------------------------------------------------ MMIDIDX reader


class MMapIndexedDataset(_DocumentsMixin):
    """Memory-mapped reader of the MMIDIDX format; items are views into `<prefix>.bin`."""

    class Index:
        """The `.idx` file: sizes, byte pointers and document index, memory-mapped."""

        _HDR_MAGIC = _MMAP_MAGIC

        @staticmethod
        def write_index(f, dtype: Any, sizes: np.ndarray, doc_idx: np.ndarray) -> None:
            """Write a complete MMIDIDX index for `sizes` (elements per item) to file `f`."""
            sizes = np.asarray(sizes, dtype=np.int64)
            itemsize = np.dtype(dtype).itemsize
            pointers = np.zeros(sizes.size, dtype=np.int64)  # exclusive prefix sum, in bytes
            if sizes.size > 1:
                np.cumsum(sizes[:-1] * itemsize, out=pointers[1:])
            f.write(_MMAP_HEADER.pack(_MMAP_MAGIC, 1, code(dtype), sizes.size, len(doc_idx)))
            f.write(sizes.astype("<i4").tobytes())
            f.write(pointers.astype("<i8").tobytes())
            f.write(np.asarray(doc_idx, dtype="<i8").tobytes())

        def __init__(self, path: str, skip_warmup: bool = False) -> None:
            self._path = path
            size = _file_size(path)
            with open(path, "rb") as f:
                head = f.read(_MMAP_HEADER.size)
            if head[:9] != _MMAP_MAGIC:
                hint = " (a lazy/cached index: use impl 'lazy')" if head[:8] == _LAZY_MAGIC else ""
                raise IndexedDatasetError(f"{path}: not an MMIDIDX index file{hint}")
            if len(head) < _MMAP_HEADER.size:
                raise IndexedDatasetError(f"{path}: truncated header ({size} bytes)")
            _, version, dcode, n, d = _MMAP_HEADER.unpack(head)
            if version != 1:
                raise IndexedDatasetError(f"{path}: unsupported version {version} (expected 1)")
            if dcode not in dtypes:
                raise IndexedDatasetError(f"{path}: unknown dtype code {dcode}")
            needed = _MMAP_HEADER.size + 12 * n + 8 * d
            if size < needed:
                raise IndexedDatasetError(
                    f"{path}: truncated index, {size} bytes but the header announces {n} items "
                    f"and {d} document entries needing {needed}"
                )
            self._dtype = dtypes[dcode]
            self._len = n
            if not skip_warmup:
                _warmup_file(path)
            self._buffer_mmap = np.memmap(path, mode="r", order="C")
            buf = memoryview(self._buffer_mmap)
            off = _MMAP_HEADER.size
            self._sizes = np.frombuffer(buf, dtype="<i4", count=n, offset=off)
            self._pointers = np.frombuffer(buf, dtype="<i8", count=n, offset=off + 4 * n)
            self._doc_idx = np.frombuffer(buf, dtype="<i8", count=d, offset=off + 12 * n)
            _check_doc_idx(path, self._doc_idx, n)

        @property
        def dtype(self) -> type:
            return self._dtype

        @property
        def sizes(self) -> np.ndarray:
            return self._sizes

        @property
        def pointers(self) -> np.ndarray:
            return self._pointers

        @property
        def doc_idx(self) -> np.ndarray:
            return self._doc_idx

        def num_bytes(self, itemsize: int) -> int:
            """Bytes of `.bin` the index refers to (end of the last item)."""
            if self._len == 0:
                return 0
            return int(self._pointers[-1]) + int(self._sizes[-1]) * itemsize

        def __getitem__(self, i: int) -> tuple[int, int]:
            return int(self._pointers[i]), int(self._sizes[i])

        def __len__(self) -> int:
            return self._len

    def __init__(self, path: str, skip_warmup: bool = False) -> None:
        self._do_init(path, skip_warmup)

    def __getstate__(self) -> str:
        return self._path

    def __setstate__(self, state: str) -> None:
        self._do_init(state, skip_warmup=True)

    def _do_init(self, path: str, skip_warmup: bool) -> None:
        self._path = path
        self._index = self.Index(index_file_path(path), skip_warmup)
        self._doc_idx = self._index.doc_idx
        bin_path = data_file_path(path)
        itemsize = np.dtype(self._index.dtype).itemsize
        num_docs = len(self._index.doc_idx) - 1
        _check_data_size(path, self._index.num_bytes(itemsize), itemsize, num_docs)
        if not skip_warmup:
            _warmup_file(bin_path)
        if _file_size(bin_path) == 0:
            self._bin_buffer_mmap = None
            self._bin_buffer = memoryview(b"")
        else:
            self._bin_buffer_mmap = np.memmap(bin_path, mode="r", order="C")
            self._bin_buffer = memoryview(self._bin_buffer_mmap)

    def __len__(self) -> int:
        return len(self._index)

    def _check(self, idx: int) -> int:
        n = len(self._index)
        i = idx + n if idx < 0 else idx
        if i < 0 or i >= n:
            raise IndexError(f"{self._path}: index {idx} out of range [0, {n})")
        return i

    def __getitem__(self, idx):
        if isinstance(idx, (int, np.integer)):
            ptr, size = self._index[self._check(int(idx))]
            return np.frombuffer(self._bin_buffer, dtype=self._index.dtype, count=size, offset=ptr)
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                raise ValueError("slices into an indexed dataset must be contiguous")
            if stop <= start:
                return []
            sizes = self._index.sizes[start:stop]
            flat = np.frombuffer(
                self._bin_buffer,
                dtype=self._index.dtype,
                count=int(sizes.sum()),
                offset=int(self._index.pointers[start]),
            )
            return np.split(flat, np.cumsum(sizes)[:-1])
        raise TypeError(f"indexed dataset indices must be int or slice, not {type(idx).__name__}")

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Elements [offset, offset + length) of item idx (to its end when length is None)."""
        ptr, size = self._index[self._check(int(idx))]
        length = size - offset if length is None else length
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"{self._path}: [{offset}, +{length}) outside item {idx} of {size}")
        ptr += offset * np.dtype(self._index.dtype).itemsize
        return np.frombuffer(self._bin_buffer, dtype=self._index.dtype, count=length, offset=ptr)

    @property
    def sizes(self) -> np.ndarray:
        return self._index.sizes

    @property
    def dtype(self) -> type:
        return self._index.dtype

    @property
    def supports_prefetch(self) -> bool:
        return False

    @staticmethod
    def exists(path: str) -> bool:
        return os.path.exists(index_file_path(path)) and os.path.exists(data_file_path(path))


# ------------------------------------------------------------------------------ factories

_IMPLS = ("lazy", "cached", "mmap")


def infer_dataset_impl(path: str) -> str:
    """'mmap' or 'cached' from the magic bytes of `<path>.idx`."""
    if not IndexedDataset.exists(path):
        raise FileNotFoundError(
            f"dataset {path} not found: need {index_file_path(path)} and {data_file_path(path)}"
        )
    with open(index_file_path(path), "rb") as f:
        magic = f.read(9)
    if magic[:8] == _LAZY_MAGIC:
        return "cached"
    if magic == _MMAP_MAGIC:
        return "mmap"
    raise IndexedDatasetError(f"{index_file_path(path)}: unknown index format (magic {magic!r})")


def make_builder(out_file: str, impl: str, vocab_size: int | None = None) -> _AtomicBuilder:
    """A builder writing `out_file` (the .bin path): mmap with the smallest fitting dtype."""
    if impl == "mmap":
        return MMapIndexedDatasetBuilder(out_file, dtype=best_fitting_dtype(vocab_size))
    if impl in ("lazy", "cached"):
        return IndexedDatasetBuilder(out_file)
    raise ValueError(f"--dataset-impl: unknown {impl!r} (choose from {', '.join(_IMPLS)})")


def make_dataset(path: str, impl: str, skip_warmup: bool = False):
    """Open the dataset at prefix `path` with impl 'lazy', 'cached', 'mmap' or 'infer'."""
    if impl not in _IMPLS + ("infer",):
        raise ValueError(f"--data-impl: unknown {impl!r} (choose from {', '.join(_IMPLS)}, infer)")
    if not IndexedDataset.exists(path):
        raise FileNotFoundError(
            f"dataset {path} not found: need {index_file_path(path)} and {data_file_path(path)}"
        )
    if impl == "infer":
        impl = infer_dataset_impl(path)
    if impl == "lazy":
        return IndexedDataset(path)
    if impl == "cached":
        return IndexedCachedDataset(path)
    return MMapIndexedDataset(path, skip_warmup)


def dataset_exists(path: str, impl: str) -> bool:
    """Whether both `<path>.idx` and `<path>.bin` exist (any impl)."""
    if impl == "mmap":
        return MMapIndexedDataset.exists(path)
    return IndexedDataset.exists(path)


# ------------------------------------------------------------------------------ eod check

_EOD_SAMPLES = 16  # documents looked at by check_document_ends
_EOD_WINDOW = 1 << 16  # tokens read from the end of each of them


def _item_length(dataset, item: int) -> int:
    offsets = getattr(dataset, "data_offsets", None)  # TNTIDX items may be n-dimensional
    if offsets is not None:
        return int(offsets[item + 1] - offsets[item])
    return int(dataset.sizes[item])


def _document_tail(dataset, doc: int, window: int) -> np.ndarray:
    """The last `window` tokens (fewer when shorter) of document `doc`, items joined."""
    parts: list[np.ndarray] = []
    need = window
    for item in range(int(dataset.doc_idx[doc + 1]) - 1, int(dataset.doc_idx[doc]) - 1, -1):
        if need <= 0:
            break
        length = _item_length(dataset, item)
        take = min(length, need)
        parts.append(np.asarray(dataset.get(item, offset=length - take)).reshape(-1))
        need -= take
    if not parts:
        return np.empty(0, dtype=np.int64)
    return np.concatenate(parts[::-1])


def sample_documents(num_docs: int, samples: int = _EOD_SAMPLES) -> np.ndarray:
    """Up to `samples` document numbers spread evenly over [0, num_docs), ends included."""
    if num_docs <= 0:
        return np.empty(0, dtype=np.int64)
    picks = np.linspace(0, num_docs - 1, min(samples, num_docs)).round().astype(np.int64)
    return np.unique(picks)


def check_document_ends(
    dataset, prefix: str, eod: int, samples: int = _EOD_SAMPLES, window: int = _EOD_WINDOW
) -> None:
    """Check, on a few documents, that end-of-document tokens sit where the index ends them.

    Neither index format records whether documents end with an eod token, so the data
    decides, with a rule that no corpus written by tools/preprocess_data.py can fail:

    * with `--append-eod` every document ends with the eod; without it the data holds no
      eod at all, since the tokenizers turn no text into the eod id (the caller passes
      `eod` only for such a tokenizer), and merging such corpora keeps both properties;
    * an index laid over another dataset's data (equal in size) cuts that data in the wrong
      places: its documents hold the other dataset's eod tokens inside, not at the end.

    So: of `samples` documents spread over the corpus (the last `window` tokens of each),
    when at least half hold the eod, every one that holds it must end with it. Reading is
    cheap (memory-mapped, a few pages). Raises IndexedDatasetError naming both files.
    """
    docs = [
        (d, tail)
        for d in sample_documents(len(dataset.doc_idx) - 1, samples).tolist()
        if (tail := _document_tail(dataset, d, window)).size
    ]
    holding = [(d, tail) for d, tail in docs if np.any(tail == eod)]
    if not holding or 2 * len(holding) < len(docs):
        return
    for d, tail in holding:
        if tail[-1] != eod:
            pos = int(np.flatnonzero(tail == eod)[-1])
            raise IndexedDatasetError(
                f"{index_file_path(prefix)} does not describe {data_file_path(prefix)}: "
                f"document {d} holds the end-of-document token {eod} {tail.size - pos - 1} "
                f"tokens before its end but does not end with it ({len(holding)} of "
                f"{len(docs)} sampled documents hold it); rebuild both files together"
            )
