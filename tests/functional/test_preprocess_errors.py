"""tools/preprocess_data.py on inputs and outputs it cannot use: one `error:` line naming the
file or flag, exit status 1, no traceback, and no .bin/.idx (or temporary file) left behind.

The command line runs as a subprocess on tiny inputs; the cases that depend on the machine
(a read-only folder, which root may write anyway) are also run in-process with the failure
injected.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "preprocess_data.py")
CORPUS = os.path.join(ROOT, "tests", "data", "corpus_small.jsonl")


def gpt2_flags(vocab_dir: str) -> list[str]:
    return [
        "--vocab", os.path.join(vocab_dir, "gpt2-vocab.json"),
        "--merge-file", os.path.join(vocab_dir, "gpt2-merges.txt"),
        "--tokenizer-type", "GPT2BPETokenizer", "--append-eod",
    ]  # fmt: skip


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, TOOL, *args], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one error line of a failed run (the tokenizer's progress lines aside)."""
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def no_outputs(folder) -> bool:
    return not [n for n in os.listdir(folder) if n.endswith((".bin", ".idx", ".tmp"))]


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("preprocess_data_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


@pytest.fixture
def truncated_gz(tmp_path):
    """The small corpus gzipped, cut in the middle of its compressed stream."""
    data = gzip.compress(open(CORPUS, "rb").read())
    path = tmp_path / "corpus.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    return str(path)


def test_truncated_gz_input(truncated_gz, tmp_path, vocab_dir):
    out = tmp_path / "out"
    proc = run_tool("--input", truncated_gz, "--output-prefix", str(out / "c"),
                    *gpt2_flags(vocab_dir), "--workers", "2")  # fmt: skip
    line = error_line(proc)
    assert line.startswith(f"error: {truncated_gz}:") and "truncated gzip file" in line, line
    lineno = int(line.split(":")[2])
    assert 1 < lineno < sum(1 for _ in open(CORPUS, "rb"))
    assert not out.exists()  # the folder it created for the output is gone again
    assert no_outputs(tmp_path)


def test_gz_input_that_is_not_gzip(tmp_path, vocab_dir):
    fake = tmp_path / "corpus.jsonl.gz"
    fake.write_bytes(open(CORPUS, "rb").read())
    proc = run_tool("--input", str(fake), "--output-prefix", str(tmp_path / "c"),
                    *gpt2_flags(vocab_dir))  # fmt: skip
    assert error_line(proc) == f"error: {fake}: not a gzip file, although its name ends in .gz"
    assert no_outputs(tmp_path)


def test_output_prefix_under_a_regular_file(tmp_path, vocab_dir):
    somefile = tmp_path / "somefile.txt"
    somefile.write_text("not a folder\n")
    prefix = str(somefile / "sub" / "out")
    proc = run_tool("--input", CORPUS, "--output-prefix", prefix, *gpt2_flags(vocab_dir))
    assert error_line(proc) == f"error: --output-prefix {prefix}: {somefile} is a file, not a folder"
    assert somefile.read_text() == "not a folder\n" and no_outputs(tmp_path)


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0,
    reason="root may write in a read-only folder; test_unwritable_output_folder_in_process "
    "covers the message",
)
def test_read_only_output_folder(tmp_path, vocab_dir):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        proc = run_tool("--input", CORPUS, "--output-prefix", str(folder / "c"),
                        *gpt2_flags(vocab_dir))  # fmt: skip
    finally:
        folder.chmod(0o755)
    prefix = folder / "c"
    assert error_line(proc) == (
        f"error: --output-prefix {prefix}: cannot write in folder {folder} (Permission denied)"
    )
    assert not os.listdir(folder)


def test_unwritable_output_folder_in_process(tool, tmp_path, monkeypatch, capsys, vocab_dir):
    """The write probe failing as it does in a read-only folder (the tokenizer is never
    built: the output folder is checked first)."""

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tool.tempfile, "mkstemp", refuse)
    monkeypatch.setattr(tool, "_build", lambda *a: pytest.fail("ran past the folder check"))
    prefix = tmp_path / "ro" / "deeper" / "c"
    code = tool.main(["--input", CORPUS, "--output-prefix", str(prefix), *gpt2_flags(vocab_dir)])
    assert code == 1
    err = capsys.readouterr().err
    assert err == (
        f"error: --output-prefix {prefix}: cannot write in folder {prefix.parent} "
        "(Permission denied)\n"
    )
    assert os.listdir(tmp_path) == []  # the folders it made are removed again


def test_damaged_gz_in_process(tool, truncated_gz, tmp_path):
    """Line counting (--partitions) and reading name the file; corrupt data is told apart
    from a short file."""
    with pytest.raises(tool.InputError, match=f"^{truncated_gz}: truncated gzip file"):
        tool.count_lines(truncated_gz)
    data = bytearray(gzip.compress(open(CORPUS, "rb").read()))
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    corrupt = tmp_path / "corrupt.jsonl.gz"
    corrupt.write_bytes(bytes(data))
    with pytest.raises(tool.InputError, match=f"^{corrupt}:[0-9]+: corrupt gzip data"):
        for _ in tool.iter_chunks([tool.Segment(str(corrupt))], 8):
            pass
