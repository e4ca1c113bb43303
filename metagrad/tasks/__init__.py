"""Task distributions that produce batched tensors ``[tasks, shots, ...]``."""

from .sinusoid import SinusoidBatch, SinusoidTasks

__all__ = ["SinusoidBatch", "SinusoidTasks"]
