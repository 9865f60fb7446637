"""tools/preprocess_data.py run as a user runs it: a subprocess on a small real corpus.

Outputs are read back with the indexed-dataset readers and compared with the tokenizer
called directly; every flag combination that must not change the result (workers,
partitions, .gz / glob input, the pure-Python and Rust `tokenizers` backends) is compared
byte for byte.
"""

from __future__ import annotations

import argparse
import filecmp
import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from megatron.data.indexed_dataset import MMapIndexedDataset, make_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "preprocess_data.py")

# Edge cases next to the real prose: contractions, whitespace runs, non-ASCII text.
EXTRA_DOCS = [
    "It's a test; they'll say we've done it, isn't it?  Two  spaces,\ttabs\n\n\nand   runs.   ",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u2014 \u201cquoted\u201d \u2019tis \u00a0nbsp \u4e2d\u6587 \U0001f600!",
    "Numbers 3.14159 and 2\u00b2, \u0661\u0662\u0663 Arabic digits, \x1c separators \x1f.",
]


def run_tool(*args: str, expect_ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, TOOL, *args], capture_output=True, text=True, timeout=120
    )
    if expect_ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def gpt2_flags(vocab_dir: str) -> list[str]:
    return [
        "--vocab", os.path.join(vocab_dir, "gpt2-vocab.json"),
        "--merge-file", os.path.join(vocab_dir, "gpt2-merges.txt"),
        "--tokenizer-type", "GPT2BPETokenizer", "--dataset-impl", "mmap", "--append-eod",
    ]  # fmt: skip


def same_dataset(prefix_a: str, prefix_b: str) -> bool:
    return all(
        filecmp.cmp(prefix_a + ext, prefix_b + ext, shallow=False) for ext in (".bin", ".idx")
    )


def write_jsonl(path: str, docs: list[dict]) -> None:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc) + "\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """~60 kB of real English (standard-library docs) plus edge cases and 2 empty texts."""
    sys.path.insert(0, os.path.join(ROOT, "tools", "bench"))
    from make_corpus import iter_documents

    texts = list(iter_documents(60_000, doc_chars=1500))
    texts[3:3] = [""]  # empty documents are skipped and counted
    texts[10:10] = EXTRA_DOCS
    texts.append("")
    docs = [{"id": str(i), "text": t, "title": f"doc {i}"} for i, t in enumerate(texts)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.json"
    write_jsonl(str(path), docs)
    return str(path), texts


@pytest.fixture(scope="module")
def baseline(corpus, vocab_dir, tmp_path_factory):
    """The README command (workers 1); returns (prefix of the output, its stdout)."""
    path, _ = corpus
    out = tmp_path_factory.mktemp("baseline") / "my-gpt2"
    proc = run_tool("--input", path, "--output-prefix", str(out), *gpt2_flags(vocab_dir))
    return str(out) + "_text_document", proc.stdout


@pytest.fixture(scope="module")
def gpt2(vocab_dir):
    from megatron.tokenizer import build_tokenizer

    args = argparse.Namespace(
        tokenizer_type="GPT2BPETokenizer",
        vocab_file=os.path.join(vocab_dir, "gpt2-vocab.json"),
        merge_file=os.path.join(vocab_dir, "gpt2-merges.txt"),
        rank=1,
        make_vocab_size_divisible_by=128,
        tensor_model_parallel_size=1,
    )
    return build_tokenizer(args)


def test_readme_command_matches_tokenizer(corpus, baseline, gpt2):
    _, texts = corpus
    prefix, stdout = baseline
    kept = [t for t in texts if t]
    ds = MMapIndexedDataset(prefix)
    assert ds.dtype == np.uint16
    assert len(ds) == len(kept)
    np.testing.assert_array_equal(ds.doc_idx, np.arange(len(kept) + 1))
    for i, text in enumerate(kept):
        expected = gpt2.tokenize(text) + [gpt2.eod]
        assert ds[i].tolist() == expected, f"document {i} differs"
        # The eod is part of the item and counted in its size.
        assert ds.sizes[i] == len(expected)
    tokens = int(ds.sizes.sum())
    assert (
        f"Done: {len(kept)} documents written, 2 skipped empty, 0 skipped invalid, "
        f"{tokens} tokens" in stdout
    )


@pytest.mark.parametrize("impl", ["python", "tokenizers"])
def test_default_equals_pure_python_and_rust_tokenizers(
    corpus, baseline, vocab_dir, tmp_path, impl
):
    """The default (tiktoken) writes the bytes of the pure-Python reference and of the Rust
    `tokenizers` fallback."""
    path, _ = corpus
    out = tmp_path / impl
    run_tool("--input", path, "--output-prefix", str(out), *gpt2_flags(vocab_dir),
             "--tokenizer-impl", impl)  # fmt: skip
    assert same_dataset(baseline[0], str(out) + "_text_document")


def test_workers_and_partitions_do_not_change_output(corpus, baseline, vocab_dir, tmp_path):
    path, _ = corpus
    for name, extra in (("w2", ["--workers", "2", "--chunk-size", "3"]),
                        ("p2", ["--partitions", "2", "--workers", "2"])):  # fmt: skip
        out = tmp_path / name
        run_tool("--input", path, "--output-prefix", str(out), *gpt2_flags(vocab_dir), *extra)
        assert same_dataset(baseline[0], f"{out}_text_document"), name
    leftovers = [f for f in os.listdir(tmp_path) if "part" in f or f.endswith(".tmp")]
    assert leftovers == []


def test_gz_and_glob_input(corpus, baseline, vocab_dir, tmp_path):
    path, _ = corpus
    with open(path) as f:
        lines = f.readlines()
    half = len(lines) // 2
    (tmp_path / "in").mkdir()
    with open(tmp_path / "in" / "a.json", "w") as f:
        f.writelines(lines[:half])
    with gzip.open(tmp_path / "in" / "b.json.gz", "wt") as f:
        f.writelines(lines[half:])
    out = tmp_path / "glob"
    run_tool("--input", str(tmp_path / "in" / "*.json*"), "--output-prefix", str(out),
             *gpt2_flags(vocab_dir))  # fmt: skip
    assert same_dataset(baseline[0], f"{out}_text_document")


def test_invalid_json_stops_with_file_and_line(vocab_dir, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": broken\n{"text": "x"}\n')
    out = tmp_path / "bad"
    proc = run_tool("--input", str(path), "--output-prefix", str(out), *gpt2_flags(vocab_dir),
                    expect_ok=False)  # fmt: skip
    assert proc.returncode == 1
    assert f"{path}:3: invalid JSON" in proc.stderr
    assert os.listdir(tmp_path) == ["bad.json"]  # nothing written, not even temporaries

    proc = run_tool("--input", str(path), "--output-prefix", str(out), *gpt2_flags(vocab_dir),
                    "--skip-invalid", "--json-keys", "text")  # fmt: skip
    assert "Done: 3 documents written, 0 skipped empty, 1 skipped invalid" in proc.stdout
    assert len(MMapIndexedDataset(f"{out}_text_document")) == 3


def test_missing_key_is_an_error(vocab_dir, tmp_path):
    path = tmp_path / "keys.json"
    path.write_text('{"text": "a"}\n{"body": "b"}\n')
    proc = run_tool("--input", str(path), "--output-prefix", str(tmp_path / "k"),
                    *gpt2_flags(vocab_dir), expect_ok=False)  # fmt: skip
    assert proc.returncode == 1
    assert re.search(rf"{re.escape(str(path))}:2: key 'text' not found", proc.stderr)
    assert sorted(os.listdir(tmp_path)) == ["keys.json"]


def test_lone_surrogate_is_invalid_input(vocab_dir, tmp_path):
    path = tmp_path / "surrogate.json"
    path.write_text('{"text": "fine"}\n{"text": "broken \\ud83d emoji"}\n')
    out = tmp_path / "s"
    proc = run_tool("--input", str(path), "--output-prefix", str(out), *gpt2_flags(vocab_dir),
                    expect_ok=False)  # fmt: skip
    assert proc.returncode == 1
    assert f"{path}:2: key 'text' holds a lone surrogate" in proc.stderr
    proc = run_tool("--input", str(path), "--output-prefix", str(out), *gpt2_flags(vocab_dir),
                    "--skip-invalid")  # fmt: skip
    assert "Done: 1 documents written, 0 skipped empty, 1 skipped invalid" in proc.stdout


def test_split_sentences_bert_with_trained_punkt(corpus, vocab_dir, tmp_path):
    import nltk

    path, texts = corpus
    out = tmp_path / "bert"
    env_nltk = str(tmp_path / "no_nltk_data")
    proc = subprocess.run(
        [sys.executable, TOOL, "--input", path, "--output-prefix", str(out),
         "--vocab", os.path.join(vocab_dir, "bert-large-uncased-vocab.txt"),
         "--tokenizer-type", "BertWordPieceLowerCase", "--split-sentences"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "NLTK_DATA": env_nltk},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        has_punkt = True
    except LookupError:
        has_punkt = False
    if not has_punkt:
        assert proc.stderr.count("punkt model for 'english' not found; trained Punkt on") == 1
    ds = MMapIndexedDataset(f"{out}_text_sentence")
    doc_idx = ds.doc_idx
    n_docs = len(doc_idx) - 1
    assert n_docs == len([t for t in texts if t.strip()])
    assert len(ds) > n_docs  # documents were split into several sentences
    assert np.all(np.diff(doc_idx) >= 1) and doc_idx[-1] == len(ds)
    assert "Done: " in proc.stdout and f"{n_docs} documents written" in proc.stdout


@pytest.mark.parametrize("impl", ["lazy", "cached"])
def test_lazy_and_cached_are_readable(corpus, baseline, vocab_dir, tmp_path, impl):
    path, _ = corpus
    out = tmp_path / impl
    flags = [f for f in gpt2_flags(vocab_dir) if f != "mmap"]
    flags[flags.index("--dataset-impl") + 1 : flags.index("--dataset-impl") + 1] = [impl]
    run_tool("--input", path, "--output-prefix", str(out), *flags)
    ds = make_dataset(f"{out}_text_document", impl)
    ref = MMapIndexedDataset(baseline[0])
    assert len(ds) == len(ref)
    for i in (0, len(ref) // 2, len(ref) - 1):
        assert np.asarray(ds[i]).tolist() == ref[i].tolist()


def test_sigterm_leaves_no_files(vocab_dir, tmp_path):
    fifo = tmp_path / "stream.json"
    os.mkfifo(fifo)
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, TOOL, "--input", str(fifo), "--output-prefix", str(out),
         *gpt2_flags(vocab_dir), "--chunk-size", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    with open(fifo, "w") as writer:
        writer.write('{"text": "a first document"}\n' * 5)
        writer.flush()
        deadline = time.time() + 60
        while not os.path.exists(f"{out}_text_document.bin.tmp") and time.time() < deadline:
            time.sleep(0.05)
        assert os.path.exists(f"{out}_text_document.bin.tmp")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert proc.returncode == 143, proc.stderr.read()
    assert sorted(os.listdir(tmp_path)) == ["stream.json"]


def _bench_module():
    sys.path.insert(0, os.path.join(ROOT, "tools", "bench"))
    import bench_preprocess

    return bench_preprocess


def test_bench_compare_index_names_the_reference_eod_bug(baseline, tmp_path):
    """An index whose sizes omit each document's eod (Megatron-DeepSpeed's tool) is told apart
    from any other difference."""
    bench = _bench_module()
    prefix, _ = baseline
    ours = prefix + ".idx"
    idx = bench.read_index(ours)
    itemsize = np.dtype(idx["dtype"]).itemsize
    assert idx["sizes"].sum() * itemsize == os.path.getsize(prefix + ".bin")

    def write(path, sizes):
        pointers = np.concatenate([[0], np.cumsum(sizes[:-1], dtype=np.int64) * itemsize])
        with open(path, "wb") as f:
            f.write(idx["header"])
            f.write(sizes.astype(np.int32).tobytes())
            f.write(pointers.astype(np.int64).tobytes())
            f.write(idx["doc_idx"].tobytes())
        return path

    short = idx["sizes"].astype(np.int64)
    short[idx["doc_idx"][1:] - 1] -= 1  # the last item of each document loses its eod
    assert bench.compare_index(ours, write(tmp_path / "same.idx", idx["sizes"])) == "identical"
    verdict = bench.compare_index(ours, write(tmp_path / "eod_bug.idx", short))
    assert verdict.startswith("differs only by the reference's eod bug"), verdict
    other = idx["sizes"].astype(np.int64)
    other[0] -= 1
    other[1] += 1
    assert bench.compare_index(ours, write(tmp_path / "other.idx", other)) == "differs: sizes"


def test_bench_runs_a_reference_checkout_as_a_peer(corpus, vocab_dir, tmp_path):
    """--reference-tool: the checkout's tools/preprocess_data.py runs with the same flags and
    its own `megatron` first on PYTHONPATH; rows carry its times and the output check. The
    stand-in checkout here forwards to this repository's tool after checking both."""
    bench = _bench_module()
    checkout = tmp_path / "checkout"
    (checkout / "tools").mkdir(parents=True)
    (checkout / "megatron").mkdir()
    (checkout / "megatron" / "__init__.py").write_text("CHECKOUT_MARKER = True\n")
    (checkout / "tools" / "preprocess_data.py").write_text(
        "import os, subprocess, sys\n"
        "import megatron\n"
        "assert megatron.CHECKOUT_MARKER\n"
        "for flag in ('--append-eod', '--vocab-file', '--merge-file', '--workers'):\n"
        "    assert flag in sys.argv, flag\n"
        "env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}\n"
        f"sys.exit(subprocess.run([sys.executable, {TOOL!r}, *sys.argv[1:]], env=env).returncode)\n"
    )
    path, _ = corpus
    rows = bench.bench(
        path, vocab_dir, [2], 1, str(tmp_path / "work"),
        reference_tool=str(checkout), peers=("fast",),
    )  # fmt: skip
    assert [r["impl"] for r in rows] == ["fast", "reference"]
    ref = rows[1]
    assert ref["check"] == ".bin identical; .idx identical" and ref["identical"]
    assert ref["docs"] == rows[0]["docs"] and ref["tokens"] == rows[0]["tokens"]
    assert ref["wall_s"] > 0 and ref["fast_speedup"] == ref["wall_s"] / rows[0]["wall_s"]
    table = bench.markdown(rows, path, "median", 1)
    assert "Megatron-DeepSpeed preprocess_data.py | 2 |" in table
