"""`.bin/.idx` files: exact bytes, round trips, documents, merging, corruption, atomic writes."""

import os
import pickle
import re
import struct
import subprocess
import sys

import numpy as np
import pytest

from megatron.data import indexed_dataset as ix

ALL_DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.int64, np.float64, np.float32, np.uint16]
CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6,
         np.float32: 7, np.uint16: 8}  # fmt: skip
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


def random_docs(rng, dtype, num_docs=6):
    """A list of documents, each a list of 1-D items (some empty)."""
    hi = 100 if np.dtype(dtype).kind in "iu" else 1.0
    docs = []
    for _ in range(num_docs):
        lens = rng.integers(0, 12, size=int(rng.integers(1, 5)))
        docs.append([(rng.random(n) * hi).astype(dtype) for n in lens])
    return docs


def build(prefix, impl, dtype, docs, use_add_doc=False):
    if impl == "mmap":
        builder = ix.MMapIndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    else:
        builder = ix.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in docs:
        if use_add_doc:
            builder.add_doc(np.concatenate(doc), [len(x) for x in doc])
        else:
            for item in doc:
                builder.add_item(item)
            builder.end_document()
    builder.finalize(prefix + ".idx")


def expected_doc_idx(docs):
    return np.cumsum([0] + [len(d) for d in docs])


# ------------------------------------------------------------------------------ exact bytes


def test_mmap_files_are_byte_exact(tmp_path):
    prefix = str(tmp_path / "d")
    items = [np.array([1, 2, 3]), np.array([], dtype=np.int64), np.array([65535, 7])]
    builder = ix.make_builder(prefix + ".bin", "mmap", vocab_size=50257)
    builder.add_item(items[0])
    builder.end_document()
    builder.add_item(items[1])
    builder.add_item(items[2])
    builder.end_document()
    builder.finalize(prefix + ".idx")

    expected = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8)
    expected += struct.pack("<QQ", 3, 3)  # 3 items, 3 doc_idx entries
    expected += struct.pack("<3i", 3, 0, 2)  # sizes
    expected += struct.pack("<3q", 0, 6, 6)  # byte pointers (uint16 items)
    expected += struct.pack("<3q", 0, 1, 3)  # doc_idx
    assert (tmp_path / "d.idx").read_bytes() == expected
    assert (tmp_path / "d.bin").read_bytes() == struct.pack("<5H", 1, 2, 3, 65535, 7)


def test_lazy_files_are_byte_exact(tmp_path):
    prefix = str(tmp_path / "d")
    builder = ix.make_builder(prefix + ".bin", "lazy")
    builder.add_item(np.array([5, 6, 7]))
    builder.add_item(np.array([[1, 2], [3, 4]]))  # a 2-D item keeps both dimensions
    builder.end_document()
    builder.finalize(prefix + ".idx")

    expected = b"TNTIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<QQ", 4, 4)
    expected += struct.pack("<QQ", 2, 3) + struct.pack("<Q", 2)  # items, sizes, doc_idx
    expected += struct.pack("<3q", 0, 1, 3)  # dim_offsets
    expected += struct.pack("<3q", 0, 3, 7)  # data_offsets (elements)
    expected += struct.pack("<3q", 3, 2, 2)  # sizes
    expected += struct.pack("<2q", 0, 3)  # doc_idx (counts sizes entries)
    assert (tmp_path / "d.idx").read_bytes() == expected
    assert (tmp_path / "d.bin").read_bytes() == struct.pack("<7i", 5, 6, 7, 1, 2, 3, 4)
    ds = ix.IndexedDataset(prefix)
    np.testing.assert_array_equal(ds[1], [[1, 2], [3, 4]])
    np.testing.assert_array_equal(ds[0:2][1], [[1, 2], [3, 4]])


# ------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("impl", ["mmap", "lazy", "cached"])
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_roundtrip_every_dtype(tmp_path, impl, dtype):
    rng = np.random.default_rng(CODES[dtype])
    docs = random_docs(rng, dtype)
    prefix = str(tmp_path / "d")
    build(prefix, impl, dtype, docs)
    items = [x for d in docs for x in d]
    assert ix.infer_dataset_impl(prefix) == ("mmap" if impl == "mmap" else "cached")
    ds = ix.make_dataset(prefix, impl, skip_warmup=True)
    if impl == "cached":
        ds.prefetch(range(len(items)))
    assert len(ds) == len(items) and np.dtype(ds.dtype) == np.dtype(dtype)
    np.testing.assert_array_equal(ds.sizes, [len(x) for x in items])
    np.testing.assert_array_equal(ds.doc_idx, expected_doc_idx(docs))
    for i, item in enumerate(items):
        assert ds[i].dtype == np.dtype(dtype)
        np.testing.assert_array_equal(ds[i], item)
    for got, item in zip(ds[1 : len(items)], items[1:]):
        np.testing.assert_array_equal(got, item)
    np.testing.assert_array_equal(ds[-1], items[-1])
    with open(prefix + ".idx", "rb") as f:
        head = f.read(26)
    assert (head[17] if impl == "mmap" else struct.unpack("<Q", head[16:24])[0]) == CODES[dtype]


@pytest.mark.parametrize("impl", ["mmap", "lazy"])
def test_add_doc_writes_the_same_files_as_add_item(tmp_path, impl):
    docs = random_docs(np.random.default_rng(5), np.int32, num_docs=8)
    build(str(tmp_path / "a"), impl, np.int32, docs)
    build(str(tmp_path / "b"), impl, np.int32, docs, use_add_doc=True)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"a{ext}").read_bytes() == (tmp_path / f"b{ext}").read_bytes()


@pytest.mark.parametrize("impl", ["mmap", "lazy"])
def test_get_with_offset_and_length(tmp_path, impl):
    prefix = str(tmp_path / "d")
    build(prefix, impl, np.int64, [[np.arange(10), np.arange(100, 105)]])
    ds = ix.make_dataset(prefix, impl, skip_warmup=True)
    np.testing.assert_array_equal(ds.get(0), np.arange(10))
    np.testing.assert_array_equal(ds.get(0, offset=3), np.arange(3, 10))
    np.testing.assert_array_equal(ds.get(0, offset=2, length=4), [2, 3, 4, 5])
    np.testing.assert_array_equal(ds.get(1, length=2), [100, 101])
    assert ds.get(1, offset=5).size == 0
    with pytest.raises(IndexError, match="outside item"):
        ds.get(1, offset=3, length=3)
    with pytest.raises(IndexError, match="out of range"):
        ds[2]
    with pytest.raises(ValueError, match="contiguous"):
        ds[0:2:2]


def test_cached_reads_unfetched_items_from_disk(tmp_path):
    prefix = str(tmp_path / "d")
    build(prefix, "lazy", np.int32, [[np.arange(4), np.arange(3)], [np.arange(5)]])
    ds = ix.make_dataset(prefix, "cached")
    assert ds.supports_prefetch
    ds.prefetch([2])
    assert list(ds.cache_index) == [2] and ds.cache.size == 5
    np.testing.assert_array_equal(ds[2], np.arange(5))
    np.testing.assert_array_equal(ds[0], np.arange(4))


def test_set_doc_idx_and_pickle(tmp_path):
    prefix = str(tmp_path / "d")
    build(prefix, "mmap", np.uint16, [[np.arange(3)], [np.arange(2), np.arange(4)]])
    ds = ix.MMapIndexedDataset(prefix)
    ds.set_doc_idx(ds.get_doc_idx()[1:])
    np.testing.assert_array_equal(ds.doc_idx, [1, 3])
    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(clone[2], np.arange(4))
    assert not ds.supports_prefetch


@pytest.mark.parametrize("impl", ["mmap", "lazy"])
def test_merge_file_keeps_documents(tmp_path, impl):
    rng = np.random.default_rng(7)
    parts = [random_docs(rng, np.int32, n) for n in (3, 4)]
    for k, docs in enumerate(parts):
        build(str(tmp_path / f"p{k}"), impl, np.int32, docs)
    out = str(tmp_path / "m")
    builder = ix.make_builder(out + ".bin", impl) if impl == "lazy" else (
        ix.MMapIndexedDatasetBuilder(out + ".bin", dtype=np.int32))  # fmt: skip
    builder.add_item(np.array([9, 9]))
    builder.end_document()
    for k in range(2):
        builder.merge_file_(str(tmp_path / f"p{k}"))
    builder.finalize(out + ".idx")
    docs = [[np.array([9, 9])]] + parts[0] + parts[1]
    ds = ix.make_dataset(out, "infer")
    np.testing.assert_array_equal(ds.doc_idx, expected_doc_idx(docs))
    for got, item in zip(ds[0 : len(ds)], [x for d in docs for x in d]):
        np.testing.assert_array_equal(got, item)


def test_merge_file_rejects_other_dtype(tmp_path):
    build(str(tmp_path / "a"), "mmap", np.int64, [[np.arange(3)]])
    builder = ix.MMapIndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=np.uint16)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "a.idx")) + ".*int64"):
        builder.merge_file_(str(tmp_path / "a"))
    builder.abort()


# ------------------------------------------------------------------------------ factories


def test_factories_and_dtype_choice(tmp_path):
    assert ix.best_fitting_dtype(50257) is np.uint16
    assert ix.best_fitting_dtype(65500) is np.int32
    assert ix.best_fitting_dtype(None) is np.int32
    assert ix.index_file_path("x/y") == "x/y.idx" and ix.data_file_path("x/y") == "x/y.bin"
    prefix = str(tmp_path / "d")
    assert not ix.dataset_exists(prefix, "mmap")
    with pytest.raises(FileNotFoundError, match=re.escape(prefix)):
        ix.make_dataset(prefix, "mmap")
    builder = ix.make_builder(prefix + ".bin", "mmap", vocab_size=100000)
    assert builder.dtype is np.int32
    builder.finalize(prefix + ".idx")
    assert ix.dataset_exists(prefix, "mmap") and len(ix.make_dataset(prefix, "mmap")) == 0
    with pytest.raises(ValueError, match="unknown 'fast'"):
        ix.make_dataset(prefix, "fast")


def test_out_of_range_tokens_are_rejected(tmp_path):
    builder = ix.MMapIndexedDatasetBuilder(str(tmp_path / "d.bin"), dtype=np.uint16)
    with pytest.raises(ValueError, match="value 70000 does not fit in uint16"):
        builder.add_item([1, 70000])
    with pytest.raises(ValueError, match="sizes sum to 3, tokens hold 2"):
        builder.add_doc([1, 2], [1, 2])
    builder.abort()


class _FakeTensor:
    """Stands in for a torch tensor (detach().cpu().numpy()) so the test need not load torch."""

    def __init__(self, values):
        self.values = np.asarray(values)

    def detach(self):
        return self

    def cpu(self):
        return self

    def numpy(self):
        return self.values


def test_tensors_accepted_and_module_imports_without_torch(tmp_path):
    code = "import sys, megatron.data.indexed_dataset; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    tensors = [_FakeTensor([3, 1, 4])]
    if "torch" in sys.modules:  # already loaded by other tests: check the real thing too
        tensors.append(sys.modules["torch"].tensor([3, 1, 4]))
    for k, tensor in enumerate(tensors):
        prefix = str(tmp_path / f"d{k}")
        builder = ix.make_builder(prefix + ".bin", "mmap", vocab_size=1000)
        builder.add_item(tensor)
        builder.end_document()
        builder.finalize(prefix + ".idx")
        np.testing.assert_array_equal(ix.MMapIndexedDataset(prefix)[0], [3, 1, 4])


# ------------------------------------------------------------------------------ corruption


def _corrupt(path, offset=None, data=None, truncate=None):
    raw = bytearray(open(path, "rb").read())
    if data is not None:
        raw[offset : offset + len(data)] = data
    if truncate is not None:
        raw = raw[:truncate]
    open(path, "wb").write(bytes(raw))


MMAP_CASES = [
    ("idx", dict(offset=0, data=b"XXXXXXX"), "not an MMIDIDX index"),
    ("idx", dict(offset=9, data=struct.pack("<Q", 2)), "unsupported version 2"),
    ("idx", dict(offset=17, data=b"\x09"), "unknown dtype code 9"),
    ("idx", dict(truncate=20), "truncated header"),
    ("idx", dict(truncate=60), "truncated index"),
    ("bin", dict(truncate=10), "truncated data file"),
    ("idx", dict(offset=34 + 12 * 4 + 8, data=struct.pack("<q", 99)), "corrupt document index"),
]
LAZY_CASES = [
    ("idx", dict(offset=0, data=b"MMIDIDX\x00"), "not a TNTIDX index file"),
    ("idx", dict(offset=8, data=struct.pack("<Q", 3)), "unsupported version 3"),
    ("idx", dict(offset=16, data=struct.pack("<Q", 0)), "unknown dtype code 0"),
    ("idx", dict(truncate=40), "truncated header"),
    ("idx", dict(truncate=100), "truncated index"),
    ("bin", dict(truncate=10), "truncated data file"),
]


@pytest.mark.parametrize(
    "impl,case", [("mmap", c) for c in MMAP_CASES] + [("lazy", c) for c in LAZY_CASES]
)
def test_corrupt_files_fail_at_open_naming_the_file(tmp_path, impl, case):
    ext, how, message = case
    prefix = str(tmp_path / "d")
    build(prefix, impl, np.int32, [[np.arange(5), np.arange(4)], [np.arange(6)], [np.arange(3)]])
    path = f"{prefix}.{ext}"
    _corrupt(path, **how)
    with pytest.raises(ix.IndexedDatasetError, match=re.escape(path) + ".*" + message):
        ix.make_dataset(prefix, impl, skip_warmup=True)


def test_wrong_impl_is_named(tmp_path):
    prefix = str(tmp_path / "d")
    build(prefix, "lazy", np.int32, [[np.arange(5)]])
    with pytest.raises(ix.IndexedDatasetError, match="use impl 'lazy'"):
        ix.make_dataset(prefix, "mmap")


# ------------------------------------------------------------------------------ atomic writes


@pytest.mark.parametrize("impl", ["mmap", "lazy"])
def test_failed_build_leaves_no_files(tmp_path, impl):
    prefix = str(tmp_path / "d")
    with pytest.raises(RuntimeError, match="tokenizer died"):
        with ix.make_builder(prefix + ".bin", impl, vocab_size=100) as builder:
            builder.add_item(np.arange(10))
            assert os.path.exists(prefix + ".bin.tmp") and not os.path.exists(prefix + ".bin")
            raise RuntimeError("tokenizer died")
    assert os.listdir(tmp_path) == []
    with pytest.raises(RuntimeError, match="already aborted"):
        builder.add_item([1])


def test_killed_build_never_shows_final_names(tmp_path):
    prefix = str(tmp_path / "d")
    script = (
        "import os, numpy as np\n"
        "from megatron.data.indexed_dataset import make_builder\n"
        f"b = make_builder({prefix!r} + '.bin', 'mmap', vocab_size=100)\n"
        "for _ in range(1000): b.add_item(np.arange(50))\n"
        "os._exit(3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO)
    assert proc.returncode == 3
    assert sorted(os.listdir(tmp_path)) == ["d.bin.tmp"]
    assert not ix.dataset_exists(prefix, "mmap")


def test_finalize_replaces_stale_files(tmp_path):
    prefix = str(tmp_path / "d")
    build(prefix, "mmap", np.int32, [[np.arange(100)]])
    build(prefix, "mmap", np.int32, [[np.arange(3)], [np.arange(2)]])
    ds = ix.MMapIndexedDataset(prefix)
    assert len(ds) == 2 and sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"]
