"""tools/plan_parallelism.py: the memory and step-time arithmetic on hand-worked cases, the
meta-device parameter count against the closed form, the published layouts of Narayanan
et al. 2021 (Table 1) reported as feasible, and the --explain / --json / --measured paths
of the command line."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from megatron.planner import memory, timing
from megatron.planner.model import ModelShape, closed_form_params

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GIB = 2**30

GPT_1P3B = ["--num-layers", "24", "--hidden-size", "2048", "--num-attention-heads", "16",
            "--seq-length", "2048", "--vocab-size", "51199"]  # NullTokenizer: 51200 ids
# LLaMA-3.2-1B (tools/bench/bench_gpt_gpu.py SHAPES["llama-1b"])
LLAMA_1B = ["--num-layers", "16", "--hidden-size", "2048", "--num-attention-heads", "32",
            "--num-key-value-heads", "8", "--ffn-hidden-size", "8192", "--seq-length", "2048",
            "--vocab-size", "128255", "--use-rotary-position-embeddings",
            "--no-position-embedding", "--swiglu", "--normalization", "rmsnorm",
            "--disable-bias-linear"]


def _tool():
    spec = importlib.util.spec_from_file_location(
        "plan_parallelism", os.path.join(ROOT, "tools", "plan_parallelism.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TOOL = _tool()


def _run_json(capsys, argv: list) -> tuple:
    code = TOOL.main(argv + ["--json"])
    return code, json.loads(capsys.readouterr().out)


def test_state_bytes_per_parameter_by_hand():
    # bf16 + Adam, Megatron's optimizer: 2 (bf16 weights) + 4 (fp32 main grads) + 12 (fp32
    # master, m, v) = 18 bytes/param; fp16 keeps 16-bit grads: 16; fp32: 4 + 4 + 8 = 16.
    assert memory.state_bytes("bf16", "none", 8).total == 18.0
    assert memory.state_bytes("fp16", "none", 8).total == 16.0
    assert memory.state_bytes("fp32", "none", 8).total == 16.0
    # distributed optimizer at DP=8: 2 + 4 + 12/8 = 7.5
    assert memory.state_bytes("bf16", "distopt", 8).total == 7.5
    # ZeRO-1 at DP=8: 2 + (2 + 4/8) + 12/8 = 6.0 (the 4/8: fp32 grads of the partition)
    assert memory.state_bytes("bf16", "zero1", 8) == memory.StateBytes(2.0, 2.5, 1.5)
    # ZeRO-2: 2 + (2/8 + 4/8) + 12/8 = 4.25; ZeRO-3: 2/8 + 0.75 + 1.5 = 2.5
    assert memory.state_bytes("bf16", "zero2", 8).total == 4.25
    assert memory.state_bytes("bf16", "zero3", 8).total == 2.5
    # 1.3B GPT (1,317,654,528 params) without ZeRO: 18 x that = 23,717,781,504 B = 22.09 GiB
    assert 18 * 1_317_654_528 == 23_717_781_504
    with pytest.raises(ValueError, match="sharding"):
        memory.state_bytes("bf16", "zero4", 8)


def test_activations_follow_korthikanti():
    # s=2048, b=8, h=2048, a=16: sbh = 33,554,432; 5as/h = 80
    m = ModelShape(num_layers=24, hidden=2048, heads=16, seq=2048, vocab=51200)
    sbh = 2048 * 8 * 2048
    assert sbh == 33_554_432
    # no recompute: sbh (34 + 80) = 3,825,205,248 B; selective: 34 sbh; full: 2 sbh
    assert memory.layer_activation_bytes(m, 8, 1, False, "none") == 114 * sbh == 3_825_205_248
    assert memory.layer_activation_bytes(m, 8, 1, False, "selective") == 34 * sbh
    assert memory.layer_activation_bytes(m, 8, 1, False, "full") == 2 * sbh
    # TP=2 without SP: sbh (10 + 24/2 + 80/2) = 62 sbh; with SP: sbh/2 (34 + 80) = 57 sbh
    assert memory.layer_activation_bytes(m, 8, 2, False, "none") == 62 * sbh
    assert memory.layer_activation_bytes(m, 8, 2, True, "none") == 57 * sbh
    for t in (1, 2, 4, 8):
        for sp in (False, True):
            for rc in memory.RECOMPUTE_MODES:
                got = memory.layer_activation_bytes(m, 8, t, sp and t > 1, rc)
                want = memory.korthikanti_per_layer(2048, 8, 2048, 16, t, sp and t > 1, rc)
                assert got == pytest.approx(want, rel=1e-12), (t, sp, rc)


def test_pipeline_warmup_depth():
    # 1F1B: stage r holds min(p - r, m) micro-batches
    assert memory.in_flight(4, 8, 1, 0) == 4
    assert memory.in_flight(4, 8, 1, 3) == 1
    assert memory.in_flight(4, 2, 1, 0) == 2
    assert memory.in_flight(1, 64, 1, 0) == 1
    # interleaved p=4, v=2: (4-1)*2 + (2-1)*4 + 1 = 11 chunks of L/8 layers = 5.5 stages
    assert memory.in_flight(4, 8, 2, 0) == 5.5


def test_meta_count_equals_closed_form(capsys):
    # 1.3B GPT by hand: V h = 104,857,600; positions 4,194,304; layer 12h^2 + 13h =
    # 50,358,272 x 24 = 1,208,598,528; final LayerNorm 4,096; total 1,317,654,528
    _, out = _run_json(capsys, GPT_1P3B + ["--num-gpus", "1", "--global-batch-size", "8",
                                          "--micro-batch-size", "8", "--sharding", "none",
                                          "--recompute", "selective"])
    assert out["model"]["parameters"] == out["model"]["parameters_closed_form"] == 1_317_654_528
    from megatron.planner.model import meta_params

    for flags in (GPT_1P3B, LLAMA_1B + ["--untie-embeddings-and-output-weights"]):
        _, problem, _ = TOOL.build_problem(flags + ["--num-gpus", "4",
                                                    "--global-batch-size", "8"])
        capsys.readouterr()
        for tp, pp in ((1, 1), (2, 2), (4, 1)):
            for rank in range(pp):
                meta = meta_params(problem.args, problem.shape, tp, pp, rank)
                assert meta == closed_form_params(problem.shape, tp, pp, rank), (tp, pp, rank)


def test_one_gpu_memory_and_time_by_hand(capsys):
    # 1.3B, mb 8, flash attention (selective), no ZeRO, 1 GPU, bf16:
    # states 23,717,781,504 + activations 24 x 34 sbh = 27,380,416,512 + loss 14 x s b V =
    # 14 x 838,860,800 = 11,744,051,200 -> 62,842,249,216 B = 58.53 GiB
    code, out = _run_json(capsys, GPT_1P3B + [
        "--num-gpus", "1", "--gpu-type", "h200", "--global-batch-size", "8",
        "--micro-batch-size", "8", "--use-flash-attn", "--sharding", "none"])
    assert code == 0 and len(out["layouts"]) == 1
    lay = out["layouts"][0]
    assert lay["peak_memory_gib"] * GIB == pytest.approx(62_842_249_216, rel=1e-9)
    assert lay["memory_gib"]["activations"] * GIB == pytest.approx(
        27_380_416_512 + 11_744_051_200, rel=1e-9)
    # the step: the model's FLOPs over its time, no communication at one GPU
    t = lay["step_time_s"]
    assert t["tp_comm"] == t["dp_comm"] == t["pp_comm"] == t["bubble"] == 0.0
    flops = 72 * 8 * 2048 * 24 * 2048**2 * (1 + 2048 / (6 * 2048) + 51200 / (16 * 24 * 2048))
    assert lay["tflops_per_gpu"] * 1e12 * t["total"] == pytest.approx(flops, rel=1e-9)
    assert lay["tokens_per_s"] == pytest.approx(8 * 2048 / t["total"])
    assert lay["command"].startswith("torchrun --nproc-per-node 1 pretrain_gpt.py ")
    assert "--checkpoint-activations" not in lay["command"]


# Narayanan et al. 2021, Table 1 (A100 80 GB, seq 2048, vocab 51,200): params (B), heads,
# hidden, layers, TP, PP, GPUs, global batch
TABLE_1 = [
    (1.7, 24, 2304, 24, 1, 1, 32, 512),
    (3.6, 32, 3072, 30, 2, 1, 64, 512),
    (7.5, 32, 4096, 36, 4, 1, 128, 512),
    (18.4, 48, 6144, 40, 8, 1, 256, 1024),
    (39.1, 64, 8192, 48, 8, 2, 512, 1536),
    (76.1, 80, 10240, 60, 8, 4, 1024, 1792),
    (145.6, 96, 12288, 80, 8, 8, 1536, 2304),
    (310.1, 128, 16384, 96, 8, 16, 1920, 2160),
    (529.6, 128, 20480, 105, 8, 35, 2520, 2520),
    (1008.0, 160, 25600, 128, 8, 64, 3072, 3072),
]


@pytest.mark.parametrize("row", TABLE_1, ids=[f"{r[0]}B" for r in TABLE_1])
def test_table1_layouts_are_feasible(capsys, row):
    billions, heads, hidden, layers, tp, pp, gpus, batch = row
    code, out = _run_json(capsys, [
        "--num-layers", str(layers), "--hidden-size", str(hidden),
        "--num-attention-heads", str(heads), "--seq-length", "2048",
        "--vocab-size", "51199", "--fp16", "--num-gpus", str(gpus), "--gpu-type", "a100-80gb",
        "--global-batch-size", str(batch), "--tensor-model-parallel-size", str(tp),
        "--pipeline-model-parallel-size", str(pp), "--micro-batch-size", "1",
        "--checkpoint-activations", "--sharding", "none", "--explain"])
    assert code == 0, out.get("rejected")
    assert out["model"]["parameters"] == out["model"]["parameters_closed_form"]
    assert out["model"]["parameters"] / 1e9 == pytest.approx(billions, rel=0.03)
    (lay,) = [x for x in out["layouts"] if x["vp"] == 1]
    assert (lay["tp"], lay["pp"], lay["dp"]) == (tp, pp, gpus // (tp * pp))
    assert lay["peak_memory_gib"] < 80 - 1.5
    assert "--checkpoint-activations" in lay["command"]


def test_explain_names_each_reason(capsys):
    argv = ["--num-layers", "24", "--hidden-size", "1536", "--num-attention-heads", "12",
            "--seq-length", "2048", "--vocab-size", "51199",
        "--num-gpus", "8", "--gpus-per-node", "4", "--global-batch-size", "12",
        "--gpu-memory-gib", "16", "--sharding", "none", "zero3", "--explain"]
    code, out = _run_json(capsys, argv)
    reasons = {r["layout"]: " ".join(r["reasons"]) for r in out["rejected"]}
    tp8 = [v for k, v in reasons.items() if k.startswith("TP=8 ")]
    assert tp8 and all("TP 8 > GPUs per node 4" in v for v in tp8)
    assert any("--num-attention-heads (12) is not divisible" in v for v in tp8)
    dp8 = [v for k, v in reasons.items() if k.startswith("TP=1 PP=1 DP=8 ")]
    assert dp8 and all("not divisible by" in v and "12" in v for v in dp8)  # 12 % (mb x 8)
    assert any("does not fit" in v and "largest term: activations" in v for v in reasons.values())
    assert any("ZeRO-3 with PP 2" in v for v in reasons.values())
    # 24 layers, PP 8, v 4: 0.75 layers a chunk
    v4 = reasons["TP=1 PP=8 DP=1 mb=1 v=4 recompute=none no-ZeRO"]
    assert "--num-layers (24) is not divisible by PP x v (8 x 4)" in v4
    # every layout that fits is within the 16 - 1.5 GiB
    assert all(x["peak_memory_gib"] <= 14.5 for x in out["layouts"])
    capsys.readouterr()
    TOOL.main(argv[:-1] + ["--explain"][:0])  # the table, without reasons
    text = capsys.readouterr().out
    assert "layouts fit" in text and "--explain says why" in text


def test_ranking_flags_and_command_lines(capsys, tmp_path):
    code, out = _run_json(capsys, GPT_1P3B + [
        "--num-gpus", "16", "--gpus-per-node", "8", "--global-batch-size", "64",
        "--lr", "1e-4", "--train-iters", "100", "--mock-data"])
    assert code == 0
    rates = [x["tokens_per_s"] for x in out["layouts"]]
    assert rates == sorted(rates, reverse=True) and len(rates) > 10
    for x in out["layouts"]:
        cmd = x["command"]
        assert "--lr 1e-4 --train-iters 100 --mock-data" in cmd  # passed through
        assert "--num-gpus" not in cmd and "--gpus-per-node" not in cmd
        if x["sharding"].startswith("zero"):
            assert cmd.startswith("deepspeed --num_nodes 2 --hostfile hostfile --num_gpus 8 ")
            assert f"--zero-stage {x['sharding'][4:]}" in cmd
        else:
            assert cmd.startswith("torchrun --nproc-per-node 8 --nnodes 2 ")
        assert f"--tensor-model-parallel-size {x['tp']} " in cmd
    # bandwidths: DP across nodes costs more than inside one at the same layout
    hw = timing.PRESETS["h100"]
    assert timing.allreduce_seconds(1e9, 16, hw.network_gbps, 0) > timing.allreduce_seconds(
        1e9, 8, hw.nvlink_gbps, 0)


def test_measured_file(capsys, tmp_path):
    path = tmp_path / "measured.json"
    path.write_text(json.dumps({"peak_tflops": 900, "nvlink_GBps": 300, "gemm": [
        {"m": 16384, "n": 6144, "k": 2048, "tflops": 450.0},
        {"m": 16384, "n": 2048, "k": 8192, "tflops": 630.0}]}))
    hw = timing.load_measured(timing.PRESETS["h100"], str(path))
    assert hw.peak_tflops == 900 and hw.nvlink_gbps == 300
    assert timing.gemm_efficiency(hw, 16384, 6144, 2048) == 0.5  # the nearest shape: 450/900
    assert timing.gemm_efficiency(hw, 16000, 2000, 8000) == 0.7
    default = timing.gemm_efficiency(timing.PRESETS["h100"], 16384, 6144, 2048)
    assert default == pytest.approx(0.72 * (16384 / 16448) * (6144 / 6208) * (2048 / 2112))
    base = GPT_1P3B + ["--num-gpus", "1", "--global-batch-size", "8", "--micro-batch-size",
                       "8", "--use-flash-attn", "--sharding", "none"]
    _, fast = _run_json(capsys, base)
    _, slow = _run_json(capsys, base + ["--measured", str(path)])
    assert slow["layouts"][0]["step_time_s"]["compute"] > fast["layouts"][0]["step_time_s"][
        "compute"]
    path.write_text(json.dumps({"peak_tflops": -1}))
    with pytest.raises(SystemExit):
        TOOL.main(base + ["--measured", str(path)])
    assert "peak_tflops must be a positive number" in capsys.readouterr().err
