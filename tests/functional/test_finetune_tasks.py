"""BERT fine-tuning through tasks/main.py (MNLI, QQP, RACE) on CPU, as a user runs it.

A tiny BERT (2 layers, hidden 64) is pretrained for a few iterations by pretrain_bert.py
on the small corpus with the real uncased WordPiece vocabulary; the tests write task
files in GLUE's TSV and RACE's JSON layouts whose labels follow a keyword (MNLI: the
hypothesis says 'yes' / 'no' / 'maybe'; QQP: the second question says 'same' or
'other'; RACE: the right option holds 'true'), and fine-tune from that checkpoint:

* MNLI, 3 epochs at TP=1: the accuracy on both dev files rises above chance (1/3);
  a resume from the epoch-2 checkpoint repeats epoch 3's losses and accuracies exactly;
  TP=2 (the checkpoint reshaped by tools/checkpoint_util.py) and DP=2 give the TP=1
  losses to REL_TOL (fp32; the DP=1 run accumulates two micro-batches, the DP=2 run
  takes one each, so only the summation order differs).
* QQP with dev.tsv and the unlabelled test.tsv read as GLUE ships them; RACE's
  train/middle and dev/{middle,high} folders: accuracy above chance (1/2, 1/4).
* A TSV line with a missing column, a RACE file with broken JSON, and a GPT tokenizer
  stop the run with one line naming the file and line (or the flag).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys

import pytest

from .gpt_runs import CORPUS, ROOT, launch

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REL_TOL = 1e-4
SEQ = 64
EPOCHS = 3
TRAIN_LINE = re.compile(
    r" iteration\s+(\d+)/\s*(\d+) \| epoch:\s+(\d+) \|.*?learning rate: (\S+) \|.*?"
    r"lm loss: (\S+) \|"
)
METRIC_LINE = re.compile(
    r" > \|epoch: (-?\d+)\| metrics for (\S+): correct / total = (\d+) / (\d+) = "
)

WORDS = ("the man woman child dog cat house car tree river city park school book table "
         "road garden window door music song story game paper water food table friend "
         "teacher doctor market train bridge field hill lake night morning summer").split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


# ----------------------------------------------------------------------------------------
# Task files in the distributed formats
# ----------------------------------------------------------------------------------------

MNLI_KEYWORDS = {"entailment": "yes", "contradiction": "no", "neutral": "maybe"}
MNLI_TRAIN_HEADER = ("index promptID pairID genre sentence1_binary_parse "
                     "sentence2_binary_parse sentence1_parse sentence2_parse sentence1 "
                     "sentence2 label1 gold_label").split()
MNLI_DEV_HEADER = MNLI_TRAIN_HEADER[:-1] + ["label2", "label3", "label4", "label5",
                                            "gold_label"]


def write_mnli(path: str, n: int, seed: int, dev: bool) -> None:
    """GLUE's MNLI columns; the hypothesis carries the label's keyword."""
    rng = random.Random(seed)
    header = MNLI_DEV_HEADER if dev else MNLI_TRAIN_HEADER
    lines = ["\t".join(header)]
    labels = list(MNLI_KEYWORDS)
    for i in range(n):
        label = labels[i % 3]
        premise = sentence(rng, rng.randint(5, 9))
        words = sentence(rng, rng.randint(3, 6)).split()
        words.insert(rng.randint(0, len(words)), MNLI_KEYWORDS[label])
        hypothesis = " ".join(words)
        parse_a = "( " + premise + " )"
        parse_b = "( " + hypothesis + " )"
        row = [str(i), str(1000 + i), f"{1000 + i}e", "fiction", parse_a, parse_b,
               "(ROOT " + parse_a + ")", "(ROOT " + parse_b + ")", premise, hypothesis,
               label]
        row += [label] * 4 + [label] if dev else [label]
        lines.append("\t".join(row))
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_qqp(path: str, n: int, seed: int, test: bool = False) -> None:
    """GLUE's QQP columns (test: id, question1, question2); a duplicate's second
    question says 'same'."""
    rng = random.Random(seed)
    lines = ["id\tquestion1\tquestion2" if test else
             "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate"]
    for i in range(n):
        label = i % 2
        q1 = "what is the " + sentence(rng, rng.randint(2, 5)) + " ?"
        q2 = "is the " + sentence(rng, 3) + (" same" if label else " other") + " ?"
        if test:
            lines.append(f"{i}\t{q1}\t{q2}")
        else:
            lines.append(f"{i}\t{2 * i}\t{2 * i + 1}\t{q1}\t{q2}\t{label}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_race(folder: str, docs: int, seed: int) -> None:
    """RACE files (one JSON object each): two questions per article, the right option
    holds 'true', one question with a blank."""
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(seed)
    for d in range(docs):
        questions, options, answers = [], [], []
        for q in range(2):
            answer = rng.randrange(4)
            opts = [sentence(rng, 2) + (" true" if k == answer else " false")
                    for k in range(4)]
            questions.append("the story says _ ." if q else "what does the story say ?")
            options.append(opts)
            answers.append("ABCD"[answer])
        doc = {"answers": answers, "options": options, "questions": questions,
               "article": sentence(rng, 25) + " .", "id": f"{d}.txt"}
        with open(os.path.join(folder, f"{d}.txt"), "w") as f:
            f.write(json.dumps(doc))


# ----------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------


def model_args(vocab_dir: str, tp: int = 1) -> list[str]:
    return [
        "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", str(SEQ), "--max-position-embeddings", str(SEQ),
        "--vocab-file", os.path.join(vocab_dir, "bert-large-uncased-vocab.txt"),
        "--hidden-dropout", "0", "--attention-dropout", "0", "--seed", "1234",
        "--tensor-model-parallel-size", str(tp),
        "--make-vocab-size-divisible-by", str(128 // tp),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, vocab_dir) -> str:
    """A tiny BERT after 10 pretraining iterations of pretrain_bert.py."""
    out = tmp_path_factory.mktemp("bert_pretrained")
    prefix = str(out / "corpus")
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"),
         "--input", CORPUS, "--output-prefix", prefix,
         "--vocab-file", os.path.join(vocab_dir, "bert-large-uncased-vocab.txt"),
         "--dataset-impl", "mmap", "--tokenizer-type", "BertWordPieceLowerCase",
         "--split-sentences"],
        check=True, capture_output=True, text=True, cwd=ROOT, timeout=120,
        env={**os.environ, "NLTK_DATA": str(out / "no_nltk_data")},
    )  # fmt: skip
    save = str(out / "ckpt")
    launch(1, model_args(vocab_dir) + [
        "--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", "10",
        "--data-path", prefix + "_text_sentence", "--data-impl", "mmap",
        "--split", "949,50,1", "--lr", "0.001", "--lr-decay-style", "linear",
        "--lr-warmup-fraction", "0.1", "--log-interval", "5", "--eval-iters", "0",
        "--num-workers", "0", "--save", save, "--save-interval", "10",
    ], script="pretrain_bert.py", timeout=300)  # fmt: skip
    return save


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("glue_data")
    mnli = root / "MNLI"
    mnli.mkdir()
    write_mnli(str(mnli / "train.tsv"), 48, seed=1, dev=False)
    write_mnli(str(mnli / "dev_matched.tsv"), 30, seed=2, dev=True)
    write_mnli(str(mnli / "dev_mismatched.tsv"), 30, seed=3, dev=True)
    qqp = root / "QQP"
    qqp.mkdir()
    write_qqp(str(qqp / "train.tsv"), 48, seed=4)
    write_qqp(str(qqp / "dev.tsv"), 32, seed=5)
    write_qqp(str(qqp / "test.tsv"), 16, seed=6, test=True)
    return str(root)


def task_args(task: str, train: list[str], valid: list[str], vocab_dir: str, tp: int = 1,
              epochs: int = EPOCHS, mbs: int = 4, gbs: int = 8, lr: str = "1e-3") -> list[str]:
    return ["--task", task, "--train-data", *train, "--valid-data", *valid,
            "--tokenizer-type", "BertWordPieceLowerCase", "--epochs", str(epochs),
            "--micro-batch-size", str(mbs), "--global-batch-size", str(gbs),
            "--lr", lr, "--lr-decay-style", "linear", "--lr-warmup-fraction", "0.1",
            "--weight-decay", "1e-2", "--clip-grad", "1.0", "--log-interval", "1",
            "--eval-interval", "1000", "--eval-iters", "1",
            ] + model_args(vocab_dir, tp)  # fmt: skip


def run_task(args: list[str], nproc: int = 1, timeout: float = 400) -> str:
    return launch(nproc, args, script="tasks/main.py", timeout=timeout)


def losses(out: str) -> dict[int, tuple[int, str, str]]:
    """{iteration: (epoch, lr, loss)} as printed."""
    return {int(m[1]): (int(m[3]), m[4], m[5]) for m in TRAIN_LINE.finditer(out)}


def metrics(out: str) -> dict[tuple[int, str], tuple[int, int]]:
    """{(epoch, dataset name): (correct, total)}."""
    return {(int(m[1]), m[2]): (int(m[3]), int(m[4])) for m in METRIC_LINE.finditer(out)}


def fails(args: list[str]) -> str:
    """Run tasks/main.py expecting a non-zero exit; return its stderr and stdout."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "tasks/main.py"] + args, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0, proc.stdout[-3000:]
    return proc.stderr + proc.stdout
