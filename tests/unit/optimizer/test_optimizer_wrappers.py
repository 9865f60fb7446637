"""get_megatron_optimizer param groups and the fp32 / fp16 / bf16 wrappers in one process."""

import copy
import io
from types import SimpleNamespace

import pytest
import torch

from megatron import global_vars
from megatron.optimizer import (
    ConstantGradScaler,
    DynamicGradScaler,
    Float16OptimizerWithFloat16Params,
    FP32Optimizer,
    get_megatron_optimizer,
)


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = torch.nn.Linear(6, 8)
        self.layernorm = torch.nn.LayerNorm(8)
        self.head = torch.nn.Linear(8, 3, bias=False)

    def forward(self, x):  # x: [b, 6]
        return self.head(self.layernorm(torch.nn.functional.gelu(self.dense(x))))


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return _Tiny().to(dtype)


def _args(**overrides):
    base = dict(
        optimizer="adam",
        lr=1e-2,
        weight_decay=0.1,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_eps=1e-8,
        sgd_momentum=0.9,
        fp16=False,
        bf16=False,
        loss_scale=None,
        initial_loss_scale=2.0**16,
        min_loss_scale=1.0,
        loss_scale_window=1000,
        hysteresis=2,
        clip_grad=1.0,
        log_num_zeros_in_grad=False,
        DDP_impl="torch",
        deepspeed=False,
        create_moe_param_group=False,
    )
    base.update(overrides)
    return SimpleNamespace(**base)


@pytest.fixture
def set_args():
    def _set(**overrides):
        global_vars.set_args(_args(**overrides))

    yield _set
    global_vars.set_args(None)


def _names(model, group):
    ids = {id(p) for p in group["params"]}
    return sorted(n for n, p in model.named_parameters() if id(p) in ids)


def test_no_weight_decay_on_biases_and_norms(set_args):
    set_args()
    model = _model()
    opt = get_megatron_optimizer(model)
    assert isinstance(opt, FP32Optimizer)
    assert isinstance(opt.optimizer, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert _names(model, decay) == ["dense.weight", "head.weight"]
    assert decay["weight_decay"] == 0.1
    assert _names(model, no_decay) == ["dense.bias", "layernorm.bias", "layernorm.weight"]
    assert no_decay["weight_decay"] == 0.0
    assert opt.optimizer.defaults["betas"] == (0.9, 0.95)


def test_lr_mult_groups_and_moe_groups(set_args):
    set_args(optimizer="sgd", create_moe_param_group=True)
    model = _model()
    model.head.weight.allreduce = False  # an expert param
    model.head.weight.group_name = "ep_size_2"
    opt = get_megatron_optimizer(
        model, scale_lr_cond=lambda n, p: n.startswith("dense"), lr_mult=3.0
    )
    assert isinstance(opt.optimizer, torch.optim.SGD)
    assert opt.optimizer.defaults["momentum"] == 0.9
    by_name = {g["name"]: (_names(model, g), g) for g in opt.param_groups}
    assert by_name["weight_decay_params_moe_ep_size_2"][0] == ["head.weight"]
    assert by_name["weight_decay_params_moe_ep_size_2"][1]["moe"] is True
    assert by_name["weight_decay_params_lr_mult"][0] == ["dense.weight"]
    assert by_name["weight_decay_params_lr_mult"][1]["lr_mult"] == 3.0
    assert by_name["no_weight_decay_params_lr_mult"][0] == ["dense.bias"]
    assert by_name["no_weight_decay_params"][0] == ["layernorm.bias", "layernorm.weight"]


def test_precision_wrappers_and_scalers(set_args):
    set_args(fp16=True)
    opt = get_megatron_optimizer(_model(torch.float16))
    assert isinstance(opt, Float16OptimizerWithFloat16Params)
    assert isinstance(opt.grad_scaler, DynamicGradScaler)
    assert opt.get_loss_scale().item() == 2.0**16
    set_args(fp16=True, loss_scale=512.0)
    assert isinstance(get_megatron_optimizer(_model(torch.float16)).grad_scaler, ConstantGradScaler)
    set_args(bf16=True)
    opt = get_megatron_optimizer(_model(torch.bfloat16))
    assert opt.grad_scaler is None and opt.get_loss_scale().item() == 1.0
    # Masters are fp32 copies carrying over the model's values.
    assert all(p.dtype == torch.float32 for p in opt.get_parameters())
    set_args(deepspeed=True)
    assert isinstance(get_megatron_optimizer(_model()), torch.optim.AdamW)


def _fp16_opt(model, clip_grad=0.0, hysteresis=2):
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    scaler = DynamicGradScaler(1024.0, 1.0, growth_interval=1000, hysteresis=hysteresis)
    return Float16OptimizerWithFloat16Params(inner, clip_grad, True, False, False, scaler)


def _fixed_grads(model, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen) * 1e-2 for p in model.parameters()]


def test_fp16_overflow_skips_step_and_backs_off():
    model = _model(torch.float16)
    opt = _fp16_opt(model)
    before = [p.detach().clone() for p in model.parameters()]
    for attempt in range(2):
        for p, g in zip(model.parameters(), _fixed_grads(model, 1)):
            p.grad = (g * 1024.0).half()
        next(model.parameters()).grad[0, 0] = float("inf")
        ok, grad_norm, zeros = opt.step()
        assert (ok, grad_norm, zeros) == (False, None, None)
        for p, b in zip(model.parameters(), before):
            assert torch.equal(p, b)
        # hysteresis=2: the first overflow keeps the scale, the second halves it
        assert opt.get_loss_scale().item() == (1024.0 if attempt == 0 else 512.0)
        assert all(m.grad is None for m in opt.get_parameters())


def test_fp16_update_is_the_fp32_update_of_unscaled_grads():
    model16, model32 = _model(torch.float16), _model(torch.float16).float()
    opt16 = _fp16_opt(model16, clip_grad=1e6)
    opt32 = torch.optim.AdamW(model32.parameters(), lr=1e-2, weight_decay=0.0)
    grads = _fixed_grads(model16, 2)
    grads[1][0] = 0.0
    for p16, p32, g in zip(model16.parameters(), model32.parameters(), grads):
        p16.grad = (g.half().float() * 1024.0).half()  # scaled by the loss scale
        p32.grad = g.half().float()
    ok, grad_norm, zeros = opt16.step()
    opt32.step()
    assert ok and zeros >= 1
    expected_norm = torch.linalg.vector_norm(
        torch.cat([p.grad.flatten() for p in model32.parameters()])
    )
    assert grad_norm == pytest.approx(expected_norm.item(), rel=1e-3)
    for p16, p32, m in zip(model16.parameters(), model32.parameters(), opt16.get_parameters()):
        torch.testing.assert_close(m, p32, rtol=0, atol=1e-6)  # fp32 master = fp32 run
        torch.testing.assert_close(p16, p32.half())


def _train(model, opt, steps=3, scale=False):
    gen = torch.Generator().manual_seed(5)
    for _ in range(steps):
        x = torch.randn(4, 6, generator=gen).to(next(model.parameters()).dtype)
        opt.zero_grad()
        loss = model(x).float().pow(2).mean()
        (opt.scale_loss(loss) if scale else loss).backward()
        assert opt.step()[0]


def test_bf16_matches_fp32_within_bf16_tolerance():
    model32, model16 = _model(), _model(torch.bfloat16)
    opt32 = FP32Optimizer(torch.optim.AdamW(model32.parameters(), lr=1e-2), 1.0, False, False)
    inner = torch.optim.AdamW(model16.parameters(), lr=1e-2)
    opt16 = Float16OptimizerWithFloat16Params(inner, 1.0, False, False, True, None)
    start = [p.detach().clone() for p in model32.parameters()]
    _train(model32, opt32)
    _train(model16, opt16, scale=True)
    for p16, p32, p0 in zip(model16.parameters(), model32.parameters(), start):
        assert not torch.equal(p32, p0)  # the run did update
        torch.testing.assert_close(p16.float(), p32, rtol=2e-2, atol=2e-2)


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("kind", ["fp32", "fp16"])
def test_state_dict_resume_gives_identical_next_step(kind):
    dtype = torch.float16 if kind == "fp16" else torch.float32

    def build(model):
        if kind == "fp16":
            return _fp16_opt(model, clip_grad=1.0)
        return FP32Optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), 1.0, False, False)

    model = _model(dtype)
    opt = build(model)
    _train(model, opt, steps=2, scale=True)
    saved_model = _roundtrip(model.state_dict())
    saved_opt = _roundtrip(opt.state_dict())
    if kind == "fp16":
        assert set(saved_opt) == {"optimizer", "grad_scaler", "fp32_from_fp16_params"}

    resumed_model = _model(dtype)
    resumed_model.load_state_dict(saved_model)
    resumed = build(resumed_model)
    resumed.load_state_dict(saved_opt)
    uninterrupted = copy.deepcopy(model)
    _train(model, opt, steps=1, scale=True)
    _train(resumed_model, resumed, steps=1, scale=True)
    for a, b, c in zip(model.parameters(), resumed_model.parameters(), uninterrupted.parameters()):
        assert torch.equal(a, b)
        assert not torch.equal(a, c)
    assert resumed.get_loss_scale().item() == opt.get_loss_scale().item()


def test_main_grad_is_used_when_params_have_main_grad():
    model = _model(torch.bfloat16)
    inner = torch.optim.SGD(model.parameters(), lr=1.0)
    opt = Float16OptimizerWithFloat16Params(inner, 0.0, False, True, True, None)
    for p in model.parameters():
        p.main_grad = torch.ones(p.shape, dtype=torch.float32)  # a DDP buffer view
        p.grad = None
    before = [m.detach().clone() for m in opt.get_parameters()]
    assert opt.step() == (True, None, None)
    for m, b in zip(opt.get_parameters(), before):
        torch.testing.assert_close(m, b - 1.0)
