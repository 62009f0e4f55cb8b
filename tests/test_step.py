"""The training step's GPU practice, checked on the CPU: fused optimizers (a step dropped on the device),
the teacher cast once under autocast, compile's static shapes, the sync_bn advice, DDP while a term is off."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from kdtrain import distributed, engine
from kdtrain.data import TensorSet
from kdtrain.data.batches import DeviceBatches
from kdtrain.engine import FitSpec, TeacherSource, fit, make_optimizer
from kdtrain.run import _sync_bn
from kdtrain.terms import TERMS, LossTerms, TermSpec, ce_only

SGD = SimpleNamespace(name="sgd", momentum=0.9, nesterov=True, weight_decay=5e-4)
ADAMW = SimpleNamespace(name="adamw", betas=[0.9, 0.999], weight_decay=0.01)
COSINE = SimpleNamespace(name="cosine", warmup_epochs=0)


def _net() -> nn.Module:
    torch.manual_seed(0)
    # No bias before BatchNorm: its gradient would be rounding noise, which AdamW amplifies differently per kernel.
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))


def _data(n: int = 200) -> TensorSet:
    g = torch.Generator().manual_seed(0)
    return TensorSet(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g))


@pytest.mark.parametrize("opt", [SGD, ADAMW], ids=["sgd", "adamw"])
def test_fused_optimizers_train_like_the_for_loop_ones(opt, monkeypatch):
    def trained(fused: bool) -> torch.Tensor:
        monkeypatch.setattr(engine, "supports_fused", lambda params: fused)
        model, data = _net(), _data()
        spec = FitSpec(epochs=2, batch_size=32, lr=0.05, seed=0, optimizer=opt, scheduler=COSINE, progress="off")
        fit(model, data, data, spec, torch.device("cpu"), None)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    torch.testing.assert_close(trained(True), trained(False), rtol=1e-5, atol=1e-6)


def test_fused_sgd_drops_a_flagged_first_step_and_takes_late_gradients():
    """prepare_fused: a dropped first step leaves no uninitialised momentum, and a layer whose first gradient
    comes later (after FitNets' hint stage) does not break the fused kernel."""
    fused, loop = _net(), _net()
    opt = make_optimizer(list(fused.parameters()), SGD, 0.1)
    reference = torch.optim.SGD(loop.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    assert opt.param_groups[0]["fused"]  # on the CPU too
    before = [p.detach().clone() for p in fused.parameters()]
    for p in fused.parameters():
        p.grad = torch.full_like(p, float("nan"))
    opt.found_inf = torch.ones(())
    opt.step()
    del opt.found_inf
    assert all(torch.equal(a, b) for a, b in zip(before, fused.parameters()))
    x, y = _data(32).x, _data(32).y
    for step in range(3):
        for model, o in ((fused, opt), (loop, reference)):
            o.zero_grad(set_to_none=True)
            hidden = model[2](model[1](model[0](x)))
            # The first two steps train up to the hidden layer only: the head gets its first gradient at step 3.
            loss = hidden.pow(2).mean() if step < 2 else nn.functional.cross_entropy(model[4](model[3](hidden)), y)
            loss.backward()
            o.step()
    torch.testing.assert_close(list(fused.parameters()), list(loop.parameters()), rtol=1e-5, atol=1e-6)


class _TeacherTerms(LossTerms):
    needs_teacher = True  # as with a KD term: the teacher runs at every step


def test_the_teacher_is_cast_once_to_the_autocast_dtype_with_float_batchnorm():
    teacher = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        teacher[1].running_mean.uniform_(-1, 1)
        teacher[1].running_var.uniform_(0.5, 2)
    teacher.eval().requires_grad_(False)
    terms = _TeacherTerms(ce_only())
    source = TeacherSource(terms, teacher, None, None, torch.bfloat16)
    cast = source.teacher
    assert cast is not teacher and teacher[0].weight.dtype == torch.float32  # the caller's teacher is untouched
    assert cast[0].weight.dtype == cast[4].weight.dtype == torch.bfloat16
    assert cast[1].weight.dtype == cast[1].running_var.dtype == torch.float32
    x = torch.randn(4, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = source.outputs(x, torch.arange(4), None)
        want = teacher(x)
    torch.testing.assert_close(got.float(), want.float(), rtol=0.05, atol=0.05)
    # Without autocast the teacher stays as it is.
    assert TeacherSource(terms, teacher, None, None, None).teacher is teacher


def test_compile_drops_the_smaller_last_batch_and_asks_for_static_shapes(monkeypatch):
    asked = []
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: asked.append(kwargs) or module)
    spec = FitSpec(epochs=1, batch_size=32, lr=0.1, seed=0, optimizer=SGD, scheduler=COSINE, compile=True)
    t = engine._Training(_net(), _data(200), spec, torch.device("cpu"), None, LossTerms(ce_only()), None, None, None)
    assert t.steps_per_epoch == 6  # 200 // 32: the last 8 samples (others each epoch) are left out
    assert {len(y) for _, y, _ in t.batches} == {32}
    t.forward_at(1)
    assert asked == [{"dynamic": False}]
    assert len(DeviceBatches(_data(200), 32, torch.device("cpu"), shuffle=True)) == 7  # without compile: kept
    assert len(DeviceBatches(_data(20), 32, torch.device("cpu"), shuffle=True, drop_last=True)) == 1  # no full batch


def test_sync_bn_with_a_small_per_rank_batch_warns(monkeypatch, caplog):
    monkeypatch.setattr(distributed, "enabled", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    cuda = torch.device("cuda")  # converting the layers needs no GPU
    with caplog.at_level(logging.WARNING, logger="kdtrain"):
        student = _sync_bn(_net(), OmegaConf.create({"sync_bn": True, "batch_size": 16}), cuda)
    assert isinstance(student[2], nn.SyncBatchNorm)
    assert "sync_bn=true with batch_size=16 per rank" in caplog.text and "4 GPUs slower than one" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kdtrain"):
        _sync_bn(_net(), OmegaConf.create({"sync_bn": True, "batch_size": 64}), cuda)
    assert not caplog.text


def _optimizer_state(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v.clone() for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


@pytest.mark.parametrize(
    ("opt", "amp"), [(SGD, None), (ADAMW, None), (SGD, torch.float16)], ids=["sgd", "adamw", "sgd-float16-gradscaler"]
)
def test_a_flagged_step_is_dropped_on_the_device(opt, amp):
    """`update` with found_inf=1 leaves the weights and the optimizer state alone (float16: GradScaler sees
    the NaN factor and also backs its scale off); with 0 it trains."""
    spec = FitSpec(epochs=10, batch_size=32, lr=0.1, seed=0, optimizer=opt, scheduler=COSINE)  # lr > 0 throughout
    t = engine._Training(_net(), _data(64), spec, torch.device("cpu"), amp, LossTerms(ce_only()), None, None, None)
    x, y, idx = next(iter(t.batches))
    for step in range(2):  # AdamW: its state exists after a first step
        _, loss, _ = t.step(t.forward_at(1), x, y, idx, 1)
        t.update(loss, torch.zeros(()), len(y), step, by_hand=False)
    weights, state = [p.detach().clone() for p in t.model.parameters()], _optimizer_state(t.optimizer)
    scale = t.scaler.get_scale() if amp else None
    _, loss, _ = t.step(t.forward_at(1), x, y, idx, 1)
    t.update(loss, torch.ones(()), len(y), 2, by_hand=False)
    assert all(torch.equal(a, p) for a, p in zip(weights, t.model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(state, _optimizer_state(t.optimizer)))
    if amp:
        assert t.scaler.get_scale() == scale / 2
    _, loss, _ = t.step(t.forward_at(1), x, y, idx, 1)
    t.update(loss, torch.zeros(()), len(y), 3, by_hand=False)
    assert not any(torch.equal(a, p) for a, p in zip(weights, t.model.parameters()))


def test_under_ddp_a_term_not_yet_on_trains_the_plain_student_with_gradients_averaged_by_hand(monkeypatch, tmp_path):
    """While a term in force is off (FitNets' hint stage) DDP cannot see which parameters get gradients: the
    plain student trains and `update` averages every gradient; DDP takes over once every term is on."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        monkeypatch.setattr(distributed, "enabled", lambda: True)
        averaged = []
        monkeypatch.setattr(distributed, "average_gradients", lambda params: averaged.append(len(params)))
        late_ce = TermSpec(TERMS["ce"], None, 1.0, start_epoch=2)
        spec = FitSpec(epochs=2, batch_size=32, lr=0.1, seed=0, optimizer=SGD, scheduler=COSINE)
        model = _net()
        t = engine._Training(model, _data(64), spec, torch.device("cpu"), None, LossTerms([late_ce]), None, None, None)
        assert t.ddp and t.forward_at(1) is model
        assert isinstance(t.forward_at(2), DDP) and t.forward_at(2).module is model
        x, y, _ = next(iter(t.batches))
        loss = nn.functional.cross_entropy(t.forward_at(1)(x), y)
        t.update(loss, torch.zeros(()), len(y), 0, by_hand=True)
        assert averaged == [len(list(model.parameters()))]  # every parameter, by hand
    finally:
        torch.distributed.destroy_process_group()
