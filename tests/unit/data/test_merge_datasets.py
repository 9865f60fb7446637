"""tools/merge_datasets.py, run as users run it (a subprocess)."""

import os
import subprocess
import sys

import numpy as np

from megatron.data import indexed_dataset as ix

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
TOOL = os.path.join(REPO, "tools", "merge_datasets.py")


def write_shard(prefix, docs, dtype=np.uint16, impl="mmap"):
    if impl == "mmap":
        builder = ix.MMapIndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    else:
        builder = ix.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in docs:
        builder.add_doc(np.concatenate(doc), [len(x) for x in doc])
    builder.finalize(prefix + ".idx")


def run_tool(*args):
    return subprocess.run(
        [sys.executable, TOOL, *args], capture_output=True, text=True, cwd=REPO, timeout=60
    )


def shard_docs(k):
    """Shard k: k+1 documents of two items each, values tagged by the shard."""
    return [[np.arange(3) + 100 * k, np.arange(d + 1) + 100 * k + 10] for d in range(k + 1)]


def check_merged(prefix, shards, impl):
    ds = ix.make_dataset(prefix, impl, skip_warmup=True)
    docs = [doc for k in shards for doc in shard_docs(k)]
    items = [x for doc in docs for x in doc]
    assert len(ds) == len(items)
    for i, item in enumerate(items):
        np.testing.assert_array_equal(ds[i], item)
    np.testing.assert_array_equal(ds.doc_idx, np.arange(len(docs) + 1) * 2)


def test_merge_folder_in_sorted_order(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for k in (2, 0, 1):
        write_shard(str(shards / f"part_{k}"), shard_docs(k))
    (shards / "notes.txt").write_text("not a dataset")
    out = str(tmp_path / "out" / "merged")
    proc = run_tool("--input", str(shards), "--output-prefix", out)
    assert proc.returncode == 0, proc.stderr
    check_merged(out, [0, 1, 2], "mmap")
    assert ix.MMapIndexedDataset(out).dtype is np.uint16


def test_merge_listed_prefixes_in_given_order_lazy(tmp_path):
    for k in (0, 1):
        write_shard(str(tmp_path / f"s{k}"), shard_docs(k), dtype=np.int32, impl="lazy")
    out = str(tmp_path / "merged")
    proc = run_tool("--input", str(tmp_path / "s1"), str(tmp_path / "s0"), "--output-prefix", out)
    assert proc.returncode == 0, proc.stderr
    assert ix.infer_dataset_impl(out) == "cached"
    check_merged(out, [1, 0], "lazy")


def test_mismatched_dtype_names_the_odd_input(tmp_path):
    write_shard(str(tmp_path / "a"), shard_docs(0), dtype=np.uint16)
    write_shard(str(tmp_path / "b"), shard_docs(1), dtype=np.int32)
    out = str(tmp_path / "merged")
    proc = run_tool("--input", str(tmp_path), "--output-prefix", out)
    assert proc.returncode != 0
    assert f"{tmp_path / 'b'} is mmap int32" in proc.stderr and "uint16" in proc.stderr
    assert not os.path.exists(out + ".bin") and not os.path.exists(out + ".idx")


def test_missing_pair_and_missing_prefix_are_reported(tmp_path):
    write_shard(str(tmp_path / "a"), shard_docs(0))
    os.remove(tmp_path / "a.bin")
    proc = run_tool("--input", str(tmp_path), "--output-prefix", str(tmp_path / "m"))
    assert proc.returncode != 0 and f"{tmp_path / 'a.idx'} has no matching" in proc.stderr
    proc = run_tool("--input", str(tmp_path / "nope"), "--output-prefix", str(tmp_path / "m"))
    assert proc.returncode != 0 and f"dataset {tmp_path / 'nope'} not found" in proc.stderr
