"""finetune_llama.py as examples_deepspeed/finetune_hf_llama/finetune_llama.sh runs it:
a tiny LlamaForCausalLM (built from a config, random weights of std 0.2, untied head, 2
key/value heads, weights in several shards) is converted to Megatron checkpoints with
--hf-ckpt-dir / --hf-ckpt-num-shards / --load-mode (torchbin shards at TP=1, safetensors
shards at TP=2), back with --to-hf-ckpt (bit-identical to the original), fine-tuned
from with --finetune --repeated-dataloader, and the fine-tuned model exported again:
its weights moved a little from the Hugging Face ones (a start from random weights would
be ~0.2 away). Bad flags stop the conversion with one line and write nothing.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
import torch

from .gpt_runs import ROOT, parse_log, small_vocab_dataset

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors.torch import load_file  # noqa: E402

MODEL_FLAGS = [
    "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
    "--num-attention-heads", "4", "--num-key-value-heads", "2",
]
TRAIN_FLAGS = MODEL_FLAGS + [
    "--seq-length", "32", "--max-position-embeddings", "32", "--swiglu",
    "--normalization", "rmsnorm", "--layernorm-epsilon", "1e-6",
    "--use-rotary-position-embeddings", "--untie-embeddings-and-output-weights",
    "--disable-bias-linear", "--no-query-key-layer-scaling", "--attention-dropout", "0",
    "--hidden-dropout", "0", "--tokenizer-type", "NullTokenizer", "--vocab-size", "127",
    "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3",
    "--lr", "1e-3", "--lr-warmup-iters", "0", "--weight-decay", "0.1", "--clip-grad", "1",
    "--split", "100,0,0", "--eval-iters", "0", "--log-interval", "1", "--num-workers", "0",
    "--finetune", "--repeated-dataloader",
]


def _tool():
    spec = importlib.util.spec_from_file_location(
        "finetune_llama_under_test", os.path.join(ROOT, "finetune_llama.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def _hf_state(folder) -> dict:
    state = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        state.update(load_file(path))
    return state


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finetune_llama")
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-6, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    safe, bins = tmp / "hf_safetensors", tmp / "hf_bin"
    model.save_pretrained(safe, safe_serialization=True, max_shard_size="100KB")
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # the pytorch_model-0000i-of-00002.bin shards of older Hugging Face releases (the
    # transformers installed here writes safetensors only)
    bins.mkdir()
    shutil.copy(safe / "config.json", bins / "config.json")
    keys = sorted(original)
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:]), start=1):
        torch.save({k: original[k] for k in part}, bins / f"pytorch_model-{i:05d}-of-00002.bin")
    return tmp, safe, bins, original


def test_convert_in_and_out_and_refuse_bad_flags(hf_llama, capsys):
    tmp, safe, bins, original = hf_llama
    tool = _tool()
    n_safe = len(glob.glob(str(safe / "model-*-of-*.safetensors")))
    n_bin = len(glob.glob(str(bins / "pytorch_model-*-of-*.bin")))
    assert n_safe > 1 and n_bin > 1
    assert tool.main(["--hf-ckpt-dir", str(bins), "--hf-ckpt-num-shards", str(n_bin),
                      "--load-mode", "torchbin", "--save", str(tmp / "mds_tp1")]
                     + MODEL_FLAGS) == 0
    assert tool.main(["--hf-ckpt-dir", str(safe), "--hf-ckpt-num-shards", str(n_safe),
                      "--load-mode", "safetensor", "--save", str(tmp / "mds_tp2"),
                      "--tensor-model-parallel-size", "2"] + MODEL_FLAGS) == 0
    assert sorted(os.listdir(tmp / "mds_tp2" / "release")) == ["mp_rank_00", "mp_rank_01"]
    assert (tmp / "mds_tp1" / "latest_checkpointed_iteration.txt").read_text().strip() == (
        "release")
    # back to Hugging Face from the TP=2 checkpoint: the same tensors, bit for bit
    assert tool.main(["--hf-ckpt-dir", str(safe), "--load-mode", "auto", "--to-hf-ckpt",
                      "--load", str(tmp / "mds_tp2"), "--save", str(tmp / "hf_back")]) == 0
    back = _hf_state(tmp / "hf_back")
    assert sorted(back) == sorted(original)
    assert all(torch.equal(back[k], original[k]) for k in original)
    config = transformers.AutoConfig.from_pretrained(tmp / "hf_back")
    assert (config.num_key_value_heads, config.tie_word_embeddings) == (2, False)
    capsys.readouterr()
    # bad input: one line naming the flag or file; nothing written
    cases = [
        (["--hf-ckpt-dir", str(bins), "--load-mode", "torchbin", "--hf-ckpt-num-shards",
          "7"], f"{bins} has no pytorch_model-00001-of-00007.bin"),
        (["--hf-ckpt-dir", str(safe), "--hidden-size", "32"],
         "--hidden-size 32 does not match"),
        (["--hf-ckpt-dir", str(safe), "--to-hf-ckpt", "--save", str(tmp / "x")],
         "--to-hf-ckpt: give --load"),
    ]
    for argv, message in cases:
        bad = tmp / "bad"
        assert tool.main(argv + ["--save", str(bad)] if "--save" not in argv else argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (message, err)
        assert not bad.exists() and not (tmp / "x").exists()


def test_finetune_from_converted_checkpoint(hf_llama):
    tmp, _, _, original = hf_llama
    tool = _tool()
    mds = tmp / "mds_tp1"
    if not mds.exists():
        pytest.skip("needs test_convert_in_and_out_and_refuse_bad_flags's checkpoint")
    data = small_vocab_dataset(str(tmp))
    save = tmp / "finetuned"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "finetune_llama.py"), "--load", str(mds),
         "--save", str(save), "--data-path", data] + TRAIN_FLAGS,
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = parse_log(proc.stdout)
    assert sorted(rows) == [1, 2, 3]
    assert all(float(r["loss"]) < 50 for r in rows.values())
    assert "at iteration 0" in proc.stdout  # the release checkpoint, weights only
    assert tool.main(["--hf-ckpt-dir", str(tmp / "hf_safetensors"), "--to-hf-ckpt",
                      "--load", str(save), "--save", str(tmp / "hf_finetuned")]) == 0
    tuned = _hf_state(tmp / "hf_finetuned")
    moved = max(float((tuned[k] - original[k]).abs().max()) for k in original)
    assert 0 < moved < 0.02, moved
