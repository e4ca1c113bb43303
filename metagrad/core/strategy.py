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
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import functional as F
from .functional import LossFn

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
        return {True: "vmap", False: "per-task loop"}.get(self.vectorize, "vmap support sets")


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


def _as_double(t: Tensor) -> Tensor:
    return t.double() if t.is_floating_point() else t


def vmap_matches_loop(
    model: nn.Module,
    loss_fn: LossFn,
    data: tuple[Tensor, Tensor, Tensor, Tensor],
    *,
    lr: float,
    steps: int,
    first_order: bool,
    tasks: int = 2,
    vectorize: bool | str = True,
) -> tuple[bool, str]:
    """Compare vmap and the loop in float64 on a copy of ``model`` and a slice of ``data``.

    Checks the query losses and the meta-gradient of every trainable parameter (frozen
    ones are adapted in the inner loop, but get no meta-gradient). ``vectorize``: the
    batched strategy to check (``True``: vmap, ``"support"``: vmap over the support sets).
    """
    what = "vmap" if vectorize is True else "vmap over the support sets"
    m = copy.deepcopy(model).double()
    params = dict(m.named_parameters())
    trainable = {k: p for k, p in params.items() if p.requires_grad}
    buffers = {k: _as_double(b) for k, b in m.named_buffers()}
    batch = [_as_double(t[:tasks].detach()) for t in data]
    results = []
    for strategy in (False, vectorize):
        try:
            with torch.enable_grad():
                losses, _ = F.batched_query_loss(
                    m, loss_fn, params, buffers, *batch,
                    lr=lr, steps=steps, first_order=first_order, vectorize=strategy,
                )  # fmt: skip
                grads = torch.autograd.grad(
                    losses.sum(), list(trainable.values()), allow_unused=True
                )
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
    for name, a, b in zip(trainable, g0, g1, strict=True):
        if a is not None and not torch.allclose(a, b, rtol=1e-7, atol=1e-9 * scale):
            err = (a - b).abs().max().item() / max(a.abs().max().item(), 1e-9 * scale)
            return False, f"{what} gives a wrong meta-gradient for {name!r} (rel. error {err:.1e})"
    return True, f"{what} matches the per-task loop in float64"
