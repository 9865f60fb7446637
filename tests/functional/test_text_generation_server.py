"""tools/run_text_generation_server.py served on 127.0.0.1 and asked over real HTTP, on a
tiny GPT that pretrain_gpt.py trained, its checkpoint moved into Megatron's `release`
folder (release/mp_rank_00/model_optim_rng.pt, tracker 'release'), zipped and extracted
by dataset/download_ckpt.sh (MEGATRON_CKPT_ZIP), and the same weights reshaped to TP=2 by
tools/checkpoint_util.py.

TP=1 server: greedy replies equal tools/generate_samples_gpt.py --greedy on the release
checkpoint; logprobs and segments line up with the tokens and equal the log-softmax of a
forward pass of the model in a separate process (|diff| <= 1e-4, fp32); bad requests are
answered 400 with a message and the server answers the next good one; requests sent at
once are all answered as when sent alone; a seeded sampled request repeats;
tools/text_generation_cli.py prints the replies. TP=2 server (torchrun, gloo): the same
greedy replies and log-probabilities, bad and concurrent requests too.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from ..dist_utils import free_port
from .gpt_runs import ROOT, preprocess, run_pretrain, tiny_gpt_args

pytestmark = pytest.mark.slow
pytest.importorskip("flask")

PROMPTS = ["Hello world", "The history of the Python programming language began in", "Data"]
NEW = 8  # tokens_to_generate of the greedy requests (seq-length 32 holds every prompt + 8)
LOG_PROB_TOL = 1e-4
MODEL_FLAGS = ["--num-layers", "--hidden-size", "--num-attention-heads", "--seq-length",
               "--max-position-embeddings", "--vocab-file", "--merge-file", "--tokenizer-type",
               "--seed"]  # fmt: skip

# The model's log-softmax over the real vocabulary at every position of each token list
# (one forward pass of the whole sequence), in a fresh process: JSON on the last line.
REFERENCE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
import torch.nn.functional as F
from megatron import get_args, get_tokenizer
from megatron.checkpointing import load_model_weights_only
from megatron.initialize import initialize_megatron
from megatron.model import GPTModel
from megatron.model.config import config_from_args

rows = json.load(open(sys.argv[2]))
initialize_megatron(args_list=sys.argv[3:])
args, tok = get_args(), get_tokenizer()
model = GPTModel(config_from_args(args), parallel_output=False)
load_model_weights_only(model, args.load)
model.eval()
out = []
for ids in rows:
    n = len(ids)
    mask = torch.ones(n, n).triu(1).bool()[None, None]  # True = masked
    with torch.no_grad():
        logits = model(torch.tensor([ids]), torch.arange(n)[None], mask)[0]  # [n, v]
    lp = F.log_softmax(logits[:, : tok.vocab_size].double(), -1)
    out.append({"chosen": [float(lp[i - 1, ids[i]]) for i in range(1, n)],
                "best": [float(lp[i - 1].max()) for i in range(1, n)]})
print(json.dumps(out))
"""


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, vocab_dir):
    """(work folder, {tp: model flags with --load}): a release checkpoint at TP=1 (zipped
    and extracted by dataset/download_ckpt.sh) and the same weights at TP=2."""
    work = tmp_path_factory.mktemp("text_server")
    args = tiny_gpt_args(preprocess(str(work), vocab_dir), vocab_dir, train_iters=3)
    args[args.index("--eval-interval") + 1] = "100"
    run_pretrain(args + ["--save", str(work / "trained"), "--save-interval", "3"])
    # Megatron's release layout: the weights under release/, the tracker says 'release'
    release = work / "release"
    release.mkdir()
    shutil.move(str(work / "trained" / "iter_0000003"), str(release / "release"))
    (release / "latest_checkpointed_iteration.txt").write_text("release\n")
    assert (release / "release" / "mp_rank_00" / "model_optim_rng.pt").is_file()
    # dataset/download_ckpt.sh extracts such a folder from its zip (as NGC ships the 345M)
    archive = shutil.make_archive(str(work / "ckpt"), "zip", str(release))
    extracted = work / "gpt2_345m"
    proc = subprocess.run(["bash", os.path.join(ROOT, "dataset", "download_ckpt.sh"),
                           str(extracted)], capture_output=True, text=True, timeout=120,
                          env=dict(_env(), MEGATRON_CKPT_ZIP=archive))  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (extracted / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
    assert sorted(os.listdir(extracted)) == ["latest_checkpointed_iteration.txt", "release"]
    flags = []
    for flag in MODEL_FLAGS:
        flags += [flag, args[args.index(flag) + 1]]
    spec = importlib.util.spec_from_file_location(
        "checkpoint_util_text_server", os.path.join(ROOT, "tools", "checkpoint_util.py")
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    # --make-vocab-size-divisible-by 64 keeps TP=1's padded vocabulary (50304) at TP=2
    assert tool.main(["--load-dir", str(release), "--save-dir", str(work / "tp2"),
                      "--target-tensor-parallel-size", "2",
                      "--make-vocab-size-divisible-by", "64"]) == 0  # fmt: skip
    return work, {
        1: flags + ["--load", str(extracted)],
        2: ["--use-checkpoint-args", "--make-vocab-size-divisible-by", "64",
            "--load", str(work / "tp2")],
    }


class Server:
    """A running server (its process group is killed at stop())."""

    def __init__(self, flags: list[str], nproc: int = 1) -> None:
        script = os.path.join(ROOT, "tools", "run_text_generation_server.py")
        if nproc == 1:
            cmd = [sys.executable, script]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                   str(nproc), "--nnodes", "1", "--master_addr", "127.0.0.1",
                   "--master_port", str(free_port()), script]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd + flags + ["--host", "127.0.0.1", "--port", "0", "--micro-batch-size", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=_env(),
            start_new_session=True,
        )  # fmt: skip
        self.lines: list[str] = []
        self.url = None
        ready = threading.Event()

        def read():
            for line in self.proc.stdout:
                self.lines.append(line)
                if "text generation server at " in line and self.url is None:
                    self.url = line.split("server at ")[1].strip()
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        ready.wait(timeout=240)
        if self.url is None:
            self.stop()
            raise AssertionError("the server did not start:\n" + "".join(self.lines[-60:]))

    def log(self) -> str:
        return "".join(self.lines)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _close(got: list, expected: list, tol: float = LOG_PROB_TOL) -> bool:
    """Same length, every |difference| <= tol."""
    return len(got) == len(expected) and all(abs(a - b) <= tol for a, b in zip(got, expected))


def put(url: str, body, raw: bytes | None = None) -> tuple[int, dict]:
    """PUT a JSON body (or raw bytes) -> (status, reply JSON)."""
    data = raw if raw is not None else json.dumps(body).encode("utf-8")
    request = urllib.request.Request(url, data=data, method="PUT",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=240) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _greedy(prompts=PROMPTS, **extra) -> dict:
    return {"prompts": list(prompts), "tokens_to_generate": NEW, "top_k": 1, **extra}


@pytest.fixture(scope="module")
def server_tp1(checkpoints):
    server = Server(checkpoints[1][1])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def greedy_tp1(server_tp1):
    status, reply = put(server_tp1.url, _greedy(logprobs=True))
    assert status == 200, reply
    return reply


def test_greedy_equals_generate_samples_on_the_release_checkpoint(checkpoints, greedy_tp1):
    work, flags = checkpoints
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    out = work / "greedy.jsonl"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "generate_samples_gpt.py"), *flags[1],
         "--micro-batch-size", "3", "--sample-input-file", str(prompts),
         "--sample-output-file", str(out), "--greedy", "--out-seq-length", str(NEW)],
        capture_output=True, text=True, timeout=240, cwd=ROOT, env=_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    # text is prompt + continuation; a row that ended at eod has fewer than NEW tokens
    assert greedy_tp1["text"] == [r["prompt"] + r["text"] for r in rows]
    for row, segments in zip(rows, greedy_tp1["segments"]):
        assert row["length"] == NEW or row["finished"]
        assert "".join(segments) == row["prompt"] + row["text"]


def test_logprobs_are_the_models_log_softmax(checkpoints, server_tp1, greedy_tp1):
    work, flags = checkpoints
    # tokens_to_generate=0 scores the prompts alone
    status, scored = put(server_tp1.url, {"prompts": PROMPTS, "tokens_to_generate": 0,
                                          "logprobs": True})  # fmt: skip
    assert status == 200, scored
    assert scored["text"] == PROMPTS
    # each reply's token ids: its segments, encoded back byte by byte, are vocabulary entries
    vocab = json.load(open(flags[1][flags[1].index("--vocab-file") + 1], encoding="utf-8"))
    byte_encoder = _byte_encoder()

    def ids_of(segments):
        return [vocab["".join(byte_encoder[b] for b in s.encode("utf-8"))] for s in segments]

    rows = [ids_of(s) for s in greedy_tp1["segments"] + scored["segments"]]
    (work / "rows.json").write_text(json.dumps(rows))
    (work / "reference.py").write_text(REFERENCE)
    proc = subprocess.run(
        [sys.executable, str(work / "reference.py"), ROOT, str(work / "rows.json"), *flags[1],
         "--micro-batch-size", "1"],
        capture_output=True, text=True, timeout=240, cwd=ROOT, env=_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ref = json.loads(proc.stdout.strip().splitlines()[-1])
    for i, (got, expected) in enumerate(zip(greedy_tp1["logprobs"] + scored["logprobs"], ref)):
        assert len(got) == len(rows[i]) - 1  # one per token after the first
        assert _close(got, expected["chosen"])
    for i in range(len(PROMPTS)):
        n = len(rows[len(PROMPTS) + i])  # the prompt's tokens
        assert rows[i][:n] == rows[len(PROMPTS) + i]
        assert n <= len(rows[i]) <= n + NEW  # fewer where a row ended at eod
        gen, best = ref[i]["chosen"][n - 1 :], ref[i]["best"][n - 1 :]  # greedy: the argmax
        assert _close(gen, best)
        # scoring the prompt gives the prompt part of the continuation's log-probabilities
        assert _close(scored["logprobs"][i], greedy_tp1["logprobs"][i][: n - 1], 1e-5)


def _byte_encoder() -> dict:
    from megatron.tokenizer.gpt2_tokenization import bytes_to_unicode

    return bytes_to_unicode()


BAD = [
    ({"tokens_to_generate": 4}, "prompts argument required"),
    ({"prompts": "Hello", "tokens_to_generate": 4}, "prompts is not a list of strings"),
    ({"prompts": ["a", 3]}, "prompts is not a list of strings"),
    ({"prompts": []}, "prompts is empty"),
    ({"prompts": ["Hello"], "tokens_to_generate": -1}, "tokens_to_generate must be an integer"),
    ({"prompts": ["Hello"], "tokens_to_generate": "8"}, "tokens_to_generate must be an integer"),
    ({"prompts": ["Hello"], "tokens_to_generate": 0}, "tokens_to_generate=0 implies logprobs"),
    ({"prompts": ["Hello"], "temperature": 0}, "temperature must be a positive number"),
    ({"prompts": ["Hello"], "top_k": 1.5}, "top_k must be an integer"),
    ({"prompts": ["Hello"], "top_k": 5, "top_p": 0.5}, "cannot set both top-k and top-p"),
    ({"prompts": ["Hello"], "logprobs": "yes"}, "logprobs must be a boolean"),
    ({"prompts": ["Hello"], "random_seed": -3}, "random_seed must be a positive integer"),
    ({"prompts": [""]}, "Empty prompts require add_BOS=true"),
    ({"prompts": ["Hello", " ".join(["word"] * 40)], "tokens_to_generate": 1},
     ("prompt 1 has ", " tokens, more than the model's context of 32 tokens")),
    ({"prompts": ["Hello"], "tokens_to_generate": 40},
     ("Length of prompt + tokens_to_generate (", ") is longer than the model's context of 32")),
    ({"prompts": ["Hello"], "beam_width": 2}, "beam search (beam_width) is not supported"),
    ([1, 2], "must be a JSON object"),
]


def _check_bad_requests(url: str) -> None:
    for body, message in BAD:
        status, reply = put(url, body)
        fragments = message if isinstance(message, tuple) else (message,)
        assert status == 400, (body, status, reply)
        assert all(f in reply["message"] for f in fragments), (body, reply)
    status, reply = put(url, None, raw=b'{"prompts": ["Hello"')  # invalid JSON
    assert status == 400 and "not valid JSON" in reply["message"], reply


def test_bad_requests_get_400_and_the_server_serves_on(server_tp1, greedy_tp1):
    _check_bad_requests(server_tp1.url)
    status, reply = put(server_tp1.url, _greedy(logprobs=True))
    assert status == 200 and reply == greedy_tp1
    assert server_tp1.proc.poll() is None


def _concurrent(url: str, bodies: list) -> list:
    replies = [None] * len(bodies)
    barrier = threading.Barrier(len(bodies))

    def send(i):
        barrier.wait()
        replies[i] = put(url, bodies[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return replies


def test_concurrent_requests_are_answered_one_at_a_time(server_tp1, greedy_tp1):
    sampled = {"prompts": PROMPTS[:2], "tokens_to_generate": NEW, "top_k": 20,
               "temperature": 0.9, "random_seed": 7}  # fmt: skip
    status, alone = put(server_tp1.url, sampled)
    assert status == 200
    singles = [_greedy([p], logprobs=True) for p in PROMPTS]
    bodies = singles + [sampled, _greedy(logprobs=True), {"prompts": ["x"], "top_k": "1"}]
    replies = _concurrent(server_tp1.url, bodies)
    for i in range(len(PROMPTS)):  # each prompt alone gives its row of the batch
        status, reply = replies[i]
        assert status == 200
        assert reply["text"] == [greedy_tp1["text"][i]]
        assert reply["segments"] == [greedy_tp1["segments"][i]]
        assert _close(reply["logprobs"][0], greedy_tp1["logprobs"][i])
    assert replies[3] == (200, alone)  # the seeded sample repeats, not disturbed
    assert replies[4][0] == 200 and replies[4][1]["text"] == greedy_tp1["text"]
    assert replies[5][0] == 400
    _assert_one_at_a_time(server_tp1, len(bodies) - 1)


def _assert_one_at_a_time(server: Server, at_least: int) -> None:
    """The server's log: one line per generation, and no two generations overlap."""
    time.sleep(0.5)
    spans = [tuple(float(t) for t in re.search(r"generated from ([0-9.]+) to ([0-9.]+)",
                                                line).groups())
             for line in server.log().splitlines() if " generated from " in line]
    assert len(spans) >= at_least, server.log()[-3000:]
    spans.sort()
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))


def test_cli_prints_the_replies(server_tp1, greedy_tp1):
    host_port = server_tp1.url[len("http://"): -len("/api")]
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "text_generation_cli.py"), host_port,
         "-n", str(NEW), "--top_k", "1"],
        input="\n".join(PROMPTS[:2]) + "\n", capture_output=True, text=True, timeout=240,
        cwd=ROOT, env=_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "".join(t + "\n\n" for t in greedy_tp1["text"][:2])
    bad = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "text_generation_cli.py"), server_tp1.url,
         "-n", "-2"],
        input="Hello\n", capture_output=True, text=True, timeout=240, cwd=ROOT, env=_env(),
    )  # fmt: skip
    assert bad.returncode == 1 and bad.stderr.startswith("Error 400: tokens_to_generate")


def test_tensor_parallel_server(checkpoints, greedy_tp1):
    server = Server(checkpoints[1][2], nproc=2)
    try:
        status, reply = put(server.url, _greedy(logprobs=True))
        assert status == 200, reply
        assert reply["text"] == greedy_tp1["text"]
        assert reply["segments"] == greedy_tp1["segments"]
        for got, expected in zip(reply["logprobs"], greedy_tp1["logprobs"]):
            assert _close(got, expected)
        _check_bad_requests(server.url)
        bodies = [_greedy([p]) for p in PROMPTS] + [{"prompts": ["Hello"], "top_k": -1}]
        replies = _concurrent(server.url, bodies)
        for i in range(len(PROMPTS)):
            assert replies[i][0] == 200
            assert replies[i][1]["text"] == [greedy_tp1["text"][i]]
        assert replies[-1][0] == 400
        _assert_one_at_a_time(server, len(PROMPTS) + 1)
        assert server.proc.poll() is None
    finally:
        server.stop()
