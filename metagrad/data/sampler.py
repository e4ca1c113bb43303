"""Vectorised N-way K-shot task sampling from a ``[classes, per_class, C, H, W]`` image tensor.

A task picks ``ways`` distinct classes and, for each, ``shots + queries`` distinct images; the
first ``shots`` go to the support set and the rest to the query set. Everything is drawn with
one ``torch.rand`` call per step and ``topk`` of the random keys (a uniformly random ordered
subset per row) followed by a single gather, so a batch of tasks costs a few tensor ops and no
per-example Python loop.

Labels: class ``j`` of a task (in the random order the classes were drawn) gets label ``j``, so
which class is label 0 is random per task. Examples are grouped by label: ``support_y`` is
``[0]*shots + [1]*shots + ...`` and ``query_y`` likewise (MAML's losses are order-invariant).

Normalisation: ``uint8`` images are mapped to float32 in ``[0, 1]`` (divided by 255) after the
gather, so only the sampled images are converted; floating images are cast to float32 as is.

Rotation modes (multiples of 90 degrees, as ``torch.rot90`` over the last two dims):

* ``"none"``: images as stored.
* ``"per-task"``: as in the original MAML Omniglot code, every class of every sampled task gets
  an independent rotation ``k * 90`` degrees, ``k`` uniform in ``0..3``, applied to all of its
  support and query images. The class count is unchanged.
* ``"classes"``: rotated copies are separate classes (Santoro et al. 2016, Vinyals et al. 2016):
  ``num_classes`` is ``4 * classes``; virtual class ``v`` is stored class ``v % classes`` rotated
  by ``(v // classes) * 90`` degrees. Nothing is materialised; rotation happens at sampling time.

Rotation is applied to the gathered (still uint8) batch by one ``gather`` with the four pixel
permutations made by ``torch.rot90`` of an index grid; this equals ``torch.rot90`` of the images
exactly and is several times faster on CPU than masked ``torch.rot90`` calls on the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

ROTATIONS = ("none", "per-task", "classes")


class TaskBatch(NamedTuple):
    """A batch of tasks; unpacks as ``support_x, support_y, query_x, query_y``."""

    support_x: Tensor  # [tasks, ways*shots, C, H, W] float32
    support_y: Tensor  # [tasks, ways*shots] int64 in 0..ways-1
    query_x: Tensor  # [tasks, ways*queries, C, H, W] float32
    query_y: Tensor  # [tasks, ways*queries] int64


def _as_float(x: Tensor) -> Tensor:
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def _rotate(x: Tensor, turns: Tensor) -> Tensor:
    """Rotate ``x[t, w]`` (``[T, W, N, C, H, H]``) by ``turns[t, w] * 90`` degrees.

    ``torch.rot90`` of a pixel-index grid gives the four pixel permutations; one batched
    ``gather`` applies them.
    """
    h, w = x.shape[-2:]
    grid = torch.arange(h * w, device=x.device).view(h, w)
    perms = torch.stack([torch.rot90(grid, k, dims=(0, 1)).flatten() for k in range(4)])
    flat = x.flatten(-2)
    index = perms[turns][:, :, None, None, :].expand_as(flat)
    return flat.gather(-1, index).view_as(x)


def _random_subsets(
    rows: tuple[int, ...], n: int, k: int, generator: torch.Generator | None
) -> Tensor:
    """For each row, ``k`` distinct indices from ``0..n-1`` in random order (top-k of uniform keys)."""
    return torch.rand(*rows, n, generator=generator).topk(k, dim=-1).indices


class FewShotSampler:
    """Samples batches of few-shot tasks from ``images [classes, per_class, C, H, W]``.

    ``images`` may be uint8 (scaled to [0, 1] when sampled) or floating point, on any device;
    random numbers come from the (CPU) ``generator`` passed to :meth:`sample`, so a seeded
    generator gives the same tasks on every device.
    """

    def __init__(self, images: Tensor, rotation: str = "none") -> None:
        if images.dim() != 5:
            raise ValueError(
                f"images must be [classes, per_class, C, H, W], got {tuple(images.shape)}"
            )
        if rotation not in ROTATIONS:
            raise ValueError(f"rotation must be one of {ROTATIONS}, got {rotation!r}")
        if rotation != "none" and images.shape[-1] != images.shape[-2]:
            raise ValueError(
                f"rotation {rotation!r} needs square images, got {tuple(images.shape[-2:])}"
            )
        self.images = images
        self.rotation = rotation

    @property
    def base_classes(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        """Classes available to tasks (``4 * base_classes`` in ``"classes"`` rotation mode)."""
        return self.base_classes * (4 if self.rotation == "classes" else 1)

    @property
    def per_class(self) -> int:
        return self.images.shape[1]

    def class_images(self, index: int) -> Tensor:
        """All images of (virtual) class ``index`` as float32 ``[per_class, C, H, W]``."""
        if not 0 <= index < self.num_classes:
            raise IndexError(f"class {index} out of range 0..{self.num_classes - 1}")
        x = _as_float(self.images[index % self.base_classes])
        return torch.rot90(x, index // self.base_classes, dims=(-2, -1))

    def sample(
        self,
        num_tasks: int,
        ways: int,
        shots: int,
        queries: int,
        generator: torch.Generator | None = None,
    ) -> TaskBatch:
        """``num_tasks`` tasks of ``ways`` classes with ``shots`` support and ``queries`` query images each."""
        if min(num_tasks, ways, shots) < 1 or queries < 0:
            raise ValueError("need num_tasks, ways, shots >= 1 and queries >= 0")
        if ways > self.num_classes:
            raise ValueError(f"ways={ways} exceeds the {self.num_classes} classes available")
        if shots + queries > self.per_class:
            raise ValueError(
                f"shots + queries = {shots + queries} exceeds the {self.per_class} images per class"
            )
        dev = self.images.device
        classes = _random_subsets((num_tasks,), self.num_classes, ways, generator)
        draws = _random_subsets((num_tasks, ways), self.per_class, shots + queries, generator)
        if self.rotation == "per-task":
            turns = torch.randint(0, 4, (num_tasks, ways), generator=generator)
        else:
            turns = classes // self.base_classes  # all zero unless rotation == "classes"
        base = (classes % self.base_classes).to(dev)
        x = self.images[base.unsqueeze(-1), draws.to(dev)]  # [T, W, S+Q, C, H, W]
        if self.rotation != "none":
            x = _rotate(x, turns.to(dev))
        x = _as_float(x)
        c, h, w = x.shape[-3:]
        labels = torch.arange(ways, device=dev)
        support_y = labels.repeat_interleave(shots).expand(num_tasks, -1).contiguous()
        query_y = labels.repeat_interleave(queries).expand(num_tasks, -1).contiguous()
        return TaskBatch(
            x[:, :, :shots].reshape(num_tasks, ways * shots, c, h, w),
            support_y,
            x[:, :, shots:].reshape(num_tasks, ways * queries, c, h, w),
            query_y,
        )


@dataclass
class FewShotDataset:
    """Images of one split, ``[classes, per_class, C, H, W]`` uint8, plus one name per class."""

    images: Tensor
    class_names: list[str]

    def __len__(self) -> int:
        return self.images.shape[0]

    def float_images(self) -> Tensor:
        """The images as float32 in [0, 1]."""
        return _as_float(self.images)

    def sampler(self, rotation: str = "none") -> FewShotSampler:
        return FewShotSampler(self.images, rotation=rotation)
