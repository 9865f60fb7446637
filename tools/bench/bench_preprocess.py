"""Benchmark tools/preprocess_data.py: fast path against the pure-Python reference BPE.

Runs the tool as a user would (a subprocess, start-up included) on a real English corpus
(tools/bench/make_corpus.py, >= 10 MB) with GPT2BPETokenizer --append-eod, at each
--workers count, once with the default fast tokenizer (tiktoken) and once with
`--tokenizer-impl python` (the pure-Python BPE, the algorithm of Megatron-DeepSpeed's own
tool). The two runs are interleaved and repeated; the best wall time of each is reported,
with the CPU seconds (user + sys of the tool and its workers) and the 1-minute load average
at the start of that run, and the outputs of the two must be byte-identical (.bin and .idx).
The fast rows are also compared with the issue's reference figure for Megatron-DeepSpeed's
own tool on a 2-core machine (--reference-wall, wall seconds per worker count).

    python tools/bench/bench_preprocess.py --workers 1 2 --repeats 3 --output-md out.md
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

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


def run_tool(corpus: str, prefix: str, vocab_dir: str, workers: int, impl: str) -> dict:
    """One run of preprocess_data.py; returns wall and CPU seconds, documents and tokens."""
    cmd = [
        sys.executable, _TOOL, "--input", corpus, "--output-prefix", prefix,
        "--vocab", os.path.join(vocab_dir, "gpt2-vocab.json"),
        "--merge-file", os.path.join(vocab_dir, "gpt2-merges.txt"),
        "--tokenizer-type", "GPT2BPETokenizer", "--dataset-impl", "mmap", "--append-eod",
        "--workers", str(workers), "--log-interval", "1000000", "--tokenizer-impl", impl,
    ]  # fmt: skip
    load = os.getloadavg()[0]
    cpu0, start = _children_cpu(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - start, _children_cpu() - cpu0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    match = _DONE.search(proc.stdout)
    if match is None:
        raise RuntimeError(f"no summary line in the output of {' '.join(cmd)}:\n{proc.stdout}")
    return {
        "wall_s": wall, "cpu_s": cpu, "load": load, "docs": int(match[1]), "tokens": int(match[2])
    }  # fmt: skip


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def identical(prefix_a: str, prefix_b: str) -> bool:
    suffix = "_text_document"
    return all(
        filecmp.cmp(prefix_a + suffix + ext, prefix_b + suffix + ext, shallow=False)
        for ext in (".bin", ".idx")
    )


def bench(
    corpus: str,
    vocab_dir: str,
    workers: list[int],
    repeats: int,
    work_dir: str,
    reference_wall: dict[int, float] | None = None,
) -> list:
    """Rows of results: one per (workers, impl), best of `repeats` by wall time."""
    reference_wall = _REFERENCE_WALL if reference_wall is None else reference_wall
    size_mb = os.path.getsize(corpus) / _MB
    rows = []
    for w in workers:
        best: dict[str, dict] = {}
        prefixes = {impl: os.path.join(work_dir, f"{impl}_w{w}") for impl in ("python", "fast")}
        for _ in range(repeats):
            for impl in ("python", "fast"):
                result = run_tool(corpus, prefixes[impl], vocab_dir, w, impl)
                if impl not in best or result["wall_s"] < best[impl]["wall_s"]:
                    best[impl] = result
        same = identical(prefixes["python"], prefixes["fast"])
        for impl in ("python", "fast"):
            r = best[impl]
            rows.append({
                "tool": "pure-Python BPE (reference)" if impl == "python" else "fast (this tool)",
                "impl": impl, "workers": w, "wall_s": r["wall_s"], "cpu_s": r["cpu_s"],
                "mb_per_s": size_mb / r["wall_s"], "docs_per_s": r["docs"] / r["wall_s"],
                "speedup": best["python"]["wall_s"] / r["wall_s"],
                "cpu_speedup": best["python"]["cpu_s"] / r["cpu_s"],
                "load": r["load"], "reference_wall_s": reference_wall.get(w),
                "identical": same, "docs": r["docs"], "tokens": r["tokens"],
            })  # fmt: skip
    return rows


def markdown(rows: list, corpus: str) -> str:
    size_mb = os.path.getsize(corpus) / _MB
    docs = rows[0]["docs"] if rows else 0
    lines = [
        f"Corpus: {size_mb:.1f} MB, {docs} documents; GPT2BPETokenizer, --append-eod, mmap.",
        f"Machine: {_cpu_model()}, {os.cpu_count()} CPUs; {time.strftime('%a %b %d %H:%M:%S %Z %Y')}.",
        "",
        "| tokenizer | workers | wall s | CPU s | load avg | MB/s | docs/s | speed-up (wall) "
        "| speed-up (CPU) | reference figure wall s | vs reference figure (wall) "
        "| .bin/.idx identical |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ref = r["reference_wall_s"]
        vs_ref = f"{ref / r['wall_s']:.2f}x" if ref and r["impl"] != "python" else ""
        lines.append(
            f"| {r['tool']} | {r['workers']} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | "
            f"{r['load']:.1f} | {r['mb_per_s']:.2f} | {r['docs_per_s']:.0f} | "
            f"{r['speedup']:.2f}x | {r['cpu_speedup']:.2f}x | {ref if ref else ''} | {vs_ref} | "
            f"{'yes' if r['identical'] else 'NO'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", help="loose-JSON corpus (built with make_corpus if absent)")
    parser.add_argument("--min-mb", type=float, default=11.0, help="size of a built corpus")
    parser.add_argument("--vocab-dir", default=_default_vocab_dir(), help="GPT-2 vocab folder")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each; best is kept")
    parser.add_argument("--work-dir", help="where outputs go (default: a temporary folder)")
    parser.add_argument("--output-json", help="write the rows as JSON here")
    parser.add_argument("--output-md", help="write the markdown table here")
    args = parser.parse_args(argv)
    if not args.vocab_dir:
        parser.error("--vocab-dir: no gpt2-vocab.json found; set MEGATRON_VOCAB_DIR")

    with tempfile.TemporaryDirectory() as tmp:
        work_dir = args.work_dir or tmp
        os.makedirs(work_dir, exist_ok=True)
        corpus = args.corpus or os.path.join(work_dir, "corpus.json")
        if not os.path.exists(corpus):
            sys.path.insert(0, _HERE)
            from make_corpus import write_corpus

            write_corpus(corpus, args.min_mb)
        rows = bench(corpus, args.vocab_dir, args.workers, args.repeats, work_dir)
        table = markdown(rows, corpus)
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
