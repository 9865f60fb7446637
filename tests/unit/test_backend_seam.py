"""DeepSpeed behind one seam, run state off args.

* the import graph of training.py, backend.py, deepspeed_engine.py, checkpointing.py,
  initialize.py, train_state.py and optimizer/ has no cycle, counting the imports inside
  functions too (none is needed to break one), and each imports alone in a fresh
  interpreter;
* deepspeed is imported only by the seam (deepspeed_engine.py), the device layer, the
  parser (DeepSpeed's own flags), the optimizer (DeepSpeedCPUAdam) and the model files
  that need its classes; checkpointing.py does not reach into deepspeed_engine.py;
* no training code writes run state into args (checked on the source), and the
  TrainState round trip reads older checkpoints that kept the counters elsewhere;
* per-run DeepSpeed log state lives in its backend, not in a module global.
"""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys

import pytest

from megatron.train_state import STATE_KEY, TrainState

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SEAM = ("megatron.training", "megatron.backend", "megatron.deepspeed_engine",
        "megatron.checkpointing", "megatron.initialize", "megatron.train_state",
        "megatron.optimizer")
# Files that may import deepspeed, and why.
DEEPSPEED_IMPORTERS = {
    "megatron/deepspeed_engine.py": "the seam: DeepSpeed's engine, config and checkpoints",
    "megatron/deepspeed_comm.py": "deepspeed.comm on the run's process group",
    "megatron/accelerator.py": "the device layer is DeepSpeed's accelerator abstraction",
    "megatron/arguments.py": "deepspeed.add_config_arguments: DeepSpeed's own flags",
    "megatron/optimizer/__init__.py": "DeepSpeedCPUAdam for --cpu-optimizer",
    "megatron/model/gpt_model_pipe.py": "PipelineModule and LayerSpec of the pipeline engine",
    "megatron/model/moe.py": "DeepSpeed's MoE layer",
    "megatron/model/ulysses.py": "DeepSpeed-Ulysses' DistributedAttention",
    "megatron/model/distributed.py": "the expert-data-parallel groups of MoE parameters",
    "megatron/model/utils.py": "GatheredParameters to initialise ZeRO-3 partitions",
}


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _megatron_files():
    for folder, _, files in os.walk(os.path.join(ROOT, "megatron")):
        for name in files:
            if name.endswith(".py"):
                yield os.path.join(folder, name)


def _imports(path: str) -> set[str]:
    """Every module path imported anywhere in the file (functions included), resolved."""
    module = _module_name(path)
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    """{module: the megatron modules it imports}. The packages above a module are left
    out: Python loads them before it (`from . import mpu` reads megatron/__init__.py)."""
    known = {_module_name(p): p for p in _megatron_files()}

    def above(name: str, other: str) -> bool:
        return name.startswith(other + ".")

    return {name: {m for m in _imports(path) if m in known and m != name and not above(name, m)}
            for name, path in known.items()}


def _cycle(graph: dict[str, set[str]], nodes: set[str]) -> list[str] | None:
    """A cycle among `nodes` (edges restricted to them), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n] & nodes):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(nodes):
        if n not in state and (found := visit(n)):
            return found
    return None


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), list(graph[start])
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(graph[n])
    return seen


def _function_level_imports(path: str) -> set[str]:
    """The modules a file imports inside functions (not at module level)."""
    tree = ast.parse(open(path).read(), path)
    top = {id(n) for n in tree.body}
    inner = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom)) and id(sub) not in top:
                    inner.add(sub)
    module = _module_name(path)
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    names = set()
    for node in inner:
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)
    return names


def test_no_import_cycle_through_the_seam():
    graph = _graph()
    seam = set(SEAM)
    cycle = _cycle(graph, seam)
    assert cycle is None, " -> ".join(cycle)
    # nothing the seam's lower layers import (inside functions too) leads back up
    assert "megatron.training" not in set().union(
        *(_reach(graph, m) for m in seam - {"megatron.training"}))
    for low in ("megatron.checkpointing", "megatron.train_state", "megatron.initialize"):
        up = _reach(graph, low) & {"megatron.deepspeed_engine", "megatron.backend"}
        assert not up, (low, up)
    # and the seam modules import each other at module level (no workaround in a function)
    for name in SEAM:
        path = os.path.join(ROOT, *name.split("."))
        path = path + ".py" if os.path.isfile(path + ".py") else os.path.join(path, "__init__.py")
        inner = _function_level_imports(path) & (seam - {name})
        assert not inner, (name, inner)


def test_deepspeed_is_imported_only_behind_the_seam():
    importers = set()
    for path in _megatron_files():
        if any(m == "deepspeed" or m.startswith("deepspeed.") for m in _imports(path)):
            importers.add(os.path.relpath(path, ROOT))
    for script in ("pretrain_gpt.py", "pretrain_bert.py", "pretrain_t5.py"):
        text = open(os.path.join(ROOT, script)).read()
        assert "deepspeed_engine" not in text and "import deepspeed" not in text, script
    assert importers <= set(DEEPSPEED_IMPORTERS), sorted(importers - set(DEEPSPEED_IMPORTERS))


# Run state that lived on args: nothing may store it there any more.
RUN_STATE = {"consumed_train_samples", "consumed_valid_samples", "consumed_train_tokens",
             "curriculum_seqlen", "curriculum_scheduler", "do_train", "do_valid", "do_test",
             "last_saved_iteration", "ds_pipeline_enabled", "create_moe_param_group"}


def test_no_run_state_is_written_into_args():
    files = ["megatron/training.py", "megatron/backend.py", "megatron/deepspeed_engine.py",
             "megatron/checkpointing.py", "megatron/train_state.py", "pretrain_gpt.py",
             "pretrain_bert.py", "pretrain_t5.py"]
    writes = []
    for rel in files:
        tree = ast.parse(open(os.path.join(ROOT, rel)).read())
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr":
                if len(node.args) > 1 and isinstance(node.args[1], ast.Constant):
                    if node.args[1].value in RUN_STATE:
                        writes.append(f"{rel}:{node.lineno} setattr {node.args[1].value}")
            for t in targets:
                for el in (t.elts if isinstance(t, ast.Tuple) else [t]):
                    if isinstance(el, ast.Attribute) and el.attr in RUN_STATE and getattr(
                            el.value, "id", None) == "args":
                        writes.append(f"{rel}:{node.lineno} args.{el.attr}")
    assert writes == []


def test_each_seam_module_imports_alone():
    """A fresh import of each module (no megatron module loaded before it) succeeds and
    loads no deepspeed for training.py, checkpointing.py, backend.py or train_state.py."""
    code = (
        "import importlib, sys\n"
        "import torch  # loaded once; megatron's own modules are dropped between imports\n"
        f"for name in {SEAM!r}:\n"
        "    for m in [m for m in sys.modules if m == 'megatron' or m.startswith('megatron.')"
        " or m == 'deepspeed' or m.startswith('deepspeed.')]:\n"
        "        del sys.modules[m]\n"
        "    importlib.import_module(name)\n"
        "    ds = 'deepspeed' in sys.modules\n"
        "    print(name, 'deepspeed' if ds else 'no-deepspeed')\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = dict(line.split() for line in proc.stdout.splitlines() if line.startswith("megatron"))
    assert sorted(seen) == sorted(SEAM)
    for name in ("megatron.training", "megatron.checkpointing", "megatron.backend",
                 "megatron.train_state", "megatron.deepspeed_engine"):
        assert seen[name] == "no-deepspeed", (name, proc.stdout)


def test_train_state_round_trip_and_older_checkpoints():
    state = TrainState(iteration=7, consumed_train_samples=56, consumed_valid_samples=16,
                       consumed_train_tokens=900, curriculum_seqlen=24, skipped_iterations=2,
                       nan_iterations=1)
    entries = state.checkpoint_entries()
    assert entries["iteration"] == 7 and entries["consumed_train_samples"] == 56
    back = TrainState()
    back.restore(entries)
    assert back == state
    # counters at the top level, no train_state key, no token count: samples x length
    old = TrainState()
    old.restore({"iteration": 4, "consumed_train_samples": 32, "consumed_valid_samples": 8},
                seq_length=16)
    assert (old.iteration, old.consumed_train_samples, old.consumed_train_tokens) == (4, 32, 512)
    # counters only in the pickled args (the oldest files)
    oldest = TrainState()
    oldest.restore({"args": argparse.Namespace(consumed_train_samples=24,
                                               consumed_valid_samples=4)}, iteration=3)
    assert (oldest.iteration, oldest.consumed_train_samples, oldest.consumed_valid_samples) == (
        3, 24, 4)
    assert STATE_KEY == "train_state"


def test_deepspeed_log_state_belongs_to_each_run():
    from megatron import deepspeed_engine
    from megatron.deepspeed_engine import DeepSpeedBackend

    first = DeepSpeedBackend(object(), None, None)
    first.moe_losses.append(0.5)
    second = DeepSpeedBackend(object(), None, None)
    assert second.moe_losses == [] and second.seqlen is None
    assert deepspeed_engine._LOG_STATE == {}


def test_ds_pipeline_enabled_keeps_its_meaning():
    from megatron.arguments import build_parser, validate_args

    flags = ("--num-layers 2 --hidden-size 8 --num-attention-heads 2 --seq-length 8 "
             "--max-position-embeddings 8 --micro-batch-size 1 --train-iters 1 --deepspeed")
    args = validate_args(build_parser().parse_args(flags.split()), world_size=1, rank=0)
    # the flags ask for the pipeline engine; which engine runs is the backend's to know
    assert args.ds_pipeline_enabled is True
    text = open(os.path.join(ROOT, "megatron", "deepspeed_engine.py")).read()
    assert "args.ds_pipeline_enabled =" not in text


@pytest.mark.parametrize("name", ["train_step", "evaluate_and_print_results", "get_model",
                                  "setup_model_and_optimizer", "pretrain"])
def test_public_entry_points_stay(name):
    import megatron.training as training

    assert callable(getattr(training, name))
