"""Hugging Face GPT2LMHeadModel / LlamaForCausalLM <-> this project's canonical checkpoint
state (megatron/hf_interop.py), in this process, on CPU, with nothing downloaded.

HF models are built from a config with random weights (their norms perturbed too, so that a
swapped norm shows) and saved as transformers saves them (safetensors, sharded safetensors)
or as older versions did (pytorch_model.bin, sharded with an index). Imported, they load
into GPTModel at TP=1 and give the HF model's logits (fp32, 1e-4); written back they reload
with AutoModelForCausalLM to the identical tensors and logits. Megatron models go the other
way. Tokenizers (the real GPT-2 BPE, a SentencePiece model and a tokenizer.json trained on
the test corpus) come back through AutoTokenizer with the ids the Megatron tokenizer gives.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil

import pytest
import torch

from megatron import mpu
from megatron.arguments import build_parser, parse_args, validate_args
from megatron.checkpoint_reshape import flatten_state, unflatten_state
from megatron.checkpointing import CHECKPOINT_RUN_ARGS, CHECKPOINT_SHAPE_ARGS
from megatron.hf_interop import (
    HFInteropError,
    TokenizerInfo,
    find_tokenizer,
    read_hf_model,
    train_command,
    write_hf_model,
)
from megatron.model import GPTModel
from megatron.model.config import config_from_args

from .tokenizer.test_gpt_sentencepiece import (
    corpus_texts,
    train_sentencepiece,
    train_tokenizer_json,
)

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("sentencepiece")

from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

WORD = ("language_model", "embedding", "word_embeddings", "weight")
OUTPUT = ("language_model", "output_layer", "weight")
VOCAB = 800  # the trained SentencePiece model and tokenizer.json
SEQ = 24


@pytest.fixture(autouse=True)
def _seeded_no_env(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    mpu.model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234)


@pytest.fixture(scope="module")
def texts():
    return corpus_texts()[:60]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return train_sentencepiece(corpus_texts(), str(tmp_path_factory.mktemp("spm") / "tokenizer"))


@pytest.fixture(scope="module")
def tok_json(tmp_path_factory):
    return train_tokenizer_json(corpus_texts(), str(tmp_path_factory.mktemp("tj") / "tokenizer.json"))


# ----------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------


def _perturb(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights everywhere, norms and biases included (not ones and zeros)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _llama(kv: int, tied: bool, theta: float = 500000.0, vocab: int = VOCAB):
    config = LlamaConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=kv,
        intermediate_size=96, vocab_size=vocab, max_position_embeddings=64, rope_theta=theta,
        rms_norm_eps=1e-5, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return _perturb(LlamaForCausalLM(config))


def _gpt2(vocab: int, activation: str = "gelu_new"):
    config = GPT2Config(
        n_layer=2, n_embd=64, n_head=4, n_positions=32, vocab_size=vocab, n_inner=96,
        activation_function=activation, bos_token_id=vocab - 1, eos_token_id=vocab - 1,
    )  # fmt: skip
    return _perturb(GPT2LMHeadModel(config))


def _save(model, folder: str, fmt: str) -> None:
    """As transformers saves (safetensors, sharded) or as older versions did (.bin)."""
    if fmt == "safetensors":
        model.save_pretrained(folder)
    elif fmt == "sharded":
        model.save_pretrained(folder, max_shard_size="100KB")
        assert os.path.isfile(os.path.join(folder, "model.safetensors.index.json"))
    else:
        model.config.save_pretrained(folder)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight")
        if fmt == "bin":
            torch.save(state, os.path.join(folder, "pytorch_model.bin"))
            return
        keys = list(state)
        halves = (keys[: len(keys) // 2], keys[len(keys) // 2 :])
        weight_map = {}
        for i, part in enumerate(halves, start=1):
            name = f"pytorch_model-{i:05d}-of-00002.bin"
            torch.save({k: state[k] for k in part}, os.path.join(folder, name))
            weight_map.update({k: name for k in part})
        with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)


def _add_tokenizer(folder: str, kind: str, sp_model: str, tok_json: str, vocab_dir: str | None):
    if kind == "sentencepiece":
        shutil.copy(sp_model, os.path.join(folder, "tokenizer.model"))
    elif kind == "tokenizer.json":  # as transformers saves one: with its tokenizer_config.json
        PreTrainedTokenizerFast(tokenizer_file=tok_json, eos_token="</s>", bos_token="<s>",
                                pad_token="<pad>").save_pretrained(folder)  # fmt: skip
    else:
        shutil.copy(os.path.join(vocab_dir, "gpt2-vocab.json"), os.path.join(folder, "vocab.json"))
        shutil.copy(os.path.join(vocab_dir, "gpt2-merges.txt"), os.path.join(folder, "merges.txt"))


def _tokens(vocab: int, b: int = 2, s: int = SEQ) -> torch.Tensor:
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(3))


def _megatron_model(args, state=None) -> GPTModel:
    config = config_from_args(args, use_cpu_initialization=True)
    model = GPTModel(config, parallel_output=False)
    if state is not None:
        model.load_state_dict(unflatten_state(state))
    return model.eval()


def _megatron_logits(model: GPTModel, tokens: torch.Tensor) -> torch.Tensor:
    s = tokens.size(1)
    mask = torch.ones(s, s, dtype=torch.bool).triu(1)[None, None]
    with torch.no_grad():
        return model(tokens, torch.arange(s).expand_as(tokens), mask)


def _hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def _validated(flags: str, **extra):
    args = build_parser().parse_args(shlex.split(flags))
    args = validate_args(args, world_size=1, rank=1)
    for key, value in extra.items():
        setattr(args, key, value)
    return args


# ----------------------------------------------------------------------------------------
# Hugging Face -> Megatron -> Hugging Face
# ----------------------------------------------------------------------------------------

CASES = {
    # name: (build, save format, tokenizer files, tokenizer type)
    "llama-gqa-untied": (lambda: _llama(2, False), "safetensors", "sentencepiece",
                         "GPTSentencePieceTokenizer"),
    "llama-gqa-tied": (lambda: _llama(2, True), "sharded", "tokenizer.json", "HFTokenizer"),
    "llama-mha-untied": (lambda: _llama(4, False, theta=10000.0), "bin", "tokenizer.json",
                         "HFTokenizer"),
    "gpt2": (lambda: _gpt2(50257), "sharded-bin", "gpt2", "GPT2BPETokenizer"),
}  # fmt: skip


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.real_vocab) if n == "gpt2"
                                  else n for n in CASES])  # gpt2: 50257 ids
def test_hf_model_round_trip(name, tmp_path, sp_model, tok_json, texts, request):
    build, fmt, tok_kind, tok_type = CASES[name]
    vocab_dir = request.getfixturevalue("vocab_dir") if tok_kind == "gpt2" else None
    hf = build()
    src = str(tmp_path / "hf")
    _save(hf, src, fmt)
    _add_tokenizer(src, tok_kind, sp_model, tok_json, vocab_dir)

    imp = read_hf_model(src)
    vocab = hf.config.vocab_size
    llama = name.startswith("llama")
    assert imp.arch == ("llama" if llama else "gpt2")
    assert imp.tokenizer.tokenizer_type == tok_type and imp.true_vocab_size == vocab
    padded = -(-vocab // 128) * 128
    assert imp.args["padded_vocab_size"] == padded and imp.state[WORD].shape == (padded, 64)
    assert not imp.state[WORD][vocab:].any()  # padding rows are zero
    tied = hf.config.tie_word_embeddings
    assert (OUTPUT in imp.state) == (not tied)
    assert imp.args["untie_embeddings_and_output_weights"] == (not tied)
    if llama:
        kv = hf.config.num_key_value_heads
        assert imp.args["num_key_value_heads"] == kv and imp.args["kv_channels"] == 16
        assert imp.args["rope_theta"] == int(hf.config.rope_parameters["rope_theta"])
        assert imp.args["swiglu"] and imp.args["normalization"] == "rmsnorm"
        assert not imp.args["add_bias_linear"] and not imp.args["add_position_embedding"]
        qkv = imp.state[("language_model", "transformer", "layers.0.self_attention."
                         "query_key_value.weight")]  # fmt: skip
        attn = hf.model.layers[0].self_attn
        r, hn = 4 // kv, 16
        # group g: its r query heads, then its key head, then its value head
        g1 = qkv[(r + 2) * hn : 2 * (r + 2) * hn]
        torch.testing.assert_close(g1[: r * hn], attn.q_proj.weight[r * hn : 2 * r * hn])
        torch.testing.assert_close(g1[r * hn : (r + 1) * hn], attn.k_proj.weight[hn : 2 * hn])
        torch.testing.assert_close(g1[(r + 1) * hn :], attn.v_proj.weight[hn : 2 * hn])
    else:
        assert imp.args["openai_gelu"] and imp.args["add_position_embedding"]
        assert imp.args["ffn_hidden_size"] == 96 and imp.args["num_key_value_heads"] == 4

    # the canonical state in GPTModel gives the HF model's logits
    args = imp.checkpoint_args()
    assert args.padded_vocab_size == padded
    model = _megatron_model(args, imp.state)
    tokens = _tokens(vocab)
    ref = _hf_logits(hf, tokens)
    ours = _megatron_logits(model, tokens)
    assert ours.shape == (2, SEQ, padded)
    torch.testing.assert_close(ours[..., :vocab], ref, atol=1e-4, rtol=1e-4)

    # written back: AutoModelForCausalLM loads identical tensors and gives identical logits
    out = str(tmp_path / "back")
    summary = write_hf_model(imp.state, args, out)
    assert summary["vocab_size"] == vocab and summary["shards"] == 1
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back) is type(hf)
    want, got = hf.state_dict(), back.state_dict()
    assert sorted(want) == sorted(got)
    for key in want:
        assert torch.equal(want[key], got[key]), key
    assert torch.equal(_hf_logits(back, tokens), ref)
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["vocab_size"] == vocab and config["tie_word_embeddings"] == tied

    # its tokenizer: AutoTokenizer gives the Megatron tokenizer's ids
    hf_tok = AutoTokenizer.from_pretrained(out)
    megatron_tok = imp.tokenizer.build()
    for text in texts:
        assert hf_tok(text)["input_ids"] == megatron_tok.tokenize(text), text[:60]
    assert hf_tok.eos_token_id == megatron_tok.eod == config["eos_token_id"]


def test_train_command_flags_are_arguments_dests(tmp_path, tok_json):
    """The command line train_command gives parses to the import's args, dest by dest, and
    builds a model whose state has the import's keys and shapes."""
    src = str(tmp_path / "hf")
    _llama(2, False).save_pretrained(src)
    _add_tokenizer(src, "tokenizer.json", "", tok_json, None)
    imp = read_hf_model(src)
    cmd = train_command(imp, "/ckpt/llama", tensor_model_parallel_size=2,
                        extra_flags=["--micro-batch-size", "2", "--seq-length", "16"])
    assert cmd[:2] == ["python", "pretrain_gpt.py"]
    assert cmd[cmd.index("--load") : cmd.index("--load") + 3] == ["--load", "/ckpt/llama",
                                                                  "--finetune"]
    args = validate_args(build_parser().parse_args(cmd[2:]), world_size=2, rank=1)
    for dest, value in imp.args.items():
        if dest not in ("padded_vocab_size", "seq_length"):
            assert getattr(args, dest) == value, dest
    assert args.seq_length == 16 and args.tensor_model_parallel_size == 2  # extra flags win
    model = _megatron_model(imp.checkpoint_args(), None)
    shapes = {k: tuple(v.shape) for k, v in flatten_state(
        model.state_dict_for_save_checkpoint()).items()}  # fmt: skip
    assert shapes == {k: tuple(v.shape) for k, v in imp.state.items()}
    # a checkpoint of the import records args that --use-checkpoint-args reads back
    ckpt = tmp_path / "ckpt"
    (ckpt / "release" / "mp_rank_00").mkdir(parents=True)
    torch.save({"args": imp.checkpoint_args(), "checkpoint_version": 3.0, "iteration": 0},
               ckpt / "release" / "mp_rank_00" / "model_optim_rng.pt")  # fmt: skip
    (ckpt / "latest_checkpointed_iteration.txt").write_text("release")
    args = parse_args(args_list=["--use-checkpoint-args", "--load", str(ckpt),
                                 "--micro-batch-size", "1"])  # fmt: skip
    carried = [d for d, _ in CHECKPOINT_SHAPE_ARGS] + list(CHECKPOINT_RUN_ARGS)
    for dest in carried:
        if dest in imp.args:
            assert getattr(args, dest) == imp.args[dest], dest
    assert args.tokenizer_model == imp.tokenizer.tokenizer_model


def test_vocabulary_padding_for_tensor_parallel(tmp_path, sp_model):
    src = str(tmp_path / "hf")
    hf = _llama(2, False)
    hf.save_pretrained(src)
    _add_tokenizer(src, "sentencepiece", sp_model, "", None)
    imp = read_hf_model(src, make_vocab_size_divisible_by=128, tensor_model_parallel_size=2)
    assert imp.args["padded_vocab_size"] == 1024  # 800 -> a multiple of 128 x 2
    for path in (WORD, OUTPUT):
        assert imp.state[path].shape == (1024, 64) and not imp.state[path][VOCAB:].any()
    assert imp.checkpoint_args(tensor_model_parallel_size=2).padded_vocab_size == 1024
    out = str(tmp_path / "back")
    write_hf_model(imp.state, imp.checkpoint_args(2), out)
    back = AutoModelForCausalLM.from_pretrained(out)
    assert back.model.embed_tokens.weight.shape == (VOCAB, 64)
    assert torch.equal(back.lm_head.weight, hf.lm_head.weight)
    # a tokenizer with more ids than the model embeds
    small = str(tmp_path / "small")
    _llama(2, False, vocab=700).save_pretrained(small)
    _add_tokenizer(small, "sentencepiece", sp_model, "", None)
    with pytest.raises(HFInteropError, match="has 800 ids but the model embeds only 700"):
        read_hf_model(small)


# ----------------------------------------------------------------------------------------
# Megatron -> Hugging Face
# ----------------------------------------------------------------------------------------

BASE = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
        "--max-position-embeddings 32 --micro-batch-size 1 --hidden-dropout 0 "
        "--attention-dropout 0")  # fmt: skip
LLAMA = ("--use-rotary-position-embeddings --swiglu --normalization rmsnorm "
         "--disable-bias-linear")  # fmt: skip


def _megatron_random(flags: str, padded: int):
    args = _validated(flags, padded_vocab_size=padded)
    model = _perturb(_megatron_model(args))
    return args, model, flatten_state(model.state_dict_for_save_checkpoint())


@pytest.mark.parametrize(
    "flags, hf_class",
    [
        (f"{LLAMA} --num-key-value-heads 2 --untie-embeddings-and-output-weights "
         "--rotary-position-embeddings-theta 500000", "LlamaForCausalLM"),
        (LLAMA, "LlamaForCausalLM"),  # tied, multi-head
        ("", "GPT2LMHeadModel"),  # fused bias-GeLU: the tanh approximation, gelu_new
        ("--no-bias-gelu-fusion", "GPT2LMHeadModel"),  # exact GeLU
    ],
)  # fmt: skip
def test_megatron_model_to_hf(flags, hf_class, tmp_path, sp_model):
    """A Megatron model written as HF (sharded, with the SentencePiece tokenizer) gives its
    logits in transformers, and reads back to the same tensors with zero padding rows."""
    tokenizer = f"--tokenizer-type GPTSentencePieceTokenizer --tokenizer-model {sp_model}"
    args, model, canonical = _megatron_random(f"{BASE} {flags} {tokenizer}", 896)
    out = str(tmp_path / "hf")
    summary = write_hf_model(canonical, args, out, max_shard_size="60KB")
    assert summary["model_class"] == hf_class and summary["shards"] > 1
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) == summary["shards"]
    config = json.load(open(os.path.join(out, "config.json")))
    if hf_class == "GPT2LMHeadModel":
        exact = "--no-bias-gelu-fusion" in flags
        assert config["activation_function"] == ("gelu" if exact else "gelu_new")
    else:
        assert config["rope_theta"] == float(args.rope_theta)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == hf_class
    tokens = _tokens(VOCAB)
    torch.testing.assert_close(
        _hf_logits(hf, tokens), _megatron_logits(model, tokens)[..., :VOCAB], atol=1e-4, rtol=1e-4
    )
    imp = read_hf_model(out)
    assert sorted(imp.state) == sorted(canonical)
    for path, tensor in canonical.items():
        if path in (WORD, OUTPUT):
            assert torch.equal(imp.state[path][:VOCAB], tensor[:VOCAB])
            assert not imp.state[path][VOCAB:].any()
        else:
            assert torch.equal(imp.state[path], tensor), path
    hf_tok = AutoTokenizer.from_pretrained(out)
    sp = TokenizerInfo("GPTSentencePieceTokenizer", tokenizer_model=sp_model).build()
    for text in corpus_texts()[:40]:
        assert hf_tok(text)["input_ids"] == sp.tokenize(text)
        assert hf_tok.decode(sp.tokenize(text)) == sp.detokenize(sp.tokenize(text))


def test_bf16_export_and_encoder_key(tmp_path, sp_model):
    """dtype casts the written tensors; a checkpoint that calls the stack `encoder` writes."""
    args, _, canonical = _megatron_random(f"{BASE} {LLAMA}", 896)
    renamed = {(p[0], "encoder") + p[2:] if p[1] == "transformer" else p: t
               for p, t in canonical.items()}  # fmt: skip
    out = str(tmp_path / "hf")
    write_hf_model(renamed, args, out, tokenizer_info=False, dtype=torch.bfloat16)
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["torch_dtype"] == "bfloat16" and config["vocab_size"] == 896  # no tokenizer
    from safetensors.torch import load_file

    state = load_file(os.path.join(out, "model.safetensors"))
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    assert torch.equal(state["model.norm.weight"],
                       canonical[("language_model", "transformer", "final_layernorm.weight")]
                       .bfloat16())  # fmt: skip
    assert not any(n.startswith("tokenizer") for n in os.listdir(out))


# ----------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------


def test_tokenizer_files_round_trip(tmp_path, sp_model, tok_json, vocab_dir, texts):
    """Each of the three tokenizers, written beside a model, loads with AutoTokenizer and
    encodes as the Megatron tokenizer does; read back, it is found by its files."""
    gpt2_vocab = os.path.join(vocab_dir, "gpt2-vocab.json")
    gpt2_merges = os.path.join(vocab_dir, "gpt2-merges.txt")
    infos = {
        "GPT2BPETokenizer": TokenizerInfo("GPT2BPETokenizer", gpt2_vocab, gpt2_merges),
        "GPTSentencePieceTokenizer": TokenizerInfo("GPTSentencePieceTokenizer",
                                                   tokenizer_model=sp_model),
        "HFTokenizer": TokenizerInfo("HFTokenizer", tokenizer_model=tok_json),
    }  # fmt: skip
    for kind, info in infos.items():
        padded = -(-info.vocab_size // 128) * 128
        args, _, canonical = _megatron_random(f"{BASE} {LLAMA}", padded)
        out = str(tmp_path / kind)
        write_hf_model(canonical, args, out, tokenizer_info=info)
        hf_tok = AutoTokenizer.from_pretrained(out)
        ours = info.build()
        assert len(hf_tok) == ours.vocab_size
        for text in texts:
            ids = ours.tokenize(text)
            assert hf_tok(text)["input_ids"] == ids, (kind, text[:60])
            assert hf_tok.decode(ids) == ours.detokenize(ids)
        found = find_tokenizer(out)
        assert found.tokenizer_type == kind and found.vocab_size == ours.vocab_size
        config = json.load(open(os.path.join(out, "config.json")))
        assert config["vocab_size"] == ours.vocab_size and config["eos_token_id"] == ours.eod
    # all three in one folder: tokenizer.json first, unless another is asked for
    both = str(tmp_path / "all")
    os.makedirs(both)
    for kind in ("GPT2BPETokenizer", "GPTSentencePieceTokenizer", "HFTokenizer"):
        for name in os.listdir(str(tmp_path / kind)):
            if name.startswith(("vocab", "merges", "tokenizer.")):
                shutil.copy(os.path.join(str(tmp_path / kind), name), both)
    assert find_tokenizer(both).tokenizer_type == "HFTokenizer"
    assert find_tokenizer(both, "GPT2BPETokenizer").vocab_file == os.path.join(both, "vocab.json")
    assert find_tokenizer(both, "GPTSentencePieceTokenizer").tokenizer_model.endswith(".model")
    with pytest.raises(HFInteropError, match="holds no GPT2BPETokenizer files"):
        find_tokenizer(str(tmp_path / "HFTokenizer"), "GPT2BPETokenizer")


# ----------------------------------------------------------------------------------------
# What cannot be expressed
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, model_class, reasons",
    [
        ("--num-experts 2", None, ["MoE layers (--num-experts 2) into the dense GPT2LMHeadModel"]),
        ("", "llama", ["LayerNorm", "a GeLU MLP", "no rotary position embeddings",
                       "learned position embeddings", "biases in the linear layers"]),
        (LLAMA, "gpt2", ["RMSNorm", "rotary position embeddings", "a SwiGLU MLP",
                         "no linear biases"]),
        (f"{LLAMA} --rotary-percent 0.5", None, ["partial rotary (--rotary-percent 0.5)"]),
        ("--use-rotary-position-embeddings --swiglu --normalization rmsnorm", None,
         ["biases in the linear layers (LlamaForCausalLM has none; --disable-bias-linear)"]),
        ("--num-key-value-heads 2", None, ["grouped-query attention (--num-key-value-heads 2 "
                                           "of 4 heads)"]),
        ("--kv-channels 8", None, ["--kv-channels 8 x 4 heads != --hidden-size 64"]),
        ("--apply-residual-connection-post-layernorm", None,
         ["--apply-residual-connection-post-layernorm"]),
    ],
)  # fmt: skip
def test_refused_megatron_models(flags, model_class, reasons, tmp_path):
    args = _validated(f"{BASE} {flags}", padded_vocab_size=128)
    out = tmp_path / "hf"
    with pytest.raises(HFInteropError) as err:
        write_hf_model({}, args, str(out), model_class=model_class)
    message = str(err.value)
    assert "\n" not in message and message.startswith("cannot write a ")
    for reason in reasons:
        assert reason in message, message
    assert not out.exists()  # nothing written


def test_refused_states_and_folders(tmp_path):
    args, _, canonical = _megatron_random(f"{BASE} {LLAMA}", 128)
    bert = dict(canonical)
    bert[("language_model", "pooler", "dense.weight")] = torch.zeros(64, 64)
    with pytest.raises(HFInteropError, match=r"not a GPT model's \(language_model.pooler\)"):
        write_hf_model(bert, args, str(tmp_path / "a"), tokenizer_info=False)
    moe = {k: v for k, v in canonical.items() if "mlp" not in k[-1] or "layers.1." not in k[-1]}
    moe[("language_model", "transformer", "layers.1.mlp.deepspeed_moe.experts."
         "deepspeed_experts.0.dense_h_to_4h.weight")] = torch.zeros(256, 64)  # fmt: skip
    with pytest.raises(HFInteropError, match="MoE layers"):
        write_hf_model(moe, args, str(tmp_path / "b"), tokenizer_info=False)
    missing = {k: v for k, v in canonical.items() if k[-1] != "layers.1.mlp.dense_4h_to_h.weight"}
    with pytest.raises(HFInteropError, match="the state does not match its args"):
        write_hf_model(missing, args, str(tmp_path / "c"), tokenizer_info=False)
    write_hf_model(canonical, args, str(tmp_path / "d"), tokenizer_info=False)
    with pytest.raises(HFInteropError, match="already holds a model"):
        write_hf_model(canonical, args, str(tmp_path / "d"), tokenizer_info=False)
    with pytest.raises(HFInteropError, match="--tokenizer-type NullTokenizer has no Hugging"):
        write_hf_model(canonical, args, str(tmp_path / "e"),
                       tokenizer_info=TokenizerInfo("NullTokenizer"))  # fmt: skip


def _write_config(folder, **config) -> str:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return str(folder)


LLAMA_CONFIG = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64,
                    num_attention_heads=4, num_hidden_layers=2, intermediate_size=96,
                    vocab_size=100)  # fmt: skip


@pytest.mark.parametrize(
    "config, reason",
    [
        (dict(LLAMA_CONFIG, attention_bias=True), "attention_bias true"),
        (dict(LLAMA_CONFIG, mlp_bias=True), "mlp_bias true"),
        (dict(LLAMA_CONFIG, rope_scaling={"rope_type": "llama3", "factor": 8.0}),
         "RoPE scaling 'llama3'"),
        (dict(LLAMA_CONFIG, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                             "partial_rotary_factor": 0.5}),
         "partial rotary (partial_rotary_factor 0.5)"),
        (dict(LLAMA_CONFIG, rope_theta=12345.5), "rope_theta 12345.5 is not an integer"),
        (dict(LLAMA_CONFIG, hidden_act="gelu"), "hidden_act 'gelu'"),
        (dict(model_type="gpt2", scale_attn_by_inverse_layer_idx=True),
         "scale_attn_by_inverse_layer_idx true"),
        (dict(model_type="gpt2", activation_function="relu"), "activation_function 'relu'"),
        (dict(model_type="bert", architectures=["BertForMaskedLM"]),
         "BertForMaskedLM is not supported; only GPT2LMHeadModel and LlamaForCausalLM"),
        (dict(model_type="gpt2", architectures=["GPT2ForSequenceClassification"]),
         "GPT2ForSequenceClassification is not supported"),
        (LLAMA_CONFIG, "holds no model weights (model.safetensors, pytorch_model.bin"),
    ],
)  # fmt: skip
def test_refused_hf_models(config, reason, tmp_path):
    folder = _write_config(tmp_path / "hf", **config)
    with pytest.raises(HFInteropError) as err:
        read_hf_model(folder)
    assert reason in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_refused_hf_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    src = str(tmp_path / "hf")
    _llama(2, False, vocab=100).save_pretrained(src)
    path = os.path.join(src, "model.safetensors")
    state = load_file(path)
    save_file({k: v for k, v in state.items() if "layers.1.mlp.up_proj" not in k}, path)
    with pytest.raises(HFInteropError, match=r"1 tensors .* are missing from the weights "
                       r"\(first: model.layers.1.mlp.up_proj.weight\)"):
        read_hf_model(src)
    save_file(dict(state, **{"model.layers.0.extra.weight": torch.zeros(2)}), path)
    with pytest.raises(HFInteropError, match="first: model.layers.0.extra.weight"):
        read_hf_model(src)
    save_file(dict(state, **{"model.layers.0.self_attn.k_proj.weight": torch.zeros(48, 64)}),
              path)  # fmt: skip
    with pytest.raises(HFInteropError, match=r"k_proj.weight \[48, 64\].* do not fit the config"):
        read_hf_model(src)
    sharded = str(tmp_path / "sharded")
    _llama(2, False, vocab=100).save_pretrained(sharded, max_shard_size="50KB")
    shard = sorted(n for n in os.listdir(sharded) if n.startswith("model-"))[-1]
    os.remove(os.path.join(sharded, shard))
    with pytest.raises(HFInteropError, match=f"names shards that are missing: {shard}"):
        read_hf_model(sharded)
    with open(os.path.join(src, "model.safetensors"), "wb") as f:
        f.write(b"not a safetensors file")
    with pytest.raises(HFInteropError, match="could not read weights file .*model.safetensors"):
        read_hf_model(src)


def _checkpoint_util():
    import importlib.util

    root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
    spec = importlib.util.spec_from_file_location(
        "checkpoint_util_unit_hf", os.path.join(root, "tools", "checkpoint_util.py")
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_cli_model_without_tokenizer_files(tmp_path, capsys):
    """An HF folder without tokenizer files imports with NullTokenizer (its ids plus eod:
    --vocab-size = vocab - 1), printed in the training command; exported back, the
    vocabulary is the model's again, with no tokenizer files and identical tensors."""
    from safetensors.torch import load_file

    tool = _checkpoint_util()
    src, ckpt, back = (str(tmp_path / n) for n in ("hf", "megatron", "back"))
    _llama(2, False, vocab=100).save_pretrained(src)
    assert tool.main(["--loader", "hf", "--saver", "megatron", "--load-dir", src, "--save-dir",
                      ckpt, "--make-vocab-size-divisible-by", "64"]) == 0  # fmt: skip
    command = capsys.readouterr().out.strip().splitlines()[-1]
    assert "--tokenizer-type NullTokenizer --vocab-size 99 " in command
    assert command.endswith(f"--load {ckpt} --finetune")
    state = torch.load(os.path.join(ckpt, "release", "mp_rank_00", "model_optim_rng.pt"),
                       weights_only=False)  # fmt: skip
    assert state["args"].tokenizer_type == "NullTokenizer" and state["args"].vocab_size == 99
    assert state["args"].padded_vocab_size == 128
    assert tool.main(["--loader", "megatron", "--saver", "hf", "--load-dir", ckpt,
                      "--save-dir", back]) == 0  # fmt: skip
    assert sorted(os.listdir(back)) == ["config.json", "model.safetensors"]
    want = load_file(os.path.join(src, "model.safetensors"))
    got = load_file(os.path.join(back, "model.safetensors"))
    assert sorted(want) == sorted(got) and all(torch.equal(want[k], got[k]) for k in want)
    assert json.load(open(os.path.join(back, "config.json")))["vocab_size"] == 100
    # a second export into the same folder is refused, the folder kept as it is
    assert tool.main(["--loader", "megatron", "--saver", "hf", "--load-dir", ckpt,
                      "--save-dir", back]) == 1  # fmt: skip
    assert "already holds a model" in capsys.readouterr().err
    assert sorted(os.listdir(back)) == ["config.json", "model.safetensors"]
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]
    assert not tool.is_deepspeed_checkpoint(ckpt) and not tool.is_deepspeed_checkpoint(src)
