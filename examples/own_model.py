"""Meta-train your own ``nn.Module`` with MAML, on sinusoid regression.

What it shows: a model class of your own (any module works: MAML runs it with
``torch.func.functional_call``, nothing to register or rewrite); ``mg.MAML`` with the
first-order switch; the training loop (``maml.meta_backward`` and a torch optimizer);
evaluation with ``maml.adaptation_curve`` on held-out tasks; adapting to one new task with
``maml.adapt``; saving and loading with ``state_dict``.

    python examples/own_model.py                  # second-order MAML
    python examples/own_model.py --first-order    # FOMAML: no second derivatives
    python examples/own_model.py --smoke          # tiny sizes, a few seconds
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import metagrad as mg


class SineNet(nn.Module):
    """Your model: an MLP with a residual hidden block and a learned output scale. Any
    ``forward`` works; the parameters MAML adapts are the ones in ``named_parameters()``."""

    def __init__(self, hidden: int = 40) -> None:
        super().__init__()
        self.inp = nn.Linear(1, hidden)
        self.block = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, 1)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        h = h + torch.relu(self.block(h))
        return self.scale * self.out(h)


def mean_ci(values: torch.Tensor) -> tuple[float, float]:
    """Mean and 95% confidence half-width over the first dimension."""
    return values.mean().item(), 1.96 * values.std().item() / math.sqrt(len(values))


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=10_000)
    parser.add_argument("--meta-batch", type=int, default=25)
    parser.add_argument("--shots", type=int, default=10, help="support points per task (K)")
    parser.add_argument("--first-order", action="store_true", help="FOMAML")
    parser.add_argument("--test-tasks", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", default="", help="folder to save the state_dict in (default: a temporary one)"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check that it runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.iterations, args.meta_batch, args.test_tasks = 20, 5, 20
    torch.set_num_threads(1)  # a net this small runs fastest on one thread
    torch.manual_seed(args.seed)

    # the paper's setting: one inner SGD step of 0.01 on the K support points, MSE loss
    model = SineNet()
    maml = mg.MAML(model, F.mse_loss, inner_lr=0.01, inner_steps=1, first_order=args.first_order)
    # maml.parameters() are the model's initial weights (and learned rates, if any)
    opt = torch.optim.Adam(maml.parameters(), lr=1e-3)

    tasks = mg.tasks.SinusoidTasks()  # y = A sin(x - phase), A ~ U[0.1, 5], phase ~ U[0, pi]
    g = torch.Generator().manual_seed(args.seed)
    log_every = max(args.iterations // 10, 1)
    for it in range(1, args.iterations + 1):
        # [tasks, points, 1] tensors: support x, y and query x, y of meta_batch tasks
        sx, sy, qx, qy = tasks.sample(args.meta_batch, args.shots, args.shots, g).tensors()
        opt.zero_grad()
        # adapt on each task's support set, take the query loss after adaptation, and
        # backpropagate its mean over tasks through the inner step into .grad
        loss = maml.meta_backward(sx, sy, qx, qy)
        opt.step()
        if it % log_every == 0 or it == 1:
            print(f"iteration {it:6d}  meta-loss (query MSE after 1 step) {loss.item():.3f}")

    # held-out tasks from their own seed, 100 query points each: MSE after 0..10 steps
    test = tasks.sample(args.test_tasks, args.shots, 100, torch.Generator().manual_seed(1234))
    curve = maml.adaptation_curve(*test.tensors(), steps=10, metrics={"mse": F.mse_loss})["mse"]
    print(f"{args.test_tasks} test tasks, K={args.shots}, MSE (mean +- 95% CI):")
    for steps in (0, 1, 10):
        mean, ci = mean_ci(curve[:, steps])
        print(f"  after {steps:2d} steps  {mean:.3f} +- {ci:.3f}")

    # one new task, no task dimension: A = 3, phase = 1, K points to adapt on
    x = torch.rand(args.shots, 1, generator=torch.Generator().manual_seed(7)) * 10 - 5
    grid = torch.linspace(-5, 5, 200).view(-1, 1)
    truth = 3 * torch.sin(grid - 1)
    with torch.no_grad():  # evaluation: no graph back to the meta-parameters
        fast = maml.adapt(x, 3 * torch.sin(x - 1), steps=10)
        before = F.mse_loss(maml(grid), truth).item()
        after = F.mse_loss(fast(grid), truth).item()
    print(f"new task: MSE before adaptation {before:.3f}, after 10 steps {after:.3f}")

    # save and load: the state_dict holds the model's weights (under "model.") and any
    # learned rates; rebuild the same MAML around a fresh model and load it
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.out or tmp) / "own_model.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(maml.state_dict(), path)
        loaded = mg.MAML(SineNet(), F.mse_loss, inner_lr=0.01, inner_steps=1)
        loaded.load_state_dict(torch.load(path, weights_only=True))
    with torch.no_grad():
        assert torch.equal(loaded(grid), maml(grid))
    print(f"saved to {path} and loaded back: the same predictions")
    assert math.isfinite(before) and math.isfinite(after)
    return {"mse_before": before, "mse_after": after}


if __name__ == "__main__":
    main()
