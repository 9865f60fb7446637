"""BERT fine-tuning through tasks/main.py (MNLI, QQP, RACE) on CPU, as a user runs it.

A tiny BERT (2 layers, hidden 64) is pretrained for a few iterations by pretrain_bert.py
on the small corpus with the real uncased WordPiece vocabulary; the tests write task
files in GLUE's TSV and RACE's JSON layouts whose labels follow a keyword (MNLI: the
hypothesis says 'yes' / 'no' / 'maybe'; QQP: the second question says 'same' or
'other'; RACE: the right option holds 'true'), and fine-tune from that checkpoint:

* MNLI, 3 epochs at TP=1: the accuracy on both dev files rises above chance (1/3);
  a resume from the middle of epoch 2 repeats the losses and accuracies exactly, and
  --epochs 0 evaluates the saved model to the last epoch's accuracies;
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

from ..dist_utils import free_port
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
    write_mnli(str(mnli / "train.tsv"), 96, seed=1, dev=False)
    write_mnli(str(mnli / "dev_matched.tsv"), 30, seed=2, dev=True)
    write_mnli(str(mnli / "dev_mismatched.tsv"), 30, seed=3, dev=True)
    qqp = root / "QQP"
    qqp.mkdir()
    write_qqp(str(qqp / "train.tsv"), 96, seed=4)
    write_qqp(str(qqp / "dev.tsv"), 32, seed=5)
    write_qqp(str(qqp / "test.tsv"), 16, seed=6, test=True)
    return str(root)


def task_args(task: str, train: list[str], valid: list[str], vocab_dir: str, tp: int = 1,
              epochs: int = EPOCHS, mbs: int = 4, gbs: int = 8, lr: str = "3e-3") -> list[str]:
    return ["--task", task, "--train-data", *train, "--valid-data", *valid,
            "--tokenizer-type", "BertWordPieceLowerCase", "--epochs", str(epochs),
            "--micro-batch-size", str(mbs), "--global-batch-size", str(gbs),
            "--lr", lr, "--lr-decay-style", "linear", "--lr-warmup-fraction", "0.1",
            "--weight-decay", "1e-2", "--clip-grad", "1.0", "--log-interval", "1",
            "--eval-interval", "1000", "--eval-iters", "1",
            ] + model_args(vocab_dir, tp)  # fmt: skip


def run_task(args: list[str], nproc: int = 1, timeout: float = 400) -> str:
    return launch(nproc, args, script="tasks/main.py", timeout=timeout)


def run_example(script: str, env: dict, args: list[str], timeout: float = 400) -> str:
    """bash examples/<script> with `env` set and `args` after it (they win over the
    script's flags, argparse keeping the last value); returns stdout."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                    PYTHONWARNINGS="ignore", MASTER_PORT=str(free_port()), PRECISION="",
                    **env)
    for key in ("RANK", "LOCAL_RANK", "MASTER_ADDR"):
        full_env.pop(key, None)
    proc = subprocess.run(["bash", os.path.join("examples", script)] + args, cwd=ROOT,
                          env=full_env, capture_output=True, text=True, timeout=timeout,
                          start_new_session=True)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\n{proc.stdout[-3000:]}" \
        f"\n{proc.stderr[-4000:]}"
    return proc.stdout


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


# ----------------------------------------------------------------------------------------
# MNLI: learning, resume, TP=2, DP=2
# ----------------------------------------------------------------------------------------

STEPS_PER_EPOCH = 12  # 96 examples, global batch 8
PARALLEL_ITERS = 14  # into epoch 2, past epoch 1's accuracy


def mnli_args(glue_dir: str, vocab_dir: str, tp: int = 1) -> list[str]:
    mnli = os.path.join(glue_dir, "MNLI")
    return task_args("MNLI", [os.path.join(mnli, "train.tsv")],
                     [os.path.join(mnli, "dev_matched.tsv"),
                      os.path.join(mnli, "dev_mismatched.tsv")], vocab_dir, tp=tp)


@pytest.fixture(scope="module")
def mnli_run(tmp_path_factory, pretrained, glue_dir, vocab_dir):
    """3 epochs from the pretrained BERT, a checkpoint after each and at iteration 18
    (the middle of epoch 2)."""
    save = str(tmp_path_factory.mktemp("mnli_ckpt"))
    out = run_task(mnli_args(glue_dir, vocab_dir) + [
        "--pretrained-checkpoint", pretrained, "--save", save, "--save-interval", "18"])
    return out, save


@pytest.mark.real_vocab
def test_mnli_learns_and_reports_each_dev_file(mnli_run):
    out, save = mnli_run
    rows = losses(out)
    assert sorted(rows) == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1)), out[-3000:]
    assert [rows[i][0] for i in (1, 12, 13, 36)] == [1, 1, 2, 3]
    assert "could not find classification_head in the checkpoint" in out
    scores = metrics(out)
    assert sorted(scores) == [(e, n) for e in range(EPOCHS)
                              for n in ("dev-matched", "dev-mismatched")], out[-3000:]
    for name in ("dev-matched", "dev-mismatched"):
        correct, total = scores[(EPOCHS - 1, name)]
        assert total == 30
        # chance is 1/3 (10 of 30): the keyword is learnt (20 of 30 in each file when
        # written; 29 and 27 after epoch 2)
        assert correct >= 16, (name, scores)
    first = [float(rows[i][2]) for i in range(1, STEPS_PER_EPOCH + 1)]
    last = [float(rows[i][2]) for i in range(25, 37)]
    assert sum(last) / 12 < sum(first) / 12 - 0.2, (first, last)
    with open(os.path.join(save, "latest_checkpointed_iteration.txt")) as f:
        assert f.read().strip() == "36"
    for it in (12, 18, 24, 36):
        assert os.path.isfile(os.path.join(save, f"iter_{it:07d}", "mp_rank_00",
                                           "model_optim_rng.pt"))


def test_mnli_checkpoint_holds_megatron_keys(mnli_run):
    import torch

    _, save = mnli_run
    state = torch.load(os.path.join(save, "iter_0000036", "mp_rank_00", "model_optim_rng.pt"),
                       map_location="cpu", weights_only=False)
    assert set(state["model"]) == {"language_model", "classification_head"}
    assert set(state["model"]["language_model"]) == {"embedding", "transformer", "pooler"}
    assert state["model"]["classification_head"]["weight"].shape == (3, 64)
    assert state["iteration"] == 36 and "optimizer" in state


def test_mnli_resume_repeats_the_epochs_exactly(mnli_run, glue_dir, vocab_dir, tmp_path):
    """From iteration 18 (half-way through epoch 2): the rest of epoch 2 and epoch 3 with
    the uninterrupted run's losses, learning rates and accuracies, exactly."""
    out, save = mnli_run
    ckpt = tmp_path / "resume"
    ckpt.mkdir()
    shutil.copytree(os.path.join(save, "iter_0000018"), ckpt / "iter_0000018")
    (ckpt / "latest_checkpointed_iteration.txt").write_text("18")
    resumed = run_task(mnli_args(glue_dir, vocab_dir) + [
        "--load", str(ckpt), "--save", str(ckpt)])
    rows, again = losses(out), losses(resumed)
    assert sorted(again) == list(range(19, 37)), resumed[-3000:]
    assert again == {i: rows[i] for i in range(19, 37)}
    assert "loading checkpoint from" in resumed and "classification_head" not in resumed
    later = {k: v for k, v in metrics(out).items() if k[0] >= 1}
    assert metrics(resumed) == later


def test_mnli_epochs_0_evaluates_the_checkpoint(mnli_run, glue_dir, vocab_dir):
    """--epochs 0 --load: the accuracies of the last epoch, reported as epoch -1."""
    out, save = mnli_run
    mnli = os.path.join(glue_dir, "MNLI")
    evaluated = run_task(task_args("MNLI", [os.path.join(mnli, "train.tsv")],
                                   [os.path.join(mnli, "dev_matched.tsv"),
                                    os.path.join(mnli, "dev_mismatched.tsv")], vocab_dir,
                                   epochs=0) + ["--load", save])
    assert not losses(evaluated), evaluated[-3000:]
    final = {(-1, k[1]): v for k, v in metrics(out).items() if k[0] == EPOCHS - 1}
    assert metrics(evaluated) == final, evaluated[-3000:]


def _assert_parallel_matches(out: str, serial: str) -> None:
    rows, other = losses(serial), losses(out)
    assert sorted(other) == list(range(1, PARALLEL_ITERS + 1)), out[-3000:]
    for it in other:
        assert other[it][:2] == rows[it][:2], (it, other[it], rows[it])
        a, b = float(other[it][2]), float(rows[it][2])
        assert abs(a - b) <= REL_TOL * abs(b), (it, a, b)
    first_epoch = {k: v for k, v in metrics(serial).items() if k[0] == 0}
    assert metrics(out) == first_epoch


def test_mnli_tensor_parallel_2_equals_serial(mnli_run, pretrained, glue_dir, vocab_dir,
                                              tmp_path):
    """The pretrained checkpoint reshaped to TP=2 by tools/checkpoint_util.py; two ranks
    split attention and MLP, the pooler and head are replicated."""
    out, _ = mnli_run
    tp2 = str(tmp_path / "bert_tp2")
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "checkpoint_util.py"),
         "--model-type", "BERT", "--load-dir", pretrained, "--save-dir", tp2,
         "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "1"],
        check=True, capture_output=True, text=True, cwd=ROOT, timeout=120)  # fmt: skip
    parallel = run_task(mnli_args(glue_dir, vocab_dir, tp=2) + [
        "--pretrained-checkpoint", tp2, "--exit-interval", str(PARALLEL_ITERS)], nproc=2)
    _assert_parallel_matches(parallel, out)


def test_mnli_data_parallel_2_equals_serial(mnli_run, pretrained, glue_dir, vocab_dir,
                                           tmp_path):
    """examples/finetune_mnli_distributed.sh on 2 ranks (fp32, the tiny model's flags
    after it). DP=2 takes one micro-batch of 4 per rank where DP=1 accumulates two: the
    same global batches; the accuracy counts all 30 examples of each file over both
    ranks."""
    out, _ = mnli_run
    mnli = os.path.join(glue_dir, "MNLI")
    env = {"WORLD_SIZE": "2", "TRAIN_DATA": os.path.join(mnli, "train.tsv"),
           "VALID_DATA": " ".join(os.path.join(mnli, f) for f in
                                  ("dev_matched.tsv", "dev_mismatched.tsv")),
           "PRETRAINED_CHECKPOINT": pretrained, "CHECKPOINT_PATH": str(tmp_path / "ckpt"),
           "VOCAB_FILE": os.path.join(vocab_dir, "bert-large-uncased-vocab.txt")}
    parallel = run_example("finetune_mnli_distributed.sh", env, mnli_args(glue_dir, vocab_dir)
                           + ["--exit-interval", str(PARALLEL_ITERS)])
    _assert_parallel_matches(parallel, out)
    assert os.path.isdir(tmp_path / "ckpt" / f"iter_{PARALLEL_ITERS:07d}")


# ----------------------------------------------------------------------------------------
# QQP and RACE
# ----------------------------------------------------------------------------------------


def test_qqp_learns_and_reads_the_unlabelled_test_file(pretrained, glue_dir, vocab_dir):
    """4 epochs; test.tsv (no is_duplicate column) is scored against label 0; a
    validation loss every 12 iterations."""
    qqp = os.path.join(glue_dir, "QQP")
    out = run_task(task_args(
        "QQP", [os.path.join(qqp, "train.tsv")],
        [os.path.join(qqp, "dev.tsv"), os.path.join(qqp, "test.tsv")], vocab_dir,
        epochs=4) + ["--pretrained-checkpoint", pretrained, "--eval-interval", "12"])
    # --eval-interval: the validation loss of --eval-iters global batches of dev + test
    assert len(re.findall(r" validation loss at iteration (?:12|24|36|48) \| lm loss value: ",
                          out)) == 4, out[-3000:]
    scores = metrics(out)
    assert scores[(3, "test")][1] == 16, out[-3000:]
    correct, total = scores[(3, "dev")]
    assert total == 32 and correct >= 24, scores  # chance: 16 of 32


@pytest.fixture(scope="module")
def race_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("race_data") / "RACE"
    write_race(str(root / "train" / "middle"), 24, seed=7)
    write_race(str(root / "dev" / "middle"), 8, seed=8)
    write_race(str(root / "dev" / "high"), 8, seed=9)
    return str(root)


def test_race_learns_on_each_dev_folder(pretrained, race_dir, vocab_dir, tmp_path):
    """examples/finetune_race_distributed.sh on one rank (fp32, the tiny model's flags
    after it): 48 questions (4 sequences each) an epoch, micro-batch 4 questions;
    chance is 1/4."""
    env = {"WORLD_SIZE": "1", "PRETRAINED_CHECKPOINT": pretrained,
           "CHECKPOINT_PATH": str(tmp_path / "ckpt"),
           "VOCAB_FILE": os.path.join(vocab_dir, "bert-large-uncased-vocab.txt")}
    out = run_example("finetune_race_distributed.sh", env, task_args(
        "RACE", [os.path.join(race_dir, "train", "middle")],
        [os.path.join(race_dir, "dev", "middle"), os.path.join(race_dir, "dev", "high")],
        vocab_dir, epochs=4))
    assert "could not find multichoice_head in the checkpoint" in out
    assert sorted(losses(out)) == list(range(1, 4 * 6 + 1)), out[-3000:]
    scores = metrics(out)
    for name in ("dev-middle", "dev-high"):
        correct, total = scores[(3, name)]
        assert total == 16 and correct >= 8, scores  # chance: 4 of 16


# ----------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------


def test_malformed_inputs_name_the_file_and_line(glue_dir, race_dir, vocab_dir, tmp_path):
    mnli = tmp_path / "MNLI"
    mnli.mkdir()
    lines = open(os.path.join(glue_dir, "MNLI", "train.tsv")).read().split("\n")
    lines[4] = "\t".join(lines[4].split("\t")[:-1])  # line 5 loses its gold_label
    (mnli / "train.tsv").write_text("\n".join(lines))
    dev = os.path.join(glue_dir, "MNLI", "dev_matched.tsv")
    err = fails(task_args("MNLI", [str(mnli / "train.tsv")], [dev], vocab_dir))
    assert f"{mnli / 'train.tsv'}:5: expected 12 tab-separated columns" in err, err[-3000:]

    race = tmp_path / "RACE" / "train" / "middle"
    shutil.copytree(os.path.join(race_dir, "train", "middle"), race)
    good = (race / "3.txt").read_text()
    (race / "3.txt").write_text(good[:-1].replace(', "options"', ',\n "options"'))
    err = fails(task_args("RACE", [str(race)], [str(race)], vocab_dir))
    assert f"{race / '3.txt'}:2: not valid JSON" in err, err[-3000:]
    (race / "3.txt").write_text(good.replace('"answers": ["', '"answers": ["E", "'))
    err = fails(task_args("RACE", [str(race)], [str(race)], vocab_dir))
    assert f"{race / '3.txt'}:1: 2 questions, 2 option lists and 3 answers" in err, err[-3000:]


def test_gpt_models_are_refused(glue_dir, vocab_dir):
    """Megatron's classification tasks fine-tune BERT only."""
    mnli = os.path.join(glue_dir, "MNLI")
    args = task_args("MNLI", [os.path.join(mnli, "train.tsv")],
                     [os.path.join(mnli, "dev_matched.tsv")], vocab_dir)
    args[args.index("BertWordPieceLowerCase")] = "GPT2BPETokenizer"
    args[args.index(os.path.join(vocab_dir, "bert-large-uncased-vocab.txt"))] = os.path.join(
        vocab_dir, "gpt2-vocab.json")
    err = fails(args + ["--merge-file", os.path.join(vocab_dir, "gpt2-merges.txt")])
    assert "GPT models are not supported on the classification tasks" in err, err[-3000:]
