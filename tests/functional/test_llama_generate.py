"""Text generation and zero-shot evaluation of a LLaMA-style checkpoint, run as a user runs
them: tools/generate_samples_gpt.py and tasks/main.py on a tiny model with RoPE, SwiGLU,
RMSNorm, grouped-query attention (2 key/value heads for 4 query heads), untied output
weights and no linear biases, tokenized by a SentencePiece model.

Once per module: a SentencePiece model (LLaMA's settings) is trained on the small corpus,
tools/preprocess_data.py writes the corpus with it, pretrain_gpt.py trains the model and
tools/checkpoint_util.py reshapes its checkpoint to TP=2 (run on two gloo ranks). A
reference process loads the TP=1 checkpoint and computes, without the entry points' code:
greedy generation of each prompt alone by full forward passes, the sliding-window
WikiText loss, and LAMBADA examples.

Checked: generation with the key/value cache gives the tokens and log-probabilities of
--recompute at TP=1 (--top_k 1) and at TP=2 (--greedy), those of the reference, and TP=2
those of TP=1; each continuation's text reads on from its prompt (SentencePiece's word
boundaries); the reported WIKITEXT103 loss and LAMBADA accuracy equal the reference's.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys

import pytest

from megatron.text_generation_utils import continuation_text
from tasks.zeroshot_gpt.datasets import lambada_tokens

from ..unit.tokenizer.test_gpt_sentencepiece import corpus_texts, train_sentencepiece
from .gpt_runs import CORPUS, ROOT, launch, parse_log, rel_close, tiny_gpt_args
from .test_llama_training import LLAMA_FLAGS
from .test_zeroshot_gpt import LAMBADA, WIKI

pytestmark = pytest.mark.slow
pytest.importorskip("sentencepiece")

ITERS = 60
SEQ_LENGTH = 32
OUT_LEN = 12
STRIDE = 8
# Model flags of every entry point (LLAMA_FLAGS: no dropout, no evaluation while training).
ARCH = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", str(SEQ_LENGTH), "--max-position-embeddings", str(SEQ_LENGTH),
    "--seed", "1234",
    *LLAMA_FLAGS,
]  # fmt: skip
# TP=1 pads the 800 ids to a multiple of 128 (896); --make-vocab-size-divisible-by 64
# keeps 896 at TP=2 (128 x 2 would pad to 1024), so the TP=2 model is the TP=1 model.
TP2 = ["--tensor-model-parallel-size", "2", "--make-vocab-size-divisible-by", "64"]
PROMPTS = [
    "Hello world",
    "The history of the Python programming language began in",
    "",  # an unconditional sample: starts from the tokenizer's eod
    "Data",
    "Assert statements are a convenient way to",
]
LOG_PROB_TOL = 1e-5  # |log p| differences allowed (fp32 model; ~1e-6 seen)

# Run in a fresh process with the model flags and --load: JSON on its last stdout line.
REFERENCE = r"""
import json, math, sys
sys.path.insert(0, sys.argv[1])
import torch
import torch.nn.functional as F
from megatron import get_args, get_tokenizer
from megatron.checkpointing import load_model_weights_only
from megatron.initialize import initialize_megatron
from megatron.model import GPTModel
from megatron.model.config import config_from_args
from tasks.zeroshot_gpt.detokenizer import wikitext_detokenize

spec = json.load(open(sys.argv[2], encoding="utf-8"))
initialize_megatron(args_list=sys.argv[3:])
args, tok = get_args(), get_tokenizer()
model = GPTModel(config_from_args(args), parallel_output=False)
load_model_weights_only(model, args.load)
model.eval()
s, vocab = args.seq_length, tok.vocab_size

def log_probs(ids):  # [n, padded vocab] float64: log softmax at each position of ids
    x = torch.tensor([ids])
    mask = torch.ones(len(ids), len(ids)).triu(1).bool()[None, None]  # True = masked
    with torch.no_grad():
        return F.log_softmax(model(x, torch.arange(len(ids))[None], mask)[0].double(), -1)

def greedy(prompt):  # one prompt alone, the whole sequence every step
    ids = tok.tokenize(prompt) if prompt else [tok.eod]
    head, tokens, scores, finished = list(ids), [], [], False
    while len(tokens) < spec["out_len"] and len(ids) < s:
        lp = F.log_softmax(log_probs(ids)[-1, :vocab], -1)  # the real vocabulary
        token = int(lp.argmax())
        if token == tok.eod:
            finished = True
            break
        ids.append(token); tokens.append(token); scores.append(float(lp[token]))
    return {"tokens": tokens, "log_probs": scores, "finished": finished,
            "whole_text": tok.detokenize(ids) if prompt else tok.detokenize(tokens),
            "prompt_tokens": head}

def wiki_loss(path, stride):  # target t is read in window k at position t - 1 - k * stride
    tokens = tok.tokenize(wikitext_detokenize(open(path, encoding="utf-8").read()))
    windows, total = {}, 0.0
    for t in range(1, len(tokens)):
        k = 0 if t <= s else math.ceil((t - s) / stride)
        if k not in windows:
            windows[k] = log_probs(tokens[k * stride : k * stride + s])
        total -= windows[k][t - 1 - k * stride, tokens[t]].item()
    return total, len(tokens) - 1

def predicted(context, target):  # every target token is the argmax after what precedes it
    lp = log_probs(context + target)
    return lp[len(context) - 1 : -1].argmax(-1).tolist() == target

def lambada(texts, docs, wanted):
    # The given passages, their target being the tokens of the whole passage after the
    # context's; then passages "<first words of a document> <word>" where the model's own
    # greedy next piece is '\u2581word' (correct by construction), kept where the passage
    # tokenizes back to the context's tokens + that piece.
    correct = 0
    for text in texts:
        last = text.split()[-1]
        context, whole = tok.tokenize(text[: text.rfind(last)].strip()), tok.tokenize(text)
        assert whole[: len(context)] == context, text
        correct += predicted(context, whole[len(context) :])
    made = []
    for doc in docs:
        words = doc.split()[:s]
        while len(tok.tokenize(" ".join(words))) >= s:
            words.pop()
        best = log_probs(tok.tokenize(" ".join(words)))[:, :vocab].argmax(-1).tolist()
        for n in range(2, len(words) + 1):
            prefix = " ".join(words[:n])
            context = tok.tokenize(prefix)
            piece_id = best[len(context) - 1]
            piece = tok.inv_vocab[piece_id]
            text = prefix + " " + piece[1:]
            if piece.startswith("\u2581") and piece[1:].isalpha() and text not in made:
                if tok.tokenize(text) == context + [piece_id]:
                    assert predicted(context, [piece_id]), text
                    made.append(text)
            if len(made) == wanted:
                return correct, made
    return correct, made

wiki, targets = wiki_loss(spec["wiki"], spec["stride"])
correct, made = lambada(spec["lambada"], spec["docs"], spec["made"])
print(json.dumps({"generations": [greedy(p) for p in spec["prompts"]], "wiki_loss": wiki,
                  "wiki_targets": targets, "lambada_texts": spec["lambada"] + made,
                  "lambada_correct": correct + len(made), "made": len(made)}))
"""


def _subprocess_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _preprocess(sp_model: str, prefix: str) -> str:
    """tools/preprocess_data.py's main() (in this process) with GPTSentencePieceTokenizer."""
    spec = importlib.util.spec_from_file_location(
        "preprocess_data_tool_llama_generate", os.path.join(ROOT, "tools", "preprocess_data.py")
    )
    tool = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = tool
    handler = signal.getsignal(signal.SIGTERM)
    try:
        spec.loader.exec_module(tool)
        argv = ["--input", CORPUS, "--output-prefix", prefix, "--dataset-impl", "mmap",
                "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", sp_model,
                "--append-eod", "--workers", "1"]  # fmt: skip
        assert tool.main(argv) == 0
    finally:
        signal.signal(signal.SIGTERM, handler)
        del sys.modules[spec.name]
    return prefix + "_text_document"


def _train_args(data_path: str, tokenizer: list[str]) -> list[str]:
    """tiny_gpt_args less its GPT-2 tokenizer, dropout and evaluation flags, with ARCH,
    batches of 32 sequences and a higher learning rate (a model that predicts words)."""
    args = tiny_gpt_args(data_path, "unused", ITERS)
    for flag in ("--vocab-file", "--merge-file", "--tokenizer-type", "--hidden-dropout",
                 "--attention-dropout", "--eval-iters", "--num-layers", "--hidden-size",
                 "--num-attention-heads", "--seq-length", "--max-position-embeddings",
                 "--seed"):  # fmt: skip
        index = args.index(flag)
        del args[index : index + 2]
    changes = {"--lr": "0.003", "--lr-decay-iters": str(ITERS), "--micro-batch-size": "16",
               "--global-batch-size": "32"}  # fmt: skip
    for flag, value in changes.items():
        args[args.index(flag) + 1] = value
    return args + ARCH + tokenizer


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("llama_generate")


def _reshape_to_tp2(load_dir: str, save_dir: str) -> None:
    """tools/checkpoint_util.py's main() (in this process): TP=1 -> TP=2, padded vocab kept."""
    spec = importlib.util.spec_from_file_location(
        "checkpoint_util_llama_generate", os.path.join(ROOT, "tools", "checkpoint_util.py")
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    argv = ["--load-dir", load_dir, "--save-dir", save_dir, "--target-tensor-parallel-size",
            "2", "--make-vocab-size-divisible-by", TP2[-1]]  # fmt: skip
    assert tool.main(argv) == 0


@pytest.fixture(scope="module")
def checkpoints(work):
    """{tp: model flags with --load}: the TP=1 checkpoint pretrain_gpt.py wrote, and the
    same weights reshaped to TP=2 by tools/checkpoint_util.py."""
    sp_model = train_sentencepiece(corpus_texts(), str(work / "tokenizer"))
    tokenizer = ["--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", sp_model]
    args = _train_args(_preprocess(sp_model, str(work / "llama")), tokenizer)
    rows = parse_log(launch(1, args + ["--save", str(work / "ckpt_tp1")]))
    assert sorted(rows) == list(range(1, ITERS + 1)), rows
    assert float(rows[ITERS]["loss"]) < float(rows[1]["loss"]) - 1.0, rows
    _reshape_to_tp2(str(work / "ckpt_tp1"), str(work / "ckpt_tp2"))
    base = ARCH + tokenizer
    return {1: base + ["--load", str(work / "ckpt_tp1")],
            2: base + TP2 + ["--load", str(work / "ckpt_tp2")]}  # fmt: skip


@pytest.fixture(scope="module")
def reference(work, checkpoints):
    """The reference computations on the TP=1 checkpoint; writes the LAMBADA file."""
    (work / "wiki.test.tokens").write_text(WIKI, encoding="utf-8")
    spec = {"prompts": PROMPTS, "out_len": OUT_LEN, "wiki": str(work / "wiki.test.tokens"),
            "stride": STRIDE, "lambada": LAMBADA, "docs": corpus_texts(), "made": 3}  # fmt: skip
    (work / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
    (work / "reference.py").write_text(REFERENCE, encoding="utf-8")
    argv = [sys.executable, str(work / "reference.py"), ROOT, str(work / "spec.json")]
    proc = subprocess.run(
        argv + checkpoints[1] + ["--micro-batch-size", "1"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=_subprocess_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ref = json.loads(proc.stdout.strip().splitlines()[-1])
    (work / "lambada_test.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in ref["lambada_texts"]), encoding="utf-8"
    )
    return ref


@pytest.fixture(scope="module")
def generations(work, checkpoints):
    """{(tp, 'cache' | 'recompute'): JSON lines of tools/generate_samples_gpt.py}."""
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    out = {}
    for tp, choice in ((1, ["--top_k", "1"]), (2, ["--greedy"])):
        for mode in ("cache", "recompute"):
            path = work / f"tp{tp}_{mode}.jsonl"
            # a user's training flags may hold --sequence-parallel: generation runs without
            extra = ["--sequence-parallel"] if (tp, mode) == (2, "cache") else []
            flags = checkpoints[tp] + choice + extra + [
                "--micro-batch-size", "3", "--sample-input-file", str(prompts),
                "--sample-output-file", str(path), "--out-seq-length", str(OUT_LEN),
                "--log-probs", *(["--recompute"] if mode == "recompute" else []),
            ]  # fmt: skip
            launch(tp, flags, script=os.path.join("tools", "generate_samples_gpt.py"))
            with open(path, encoding="utf-8") as f:
                out[tp, mode] = [json.loads(line) for line in f]
            assert [row["prompt"] for row in out[tp, mode]] == PROMPTS
    return out


def _assert_same_generation(rows, expected, tol, what):
    for row, want, prompt in zip(rows, expected, PROMPTS):
        assert row["tokens"] == want["tokens"], (what, prompt)
        assert row["finished"] == want["finished"] and row["length"] == len(want["tokens"])
        assert len(row["log_probs"]) == len(want["log_probs"]), (what, prompt)
        for a, b in zip(row["log_probs"], want["log_probs"]):
            assert abs(a - b) <= tol and a < 0.0, (what, prompt, a, b)
    assert len(rows) == len(expected)


def test_key_value_cache_equals_recompute(generations):
    for tp in (1, 2):
        cache, full = generations[tp, "cache"], generations[tp, "recompute"]
        _assert_same_generation(cache, full, LOG_PROB_TOL, f"TP={tp}")
        assert [r["text"] for r in cache] == [r["text"] for r in full]


def test_generation_equals_one_prompt_at_a_time(generations, reference):
    """Batched with padding (3 then 2 prompts of different lengths), cached: the greedy
    tokens of each prompt run alone through full forward passes."""
    rows, expected = generations[1, "cache"], reference["generations"]
    _assert_same_generation(rows, expected, LOG_PROB_TOL, "reference")
    for row, want in zip(rows, expected):
        assert len(row["tokens"]) == OUT_LEN or row["finished"] or (
            len(want["prompt_tokens"]) + len(row["tokens"]) == SEQ_LENGTH
        )
    assert len({tuple(r["tokens"]) for r in rows}) > 1  # the prompts steer the model


def test_sentencepiece_continuation_reads_on_from_the_prompt(generations, reference):
    """prompt + text is the detokenized prompt + generated ids: a first generated piece
    '\u2581word' keeps its space ('... began in the'), where decoding the continuation alone
    would drop it; the empty prompt starts from the tokenizer's eod (its eos id, 2)."""
    rows, expected = generations[1, "cache"], reference["generations"]
    for row, want, prompt in zip(rows, expected, PROMPTS):
        assert prompt + row["text"] == want["whole_text"], (prompt, row["text"])
    assert expected[PROMPTS.index("")]["prompt_tokens"] == [2]
    assert any(p and r["text"].startswith(" ") for p, r in zip(PROMPTS, rows))


def test_tensor_parallel_generation_equals_serial(generations):
    _assert_same_generation(
        generations[2, "cache"], generations[1, "cache"], LOG_PROB_TOL, "TP=2"
    )


def _task(tp: int, task: str, flags: list[str], data: str, extra=()) -> str:
    argv = ["--task", task, *flags, "--valid-data", data, "--micro-batch-size", "8",
            "--no-load-optim", "--no-load-rng", "--log-interval", "10", *extra]  # fmt: skip
    return launch(tp, argv, script=os.path.join("tasks", "main.py"))


def _number(name: str, stdout: str) -> float:
    m = re.search(rf"{name}: ([-0-9.E+a-z]+)", stdout)
    assert m, f"no '{name}' in output:\n{stdout[-2000:]}"
    return float(m.group(1))


def _check_wikitext(stdout: str, reference: dict, rel: float) -> None:
    summed = re.search(r"summed loss: (\S+) over (\d+) targets", stdout)
    assert summed and int(summed.group(2)) == reference["wiki_targets"] > 2 * SEQ_LENGTH, stdout[-2000:]
    want = reference["wiki_loss"] / reference["wiki_targets"]
    assert rel_close(float(summed.group(1)) / reference["wiki_targets"], want, rel)
    assert rel_close(_number("avg loss", stdout), want, max(rel, 1e-4))  # printed to 5 digits
    assert rel_close(_number(" ppl", stdout), math.exp(want), 1e-3)


def test_zeroshot_tp1_equals_reference(work, checkpoints, reference):
    wiki = _task(1, "WIKITEXT103", checkpoints[1], str(work / "wiki.test.tokens"),
                 ["--overlapping-eval", str(STRIDE)])  # fmt: skip
    _check_wikitext(wiki, reference, 1e-6)
    lam = _task(1, "LAMBADA", checkpoints[1], str(work / "lambada_test.jsonl"),
                ["--strict-lambada"])  # fmt: skip
    assert _number("total examples", lam) == len(reference["lambada_texts"])
    # The passages made from the model's own predictions are all right; with the target
    # split from " word" alone a SentencePiece model would be scored on an extra piece.
    assert reference["made"] >= 1 and reference["lambada_correct"] >= reference["made"]
    assert _number("number correct", lam) == reference["lambada_correct"]


def test_zeroshot_tp2_equals_reference(work, checkpoints, reference):
    wiki = _task(2, "WIKITEXT103", checkpoints[2], str(work / "wiki.test.tokens"),
                 ["--overlapping-eval", str(STRIDE)])  # fmt: skip
    _check_wikitext(wiki, reference, 1e-6)


# ----------------------------------------------------------------------------------------
# The tokenizer-dependent pieces on their own (no model).
# ----------------------------------------------------------------------------------------


def test_sentencepiece_continuation_and_lambada_targets(tmp_path):
    from megatron.tokenizer.tokenizer import _GPTSentencePieceTokenizer

    tok = _GPTSentencePieceTokenizer(train_sentencepiece(corpus_texts(), str(tmp_path / "sp")))
    prompt, whole = tok.tokenize("Hello"), tok.tokenize("Hello world again")
    assert whole[: len(prompt)] == prompt
    generated = whole[len(prompt) :]
    assert tok.detokenize(prompt) == "Hello" and tok.detokenize(generated) == "world again"
    assert continuation_text(tok, prompt, generated) == " world again"
    assert continuation_text(tok, [tok.eod], generated) == "world again"  # an eod start
    assert continuation_text(tok, prompt, []) == ""
    for text in LAMBADA:
        last = text.split()[-1]
        context, target = lambada_tokens(text, tok, strict=True)
        assert context + target == tok.tokenize(text)  # the passage as the model reads it
        assert tok.tokenize(" " + last) == [tok.vocab["\u2581"]] + target  # " word" alone
        assert lambada_tokens(text, tok, strict=False)[1] == tok.tokenize(text)[-1:]


def test_gpt2_lambada_targets_are_megatrons(vocab_dir):
    """With GPT-2's BPE the target is tokenize(" " + word), as Megatron computes it."""
    from megatron.tokenizer.tokenizer import _GPT2BPETokenizer

    tok = _GPT2BPETokenizer(
        os.path.join(vocab_dir, "gpt2-vocab.json"), os.path.join(vocab_dir, "gpt2-merges.txt")
    )
    texts = LAMBADA + ['he said "yes', "it's 1999", "the end.\nagain", "cats' toys", "a  b"]
    for text in texts:
        last = text.split()[-1]
        context, target = lambada_tokens(text, tok, strict=True)
        assert context == tok.tokenize(text[: text.rfind(last)].strip())
        assert target == tok.tokenize(" " + last), text
    assert continuation_text(tok, tok.tokenize("Hello"), tok.tokenize(" world")) == " world"
    assert continuation_text(tok, [tok.eod], tok.tokenize("Hi")) == "Hi"


def test_log_probs_need_json_lines_output(tmp_path):
    from megatron.arguments import build_parser

    spec = importlib.util.spec_from_file_location(
        "generate_samples_gpt_llama", os.path.join(ROOT, "tools", "generate_samples_gpt.py")
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("4")
    base = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
            "--load", str(tmp_path), "--log-probs"]  # fmt: skip
    parse = build_parser(script.add_text_generate_args).parse_args
    with pytest.raises(SystemExit) as exc:
        script.check_generation_args(parse(base + ["--sample-input-file", "p.txt"]))
    assert str(exc.value) == (
        "tools/generate_samples_gpt.py: error: --log-probs needs JSON lines output: a "
        "--sample-output-file ending in .json or .jsonl (got p.txt.out)"
    )
    for ok in (["--sample-input-file", "p.txt", "--sample-output-file", "o.jsonl"],
               ["--num-samples", "2", "--genfile", "s.txt"]):  # fmt: skip
        script.check_generation_args(parse(base + ok))  # no exit
