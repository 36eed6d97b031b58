"""The one training engine (`engine.py`) on a tiny linear model: micro-batches add up to the whole step, each
network's gradient is clipped on its own (or together), and a non-finite loss or norm stops the step before any
weight changes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from wprlhf.distributed import make_accelerator
from wprlhf.engine import Engine
from wprlhf.errors import NonFiniteError


class Two(nn.Module):
    """Two small networks in one module, as PPO's policy and value model."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 1), nn.Linear(4, 1)

    def forward(self, x):
        return self.a(x).squeeze(-1), self.b(x).squeeze(-1)


def engine_for(model, max_grad_norm=None, clip_together=False, lr=0.1):
    groups = {"grad_norm": (list(model.a.parameters()), lr), "value_grad_norm": (list(model.b.parameters()), lr)}
    return Engine(make_accelerator(torch.device("cpu")), model, groups, weight_decay=0.0, schedule=lambda s: 1.0,
                  max_grad_norm=max_grad_norm, what="test update", fix="lower the lr", clip_together=clip_together)


X = torch.arange(24, dtype=torch.float32).reshape(6, 4) / 10
Y = torch.tensor([1.0, -1.0, 2.0, 0.5, -2.0, 1.5])


def loss_of(model, rows):
    a, b = model(X[rows])
    return ((a - Y[rows]) ** 2).sum() / len(X) + ((b + Y[rows]) ** 2).sum() / len(X)  # a share of the batch mean


@pytest.mark.parametrize("micro", [1, 2, 4, 6])
def test_micro_batches_add_up_to_the_whole_step(micro):
    whole, cut = Two(), Two()
    e_whole, e_cut = engine_for(whole), engine_for(cut)
    e_whole.backward(loss_of(e_whole.model, list(range(6))))
    norms_whole = e_whole.step(1)
    chunks = 0
    for rows in e_cut.micro_batches(list(range(6)), micro):
        e_cut.backward(loss_of(e_cut.model, rows))
        chunks += 1
    norms_cut = e_cut.step(1)
    assert chunks == -(-6 // micro)
    assert norms_cut == pytest.approx(norms_whole, rel=1e-5)
    for p, q in zip(whole.parameters(), cut.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in cut.parameters())  # freed after the step


def _norm(params):
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))


@pytest.mark.parametrize("clip_together", [False, True])
def test_each_network_is_clipped_on_its_own_or_together(clip_together):
    """Reported norms are the gradients' before clipping; at the optimizer step each network's gradient (apart) or
    the two together have norm max_grad_norm."""
    model = Two()
    engine = engine_for(model, max_grad_norm=1e-3, clip_together=clip_together)
    engine.backward(loss_of(engine.model, list(range(6))))
    raw_a, raw_b = _norm(model.a.parameters()), _norm(model.b.parameters())
    seen = {}
    real_step = engine.optimizer.step

    def step(*args, **kwargs):  # the gradients the optimizer steps with, after clipping
        seen.update(a=_norm(model.a.parameters()), b=_norm(model.b.parameters()))
        return real_step(*args, **kwargs)

    engine.optimizer.step = step
    norms = engine.step(1)
    assert min(raw_a, raw_b) > 1e-2  # far above the clip, so clipping must act
    if clip_together:
        assert norms == pytest.approx({"grad_norm": (raw_a**2 + raw_b**2) ** 0.5}, rel=1e-5)
        assert (seen["a"] ** 2 + seen["b"] ** 2) ** 0.5 == pytest.approx(1e-3, rel=1e-3)
        assert seen["a"] / seen["b"] == pytest.approx(raw_a / raw_b, rel=1e-4)  # one factor for both
    else:
        assert norms == pytest.approx({"grad_norm": raw_a, "value_grad_norm": raw_b}, rel=1e-5)
        assert seen == pytest.approx({"a": 1e-3, "b": 1e-3}, rel=1e-3)


def test_a_non_finite_loss_or_norm_stops_before_the_step():
    model = Two()
    engine = engine_for(model)
    before = [p.detach().clone() for p in model.parameters()]
    a, _ = engine.model(X)
    engine.backward((a * float("nan")).sum())
    with pytest.raises(NonFiniteError, match="test update, step 3: .*grad_norm = nan.*lower the lr"):
        engine.step(3, loss=float("nan"))
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)  # no NaN reached the weights
