"""Benchmark tools/preprocess_data.py against the pure-Python BPE and Megatron-DeepSpeed's tool.

Runs the tool as a user would (a subprocess, start-up included) on a real English corpus
(tools/bench/make_corpus.py, >= 10 MB) with GPT2BPETokenizer --append-eod, at each
--workers count, once with the default fast tokenizer (tiktoken) and once with
`--tokenizer-impl python` (the pure-Python BPE, the algorithm of Megatron-DeepSpeed's own
tool). With `--reference-tool DIR` (a Megatron-DeepSpeed checkout, kept outside this
repository) that checkout's own tools/preprocess_data.py runs as a third peer, on the same
corpus with the same flags and --workers, its `megatron` package first on PYTHONPATH.

The runs are interleaved and repeated; each row reports the median (or, with --stat best,
the fastest) wall time, with the CPU seconds (user + sys of the tool and its workers) and
the 1-minute load average at the start of that run. Outputs must be byte-identical: fast
against pure-Python (.bin and .idx), fast against the reference tool (.bin; the reference's
.idx is compared and any difference described, see `compare_index`). The fast rows also
show the issue's figure for Megatron-DeepSpeed's tool on a 2-core machine (`_REFERENCE_WALL`,
wall seconds per worker count), which is not a measurement on this machine.

    python tools/bench/bench_preprocess.py --workers 1 2 --repeats 3 \\
        --reference-tool /path/to/Megatron-DeepSpeed --output-md out.md
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import re
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(os.path.dirname(_HERE))
_TOOL = os.path.join(_ROOT, "tools", "preprocess_data.py")
_MB = 1024 * 1024
_DONE = re.compile(r"Done: (\d+) documents written.*?(\d+) tokens")
# Megatron-DeepSpeed's own preprocess_data.py, 11.4 MB / 4,095 documents, 2-core machine.
_REFERENCE_WALL = {1: 11.0, 2: 8.2}


def _default_vocab_dir() -> str | None:
    for path in (
        os.environ.get("MEGATRON_VOCAB_DIR"),
        os.path.join(_ROOT, "..", "shared", "vocab"),
    ):
        if path and os.path.exists(os.path.join(path, "gpt2-vocab.json")):
            return os.path.abspath(path)
    return None


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _gpt2_flags(corpus: str, prefix: str, vocab_dir: str, workers: int) -> list[str]:
    """The flags both tools get: same input, tokenizer, output format and worker count."""
    return [
        "--input", corpus, "--output-prefix", prefix,
        "--vocab-file", os.path.join(vocab_dir, "gpt2-vocab.json"),
        "--merge-file", os.path.join(vocab_dir, "gpt2-merges.txt"),
        "--tokenizer-type", "GPT2BPETokenizer", "--dataset-impl", "mmap", "--append-eod",
        "--workers", str(workers), "--log-interval", "1000000",
    ]  # fmt: skip


def _timed(cmd: list[str], env: dict | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    """Run cmd; (process, {wall_s, cpu_s, load}). Raises with its stderr if it fails."""
    load = os.getloadavg()[0]
    cpu0, start = _children_cpu(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall, cpu = time.perf_counter() - start, _children_cpu() - cpu0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return proc, {"wall_s": wall, "cpu_s": cpu, "load": load}


def run_tool(corpus: str, prefix: str, vocab_dir: str, workers: int, impl: str) -> dict:
    """One run of this repository's preprocess_data.py; wall and CPU seconds, docs, tokens."""
    cmd = [sys.executable, _TOOL, *_gpt2_flags(corpus, prefix, vocab_dir, workers)]
    proc, result = _timed([*cmd, "--tokenizer-impl", impl])
    match = _DONE.search(proc.stdout)
    if match is None:
        raise RuntimeError(f"no summary line in the output of {' '.join(cmd)}:\n{proc.stdout}")
    return {**result, "docs": int(match[1]), "tokens": int(match[2])}


def run_reference(
    corpus: str, prefix: str, vocab_dir: str, workers: int, ref_dir: str, extra_path: list[str]
) -> dict:
    """One run of Megatron-DeepSpeed's own tools/preprocess_data.py from the checkout
    `ref_dir` (its `megatron` first on PYTHONPATH, then `extra_path`); docs and tokens are
    read back from the .bin/.idx it writes (it prints no summary)."""
    tool = os.path.join(ref_dir, "tools", "preprocess_data.py")
    if not os.path.isfile(tool):
        raise FileNotFoundError(f"--reference-tool {ref_dir}: no tools/preprocess_data.py there")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.abspath(ref_dir), *extra_path, *filter(None, [env.get("PYTHONPATH")])]
    )
    _, result = _timed(
        [sys.executable, tool, *_gpt2_flags(corpus, prefix, vocab_dir, workers)], env
    )
    index = read_index(prefix + "_text_document.idx")
    bin_bytes = os.path.getsize(prefix + "_text_document.bin")
    return {
        **result, "docs": len(index["doc_idx"]) - 1,
        "tokens": bin_bytes // np.dtype(index["dtype"]).itemsize,
    }  # fmt: skip


def read_index(path: str) -> dict:
    """Fields of an mmap `.idx` file: dtype code, sizes, pointers, doc_idx (numpy arrays)."""
    with open(path, "rb") as f:
        data = f.read()
    code = data[17]
    n, n_docs = struct.unpack("<QQ", data[18:34])
    sizes = np.frombuffer(data, np.int32, n, 34)
    pointers = np.frombuffer(data, np.int64, n, 34 + 4 * n)
    doc_idx = np.frombuffer(data, np.int64, n_docs, 34 + 12 * n)
    dtype = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
    return {"header": data[:34], "code": code, "dtype": dtype.get(code, np.int32),
            "sizes": sizes, "pointers": pointers, "doc_idx": doc_idx}  # fmt: skip


def compare_index(ours: str, reference: str) -> str:
    """'identical', or what differs between two `.idx` files of the same .bin.

    Megatron-DeepSpeed's tool records each document's size before it appends the eod token,
    so with --append-eod its sizes are one short per document and its pointers drift by one
    token per document, while its .bin holds the eod; that case is named as such.
    """
    with open(ours, "rb") as a, open(reference, "rb") as b:
        if a.read() == b.read():
            return "identical"
    x, y = read_index(ours), read_index(reference)
    if x["header"][:18] != y["header"][:18] or len(x["sizes"]) != len(y["sizes"]):
        return "differs: header or item count"
    if not np.array_equal(x["doc_idx"], y["doc_idx"]):
        return "differs: doc_idx"
    short = x["sizes"].astype(np.int64) - y["sizes"]
    if np.all(short[x["doc_idx"][1:] - 1] == 1) and int(short.sum()) == len(x["doc_idx"]) - 1:
        return (
            "differs only by the reference's eod bug: its sizes omit the eod "
            f"({len(x['doc_idx']) - 1} documents one token short), pointers drift to match"
        )
    return "differs: sizes"


def identical(prefix_a: str, prefix_b: str, exts: tuple[str, ...] = (".bin", ".idx")) -> bool:
    suffix = "_text_document"
    return all(
        filecmp.cmp(prefix_a + suffix + ext, prefix_b + suffix + ext, shallow=False) for ext in exts
    )


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


_TOOL_NAMES = {
    "python": "pure-Python BPE (this tool)",
    "fast": "fast (this tool)",
    "reference": "Megatron-DeepSpeed preprocess_data.py",
}


def _pick(runs: list[dict], stat: str) -> dict:
    """The run reported for `runs`: the fastest, or the median by wall time (for an even
    count, the wall and CPU seconds are the medians and the other fields the upper run's)."""
    ordered = sorted(runs, key=lambda r: r["wall_s"])
    if stat == "best":
        return {**ordered[0], "walls": [r["wall_s"] for r in runs]}
    mid = dict(ordered[len(ordered) // 2])
    mid["wall_s"] = statistics.median(r["wall_s"] for r in runs)
    mid["cpu_s"] = statistics.median(r["cpu_s"] for r in runs)
    mid["walls"] = [r["wall_s"] for r in runs]
    return mid


def bench(
    corpus: str,
    vocab_dir: str,
    workers: list[int],
    repeats: int,
    work_dir: str,
    reference_wall: dict[int, float] | None = None,
    reference_tool: str | None = None,
    reference_path: list[str] | None = None,
    stat: str = "median",
    peers: tuple[str, ...] = ("python", "fast"),
) -> list:
    """Rows of results: one per (workers, peer); `stat` of `repeats` interleaved runs."""
    reference_wall = _REFERENCE_WALL if reference_wall is None else reference_wall
    peers = (*peers, "reference") if reference_tool else peers
    size_mb = os.path.getsize(corpus) / _MB
    rows = []
    for w in workers:
        runs: dict[str, list] = {p: [] for p in peers}
        prefixes = {p: os.path.join(work_dir, f"{p}_w{w}") for p in peers}
        for _ in range(repeats):
            for p in peers:
                if p == "reference":
                    r = run_reference(
                        corpus, prefixes[p], vocab_dir, w, reference_tool, reference_path or []
                    )
                else:
                    r = run_tool(corpus, prefixes[p], vocab_dir, w, p)
                runs[p].append(r)
        picked = {p: _pick(runs[p], stat) for p in peers}
        checks = {}
        if "python" in peers:
            same = identical(prefixes["python"], prefixes["fast"])
            checks["python"] = "yes: .bin/.idx identical" if same else "NO: output differs"
        if "reference" in peers:
            same_bin = identical(prefixes["fast"], prefixes["reference"], (".bin",))
            idx = compare_index(
                prefixes["fast"] + "_text_document.idx",
                prefixes["reference"] + "_text_document.idx",
            )
            checks["reference"] = f".bin {'identical' if same_bin else 'DIFFERS'}; .idx {idx}"
        for p in peers:
            r = picked[p]
            rows.append({
                "tool": _TOOL_NAMES[p], "impl": p, "workers": w, "wall_s": r["wall_s"],
                "cpu_s": r["cpu_s"], "walls": r["walls"], "load": r["load"],
                "mb_per_s": size_mb / r["wall_s"], "docs_per_s": r["docs"] / r["wall_s"],
                "fast_speedup": r["wall_s"] / picked["fast"]["wall_s"],
                "fast_cpu_speedup": r["cpu_s"] / picked["fast"]["cpu_s"],
                "reference_wall_s": reference_wall.get(w) if p == "fast" else None,
                "check": checks.get(p, "(baseline)"), "docs": r["docs"], "tokens": r["tokens"],
                "identical": p == "fast" or checks.get(p, "").startswith(("yes", ".bin identical")),
            })  # fmt: skip
    return rows


def markdown(rows: list, corpus: str, stat: str = "median", repeats: int = 3) -> str:
    size_mb = os.path.getsize(corpus) / _MB
    docs = rows[0]["docs"] if rows else 0
    lines = [
        f"Corpus: {size_mb:.1f} MB, {docs} documents; GPT2BPETokenizer, --append-eod, mmap.",
        f"Machine: {_cpu_model()}, {os.cpu_count()} CPUs; {time.strftime('%a %b %d %H:%M:%S %Z %Y')}.",
        f"Each row: {stat} of {repeats} interleaved runs (wall s of every run listed).",
        "",
        "| tool | workers | wall s | runs (wall s) | CPU s | load avg | MB/s | docs/s "
        "| fast tool is faster by (wall) | (CPU) | output vs fast tool |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        speedup = "" if r["impl"] == "fast" else f"{r['fast_speedup']:.2f}x"
        cpu_speedup = "" if r["impl"] == "fast" else f"{r['fast_cpu_speedup']:.2f}x"
        ref = r["reference_wall_s"]
        check = r["check"]
        if ref:
            check += f"; issue's figure for Megatron-DeepSpeed {ref} s = {ref / r['wall_s']:.2f}x"
        lines.append(
            f"| {r['tool']} | {r['workers']} | {r['wall_s']:.2f} | "
            f"{', '.join(f'{x:.2f}' for x in r['walls'])} | {r['cpu_s']:.2f} | "
            f"{r['load']:.1f} | {r['mb_per_s']:.2f} | {r['docs_per_s']:.0f} | "
            f"{speedup} | {cpu_speedup} | {check} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", help="loose-JSON corpus (built with make_corpus if absent)")
    parser.add_argument("--min-mb", type=float, default=11.0, help="size of a built corpus")
    parser.add_argument("--vocab-dir", default=_default_vocab_dir(), help="GPT-2 vocab folder")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each peer")
    parser.add_argument("--stat", choices=("median", "best"), default="median",
                        help="which of the repeated runs a row reports")  # fmt: skip
    parser.add_argument("--reference-tool", metavar="DIR",
                        help="Megatron-DeepSpeed checkout whose tools/preprocess_data.py runs "
                             "as a peer")  # fmt: skip
    parser.add_argument("--reference-pythonpath", default="",
                        help=f"extra PYTHONPATH entries ('{os.pathsep}'-separated) for the "
                             "reference tool, after the checkout itself")  # fmt: skip
    parser.add_argument("--no-python-peer", action="store_true",
                        help="skip the pure-Python BPE runs")  # fmt: skip
    parser.add_argument("--work-dir", help="where outputs go (default: a temporary folder)")
    parser.add_argument("--output-json", help="write the rows as JSON here")
    parser.add_argument("--output-md", help="write the markdown table here")
    args = parser.parse_args(argv)
    if not args.vocab_dir:
        parser.error("--vocab-dir: no gpt2-vocab.json found; set MEGATRON_VOCAB_DIR")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.reference_tool and not os.path.isfile(
        os.path.join(args.reference_tool, "tools", "preprocess_data.py")
    ):
        parser.error(f"--reference-tool {args.reference_tool}: no tools/preprocess_data.py there")
    peers = ("fast",) if args.no_python_peer else ("python", "fast")
    extra_path = [p for p in args.reference_pythonpath.split(os.pathsep) if p]

    with tempfile.TemporaryDirectory() as tmp:
        work_dir = args.work_dir or tmp
        os.makedirs(work_dir, exist_ok=True)
        corpus = args.corpus or os.path.join(work_dir, "corpus.json")
        if not os.path.exists(corpus):
            sys.path.insert(0, _HERE)
            from make_corpus import write_corpus

            write_corpus(corpus, args.min_mb)
        rows = bench(
            corpus, args.vocab_dir, args.workers, args.repeats, work_dir,
            reference_tool=args.reference_tool, reference_path=extra_path, stat=args.stat,
            peers=peers,
        )  # fmt: skip
        table = markdown(rows, corpus, args.stat, args.repeats)
    print(table)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(rows, f, indent=2)
    if args.output_md:
        with open(args.output_md, "w") as f:
            f.write(table + "\n")
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
