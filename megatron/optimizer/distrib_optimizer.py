"""Megatron's distributed optimizer (``--use-distributed-optimizer``): the fp32 master weights
and the optimizer state are sharded over the data-parallel ranks.

Every contiguous gradient buffer of the local DDP (megatron/model/distributed.py, padded to
N = DP * S elements) is cut into DP contiguous shards: data-parallel rank r owns elements
[r*S, (r+1)*S) of it, whichever params they belong to (a param may straddle two shards).
One step:

    g[r*S:(r+1)*S] = (1/DP) * sum over DP ranks of g      (reduce-scatter of the buffer)
    m_r = fp32 master copy of the params' elements in shard r (a view of the param if fp32)
    fp16: g *= 1/loss_scale; inf/nan on any rank -> every rank skips the step
    clip with the global norm ||g|| = sqrt(sum over all ranks of ||g_r||^2), each element
        of the model counted once (tensor-parallel duplicates and the tied copy excluded)
    m_r <- inner optimizer step on the shard (Adam and SGD are elementwise, so the shard's
           update equals the unsharded one)
    params <- all-gather of m_r cast to the param dtype, through the gradient buffer's
              memory (the gradients are spent by then)

So each rank keeps (4 + 8) bytes per param of master weights and Adam moments for P/DP
params instead of P.

Checkpoints: :meth:`DistributedOptimizer.state_dict` (saved in model_optim_rng.pt) holds
everything but per-element state; :meth:`parameter_state` gathers the per-element state of
every data-parallel rank into whole flat buffers, Megatron's ``distrib_optim.pt`` layout

    {chunk index: {grad dtype: {"param": fp32 [N], "exp_avg": fp32 [N], ...}}}

and :meth:`load_parameter_state` reads it back at any DP size: where an element lies in a
buffer does not depend on DP (only the padding at the end does), so each rank takes its
new shard's elements by position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import torch

from megatron import mpu, print_rank_0

from .clip_grads import clip_grad_norm_fp32, count_zeros_fp32
from .grad_scaler import MegatronGradScaler
from .optimizer import MegatronOptimizer, StepResult, _copy_parallel_attributes, _stop, _timer

dist = torch.distributed
# torch >= 2.13 renames the single-tensor collectives; older versions only have the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass
class _Buffer:
    """One DDP gradient buffer and what this rank owns of it."""

    model_index: int
    grad: torch.Tensor  # the DDP's flat gradient buffer [N]
    params: torch.Tensor  # the same memory read as the param dtype [N]
    numel: int  # elements that belong to params (N minus the padding)
    shard_size: int  # S = N / DP
    ranges: List[Tuple[torch.Tensor, int, int]]  # (param, start, end) in the buffer


@dataclass
class _Shard:
    """This rank's piece of one param: buffer[start:end] = param.view(-1)[offset:...]."""

    param: torch.Tensor  # the model param
    main: torch.Tensor  # its fp32 master piece [end - start], what the inner optimizer steps
    buffer: int  # index into DistributedOptimizer.buffers
    start: int
    end: int
    offset: int


class DistributedOptimizer(MegatronOptimizer):
    """Shards master weights and optimizer state over the data-parallel group.

    Args:
        optimizer: the inner torch optimizer, built on the model params (they are replaced
            by this rank's fp32 master pieces).
        clip_grad, log_num_zeros_in_grad: as for the other wrappers.
        grad_scaler: the fp16 loss scaler (None for fp32 and for bf16 without --loss-scale).
        models: the model chunks, each a local DistributedDataParallel built with
            ``use_distributed_optimizer=True``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        clip_grad: float,
        log_num_zeros_in_grad: bool,
        grad_scaler: MegatronGradScaler | None,
        models: List[torch.nn.Module],
    ) -> None:
        super().__init__(optimizer, clip_grad, log_num_zeros_in_grad, True)
        self.grad_scaler = grad_scaler
        self.dp_group = mpu.get_data_parallel_group()
        self.dp_size = mpu.get_data_parallel_world_size()
        self.dp_rank = mpu.get_data_parallel_rank()
        self.dp_ranks = mpu.get_data_parallel_group_ranks()
        self._gloo = dist.get_backend(self.dp_group) == "gloo"
        self.buffers = self._collect_buffers(models)
        self.shards = self._replace_params_by_shards()
        device = self._device()
        self.found_inf = torch.tensor([0.0], dtype=torch.float, device=device)
        self._scale_one = torch.tensor([1.0], dtype=torch.float, device=device)
        self._loaded_scalars: Dict[str, Any] = {}
        numel = sum(b.numel for b in self.buffers)
        mine = sum(s.end - s.start for s in self.shards)
        print_rank_0(
            f"> distributed optimizer: {numel} params in {len(self.buffers)} gradient "
            f"buffer(s) sharded over {self.dp_size} data-parallel ranks ({mine} on rank 0)"
        )

    # ------------------------------------------------------------------------------------
    # Layout
    # ------------------------------------------------------------------------------------

    def _collect_buffers(self, models: List[torch.nn.Module]) -> List[_Buffer]:
        buffers = []
        for model_index, model in enumerate(models):
            if not getattr(model, "use_distributed_optimizer", False):
                raise TypeError(
                    "distrib_optimizer.py: --use-distributed-optimizer needs every model "
                    "chunk wrapped in the local DistributedDataParallel (--DDP-impl local) "
                    f"built with use_distributed_optimizer=True, got {type(model).__name__}"
                )
            for (grad_dtype, group_name), buffer in model.grad_buffers.items():
                if group_name is not None:
                    raise ValueError(
                        "distrib_optimizer.py: expert params (Mixture-of-Experts) are not "
                        "sharded by --use-distributed-optimizer; train MoE with --deepspeed"
                    )
                ranges = model.grad_buffer_param_ranges[(grad_dtype, group_name)]
                dtypes = {param.dtype for param, _, _ in ranges}
                if len(dtypes) != 1:
                    raise TypeError(
                        "distrib_optimizer.py: one gradient buffer holds params of several "
                        f"dtypes {sorted(str(d) for d in dtypes)}; give every param one dtype"
                    )
                param_dtype = dtypes.pop()
                if param_dtype.itemsize > grad_dtype.itemsize:
                    raise TypeError(
                        f"distrib_optimizer.py: {param_dtype} params do not fit the memory of "
                        f"their {grad_dtype} gradient buffer"
                    )
                grad = buffer.data  # [N]
                params = grad if param_dtype == grad_dtype else grad.view(param_dtype)
                if grad.numel() % self.dp_size != 0:
                    raise ValueError(
                        f"distrib_optimizer.py: a gradient buffer of {grad.numel()} elements "
                        f"does not split into {self.dp_size} data-parallel shards"
                    )
                buffers.append(
                    _Buffer(
                        model_index=model_index,
                        grad=grad,
                        params=params[: grad.numel()],
                        numel=max(end for _, _, end in ranges),
                        shard_size=grad.numel() // self.dp_size,
                        ranges=ranges,
                    )
                )
        return buffers

    def _shard_bounds(self, buffer: _Buffer) -> Tuple[int, int]:
        return self.dp_rank * buffer.shard_size, (self.dp_rank + 1) * buffer.shard_size

    def _replace_params_by_shards(self) -> List[_Shard]:
        """Each model param in the inner optimizer's groups becomes its master piece on this
        rank (or leaves the group when this rank owns none of it)."""
        where: Dict[torch.Tensor, Tuple[int, int, int]] = {}
        for index, buffer in enumerate(self.buffers):
            for param, start, end in buffer.ranges:
                where[param] = (index, start, end)
        shards = []
        # the model params of each group, in order (an unsharded checkpoint lists them so)
        self.model_param_groups = [list(g["params"]) for g in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            mains = []
            for param in group["params"]:
                if param not in where:
                    raise ValueError(
                        "distrib_optimizer.py: a param of shape "
                        f"{tuple(param.shape)} is in the optimizer but in no gradient buffer"
                    )
                index, start, end = where[param]
                lo, hi = self._shard_bounds(self.buffers[index])
                lo, hi = max(start, lo), min(end, hi)
                if lo >= hi:
                    continue
                piece = param.detach().view(-1)[lo - start : hi - start]  # [hi - lo]
                # fp32 params are stepped in place; half-precision ones through an fp32 copy
                main = piece if param.dtype == torch.float32 else piece.clone().float()
                _copy_parallel_attributes(main, param)
                mains.append(main)
                shards.append(_Shard(param, main, index, lo, hi, lo - start))
            group["params"] = mains
        return shards

    # ------------------------------------------------------------------------------------
    # Step
    # ------------------------------------------------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the master grads (the DDP zeroes its buffers before each backward)."""
        for shard in self.shards:
            shard.main.grad = None
            shard.param.grad = None

    def get_loss_scale(self) -> torch.Tensor:
        return self._scale_one if self.grad_scaler is None else self.grad_scaler.scale

    def reload_model_params(self) -> None:
        for shard in self.shards:
            if shard.main.dtype != shard.param.dtype:
                n = shard.end - shard.start
                piece = shard.param.detach().view(-1)[shard.offset : shard.offset + n]
                shard.main.data.copy_(piece)

    def _reduce_scatter_grads(self) -> None:
        """buffer[shard r] = average over the data-parallel ranks, on rank r."""
        if self.dp_size == 1:
            return
        for buffer in self.buffers:
            buffer.grad /= self.dp_size
            lo, hi = self._shard_bounds(buffer)
            mine = buffer.grad[lo:hi]  # [S]
            if self._gloo:
                # gloo writes through a separate output tensor
                out = torch.empty_like(mine)
                _reduce_scatter_single(out, buffer.grad, group=self.dp_group)
                mine.copy_(out)
            else:
                _reduce_scatter_single(mine, buffer.grad, group=self.dp_group)

    def _set_main_grads(self) -> None:
        for shard in self.shards:
            grad = self.buffers[shard.buffer].grad[shard.start : shard.end]
            shard.main.grad = grad.float()  # a view when the buffer is fp32
            shard.param.grad = None

    def _unscale_and_check_for_nan(self) -> bool:
        """grads *= 1/scale; True when any grad on any rank is inf/nan (every rank holds a
        different shard, so the check is over the whole world)."""
        grads = [s.main.grad for s in self.shards]
        self.found_inf.fill_(0.0)
        if grads:
            torch._amp_foreach_non_finite_check_and_unscale_(
                grads, self.found_inf, self.grad_scaler.inv_scale
            )
        dist.all_reduce(self.found_inf, op=dist.ReduceOp.MAX)
        return self.found_inf.item() > 0

    def clip_grad_norm(self, clip_grad: float) -> float:
        """Clip to the norm over every shard of every rank of the model."""
        return clip_grad_norm_fp32(self.get_parameters(), clip_grad,
                                   model_parallel_group=dist.group.WORLD)

    def count_zeros(self) -> int:
        return count_zeros_fp32(self.get_parameters(), model_parallel_group=dist.group.WORLD)

    def _gather_params(self) -> None:
        """Write the updated pieces into the buffers, all-gather them, copy out to params."""
        for shard in self.shards:
            self.buffers[shard.buffer].params[shard.start : shard.end].copy_(shard.main)
        for buffer in self.buffers:
            if self.dp_size > 1:
                lo, hi = self._shard_bounds(buffer)
                mine = buffer.params[lo:hi]  # [S]
                _all_gather_single(buffer.params, mine.clone() if self._gloo else mine,
                                   group=self.dp_group)
            for param, start, end in buffer.ranges:
                param.data.view(-1).copy_(buffer.params[start:end])

    def step(self, args: Any = None, timers: Any = None) -> StepResult:
        timer = _timer(timers, "grads-reduce-scatter")
        self._reduce_scatter_grads()
        self._set_main_grads()
        _stop(timer)

        if self.grad_scaler is not None:
            timer = _timer(timers, "optimizer-unscale-and-check-inf")
            found_inf = self._unscale_and_check_for_nan()
            _stop(timer)
            self.grad_scaler.update(found_inf)
            if found_inf:
                self.zero_grad()
                return False, None, None

        timer = _timer(timers, "optimizer-clip-main-grad")
        grad_norm, num_zeros = self._clip_and_count()
        _stop(timer)

        timer = _timer(timers, "optimizer-inner-step")
        self.optimizer.step()
        _stop(timer)

        timer = _timer(timers, "params-all-gather")
        self._gather_params()
        _stop(timer)
        return True, grad_norm, num_zeros

    # ------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------

    def _split_state(self, state: dict, main: torch.Tensor) -> Tuple[List[str], dict]:
        """(per-element keys, other entries such as Adam's step) of one param's state."""
        per_element = [k for k, v in state.items()
                       if k != "step" and torch.is_tensor(v) and v.shape == main.shape]
        # copies: Adam increments its step tensor in place
        scalars = {k: v.clone() if torch.is_tensor(v) else v
                   for k, v in state.items() if k not in per_element}
        return per_element, scalars

    def _local_state_summary(self) -> Tuple[List[str], dict]:
        for shard in self.shards:
            state = self.optimizer.state.get(shard.main)
            if state:
                return self._split_state(state, shard.main)
        return [], {}

    def state_dict(self) -> dict:
        """Everything but the per-element state (that is :meth:`parameter_state`)."""
        inner = self.optimizer.state_dict()
        groups = [{k: v for k, v in g.items() if k != "params"} for g in inner["param_groups"]]
        _, scalars = self._local_state_summary()
        state_dict = {
            "optimizer": {"param_groups": groups, "scalar_state": scalars},
            "distributed_optimizer": {"data_parallel_size": self.dp_size},
        }
        if self.grad_scaler is not None:
            state_dict["grad_scaler"] = self.grad_scaler.state_dict()
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Group hyperparameters, grad scaler, and the scalar state that
        :meth:`load_parameter_state` completes; the state of an unsharded optimizer (a
        checkpoint saved without --use-distributed-optimizer) is sharded here instead."""
        if "distributed_optimizer" not in state_dict:
            self.load_unsharded_state_dict(state_dict)
            return
        saved = state_dict["optimizer"]["param_groups"]
        if len(saved) != len(self.optimizer.param_groups):
            raise ValueError(
                f"distrib_optimizer.py: the checkpoint has {len(saved)} param groups, this "
                f"optimizer has {len(self.optimizer.param_groups)}"
            )
        for group, saved_group in zip(self.optimizer.param_groups, saved):
            group.update({k: v for k, v in saved_group.items() if k != "params"})
        self._loaded_scalars = dict(state_dict["optimizer"].get("scalar_state", {}))
        if self.grad_scaler is not None:
            if "grad_scaler" in state_dict:
                self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
            else:
                print_rank_0("***WARNING*** the checkpoint has no grad scaler state; the "
                             "loss scale starts from its initial value")

    def load_unsharded_state_dict(self, state_dict: dict) -> None:
        """Start from the state of the unsharded optimizer (FP32Optimizer's torch state dict,
        or Float16OptimizerWithFloat16Params' with its fp32 masters) of the same model: each
        rank keeps its shard's elements of every master weight and per-element state."""
        half = "fp32_from_fp16_params" in state_dict or "fp32_from_fp16" in state_dict
        inner_saved = state_dict["optimizer"] if half else state_dict
        saved_groups = inner_saved["param_groups"]
        if [len(g["params"]) for g in saved_groups] != [len(g) for g in self.model_param_groups]:
            raise ValueError(
                "distrib_optimizer.py: the checkpoint's optimizer has param groups of "
                f"{[len(g['params']) for g in saved_groups]} params, this model's "
                f"{[len(g) for g in self.model_param_groups]}"
            )
        masters_by_group = state_dict.get("fp32_from_fp16_params", state_dict.get(
            "fp32_from_fp16")) if half else None
        for group, saved in zip(self.optimizer.param_groups, saved_groups):
            group.update({k: v for k, v in saved.items() if k != "params"})
        by_param = {id(s.param): s for s in self.shards}
        inner = self.optimizer.state_dict()
        ids = [i for group in inner["param_groups"] for i in group["params"]]
        new_state, position = {}, 0
        for g, (params, saved) in enumerate(zip(self.model_param_groups, saved_groups)):
            halves = iter(masters_by_group[g]) if half else None
            for param, saved_id in zip(params, saved["params"]):
                master = next(halves) if half and param.dtype != torch.float32 else param
                shard = by_param.get(id(param))
                if shard is None:
                    continue
                n = shard.end - shard.start
                shard.main.data.copy_(master.detach().view(-1)[shard.offset : shard.offset + n])
                state = inner_saved["state"].get(saved_id)
                if state:
                    new_state[ids[position]] = {
                        k: (v.detach().reshape(-1)[shard.offset : shard.offset + n].clone()
                            if torch.is_tensor(v) and v.shape == param.shape and k != "step"
                            else v.clone() if torch.is_tensor(v) else v)
                        for k, v in state.items()
                    }
                position += 1
        self.optimizer.load_state_dict({"state": new_state, "param_groups": inner["param_groups"]})
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])

    def _gather_to_first_rank(self, local: torch.Tensor, buffer: _Buffer) -> torch.Tensor | None:
        """[N] on CPU on data-parallel rank 0 (point to point, one shard at a time, so no rank
        holds more than a shard on the device); None elsewhere."""
        if self.dp_rank != 0:
            dist.send(local, dst=self.dp_ranks[0], group=self.dp_group)
            return None
        world = torch.empty(buffer.grad.numel(), dtype=torch.float32)  # [N]
        size = buffer.shard_size
        world[:size].copy_(local)
        received = torch.empty_like(local)
        for r in range(1, self.dp_size):
            dist.recv(received, src=self.dp_ranks[r], group=self.dp_group)
            world[r * size : (r + 1) * size].copy_(received)
        return world

    def parameter_state(self) -> dict | None:
        """The full per-element state (a collective over the data-parallel group): the
        ``distrib_optim.pt`` dict on data-parallel rank 0, None on the others."""
        keys, scalars = self._local_state_summary()
        summaries = [None] * self.dp_size
        dist.all_gather_object(summaries, (keys, scalars), group=self.dp_group)
        keys = sorted({k for ks, _ in summaries for k in ks})
        scalars = next((s for ks, s in summaries if ks), scalars)
        device = self._device()
        state: Dict[Any, Any] = {}
        numels: Dict[int, Dict[torch.dtype, int]] = {}
        for index, buffer in enumerate(self.buffers):
            lo, _ = self._shard_bounds(buffer)
            tensors = {}
            for key in ["param"] + keys:
                local = torch.zeros(buffer.shard_size, dtype=torch.float32, device=device)
                for shard in self.shards:
                    if shard.buffer != index:
                        continue
                    value = shard.main if key == "param" else self.optimizer.state[shard.main][key]
                    local[shard.start - lo : shard.end - lo].copy_(value.detach())
                tensors[key] = self._gather_to_first_rank(local, buffer)
            state.setdefault(buffer.model_index, {})[buffer.grad.dtype] = tensors
            numels.setdefault(buffer.model_index, {})[buffer.grad.dtype] = buffer.numel
        if self.dp_rank != 0:
            return None
        state["metadata"] = {
            "data_parallel_size": self.dp_size,
            "numel": numels,
            "element_state_keys": keys,
            "scalar_state": scalars,
        }
        return state

    def load_parameter_state(self, state: dict, source: str = "distrib_optim.pt") -> None:
        """Load master weights and per-element state from a ``distrib_optim.pt`` dict saved
        at any data-parallel size (no communication: each rank reads its elements)."""
        meta = state.get("metadata", {})
        worlds = []
        for buffer in self.buffers:
            dtype = buffer.grad.dtype
            try:
                world = state[buffer.model_index][dtype]
            except KeyError:
                raise ValueError(
                    f"{source}: no state for model chunk {buffer.model_index} with {dtype} "
                    f"gradients (it has {sorted(k for k in state if k != 'metadata')})"
                ) from None
            saved_numel = meta.get("numel", {}).get(buffer.model_index, {}).get(dtype)
            short = [k for k, t in world.items() if t.numel() < buffer.numel]
            if (saved_numel is not None and saved_numel != buffer.numel) or short:
                got = saved_numel if saved_numel is not None else min(
                    world[k].numel() for k in short)
                raise ValueError(
                    f"{source}: model chunk {buffer.model_index} was saved with {got} "
                    f"parameters in its {dtype} gradient buffer, this model has {buffer.numel}"
                )
            worlds.append(world)
        scalars = dict(meta.get("scalar_state", {}))
        scalars.update(self._loaded_scalars)
        element_keys = [k for k in meta.get("element_state_keys", [])] or sorted(
            {k for world in worlds for k in world if k != "param"})

        inner = self.optimizer.state_dict()
        # torch's state_dict numbers the params of all groups in order
        ids = [i for group in inner["param_groups"] for i in group["params"]]
        by_main = {id(s.main): s for s in self.shards}
        mains = [main for group in self.optimizer.param_groups for main in group["params"]]
        new_state = {}
        for state_id, main in zip(ids, mains):
            shard = by_main[id(main)]
            world = worlds[shard.buffer]
            main.data.copy_(world["param"][shard.start : shard.end])
            if element_keys:
                entry = {k: world[k][shard.start : shard.end].clone() for k in element_keys}
                # one tensor per param: Adam increments its step in place
                entry.update({k: v.clone() if torch.is_tensor(v) else v
                              for k, v in scalars.items()})
                new_state[state_id] = entry
        self.optimizer.load_state_dict(
            {"state": new_state, "param_groups": inner["param_groups"]})
        # fp32 pieces are views of the params; half-precision params take the masters' values
        for shard in self.shards:
            if shard.main.dtype != shard.param.dtype:
                n = shard.end - shard.start
                shard.param.data.view(-1)[shard.offset : shard.offset + n].copy_(shard.main)
