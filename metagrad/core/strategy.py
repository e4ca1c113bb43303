"""Choosing how the tasks of a meta-batch are run: batched with ``vmap``, in a loop, or both.

All strategies compute the same function, but ``vmap`` is not exact for every layer
(in torch 2.13 the second-order gradient through the fused BatchNorm, LayerNorm and
InstanceNorm kernels under ``vmap`` is wrong; metagrad runs the first two as plain tensor
ops under ``vmap``, see ``functional.plain_norms``) and fails outright for others
(recurrent layers, in-place buffer updates). So ``vmap`` is only used after a float64
check against the per-task loop on the model itself says the two agree; otherwise the
loop runs. The third strategy, ``"support"``, batches only the inner adaptation on the
(small) support sets and runs the (large) query sets in a loop: on CPU convnets with small
support sets the loop is bound by per-task overhead on the support side, while a
batched query pass falls out of cache.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from . import executors
from .executors import Problem
from .spec import Hyper, Params

# Leaf layers for which batching tasks with vmap pays on CPU (small dense layers bound by
# Python overhead). Convolutions run faster in a per-task loop on CPU: vmap turns them
# into one huge grouped convolution that falls out of cache.
_CHEAP_UNDER_VMAP: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Bilinear, nn.Identity, nn.Flatten, nn.Unflatten, nn.LayerNorm,
    nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Softplus,
    nn.Mish, nn.Hardtanh, nn.Softmax, nn.LogSoftmax,
)  # fmt: skip


# On CPU, a convnet's support sets are adapted with vmap (queries looped) when one task's
# support inputs hold at most this many values. Measured on 2 cores, in-process A/B of a
# whole meta-gradient against the loop (the benchmarks' configs): 5 Omniglot images per task
# (3,920 values, 32 tasks) 1.34x faster; 20 images (15,680, 16 tasks, 5 steps) break-even
# (1.12x in one run, slower support side in another); 5 MiniImagenet images (105,840, 4
# tasks) 0.86x.
SMALL_SUPPORT = 8192


@dataclass(frozen=True)
class Verdict:
    vectorize: bool | str  # True: vmap, False: per-task loop, "support": vmap the support sets
    reason: str

    @property
    def name(self) -> str:
        names = {"True": "vmap", "False": "per-task loop", "support": "vmap support sets"}
        return names[str(self.vectorize)]


def _leaves(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if not list(m.children())]


def static_blocker(model: nn.Module) -> str | None:
    """A reason ``vmap`` cannot run this model at all, or None."""
    for m in model.modules():
        if isinstance(m, nn.RNNBase):
            return f"{type(m).__name__} layers do not run under vmap"
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            return (
                f"{type(m).__name__} with track_running_stats=True updates its running "
                "statistics in place, which vmap cannot batch; construct it with "
                "track_running_stats=False (MAML's setting) or call "
                "torch.func.replace_all_batch_norm_modules_(model)"
            )
    return None


def check_model(model: nn.Module, compile: bool | None, checkpoint: bool = False) -> None:
    """Refuse options the model cannot run exactly with."""
    blocker = static_blocker(model)
    if compile and blocker is not None:
        raise ValueError(
            "compile=True needs a model that runs under torch.func transforms without "
            f"in-place buffer updates, and this one does not: {blocker}"
        )
    # recomputing a step would update BatchNorm running statistics a second time
    if checkpoint and any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
                          for m in model.modules()):  # fmt: skip
        raise ValueError("checkpoint=True recomputes each inner step, which would update "
                         "BatchNorm running statistics twice: build the norms with "
                         "track_running_stats=False (as the paper's networks)")  # fmt: skip


def cheap_under_vmap(model: nn.Module, device: torch.device) -> bool:
    """Whether batching the tasks is expected to be faster than a loop."""
    if device.type != "cpu":
        return True
    return all(isinstance(m, _CHEAP_UNDER_VMAP) for m in _leaves(model))


def channels_last_query(model: nn.Module, query_x: Tensor) -> bool:
    """Whether the per-task query passes should run in ``channels_last`` memory format.

    On CPU, for models with 2-d convolutions fed images ``[tasks, n, C, H, W]``. Measured
    on 2 cores (whole meta-iteration, in-process A/B, query gradients handed back
    contiguous): Omniglot net 5w1s 1.11x, 20w1s 1.05x, MiniImagenet net 5w1s 1.21x.
    """
    return (
        query_x.device.type == "cpu"
        and query_x.dim() == 5
        and any(isinstance(m, nn.Conv2d) for m in model.modules())
    )


def small_support(support_x: Tensor, steps: int) -> bool:
    """Whether batching only the support sets is expected to beat the loop (CPU convnets)."""
    return steps >= 1 and support_x[0].numel() <= SMALL_SUPPORT


def as_double(t: Tensor) -> Tensor:
    return t.double() if t.is_floating_point() else t


def choose(
    problem: Problem,
    hyper: Hyper,
    data: tuple[Tensor, Tensor, Tensor, Tensor],
    vectorize: bool | str | None,
) -> Verdict:
    """The strategy for this batch. ``vectorize=None``: on CUDA, and for small dense models
    on CPU, ``vmap`` over the tasks; for other models on CPU ``"support"`` where one task's
    support inputs are small (``SMALL_SUPPORT`` values), else the loop. A batched strategy
    runs only after it matched the loop in float64 on this problem; a forced one that
    cannot be exact raises ``ValueError``."""
    model, device = problem.model, data[0].device
    blocker = static_blocker(model)
    if vectorize is False:
        return Verdict(False, "vectorize=False")
    if blocker is not None:
        if vectorize:
            raise ValueError(f"vectorize={vectorize!r} is not possible for this model: {blocker}")
        return Verdict(False, blocker)
    cheap = cheap_under_vmap(model, device)
    if vectorize is None and not cheap and not small_support(data[0], problem.spec.steps):
        return Verdict(False, "per-task loop is faster for these layers on this device")
    batched: bool | str = vectorize if vectorize is not None else (True if cheap else "support")
    ok, why = vmap_matches_loop(replace(problem, spec=replace(problem.spec, steps=max(
        problem.spec.steps, 1))), hyper, data, vectorize=batched)  # fmt: skip
    if not ok and vectorize:
        raise ValueError(
            f"vectorize={vectorize!r} is not exact for this model: {why}; "
            "use vectorize=False or leave it unset"
        )
    return Verdict(batched if ok else False, why)


def float64_copy(problem: Problem, hyper: Hyper) -> tuple[Problem, Params, Params, Hyper]:
    """A float64 copy of the problem: its model's parameters (trainable ones as leaves that
    require grad) and learned rates, detached from the originals."""
    model = copy.deepcopy(problem.model).double()
    params: Params = {n: p for n, p in model.named_parameters()}
    buffers = {k: as_double(b) for k, b in model.named_buffers()}
    rates = {k: r.detach().double().requires_grad_(r.requires_grad) for k, r in hyper.rates.items()}
    weights = None if hyper.weights is None else hyper.weights.detach().double()
    return replace(problem, model=model, buffers=buffers), params, buffers, Hyper(rates, weights)


def vmap_matches_loop(
    problem: Problem,
    hyper: Hyper,
    data: tuple[Tensor, Tensor, Tensor, Tensor],
    *,
    tasks: int = 2,
    vectorize: bool | str = True,
) -> tuple[bool, str]:
    """Compare a batched strategy and the loop in float64 on a copy of the problem's model
    and a slice of ``data``.

    Checks the query losses and the meta-gradient of every trainable parameter and learned
    rate (frozen parameters get none). ``vectorize``: the batched strategy to check
    (``True``: vmap, ``"support"``: vmap over the support sets).
    """
    what = "vmap" if vectorize is True else "vmap over the support sets"
    p64, params, _, h64 = float64_copy(problem, hyper)
    wrt = {k: p for k, p in params.items() if p.requires_grad}
    wrt |= {f"learned lr of {k}": r for k, r in h64.rates.items() if r.requires_grad}
    batch = tuple(as_double(t[:tasks].detach()) for t in data)
    results = []
    for strategy in (False, vectorize):
        try:
            with torch.enable_grad():
                losses, _ = executors.run(p64, params, h64, batch, strategy)  # type: ignore[arg-type]
                grads = torch.autograd.grad(losses.sum(), list(wrt.values()), allow_unused=True)
        except Exception as e:  # any failure under vmap means: do not use vmap
            return False, f"{what} failed: {type(e).__name__}: {str(e).splitlines()[0]}"
        results.append((losses.detach(), [None if g is None else g.detach() for g in grads]))
    (l0, g0), (l1, g1) = results
    if not torch.allclose(l0, l1, rtol=1e-9, atol=1e-12):
        return False, f"{what} gives different query losses than the per-task loop"
    if any((a is None) != (b is None) for a, b in zip(g0, g1, strict=True)):
        return False, f"{what} gives a different gradient structure than the per-task loop"
    # one scale for all parameters: gradients that are exactly zero in exact arithmetic
    # (a bias feeding a normalisation) are float noise in both strategies
    scale = max([a.abs().max().item() for a in g0 if a is not None] + [1e-12])
    for name, a, b in zip(wrt, g0, g1, strict=True):
        if a is not None and not torch.allclose(a, b, rtol=1e-7, atol=1e-9 * scale):
            err = (a - b).abs().max().item() / max(a.abs().max().item(), 1e-9 * scale)
            return False, f"{what} gives a wrong meta-gradient for {name!r} (rel. error {err:.1e})"
    return True, f"{what} matches the per-task loop in float64"
