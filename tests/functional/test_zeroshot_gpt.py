"""Zero-shot GPT evaluation (tasks/main.py): the detokenizers, the sliding-window
arithmetic of perplexity evaluation, LAMBADA examples and scoring, and WIKITEXT103 /
LAMBADA run like a user on a checkpoint written by pretrain_gpt.py, checked against a
direct computation with the same model.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from tasks.zeroshot_gpt.datasets import (
    LambadaDataset,
    LMDataset,
    count_original_tokens,
    lambada_tokens,
    lm_window,
    num_lm_windows,
)
from tasks.zeroshot_gpt.detokenizer import (
    get_detokenizer,
    identity_detokenize,
    lambada_detokenize,
    ptb_detokenize,
    wikitext_detokenize,
)
from tasks.zeroshot_gpt.evaluate import count_correct, loss_results, shard_batches

from .gpt_runs import ROOT, preprocess, run_pretrain, tiny_gpt_args

# ----------------------------------------------------------------------------------------
# Detokenizers.
# ----------------------------------------------------------------------------------------


def test_wikitext_detokenize_rules():
    cases = {
        "a role @-@ playing game": "a role-playing game",
        "sold 1 @,@ 000 copies at 3 @.@ 5 dollars": "sold 1,000 copies at 3.5 dollars",
        "one , two . three : four ; five ! six ? seven": "one, two. three: four; five! six? seven",
        "a ( b c ) d [ e ] f { g } h": "a (b c) d [e] f {g} h",
        'he said " hello there " ok': 'he said "hello there" ok',
        "the players ' union": "the players' union",
        " = = = = Deep = = = = \n = = = Mid = = = \n = = Top = =": " ==== Deep ====\n=== Mid ===\n== Top ==",
        "it was 5 \u00b0 C": "it was 5\u00b0C",
        "line one \n line two": "line one\nline two",
        "about N people": "about 1 people",
        "the game 's battle": "the game's battle",
    }
    for raw, want in cases.items():
        assert wikitext_detokenize(raw) == want, raw


def test_ptb_and_lambada_detokenize():
    # Megatron's PTB rule turns " N " into "1 ", joining the number to the word before
    assert ptb_detokenize("he does n't know it 's N $ 1 # 1") == "he doesn't know it's1 $1 #1"
    assert ptb_detokenize("a \n b") == "a\nb"
    assert lambada_detokenize("  \u201cyes,\u201d she said\n now ") == '"yes," she said\nnow'


def test_get_detokenizer_by_path():
    assert get_detokenizer("/data/wikitext-103/wiki.test.tokens") is wikitext_detokenize
    assert get_detokenizer("/data/ptb/ptb.test.txt") is ptb_detokenize
    assert get_detokenizer("/data/lambada_test.jsonl") is lambada_detokenize
    assert get_detokenizer("/data/other.txt") is identity_detokenize
    assert get_detokenizer("/data/other.txt", default=wikitext_detokenize) is wikitext_detokenize


def test_count_original_tokens_counts_line_breaks():
    # "a b \n c" split on spaces: a, b, \n, c (the line break is the word-level <eos>)
    assert count_original_tokens(" a b \n c \n") == 4


# ----------------------------------------------------------------------------------------
# Sliding windows: every target scored exactly once.
# ----------------------------------------------------------------------------------------


def _scored_targets(num_tokens, seq_len, stride):
    tokens = np.arange(num_tokens) + 1000  # token value = position + 1000
    scored = []
    for i in range(num_lm_windows(num_tokens, seq_len, stride)):
        text, pad_mask = lm_window(tokens, i, seq_len, stride, pad_id=-1)
        assert text.shape == (seq_len + 1,) and pad_mask.shape == (seq_len,)
        for j in np.nonzero(pad_mask)[0]:
            assert text[j + 1] != -1  # a scored target is never padding
            scored.append(int(text[j + 1]) - 1000)
    return scored


@pytest.mark.parametrize("seq_len", [1, 4, 7, 16])
@pytest.mark.parametrize("stride_frac", [0.25, 0.5, 1.0])
def test_every_target_scored_exactly_once(seq_len, stride_frac):
    stride = max(1, int(seq_len * stride_frac))
    for num_tokens in [1, 2, 3, seq_len, seq_len + 1, seq_len + 2, 3 * seq_len + 5, 50]:
        assert _scored_targets(num_tokens, seq_len, stride) == list(range(1, num_tokens))


def test_window_context_and_count():
    tokens = list(range(100, 120))  # 20 tokens, 19 targets
    assert num_lm_windows(20, 8, 4) == 4  # 8 + 4 + 4 + 4 >= 19
    text, mask = lm_window(tokens, 2, 8, 4, pad_id=0)
    assert text.tolist() == list(range(108, 117))  # window of 9 starts at token 8
    assert mask.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]  # the first 4 targets are context
    text, mask = lm_window(tokens, 3, 8, 4, pad_id=0)
    assert text.tolist() == list(range(112, 120)) + [0]
    assert mask.tolist() == [0, 0, 0, 0, 1, 1, 1, 0]
    ds = LMDataset(
        tokens, 8, 0, num_original_tokens=10, num_tokenized_tokens=20, overlapping_eval=4
    )
    assert len(ds) == 4 and sum(int(ds[i]["pad_mask"].sum()) for i in range(4)) == 19
    with pytest.raises(ValueError, match="--overlapping-eval"):
        LMDataset(tokens, 8, 0, 10, 20, overlapping_eval=9)


def test_loss_results_and_sharding():
    r = loss_results(total_loss=2.0 * 99, num_tokenized=100, num_original=34)
    assert r["avg loss"] == 2.0 and r["ppl"] == pytest.approx(math.exp(2.0))
    assert r["token ratio"] == 3.0 and r["adjusted ppl"] == pytest.approx(math.exp(6.0))
    assert loss_results(99 * 50.0, 100, 34)["ppl"] == pytest.approx(math.exp(20.0))  # capped
    parts = [shard_batches(11, 3, r, 2) for r in range(2)]
    assert parts == [[[0, 1, 2], [6, 7, 8]], [[3, 4, 5], [9, 10]]]


# ----------------------------------------------------------------------------------------
# LAMBADA examples and scoring.
# ----------------------------------------------------------------------------------------


class _CharTokenizer:
    """One token per character (ord), enough to check the target split."""

    eod = 0

    def tokenize(self, text):
        return [ord(c) for c in text]


def test_lambada_target_split():
    tok = _CharTokenizer()
    context, target = lambada_tokens("the dog ran home", tok, strict=True)
    assert "".join(map(chr, context)) == "the dog ran"
    assert "".join(map(chr, target)) == " home"
    context, target = lambada_tokens("the dog ran home", tok, strict=False)
    assert "".join(map(chr, context)) == "the dog ran hom" and target == [ord("e")]


def test_lambada_dataset_items(tmp_path):
    path = tmp_path / "lambada.jsonl"
    path.write_text(json.dumps({"text": "ab cd"}) + "\n\n" + json.dumps({"text": "x" * 9 + " yz"}))
    ds = LambadaDataset(str(path), pad_id=0, tokenizer=_CharTokenizer(), seq_len=6, strict=True)
    assert len(ds) == 2
    item = ds[0]  # "ab" + " cd", padded to 7
    assert item["text"].tolist() == [ord(c) for c in "ab cd"] + [0, 0]
    assert item["pad_mask"].tolist() == [0, 1, 1, 1, 0, 0]  # targets " ", "c", "d"
    item = ds[1]  # too long: keeps its last 7 tokens, the target stays whole
    assert item["text"].tolist() == [ord(c) for c in "xxxx yz"]
    assert item["pad_mask"].tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.num_truncated == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "a b"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected a JSON object"):
        LambadaDataset(str(bad), 0, _CharTokenizer(), 6, strict=True)


def test_count_correct_needs_every_target():
    labels = torch.tensor([[1, 2, 3], [1, 2, 3], [0, 0, 0]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 1], [0, 0, 1]])
    preds = torch.tensor([[9, 2, 3], [1, 2, 0], [5, 5, 0]])  # right, one target wrong, right
    logits = torch.nn.functional.one_hot(preds, 10).float()  # [3, 3, 10]
    assert count_correct(logits, labels, mask).item() == 2.0


# ----------------------------------------------------------------------------------------
# End to end: tasks/main.py on a tiny trained GPT.
# ----------------------------------------------------------------------------------------

MODEL_FLAGS = [
    "--num-layers",
    "--hidden-size",
    "--num-attention-heads",
    "--seq-length",
    "--max-position-embeddings",
    "--vocab-file",
    "--merge-file",
]
WIKI = (
    " = Valkyria Chronicles III = \n \n Senjo no Valkyria 3 : Unrecorded Chronicles ( "
    "Japanese : lit . Valkyria of the Battlefield 3 ) , commonly referred to as Valkyria "
    "Chronicles III outside Japan , is a tactical role @-@ playing video game developed by "
    "Sega for the PlayStation Portable . \n \n = = Gameplay = = \n \n The game 's battle "
    "system sold 1 @,@ 000 copies at 3 @.@ 5 dollars in N stores . \n"
)
LAMBADA = [
    "He opened the door and saw the dog. The dog wagged its tail. He patted the dog",
    "She picked up the phone and called her mother. Her mother said hello",
    "The cat sat on the mat. Then the cat slept on the mat",
]
STRIDE = 8

# Run in a fresh process: the model from the checkpoint, scored without the task code's
# windows or masks. Targets t = 1 .. N-1; target t is read in window k = 0 when
# t <= seq_len, else k = ceil((t - seq_len) / stride), at position t - 1 - k * stride.
DIRECT = r"""
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

wiki_path, lambada_path, stride = sys.argv[2], sys.argv[3], int(sys.argv[4])
initialize_megatron(args_list=sys.argv[5:])
args, tok = get_args(), get_tokenizer()
model = GPTModel(config_from_args(args), parallel_output=False)
load_model_weights_only(model, args.load)
model.eval()
s = args.seq_length

def logits_of(ids):
    x = torch.tensor([ids])
    mask = torch.tril(torch.ones(1, 1, len(ids), len(ids))) < 0.5
    with torch.no_grad():
        return model(x, torch.arange(len(ids))[None], mask)[0].double()  # [n, v]

tokens = tok.tokenize(wikitext_detokenize(open(wiki_path, encoding="utf-8").read()))
cache, total = {}, 0.0
for t in range(1, len(tokens)):
    k = 0 if t <= s else math.ceil((t - s) / stride)
    if k not in cache:
        cache[k] = F.log_softmax(logits_of(tokens[k * stride : k * stride + s]), -1)
    total -= cache[k][t - 1 - k * stride, tokens[t]].item()
correct = 0
for line in open(lambada_path, encoding="utf-8"):
    text = json.loads(line)["text"]
    last = text.split()[-1]
    ctx = tok.tokenize(text[: text.rfind(last)].strip())
    tgt = tok.tokenize(" " + last)
    pred = logits_of(ctx + tgt)[len(ctx) - 1 : -1].argmax(-1).tolist()
    correct += int(pred == tgt)
print(json.dumps({"loss": total, "targets": len(tokens) - 1, "correct": correct}))
"""


def _python(argv, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in ("WORLD_SIZE", "MASTER_ADDR", "RANK"):
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env
    )


def _task(task, flags, check=True):
    proc = _python([os.path.join(ROOT, "tasks", "main.py"), "--task", task, *flags])
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory, vocab_dir):
    """(folder, model flags with --load): a tiny GPT trained 4 iterations, plus a
    WikiText-like file and a LAMBADA file in the folder."""
    work = tmp_path_factory.mktemp("zeroshot")
    args = tiny_gpt_args(preprocess(str(work), vocab_dir), vocab_dir, train_iters=4)
    args[args.index("--eval-iters") + 1] = "1"
    run_pretrain(args + ["--save", str(work / "ckpt"), "--save-interval", "4"])
    flags = []
    for flag in MODEL_FLAGS:
        flags += [flag, args[args.index(flag) + 1]]
    (work / "wiki.test.tokens").write_text(WIKI, encoding="utf-8")
    (work / "lambada_test.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in LAMBADA), encoding="utf-8"
    )
    return work, flags + ["--load", str(work / "ckpt")]


def _number(name, stdout):
    m = re.search(rf"{name}: ([-0-9.E+a-z]+)", stdout)
    assert m, f"no '{name}' in output:\n{stdout[-2000:]}"
    return float(m.group(1))


@pytest.mark.real_vocab
@pytest.mark.slow
def test_wikitext_and_lambada_like_a_user(trained):
    work, flags = trained
    readme = [
        "--tokenizer-type",
        "GPT2BPETokenizer",
        "--micro-batch-size",
        "8",
        "--checkpoint-activations",
        "--log-interval",
        "10",
        "--no-load-optim",
        "--no-load-rng",
    ]
    wiki = _task(
        "WIKITEXT103",
        flags
        + readme
        + ["--valid-data", str(work / "wiki.test.tokens"), "--overlapping-eval", str(STRIDE)],
    ).stdout
    assert " validation results on WIKITEXT103 | " in wiki
    avg, ppl = _number("avg loss", wiki), _number(" ppl", wiki)
    adjusted, ratio = _number("adjusted ppl", wiki), _number("token ratio", wiki)
    assert all(math.isfinite(v) and v > 0 for v in (avg, ppl, adjusted, ratio))
    summed = re.search(r"summed loss: (\S+) over (\d+) targets", wiki)
    tokenized = int(re.search(r"number of tokenized tokens: (\d+)", wiki).group(1))
    original = int(re.search(r"number of original tokens: (\d+)", wiki).group(1))
    assert original == len(WIKI.strip().split(" "))
    assert ratio == pytest.approx((tokenized - 1) / (original - 1))
    assert int(summed.group(2)) == tokenized - 1 > 2 * 32  # several overlapping windows

    lam = _task(
        "LAMBADA",
        flags + readme + ["--strict-lambada", "--valid-data", str(work / "lambada_test.jsonl")],
    ).stdout
    assert " validation results on LAMBADA | " in lam
    assert _number("total examples", lam) == len(LAMBADA)
    accuracy = _number("avg accuracy", lam)
    assert 0.0 <= accuracy <= 1.0

    script = work / "direct.py"
    script.write_text(DIRECT)
    proc = _python(
        [
            str(script),
            ROOT,
            str(work / "wiki.test.tokens"),
            str(work / "lambada_test.jsonl"),
            str(STRIDE),
            *flags,
            "--micro-batch-size",
            "1",
            "--tokenizer-type",
            "GPT2BPETokenizer",
        ]
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    direct = json.loads(proc.stdout.strip().splitlines()[-1])
    assert direct["targets"] == tokenized - 1
    assert float(summed.group(1)) / direct["targets"] == pytest.approx(
        direct["loss"] / direct["targets"], abs=1e-5
    )
    assert avg == pytest.approx(direct["loss"] / direct["targets"], rel=1e-4)
    assert _number("number correct", lam) == direct["correct"]


def test_unknown_and_missing_tasks_exit_with_one_line():
    from tasks.main import task_main

    with pytest.raises(SystemExit, match=r"^tasks/main.py: error: unknown --task FOO; choose"):
        task_main("FOO")
    if not os.path.isdir(os.path.join(ROOT, "tasks", "race")):
        with pytest.raises(SystemExit, match=r"--task RACE is not implemented here \(tasks/race"):
            task_main("RACE")
    assert callable(task_main("LAMBADA"))


def test_eval_flags_are_checked(tmp_path):
    from types import SimpleNamespace

    from tasks.zeroshot_gpt.evaluate import check_eval_args

    data = tmp_path / "wiki.test.tokens"
    data.write_text("a b\n")
    ok = dict(
        task="WIKITEXT103",
        valid_data=[str(data)],
        pipeline_model_parallel_size=1,
        deepspeed=False,
        load=str(tmp_path),
    )
    cases = [
        (dict(valid_data=None), "--task WIKITEXT103 needs --valid-data FILE"),
        (
            dict(valid_data=[str(tmp_path / "none.txt")]),
            f"--valid-data {tmp_path / 'none.txt'}: no such file",
        ),
        (dict(pipeline_model_parallel_size=2), "--pipeline-model-parallel-size 2 is not"),
        (dict(load=None), "--load (the checkpoint folder) is required"),
        ({}, f"--load {tmp_path}: no checkpoint there"),
    ]
    for change, message in cases:
        with pytest.raises(SystemExit) as exc:
            check_eval_args(SimpleNamespace(**{**ok, **change}))
        assert str(exc.value).startswith(f"tasks/main.py: error: {message}"), exc.value
