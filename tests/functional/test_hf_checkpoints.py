"""Hugging Face checkpoints in and out through tools/checkpoint_util.py, end to end.

Tiny GPT2LMHeadModel (tied head, GPT-2 BPE files, one model.safetensors) and
LlamaForCausalLM (4 heads, 2 key/value heads, untied head, SentencePiece tokenizer.model,
safetensors sharded at 100KB) are built with transformers from a config, with random
weights (norms and biases perturbed too), and converted in with the CLI at TP=1 and at
TP=2 x PP=2. One 4-rank gloo world then, through our own model classes (GPTModel built
from the checkpoint's saved args by --use-checkpoint-args, weights read by
load_checkpoint, stage outputs passed by send/recv):

* computes the logits of every imported checkpoint: they equal HF's (fp32, one thread,
  atol = rtol = 1e-4);
* trains with pretrain_gpt.py's pretrain(): a tiny LLaMA 20 iterations at TP=2 (x DP=2),
  a tiny GPT 20 iterations under DeepSpeed ZeRO-2 (DP=4), the LLaMA 20 iterations under
  DeepSpeed's pipeline engine at TP=2 x PP=2, and small-vocabulary LLaMAs 6 iterations
  under ZeRO-2 in bf16 and under ZeRO-3 (DP=4); and computes their logits (the DeepSpeed
  checkpoints converted to Megatron ones by the CLI).

Exported with the CLI (the TP=2 Megatron checkpoint and the DeepSpeed save folders), the
trained models give those logits in transformers, and tools/generate_samples_gpt.py's
greedy continuations of the LLaMA and the GPT equal model.generate(do_sample=False) token
for token.
The bf16 model is exported with its fp32 master weights. HF -> Megatron (TP=2 x PP=2) ->
HF gives bit-identical tensors and the same config (as transformers reads it).
Bad input stops the CLI with one line naming the file or flag, and nothing in --save-dir.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from ..unit.tokenizer.test_gpt_sentencepiece import corpus_texts, train_sentencepiece
from .gpt_runs import (
    ROOT,
    launch,
    parse_log,
    preprocess,
    pretrain_in_process,
    small_vocab_dataset,
    tiny_gpt_args,
)
from .test_llama_generate import _preprocess as preprocess_sentencepiece
from .test_llama_generate import _train_args as llama_train_args
from .test_llama_training import LLAMA_FLAGS

pytestmark = [pytest.mark.slow, pytest.mark.real_vocab]  # GPT2LMHeadModel of 50257 ids
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("sentencepiece")

from safetensors.torch import load_file  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

TOL = 1e-4  # fp32 logits, ours vs transformers (differences of ~1e-6 seen)
SEQ = 16
ITERS = 20
OUT_LEN = 10
SEQ_LENGTH = 32  # of the trained LLaMA (tests/functional/test_llama_generate.py's ARCH)
PROMPTS = ["Hello world", "The history of the Python programming language began in", "Data"]
GPT2_VOCAB = 50257
SP_VOCAB = 800
NULL_VOCAB = 101  # NullTokenizer --vocab-size 100: ids 0..99 and eod 100
BF16_ITERS = 6


def _tool():
    spec = importlib.util.spec_from_file_location(
        "checkpoint_util_hf_checkpoints", os.path.join(ROOT, "tools", "checkpoint_util.py")
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def _convert(*argv: str) -> int:
    return _tool().main(list(argv))


def _perturb(model):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _hf_state(folder: str) -> dict:
    state = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        state.update(load_file(path))
    return state


def _config(folder: str) -> dict:
    """The config as transformers reads it (spellings of config.json normalised)."""
    config = AutoConfig.from_pretrained(folder).to_dict()
    for key in ("transformers_version", "_name_or_path"):
        config.pop(key, None)
    return config


def _hf_logits(folder: str, tokens: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(tokens).logits


# ----------------------------------------------------------------------------------------
# The 4-rank world
# ----------------------------------------------------------------------------------------


def _our_logits(load_dir: str, tokens: torch.Tensor):
    """Logits of the checkpoint in load_dir through GPTModel, its layout and model flags
    taken from the checkpoint (--use-checkpoint-args); returned by the last stage's first
    tensor rank of data-parallel rank 0 (None elsewhere)."""
    import torch.distributed as dist

    from megatron import get_args, mpu
    from megatron.checkpointing import load_model_weights_only
    from megatron.global_vars import reset_global_variables
    from megatron.initialize import initialize_megatron
    from megatron.model import GPTModel
    from megatron.model.config import config_from_args
    from megatron.text_generation_utils import get_batch

    reset_global_variables()
    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    dist.barrier()
    initialize_megatron(
        args_list=["--load", load_dir, "--use-checkpoint-args", "--micro-batch-size", "1"]
    )
    args = get_args()
    first, last = mpu.is_pipeline_first_stage(), mpu.is_pipeline_last_stage()
    model = GPTModel(config_from_args(args), num_tokentypes=0, parallel_output=False,
                     pre_process=first, post_process=last)  # fmt: skip
    load_model_weights_only(model, args.load)
    model.eval()
    tokens, mask, positions = get_batch(tokens)
    b, s = tokens.shape
    with torch.no_grad():
        if not first:
            hidden = torch.empty(s, b, args.hidden_size)
            dist.recv(hidden, mpu.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
        out = model(tokens, positions, mask)
        if not last:
            dist.send(out.contiguous(), mpu.get_pipeline_model_parallel_next_rank())
    dist.barrier()
    keep = last and mpu.get_tensor_model_parallel_rank() == 0
    keep = keep and mpu.get_data_parallel_rank() == 0
    layout = (args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    return (out.clone(), layout) if keep else None


def _world(rank, world_size, plan):
    """Imported checkpoints' logits, then the training runs, then theirs:
    {name: (logits, (tp, pp))} gathered from the ranks that hold them."""
    import torch.distributed as dist

    from megatron import mpu
    from megatron.global_vars import reset_global_variables

    results = {}
    for name, load_dir, tokens in plan["imported"]:
        results[name] = _our_logits(load_dir, tokens)
    for name, argv, tokenizer_type in plan["train"]:
        reset_global_variables()
        if mpu.model_parallel_is_initialized():
            mpu.destroy_model_parallel()
        results[f"{name}_log"] = parse_log(pretrain_in_process(argv, tokenizer_type))
    if rank == 0:  # DeepSpeed -> Megatron TP=1 with the CLI
        for src, dst in plan["deepspeed_convert"]:
            assert _convert("--load-dir", src, "--save-dir", dst) == 0
    dist.barrier()
    for name, load_dir, tokens in plan["trained"]:
        results[name] = _our_logits(load_dir, tokens)
    return {k: v for k, v in results.items() if v is not None and v != {}}


# ----------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("hf_checkpoints")


@pytest.fixture(scope="module")
def sp_model(work):
    return train_sentencepiece(corpus_texts(), str(work / "tokenizer"))


def _tokens(vocab: int, b: int = 2, s: int = SEQ) -> torch.Tensor:
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def hf_models(work, sp_model, vocab_dir):
    """{name: {'dir', 'tokens', 'logits'}}: the two HF models as saved, their reference
    logits, and their Megatron checkpoints at TP=1 and TP=2 x PP=2 written by the CLI."""
    torch.manual_seed(1234)
    gpt2 = _perturb(GPT2LMHeadModel(GPT2Config(
        n_layer=2, n_embd=64, n_head=4, n_positions=32, vocab_size=GPT2_VOCAB, n_inner=96,
        bos_token_id=GPT2_VOCAB - 1, eos_token_id=GPT2_VOCAB - 1,
    )))  # fmt: skip
    llama = _perturb(LlamaForCausalLM(LlamaConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, vocab_size=SP_VOCAB, max_position_embeddings=64,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=2,
    )))  # fmt: skip
    models = {}
    for name, model, vocab in (("gpt2", gpt2, GPT2_VOCAB), ("llama", llama, SP_VOCAB)):
        folder = str(work / f"hf_{name}")
        if name == "gpt2":
            model.save_pretrained(folder)
            for src, dst in (("gpt2-vocab.json", "vocab.json"), ("gpt2-merges.txt", "merges.txt")):
                shutil.copy(os.path.join(vocab_dir, src), os.path.join(folder, dst))
        else:
            model.save_pretrained(folder, max_shard_size="100KB")
            assert os.path.isfile(os.path.join(folder, "model.safetensors.index.json"))
            shutil.copy(sp_model, os.path.join(folder, "tokenizer.model"))
        tokens = _tokens(vocab)
        with torch.no_grad():
            logits = model(tokens).logits
        entry = {"dir": folder, "tokens": tokens, "logits": logits, "vocab": vocab}
        for tp, pp in ((1, 1), (2, 2)):
            out = str(work / f"megatron_{name}_tp{tp}_pp{pp}")
            assert _convert("--loader", "hf", "--saver", "megatron", "--load-dir", folder,
                            "--save-dir", out, "--target-tensor-parallel-size", str(tp),
                            "--target-pipeline-parallel-size", str(pp)) == 0  # fmt: skip
            entry[tp, pp] = out
        models[name] = entry
    return models


@pytest.fixture(scope="module")
def trained(work, sp_model, vocab_dir):
    """Data and training flags of the tiny LLaMA (TP=2) and the tiny GPT (ZeRO-2)."""
    tokenizer = ["--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", sp_model]
    llama_data = preprocess_sentencepiece(sp_model, str(work / "llama_data"))
    llama = llama_train_args(llama_data, tokenizer)
    changes = {"--train-iters": str(ITERS), "--lr-decay-iters": str(ITERS),
               "--micro-batch-size": "4", "--global-batch-size": "8"}  # fmt: skip
    for flag, value in changes.items():
        llama[llama.index(flag) + 1] = value
    llama += ["--tensor-model-parallel-size", "2", "--save-interval", str(ITERS)]
    # the same model under DeepSpeed's pipeline engine (layer files, untied head) at TP=2
    llama_pipe = llama + ["--deepspeed", "--zero-stage", "1", "--pipeline-model-parallel-size",
                          "2", "--save", str(work / "trained_llama_pipe")]  # fmt: skip
    llama += ["--save", str(work / "trained_llama")]
    gpt = tiny_gpt_args(preprocess(str(work), vocab_dir), vocab_dir, ITERS)
    gpt[gpt.index("--micro-batch-size") + 1] = "2"
    gpt += ["--deepspeed", "--zero-stage", "2", "--save", str(work / "trained_gpt_ds"),
            "--save-interval", str(ITERS)]  # fmt: skip
    # an untied LLaMA in bf16 under ZeRO-2 (DP=4): exported from its fp32 partitions
    bf16 = tiny_gpt_args(small_vocab_dataset(str(work)), vocab_dir, BF16_ITERS)
    for flag in ("--vocab-file", "--merge-file", "--tokenizer-type", "--hidden-dropout",
                 "--attention-dropout", "--eval-iters", "--micro-batch-size"):  # fmt: skip
        del bf16[bf16.index(flag) : bf16.index(flag) + 2]
    bf16 += LLAMA_FLAGS + [
        "--micro-batch-size", "2", "--tokenizer-type", "NullTokenizer", "--vocab-size",
        str(NULL_VOCAB - 1), "--bf16", "--deepspeed", "--zero-stage", "2", "--save",
        str(work / "trained_llama_bf16"), "--save-interval", str(BF16_ITERS),
    ]  # fmt: skip
    # the same in fp32 under ZeRO-3 (the module's weights partitioned: read from the fp32 ones)
    zero3 = [a for a in bf16 if a != "--bf16"]
    zero3[zero3.index("--zero-stage") + 1] = "3"
    zero3[zero3.index("--save") + 1] = str(work / "trained_llama_zero3")
    return {"llama": llama, "gpt": gpt, "llama_pipe": llama_pipe, "llama_bf16": bf16,
            "llama_zero3": zero3}  # fmt: skip


@pytest.fixture(scope="module")
def world(work, hf_models, trained):
    imported = [
        (f"{name}_tp{tp}_pp{pp}", m[tp, pp], m["tokens"])
        for name, m in hf_models.items()
        for tp, pp in ((1, 1), (2, 2))
    ]
    plan = {
        "imported": imported,
        "train": [("llama", trained["llama"], "GPTSentencePieceTokenizer"),
                  ("gpt", trained["gpt"], "GPT2BPETokenizer"),
                  ("llama_pipe", trained["llama_pipe"], "GPTSentencePieceTokenizer"),
                  ("llama_bf16", trained["llama_bf16"], "NullTokenizer"),
                  ("llama_zero3", trained["llama_zero3"], "NullTokenizer")],
        "deepspeed_convert": [
            (str(work / "trained_gpt_ds"), str(work / "trained_gpt_megatron")),
            (str(work / "trained_llama_pipe"), str(work / "trained_llama_pipe_megatron")),
            (str(work / "trained_llama_bf16"), str(work / "trained_llama_bf16_megatron")),
            (str(work / "trained_llama_zero3"), str(work / "trained_llama_zero3_megatron")),
        ],
        "trained": [
            ("trained_llama_pipe", str(work / "trained_llama_pipe_megatron"), _tokens(SP_VOCAB)),
            ("trained_llama_bf16", str(work / "trained_llama_bf16_megatron"),
             _tokens(NULL_VOCAB)),
            ("trained_llama_zero3", str(work / "trained_llama_zero3_megatron"),
             _tokens(NULL_VOCAB)),
            ("trained_llama", str(work / "trained_llama"), _tokens(SP_VOCAB)),
            ("trained_gpt", str(work / "trained_gpt_megatron"), _tokens(GPT2_VOCAB)),
        ],
    }
    from ..dist_utils import run_distributed

    merged = {}
    for result in run_distributed(_world, 4, args=(plan,), timeout=900):
        merged.update(result)
    return merged


@pytest.fixture(scope="module")
def exported(work, world):
    """The trained models exported with the CLI: {name: HF folder}."""
    out = {}
    pairs = (("llama", "trained_llama"), ("gpt", "trained_gpt_ds"),
             ("llama_pipe", "trained_llama_pipe"), ("llama_bf16", "trained_llama_bf16"),
             ("llama_zero3", "trained_llama_zero3"))  # fmt: skip
    for name, src in pairs:
        out[name] = str(work / f"exported_{name}")
        assert _convert("--loader", "megatron", "--saver", "hf", "--load-dir", str(work / src),
                        "--save-dir", out[name]) == 0  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------


def test_imported_checkpoint_layout_and_args(hf_models):
    """release/ with one rank folder per (TP, PP) rank; the saved args hold the model and
    tokenizer flags and the layout."""
    for name, m in hf_models.items():
        for tp, pp in ((1, 1), (2, 2)):
            folder = m[tp, pp]
            with open(os.path.join(folder, "latest_checkpointed_iteration.txt")) as f:
                assert f.read() == "release"
            ranks = sorted(os.listdir(os.path.join(folder, "release")))
            if pp == 1:
                assert ranks == ["mp_rank_00"]
            else:
                assert ranks == ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000",
                                 "mp_rank_01_001"]  # fmt: skip
            state = torch.load(os.path.join(folder, "release", ranks[0], "model_optim_rng.pt"),
                               weights_only=False)  # fmt: skip
            args = state["args"]
            assert state["iteration"] == 0
            assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (tp, pp)
            assert args.num_layers == 2 and args.hidden_size == 64 and args.ffn_hidden_size == 96
            assert args.padded_vocab_size % (128 * tp) == 0
            assert args.padded_vocab_size >= m["vocab"] > args.padded_vocab_size - 128 * tp
            if name == "llama":
                assert args.tokenizer_type == "GPTSentencePieceTokenizer"
                assert args.swiglu and args.num_key_value_heads == 2 and args.rope_theta == 500000
                assert args.untie_embeddings_and_output_weights
            else:
                assert args.tokenizer_type == "GPT2BPETokenizer" and args.add_position_embedding
                assert not args.untie_embeddings_and_output_weights


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("layout", [(1, 1), (2, 2)])
def test_imported_logits_equal_transformers(world, hf_models, name, layout):
    m = hf_models[name]
    logits, got_layout = world[f"{name}_tp{layout[0]}_pp{layout[1]}"]
    assert got_layout == layout  # taken from the checkpoint by --use-checkpoint-args
    assert logits.shape[:2] == (2, SEQ) and logits.shape[2] >= m["vocab"]
    torch.testing.assert_close(logits[..., : m["vocab"]], m["logits"], atol=TOL, rtol=TOL)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_round_trip_is_bit_identical(work, hf_models, name):
    """HF -> Megatron TP=2 x PP=2 -> HF: the same tensors bit for bit, the same config,
    the tokenizer files back."""
    m = hf_models[name]
    out = str(work / f"round_trip_{name}")
    argv = ["--loader", "megatron", "--saver", "hf", "--load-dir", m[2, 2], "--save-dir", out]
    if name == "llama":
        argv += ["--max-shard-size", "100KB"]
    assert _convert(*argv) == 0
    want, got = _hf_state(m["dir"]), _hf_state(out)
    assert sorted(want) == sorted(got)
    for key in want:
        assert want[key].dtype == got[key].dtype and torch.equal(want[key], got[key]), key
    assert _config(out) == _config(m["dir"])
    if name == "llama":
        assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
        assert os.path.isfile(os.path.join(out, "tokenizer.model"))
    else:
        assert os.path.isfile(os.path.join(out, "model.safetensors"))
        assert os.path.isfile(os.path.join(out, "vocab.json"))
    assert not [n for n in os.listdir(work) if ".tmp-" in n]  # the temporary folder is gone


def test_training_ran(world):
    for name, iters in (("llama", ITERS), ("gpt", ITERS), ("llama_pipe", ITERS),
                        ("llama_bf16", BF16_ITERS), ("llama_zero3", BF16_ITERS)):  # fmt: skip
        rows = world[f"{name}_log"]
        assert sorted(rows) == list(range(1, iters + 1)), name
        assert float(rows[iters]["loss"]) < float(rows[1]["loss"]), name


@pytest.mark.parametrize(
    "name,vocab",
    [("llama", SP_VOCAB), ("gpt", GPT2_VOCAB), ("llama_pipe", SP_VOCAB),
     ("llama_bf16", NULL_VOCAB), ("llama_zero3", NULL_VOCAB)],
)  # fmt: skip
def test_trained_model_exported_logits_equal_ours(world, exported, name, vocab):
    """The TP=2 LLaMA, the ZeRO-2 GPT, the LLaMA of DeepSpeed's pipeline engine (TP=2 x
    PP=2) and the ZeRO-2 (bf16) and ZeRO-3 LLaMAs, exported, give in transformers the logits
    our model gives from their checkpoints (the DeepSpeed ones converted by the CLI)."""
    ours, layout = world[f"trained_{name}"]
    assert layout == ((2, 1) if name == "llama" else (1, 1))
    config = json.load(open(os.path.join(exported[name], "config.json")))
    assert config["architectures"] == (["GPT2LMHeadModel"] if name == "gpt"
                                       else ["LlamaForCausalLM"])  # fmt: skip
    assert config["vocab_size"] == vocab  # the padding rows are cut off
    theirs = _hf_logits(exported[name], _tokens(vocab))
    torch.testing.assert_close(ours[..., :vocab], theirs, atol=TOL, rtol=TOL)


def test_half_precision_zero_exports_fp32_master_weights(work, exported):
    """bf16 under ZeRO-2: the exported weights are the fp32 ones of the optimizer partitions
    (DeepSpeed's zero_to_fp32), which round to the bf16 module weights; no tokenizer files
    for NullTokenizer, and the vocabulary is its 101 ids."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folder = work / "trained_llama_bf16"
    fp32 = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=f"global_step{BF16_ITERS}")
    module = torch.load(folder / f"global_step{BF16_ITERS}" / "mp_rank_00_model_states.pt",
                        weights_only=False)["module"]  # fmt: skip
    hf = _hf_state(exported["llama_bf16"])
    pairs = (("model.embed_tokens.weight", "language_model.embedding.word_embeddings.weight"),
             ("lm_head.weight", "language_model.output_layer.weight"))  # fmt: skip
    for ours, theirs in pairs:
        assert hf[ours].dtype == torch.float32 and module[theirs].dtype == torch.bfloat16
        assert torch.equal(hf[ours], fp32[theirs][:NULL_VOCAB])
        assert torch.equal(hf[ours].bfloat16(), module[theirs][:NULL_VOCAB])
    assert not torch.equal(hf["lm_head.weight"], module[pairs[1][1]][:NULL_VOCAB].float())
    assert sorted(os.listdir(exported["llama_bf16"])) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("name", ["llama", "gpt"])
def test_greedy_generation_equals_transformers(work, world, exported, sp_model, vocab_dir, name):
    """tools/generate_samples_gpt.py (--greedy, model flags from the checkpoint; the LLaMA at
    TP=2, the GPT trained under ZeRO-2 and converted, on one rank) continues each prompt
    with the tokens of model.generate(do_sample=False) of the exported model."""
    from megatron.hf_interop import TokenizerInfo

    load, nproc = {"llama": ("trained_llama", 2), "gpt": ("trained_gpt_megatron", 1)}[name]
    prompts, out = work / f"prompts_{name}.txt", work / f"generated_{name}.jsonl"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    launch(nproc, ["--load", str(work / load), "--use-checkpoint-args", "--greedy",
                   "--micro-batch-size", "2", "--sample-input-file", str(prompts),
                   "--sample-output-file", str(out), "--out-seq-length", str(OUT_LEN),
                   "--log-probs"],
           script=os.path.join("tools", "generate_samples_gpt.py"))  # fmt: skip
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS
    if name == "llama":
        tok = TokenizerInfo("GPTSentencePieceTokenizer", tokenizer_model=sp_model).build()
    else:
        tok = TokenizerInfo("GPT2BPETokenizer",
                            vocab_file=os.path.join(vocab_dir, "gpt2-vocab.json"),
                            merge_file=os.path.join(vocab_dir, "gpt2-merges.txt")).build()
    model = AutoModelForCausalLM.from_pretrained(exported[name]).eval()
    assert model.config.eos_token_id == tok.eod
    for row, prompt in zip(rows, PROMPTS):
        ids = torch.tensor([tok.tokenize(prompt)])
        room = min(OUT_LEN, SEQ_LENGTH - ids.size(1))  # ours stops at --seq-length tokens
        with torch.no_grad():
            full = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=room, pad_token_id=tok.eod)  # fmt: skip
        theirs = full[0, ids.size(1) :].tolist()
        if row["finished"]:  # ours stops before the eod that HF emits
            assert theirs == row["tokens"] + [tok.eod], prompt
        else:
            assert len(row["tokens"]) == room and theirs == row["tokens"], prompt


# ----------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------


def _bad_cases(work, hf_models) -> list:
    gpt2 = hf_models["gpt2"]["dir"]
    no_config = work / "bad_no_config"
    shutil.copytree(gpt2, no_config)
    os.remove(no_config / "config.json")
    mistral = work / "bad_arch"
    shutil.copytree(gpt2, mistral)
    config = json.load(open(mistral / "config.json"))
    config.update(architectures=["MistralForCausalLM"], model_type="mistral")
    (mistral / "config.json").write_text(json.dumps(config))
    truncated = work / "bad_truncated"
    shutil.copytree(gpt2, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    hf_in = ["--loader", "hf", "--saver", "megatron"]
    return [
        (hf_in + ["--load-dir", str(no_config)], str(no_config / "config.json")),
        (hf_in + ["--load-dir", str(mistral)], "MistralForCausalLM"),
        (hf_in + ["--load-dir", str(truncated)], str(weights)),
        (hf_in + ["--load-dir", hf_models["llama"]["dir"], "--target-tensor-parallel-size", "3"],
         "--target-tensor-parallel-size 3: --num-attention-heads (4)"),
        (["--loader", "megatron", "--saver", "hf", "--load-dir", hf_models["gpt2"][1, 1],
          "--model-class", "llama"], "LayerNorm"),
    ]  # fmt: skip


def test_bad_input_one_line_and_nothing_written(work, hf_models, capsys):
    cases = _bad_cases(work, hf_models)
    for i, (argv, named) in enumerate(cases):
        save = work / f"bad_out_{i}"
        capsys.readouterr()
        assert _convert(*argv, "--save-dir", str(save)) == 1, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("checkpoint_util.py: error: ")
        assert named in err, (named, err)
        assert not save.exists(), argv
    assert not [n for n in os.listdir(work) if ".tmp-" in n]
    # the same as a user runs it: exit status 1, one line on stderr
    argv, named = cases[2]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "checkpoint_util.py"), *argv,
         "--save-dir", str(work / "bad_out_cli")],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=120,
    )  # fmt: skip
    lines = [ln for ln in proc.stderr.splitlines() if "checkpoint_util.py: error" in ln]
    assert proc.returncode == 1 and len(lines) == 1 and named in lines[0], proc.stderr
    assert not (work / "bad_out_cli").exists()
