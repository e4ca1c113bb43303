"""Gradient checkpointing of the inner loop (``MAML(checkpoint=True)``): each inner step is
recomputed in the backward pass; the meta-gradient equals plain MAML's in float64."""

from __future__ import annotations

import pytest
import torch
from test_core import make_case
from torch import nn

import metagrad as mg


def meta_grads(model, loss_fn, data, **kwargs):
    model.zero_grad()
    learner = mg.MAML(model, loss_fn, inner_lr=0.1, inner_steps=3, **kwargs)
    loss = learner.meta_backward(*data)
    return loss, [p.grad.clone() for p in learner.parameters()]


@pytest.mark.parametrize("kind", ["mlp", "conv_bn"])
@pytest.mark.parametrize(
    "options",
    [{}, {"learn_lr": "per-layer-per-step", "step_weights": [0.2, 0.3, 0.5]},
     {"inner_optimizer": mg.inner.Adam()}],
    ids=["maml", "lslr-multistep", "adam"],
)  # fmt: skip
def test_checkpointed_maml_equals_plain_maml(kind, options):
    model, loss_fn, data = make_case(kind)
    loss, plain = meta_grads(model, loss_fn, data, vectorize=False, **options)
    loss_ck, ckpt = meta_grads(model, loss_fn, data, checkpoint=True, **options)
    torch.testing.assert_close(loss_ck, loss, rtol=0, atol=0)
    for a, b in zip(ckpt, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_checkpoint_refuses_what_it_cannot_run_exactly():
    model, loss_fn, _ = make_case("mlp")
    for kwargs in ({"vectorize": True}, {"vectorize": "support"}, {"compile": True}):
        with pytest.raises(ValueError, match="checkpoint=True"):
            mg.MAML(model, loss_fn, checkpoint=True, **kwargs)
    tracked = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    with pytest.raises(ValueError, match="running statistics"):
        mg.MAML(tracked, loss_fn, checkpoint=True)


def test_checkpointed_steps_are_recomputed_in_backward():
    # the evidence that the path is taken: the support forward runs again during backward
    model, loss_fn, data = make_case("mlp")
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    meta_grads(model, loss_fn, data, vectorize=False)
    plain = len(calls)
    calls.clear()
    meta_grads(model, loss_fn, data, checkpoint=True)
    tasks, steps = data[0].shape[0], 3
    extra = len(calls) - plain  # torch recomputes each step once per backward phase using it
    assert extra > 0 and extra % (tasks * steps) == 0, (plain, len(calls))
