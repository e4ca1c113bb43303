"""Task distributions that produce batched tensors ``[tasks, shots, ...]``."""

from .sinusoid import SinusoidTasks

__all__ = ["SinusoidTasks"]
