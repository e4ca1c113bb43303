"""Exact tests of the MAML math against an explicit autograd reference, in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import metagrad as mg


class TinyConvNorm(nn.Module):
    """conv -> BatchNorm (default) or another normalisation -> ReLU -> max-pool -> linear.

    InstanceNorm: its fused kernel's batching rule is wrong for second order under vmap."""

    def __init__(self, norm: nn.Module | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = norm or nn.BatchNorm2d(4, track_running_stats=False)
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.conv(x)))
        return self.head(F.max_pool2d(h, 2).flatten(1))


class TinyGRU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(2, 5, batch_first=True)
        self.head = nn.Linear(5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class WithBuffer(nn.Module):
    """A model with a (constant) buffer and a LayerNorm."""

    def __init__(self, affine: bool = False) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor([2.0, 0.5, 1.0]))
        norm = nn.LayerNorm(8, elementwise_affine=affine)
        self.net = nn.Sequential(nn.Linear(3, 8), norm, nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * self.scale)


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred, target)


def make_case(kind: str, tasks: int = 3):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if kind == "mlp":
        model = nn.Sequential(
            nn.Linear(1, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1)
        )
        sx, qx = torch.randn(tasks, 6, 1, generator=g), torch.randn(tasks, 7, 1, generator=g)
        sy, qy = torch.sin(sx), torch.sin(qx)
        loss = mse
    elif kind in ("conv_bn", "conv_in"):
        norm = nn.InstanceNorm2d(4, affine=True) if kind == "conv_in" else None
        model = TinyConvNorm(norm)
        sx, qx = (
            torch.randn(tasks, 6, 1, 8, 8, generator=g),
            torch.randn(tasks, 6, 1, 8, 8, generator=g),
        )
        sy, qy = (
            torch.randint(0, 3, (tasks, 6), generator=g),
            torch.randint(0, 3, (tasks, 6), generator=g),
        )
        loss = F.cross_entropy
    elif kind == "gru":
        model = TinyGRU()
        sx, qx = torch.randn(tasks, 5, 4, 2, generator=g), torch.randn(tasks, 5, 4, 2, generator=g)
        sy, qy = sx.sum((2, 3)).unsqueeze(-1), qx.sum((2, 3)).unsqueeze(-1)
        loss = mse
    elif kind in ("buffer", "layernorm"):
        model = WithBuffer(affine=kind == "layernorm")
        sx, qx = torch.randn(tasks, 6, 3, generator=g), torch.randn(tasks, 6, 3, generator=g)
        sy, qy = sx.sum(-1, keepdim=True), qx.sum(-1, keepdim=True)
        loss = mse
    else:
        raise ValueError(kind)
    model = model.double()
    data = [t.double() if t.is_floating_point() else t for t in (sx, sy, qx, qy)]
    return model, loss, data


def reference_meta_grad(model, loss_fn, data, lr, steps, first_order):
    """MAML written out by hand: a loop over tasks with torch.autograd.grad."""
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    total = 0.0
    for sx, sy, qx, qy in zip(*data, strict=True):
        fast = list(params)
        for _ in range(steps):
            inner = loss_fn(
                torch.func.functional_call(model, dict(zip(names, fast, strict=False)), (sx,)), sy
            )
            grads = torch.autograd.grad(inner, fast, create_graph=not first_order)
            fast = [w - lr * g for w, g in zip(fast, grads, strict=True)]
        total = total + loss_fn(
            torch.func.functional_call(model, dict(zip(names, fast, strict=False)), (qx,)), qy
        )
    loss = total / len(data[0])
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.detach(), {
        n: (torch.zeros_like(p) if g is None else g)
        for n, p, g in zip(names, params, grads, strict=False)
    }


def metagrad_meta_grad(model, loss_fn, data, lr, steps, first_order, vectorize):
    maml = mg.MAML(
        model, loss_fn, inner_lr=lr, inner_steps=steps, first_order=first_order, vectorize=vectorize
    )
    model.zero_grad(set_to_none=True)
    loss = maml.meta_loss(*data)
    loss.backward()
    grads = {
        n: (torch.zeros_like(p) if p.grad is None else p.grad.clone())
        for n, p in model.named_parameters()
    }
    return loss.detach(), grads, maml


KINDS = ["mlp", "conv_bn", "conv_in", "gru", "buffer", "layernorm"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True])
def test_meta_gradient_matches_reference(kind, steps, first_order):
    model, loss_fn, data = make_case(kind)
    ref_loss, ref_grads = reference_meta_grad(model, loss_fn, data, 0.1, steps, first_order)
    loss, grads, _ = metagrad_meta_grad(model, loss_fn, data, 0.1, steps, first_order, None)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-8, atol=1e-10, msg=n)


@pytest.mark.parametrize("kind", ["mlp", "buffer", "conv_bn", "layernorm"])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("batched", [True, "support"])
def test_vmap_and_loop_agree(kind, first_order, batched):
    """Including BatchNorm and LayerNorm, whose fused kernels are wrong for second order
    under vmap in torch 2.13: metagrad runs them as plain tensor ops there."""
    model, loss_fn, data = make_case(kind)
    l0, g0, m0 = metagrad_meta_grad(model, loss_fn, data, 0.1, 2, first_order, False)
    l1, g1, m1 = metagrad_meta_grad(model, loss_fn, data, 0.1, 2, first_order, batched)
    assert m0.strategy(data, steps=2, first_order=first_order).vectorize is False
    assert m1.strategy(data, steps=2, first_order=first_order).vectorize == batched
    torch.testing.assert_close(l0, l1, rtol=1e-10, atol=1e-12)
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], rtol=1e-8, atol=1e-10, msg=n)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("batched", [True, "support"])
def test_forced_vmap_is_exact_or_refused(kind, first_order, batched):
    """A forced batched strategy never returns a wrong answer: it matches the reference
    or raises."""
    model, loss_fn, data = make_case(kind)
    ref_loss, ref_grads = reference_meta_grad(model, loss_fn, data, 0.1, 2, first_order)
    try:
        loss, grads, _ = metagrad_meta_grad(model, loss_fn, data, 0.1, 2, first_order, batched)
    except ValueError as e:
        assert f"vectorize={batched!r} is not" in str(e)
        return
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-8, atol=1e-10, msg=n)


def test_plain_norms_compute_the_fused_norms():
    """The plain-op BatchNorm / LayerNorm used under vmap is the same function as torch's."""
    from metagrad.core.functional import plain_norms

    torch.manual_seed(0)
    x = torch.randn(6, 4, 5, 5, dtype=torch.float64)
    for layer in (
        nn.BatchNorm2d(4, track_running_stats=False),
        nn.BatchNorm2d(4, affine=False, track_running_stats=False),
        nn.LayerNorm([5, 5]),
        nn.LayerNorm(5, elementwise_affine=False),
    ):
        layer = layer.double()
        for p in layer.parameters():
            nn.init.normal_(p)
        expected = layer(x)
        with plain_norms(layer):
            torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_second_order_differs_from_first_order():
    model, loss_fn, data = make_case("mlp")
    _, g2, _ = metagrad_meta_grad(model, loss_fn, data, 0.1, 1, False, None)
    _, g1, _ = metagrad_meta_grad(model, loss_fn, data, 0.1, 1, True, None)
    diff = max((g2[n] - g1[n]).abs().max().item() for n in g2)
    assert diff > 1e-4


def test_zero_steps_is_plain_query_loss():
    model, loss_fn, data = make_case("mlp")
    maml = mg.MAML(model, loss_fn, inner_lr=0.1, inner_steps=0)
    expected = torch.stack(
        [loss_fn(model(qx), qy) for qx, qy in zip(data[2], data[3], strict=True)]
    ).mean()
    torch.testing.assert_close(maml.meta_loss(*data), expected)


def test_auto_strategy_vectorizes_mlp_and_loops_convnets_and_rnns():
    # on CPU; on a GPU convnets are vectorized when exact
    cases = [("mlp", True), ("conv_bn", "support"), ("gru", False), ("layernorm", True)]
    for kind, expect in cases:
        model, loss_fn, data = make_case(kind)
        maml = mg.MAML(model, loss_fn, inner_lr=0.1)
        assert maml.strategy(data, steps=1, first_order=False).vectorize == expect, kind
    # a convnet's support sets are batched only when small; zero steps: nothing to batch
    model, loss_fn, (sx, sy, qx, qy) = make_case("conv_bn")
    big = sx.repeat(1, 1, 1, 12, 12)  # 6 images of 96x96 per task: > SMALL_SUPPORT values
    assert big[0].numel() > mg.core.strategy.SMALL_SUPPORT
    maml = mg.MAML(model, loss_fn, inner_lr=0.1)
    verdict = maml.strategy((big, sy, qx, qy), steps=1, first_order=False)
    assert verdict.vectorize is False and verdict.name == "per-task loop"
    verdict = mg.MAML(model, loss_fn).strategy((sx, sy, qx, qy), steps=0, first_order=False)
    assert verdict.vectorize is False


def test_vmap_check_catches_wrong_second_order():
    """torch 2.13 computes the 2nd-order gradient through InstanceNorm wrongly under vmap.

    The strategy check must see it: forcing vmap raises, the default loops (exactly)."""
    model, loss_fn, data = make_case("conv_in")
    maml = mg.MAML(model, loss_fn, inner_lr=0.1, vectorize=True)
    with pytest.raises(ValueError, match="not exact.*wrong meta-gradient"):
        maml.meta_loss(*data)
    verdict = mg.MAML(model, loss_fn, inner_lr=0.1).strategy(data, steps=1, first_order=False)
    assert not verdict.vectorize
    # first order through InstanceNorm is exact under vmap, so it is allowed
    fo = mg.MAML(model, loss_fn, inner_lr=0.1, first_order=True, vectorize=True)
    assert fo.strategy(data, steps=1, first_order=True).vectorize


def test_vmap_refused_for_rnn_and_running_stats():
    model, loss_fn, data = make_case("gru")
    with pytest.raises(ValueError, match="GRU"):
        mg.MAML(model, loss_fn, vectorize=True).meta_loss(*data)
    bn = nn.Sequential(nn.Linear(1, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    x = torch.randn(2, 5, 1)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        mg.MAML(bn, mse, vectorize=True).meta_loss(x, x, x, x)
    # the default runs it exactly in a loop
    loss = mg.MAML(bn, mse).meta_loss(x, x, x, x)
    assert torch.isfinite(loss)


def test_adapt_single_task_matches_manual_sgd():
    model, loss_fn, data = make_case("mlp")
    sx, sy = data[0][0], data[1][0]
    maml = mg.MAML(model, loss_fn, inner_lr=0.05)
    fast = maml.adapt(sx, sy, steps=2)
    params = dict(model.named_parameters())
    p = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    for _ in range(2):
        loss = loss_fn(torch.func.functional_call(model, p, (sx,)), sy)
        g = torch.autograd.grad(loss, list(p.values()))
        p = {
            k: (v - 0.05 * gi).detach().requires_grad_()
            for (k, v), gi in zip(p.items(), g, strict=True)
        }
    torch.testing.assert_close(
        fast(data[2][0]), torch.func.functional_call(model, p, (data[2][0],))
    )
    # the adapted parameters are differentiable w.r.t. the meta-parameters
    loss_fn(fast(data[2][0]), data[3][0]).backward()
    assert all(q.grad is not None for q in model.parameters())


def test_adaptation_curve_matches_repeated_adapt():
    model, loss_fn, data = make_case("mlp")
    maml = mg.MAML(model, loss_fn, inner_lr=0.05)
    curve = maml.adaptation_curve(*data, steps=3, metrics={"mse": loss_fn})["mse"]
    assert curve.shape == (3, 4)
    for t in range(3):
        for s in range(4):
            with torch.no_grad():
                fast = maml.adapt(data[0][t], data[1][t], steps=s)
                expected = loss_fn(fast(data[2][t]), data[3][t])
            torch.testing.assert_close(curve[t, s], expected)


def test_maml_is_a_module():
    model, loss_fn, _ = make_case("mlp")
    maml = mg.MAML(model, loss_fn)
    assert {n for n, _ in maml.named_parameters()} == {
        f"model.{n}" for n, _ in model.named_parameters()
    }
    state = maml.state_dict()
    clone = mg.MAML(make_case("mlp")[0], loss_fn)
    clone.load_state_dict(state)
    assert all(
        torch.equal(a, b) for a, b in zip(maml.parameters(), clone.parameters(), strict=True)
    )


@pytest.mark.parametrize(
    "shapes, match",
    [
        (((2, 5, 1), (2, 5, 1), (3, 5, 1), (3, 5, 1)), "task dimensions differ"),
        (((2, 5, 1), (2, 4, 1), (2, 5, 1), (2, 5, 1)), "support_x"),
        (((2, 5, 1), (2, 5, 1), (2, 5, 1), (2, 6, 1)), "query_x"),
        (((5,), (5,), (5,), (5,)), r"\[tasks, shots"),
    ],
)
def test_bad_shapes_give_clear_errors(shapes, match):
    maml = mg.MAML(nn.Linear(1, 1), mse)
    with pytest.raises(ValueError, match=match):
        maml.meta_loss(*(torch.zeros(s) for s in shapes))


def test_bad_constructor_values():
    with pytest.raises(ValueError, match="vectorize must be"):
        mg.MAML(nn.Linear(1, 1), mse, vectorize="yes")
    with pytest.raises(ValueError, match="inner_lr"):
        mg.MAML(nn.Linear(1, 1), mse, inner_lr=0)
    with pytest.raises(ValueError, match="inner_steps"):
        mg.MAML(nn.Linear(1, 1), mse, inner_steps=-1)


# ---------------------------------------------------------------- meta_backward / compile
def _assert_grads_close(model, ref, rtol=1e-9, atol=1e-12):
    for n, p in model.named_parameters():
        got = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(got, ref[n], rtol=rtol, atol=atol, msg=n)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("first_order", [False, True])
def test_meta_backward_matches_reference_and_accumulates(kind, first_order):
    """With the default strategy: vmap (mlp, buffer, layernorm), support sets batched
    (conv_bn), the loop (conv_in, gru)."""
    model, loss_fn, data = make_case(kind)
    ref_loss, ref = reference_meta_grad(model, loss_fn, data, 0.1, 2, first_order)
    maml = mg.MAML(model, loss_fn, inner_lr=0.1, inner_steps=2, first_order=first_order)
    model.zero_grad(set_to_none=True)
    loss, outputs = maml.meta_backward(*data, return_outputs=True)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-14)
    assert not loss.requires_grad and not outputs.requires_grad
    assert outputs.shape[:2] == data[3].shape[:2]
    _assert_grads_close(model, ref)
    # like backward(), a second call adds to .grad
    maml.meta_backward(*data)
    _assert_grads_close(model, {n: 2 * g for n, g in ref.items()})


def test_compiled_meta_backward_matches_reference():
    # one compiled vmapped graph (MLP) and one compiled per-task graph reused in a loop
    model, loss_fn, data = make_case("mlp")
    ref_loss, ref = reference_meta_grad(model, loss_fn, data, 0.1, 2, False)
    for vectorize in (True, False):
        maml = mg.MAML(
            model, loss_fn, inner_lr=0.1, inner_steps=2, vectorize=vectorize, compile=True
        )
        model.zero_grad(set_to_none=True)
        loss = maml.meta_backward(*data)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-14)
        _assert_grads_close(model, ref, rtol=1e-9, atol=1e-11)


def test_compile_refused_for_in_place_buffer_updates():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))  # tracks running stats
    with pytest.raises(ValueError, match="compile=True needs .*track_running_stats"):
        mg.MAML(model, mse, compile=True)


def bad_compile(fn, **_):
    """A stand-in for torch.compile whose gradients are 1% off."""

    def wrapped(*args):
        (grads, rate_grads), aux = fn(*args)
        return ({k: g * 1.01 for k, g in grads.items()}, rate_grads), aux

    return wrapped


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_wrong_compiled_gradient_is_caught(monkeypatch, dtype):
    # a compiler that returned a wrong gradient must not reach the optimizer (in float32
    # after the second test, against the float64 gradient)
    monkeypatch.setattr(torch, "compile", bad_compile)
    model, loss_fn, data = make_case("mlp")
    model = model.to(dtype)
    model[0].bias.requires_grad_(False)  # a frozen parameter must not upset the check
    data = [t.to(dtype) if t.is_floating_point() else t for t in data]
    maml = mg.MAML(model, loss_fn, inner_lr=0.1, compile=True)
    model.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="compile=True is not exact for this model"):
        maml.meta_backward(*data)
    assert all(p.grad is None for p in model.parameters())


def test_auto_compile_is_eager_on_cpu(monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn) or fn)
    model, loss_fn, data = make_case("mlp")
    maml = mg.MAML(model, loss_fn, inner_lr=0.1, compile=None)
    maml.meta_backward(*data)
    assert not compiled  # nothing compiled on a CPU


def test_auto_compile_falls_back_to_eager_when_not_exact(monkeypatch):
    """compile=None (what the few-shot presets use on CUDA) warns and runs eagerly where a
    compiled gradient fails its check, and does not try that graph again."""

    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(fn) or bad_compile(fn))
    # as on CUDA, where compile=None compiles
    monkeypatch.setattr(mg.core.compiled.Compiled, "AUTO_DEVICES", ("cpu", "cuda"))
    model, loss_fn, data = make_case("mlp")
    ref_loss, ref_grads = reference_meta_grad(model, loss_fn, data, 0.1, 1, False)
    maml = mg.MAML(model, loss_fn, inner_lr=0.1, compile=None)
    for call in range(2):
        model.zero_grad(set_to_none=True)
        if call == 0:
            with pytest.warns(RuntimeWarning, match="not exact.*running eagerly"):
                loss = maml.meta_backward(*data)
        else:
            loss = maml.meta_backward(*data)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-8, atol=1e-10, msg=n)
    assert len(calls) == 1  # the refused graph is not compiled again


def test_keep_freed_memory_is_applied_once_and_can_be_turned_off(monkeypatch):
    import sys

    from metagrad.core import malloc

    monkeypatch.setattr(malloc, "_applied", None)
    monkeypatch.setenv("METAGRAD_KEEP_FREED_MEMORY", "0")
    assert malloc.keep_freed_memory() is False
    monkeypatch.setattr(malloc, "_applied", None)
    monkeypatch.delenv("METAGRAD_KEEP_FREED_MEMORY")
    expected = sys.platform.startswith("linux")  # glibc here; elsewhere left alone
    assert malloc.keep_freed_memory() is expected
    assert malloc.keep_freed_memory() is expected  # idempotent


class FrozenAndUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.frozen = nn.Linear(4, 4).requires_grad_(False)
        self.unused = nn.Linear(4, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.frozen(torch.tanh(self.body(x)))))


@pytest.mark.parametrize("first_order", [False, True])
def test_autograd_inner_step_is_torch_func_grad(first_order):
    """adapt(autograd=True), the per-task loop's faster inner step, gives the same adapted
    parameters and meta-gradient as torch.func.grad, frozen (selected to adapt) and unused
    parameters included."""
    torch.manual_seed(0)
    model = FrozenAndUnused().double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
    qx = torch.randn(5, 3, dtype=torch.float64)
    params, results = dict(model.named_parameters()), []
    spec = mg.core.Spec(tuple(params), steps=2, lr=0.1, first_order=first_order)
    for autograd in (False, True):
        support = mg.core.support_loss(model, mse, {}, x, y)
        hyper = mg.core.Hyper({}, None)
        fast = mg.core.adapt(support, params, spec, hyper, autograd=autograd)
        out = mg.core.forward(model, fast, {}, qx).square().sum()
        trainable = [p for p in params.values() if p.requires_grad]
        meta = torch.autograd.grad(out, trainable, allow_unused=True, materialize_grads=True)
        results.append((fast, meta))
    (f0, m0), (f1, m1) = results
    for k in f0:
        torch.testing.assert_close(f1[k], f0[k], rtol=1e-12, atol=1e-14, msg=k)
    assert not torch.equal(f0["frozen.weight"], params["frozen.weight"])  # adapted too
    for a, b in zip(m0, m1, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("adapt", [None, "all"])
def test_support_batched_meta_backward_with_frozen_and_unused_parameters(first_order, adapt):
    """vectorize="support" splits the chain rule at the adapted parameters. By default a
    frozen parameter does not adapt; selected to adapt, its adapted value depends on the
    trainable ones and must carry its part of the meta-gradient."""
    adapt = (lambda name: True) if adapt == "all" else None
    torch.manual_seed(0)
    model = FrozenAndUnused().double()
    g = torch.Generator().manual_seed(1)
    sx, qx = torch.randn(3, 6, 3, generator=g), torch.randn(3, 5, 3, generator=g)
    data = [t.double() for t in (sx, sx.sum(-1, keepdim=True), qx, qx.sum(-1, keepdim=True))]
    results = []
    for vectorize in (False, "support"):
        maml = mg.MAML(
            model, mse, inner_lr=0.1, inner_steps=2, first_order=first_order, vectorize=vectorize,
            adapt=adapt,
        )  # fmt: skip
        model.zero_grad(set_to_none=True)
        loss, out = maml.meta_backward(*data, return_outputs=True)
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss, out, grads))
    (l0, o0, g0), (l1, o1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(o1, o0, rtol=1e-12, atol=1e-14)
    assert g0["unused.weight"] is None and g1["unused.weight"].abs().max() == 0
    for n in ("body.weight", "body.bias", "head.weight", "head.bias"):
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-10, atol=1e-12, msg=n)
    assert model.frozen.weight.grad is None


@pytest.mark.parametrize("vectorize", [False, "support"])
def test_channels_last_query_pass_is_the_same_function(vectorize):
    """The query pass in channels_last (the CPU default for conv nets) changes the memory
    layout only: the same losses, outputs and meta-gradient as the contiguous one."""
    model, loss_fn, data = make_case("conv_bn")
    assert mg.core.strategy.channels_last_query(model, data[2])  # auto: conv net, images
    mlp, _, mlp_data = make_case("mlp")
    assert not mg.core.strategy.channels_last_query(mlp, mlp_data[2])
    results = []
    for channels_last in (False, True):
        maml = mg.MAML(
            model, loss_fn, inner_lr=0.1, inner_steps=2, vectorize=vectorize,
            channels_last=channels_last,
        )  # fmt: skip
        model.zero_grad(set_to_none=True)
        loss, out = maml.meta_backward(*data, return_outputs=True)
        results.append((loss, out, {n: p.grad.clone() for n, p in model.named_parameters()}))
        losses, _ = maml.task_losses(*data)  # the differentiable path too
        torch.testing.assert_close(losses.mean(), loss, rtol=1e-12, atol=1e-14)
    (l0, o0, g0), (l1, o1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(o1, o0, rtol=1e-12, atol=1e-14)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-10, atol=1e-12, msg=n)


def test_channels_last_copy_hands_back_contiguous_gradients():
    """The query pass runs on channels_last copies; the gradient reaching the adapted
    parameters is contiguous again, so the adaptation's backward keeps its own layout."""
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    params, xc = mg.core.functional.to_channels_last({"w": w}, x)
    p = params["w"]
    assert p.is_contiguous(memory_format=torch.channels_last) and torch.equal(p, w)
    assert xc.is_contiguous(memory_format=torch.channels_last) and torch.equal(xc, x)
    y = F.conv2d(xc, p)
    (g,) = torch.autograd.grad(y.square().sum(), w, create_graph=True)
    assert g.is_contiguous()
    torch.testing.assert_close(g, torch.autograd.grad(F.conv2d(x, w).square().sum(), w)[0])
    # and it stays differentiable (a second-order use of the copy)
    (gg,) = torch.autograd.grad(g.sum(), w)
    assert torch.isfinite(gg).all()


def test_channels_last_copy_of_one_channel_images_has_channels_last_strides():
    """With one channel, NCHW strides already pass as channels_last; the copy must still
    carry channel-minor strides, or oneDNN runs the pass in NCHW (what made evaluation slow)."""
    x = torch.randn(6, 1, 5, 5)
    w = torch.randn(4, 1, 3, 3)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            params, xc = mg.core.functional.to_channels_last({"w": w}, x)
        assert torch.equal(xc, x) and torch.equal(params["w"], w)
        assert xc.stride() == (25, 1, 5, 1)
        assert params["w"].stride() == (9, 1, 3, 1)


def test_adaptation_curve_is_the_same_in_both_layouts():
    """The evaluation curve's query passes run in channels_last on CPU conv nets (no graph):
    the same metrics as the contiguous passes and as the vectorized curve."""
    model, loss_fn, data = make_case("conv_bn")
    curves = []
    for kw in ({"channels_last": False}, {"channels_last": True}, {"vectorize": True}):
        maml = mg.MAML(model, loss_fn, inner_lr=0.1, **kw)
        curves.append(maml.adaptation_curve(*data, steps=3, metrics={"loss": loss_fn})["loss"])
    assert curves[0].shape == (data[0].shape[0], 4) and curves[0].dtype == torch.float64
    for c in curves[1:]:
        torch.testing.assert_close(c, curves[0], rtol=1e-12, atol=1e-14)


def test_meta_backward_under_no_grad_says_so():
    model, loss_fn, data = make_case("conv_bn")
    with torch.no_grad(), pytest.raises(RuntimeError, match="needs grad mode"):
        mg.MAML(model, loss_fn).meta_backward(*data)
