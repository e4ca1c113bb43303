"""Sinusoid regression (MAML paper, section 5.1).

A task is ``y = A sin(x - phi)`` with amplitude ``A ~ U[0.1, 5]``, phase ``phi ~ U[0, pi]``
and inputs ``x ~ U[-5, 5]``. Everything is sampled as whole tensors, no Python loop over
tasks or points. Each batch also carries its tasks' amplitudes and phases, and
:meth:`SinusoidTasks.task_inputs` appends them to every point (the inputs of the "oracle"
baseline, which is told the task).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SinusoidBatch:
    """A batch of sinusoid tasks: support and query points, and each task's parameters."""

    support_x: Tensor  # [tasks, shots, 1]
    support_y: Tensor
    query_x: Tensor  # [tasks, queries, 1]
    query_y: Tensor
    amplitude: Tensor  # [tasks]
    phase: Tensor  # [tasks]

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.support_x, self.support_y, self.query_x, self.query_y


@dataclass(frozen=True)
class SinusoidTasks:
    """The MAML paper's sinusoid task distribution: ``y = A sin(x - phi)``, ``A`` uniform in
    ``amplitude``, ``phi`` in ``phase``, points ``x`` in ``x_range``.

    Example:
        >>> import torch
        >>> import metagrad as mg
        >>> g = torch.Generator().manual_seed(0)
        >>> batch = mg.tasks.SinusoidTasks().sample(25, 10, 10, g)  # 25 tasks, K = 10
        >>> sx, sy, qx, qy = batch.tensors()
        >>> sx.shape, qy.shape, batch.amplitude.shape
        (torch.Size([25, 10, 1]), torch.Size([25, 10, 1]), torch.Size([25]))
    """

    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)

    def _uniform(self, bounds: tuple[float, float], shape: tuple[int, ...], g: torch.Generator):
        lo, hi = bounds
        return lo + (hi - lo) * torch.rand(shape, generator=g)

    def sample(
        self, tasks: int, shots: int, queries: int, generator: torch.Generator
    ) -> SinusoidBatch:
        """``tasks`` random sinusoids with ``shots`` support and ``queries`` query points."""
        amp = self._uniform(self.amplitude, (tasks,), generator)
        phase = self._uniform(self.phase, (tasks,), generator)
        x = self._uniform(self.x_range, (tasks, shots + queries, 1), generator)
        y = self.function(x, amp, phase)
        return SinusoidBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:], amp, phase)

    @staticmethod
    def function(x: Tensor, amplitude: Tensor, phase: Tensor) -> Tensor:
        """``A sin(x - phi)`` for ``x`` of shape ``[tasks, points, 1]``."""
        return amplitude[:, None, None] * torch.sin(x - phase[:, None, None])

    @staticmethod
    def task_inputs(x: Tensor, amplitude: Tensor, phase: Tensor) -> Tensor:
        """``[x, A, phi]`` per point: ``x`` of shape ``[tasks, points, 1]`` becomes
        ``[tasks, points, 3]``, each task's amplitude and phase beside each of its points."""
        task = torch.stack([amplitude, phase], -1).to(x)[:, None, :]  # [tasks, 1, 2]
        return torch.cat([x, task.expand(-1, x.shape[1], -1)], -1)
