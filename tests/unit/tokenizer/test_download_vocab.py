"""dataset/download_vocab.sh offline: copy from MEGATRON_VOCAB_DIR, md5 checks, clear failure.

Network tools are replaced by stubs that fail, so these tests never touch the network.
"""

import hashlib
import os
import shutil
import subprocess

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
SCRIPT = os.path.join(REPO, "dataset", "download_vocab.sh")


def _run(tmp_path, args, vocab_dir):
    stubs = tmp_path / "stubs"
    stubs.mkdir(exist_ok=True)
    for tool in ("wget", "curl"):
        stub = stubs / tool
        stub.write_text('#!/bin/sh\necho "$0: offline" >&2\nexit 1\n')
        stub.chmod(0o755)
    env = dict(os.environ, PATH=f"{stubs}:{os.environ['PATH']}")
    env.pop("MEGATRON_VOCAB_DIR", None)
    if vocab_dir is not None:
        env["MEGATRON_VOCAB_DIR"] = str(vocab_dir)
    return subprocess.run(
        ["bash", SCRIPT, *args], env=env, capture_output=True, text=True, timeout=60
    )


def _md5(path):
    return hashlib.md5(open(path, "rb").read()).hexdigest()


@pytest.mark.real_vocab
def test_copies_gpt2_files_and_checks_md5(tmp_path, vocab_dir):
    target = tmp_path / "out"
    res = _run(tmp_path, [str(target)], vocab_dir)
    assert res.returncode == 0, res.stderr
    assert "copied gpt2-vocab.json from MEGATRON_VOCAB_DIR" in res.stdout
    assert "md5 ok: gpt2-merges.txt" in res.stdout
    assert _md5(target / "gpt2-vocab.json") == "dffec25a898b1f5e569bec4dffd7e5c0"
    assert _md5(target / "gpt2-merges.txt") == "75a37753dd7a28a2c5df80c28bf06e4e"
    assert not (target / "bert-large-uncased-vocab.txt").exists()


@pytest.mark.real_vocab
def test_bert_files_and_default_target(tmp_path, vocab_dir):
    local = tmp_path / "local"
    local.mkdir()
    for name in ("gpt2-vocab.json", "gpt2-merges.txt", "bert-large-uncased-vocab.txt"):
        shutil.copy(os.path.join(vocab_dir, name), local / name)
    (local / "bert-large-cased-vocab.txt").write_text("[PAD]\n[UNK]\n")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    res = subprocess.run(
        ["bash", SCRIPT, "bert"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, MEGATRON_VOCAB_DIR=str(local)),
    )
    assert res.returncode == 0, res.stderr
    assert sorted(os.listdir(cwd)) == [
        "bert-large-cased-vocab.txt",
        "bert-large-uncased-vocab.txt",
        "gpt2-merges.txt",
        "gpt2-vocab.json",
    ]


def test_md5_mismatch_fails(tmp_path, vocab_dir):
    local = tmp_path / "local"
    local.mkdir()
    shutil.copy(os.path.join(vocab_dir, "gpt2-merges.txt"), local / "gpt2-merges.txt")
    (local / "gpt2-vocab.json").write_text("{}")
    res = _run(tmp_path, [str(tmp_path / "out")], local)
    assert res.returncode != 0
    assert "gpt2-vocab.json has md5 99914b932bd37a50b983c5e7c90ae93b, expected dffec25a" in (
        res.stderr
    )


def test_neither_source_works(tmp_path):
    res = _run(tmp_path, [str(tmp_path / "out")], tmp_path / "empty")
    assert res.returncode != 0
    assert "ERROR: could not get gpt2-vocab.json: not in MEGATRON_VOCAB_DIR" in res.stderr
    assert (
        "download of https://s3.amazonaws.com/models.huggingface.co/bert/gpt2-vocab.json"
        " failed" in res.stderr
    )
    assert not (tmp_path / "out" / "gpt2-vocab.json").exists()
