"""Your own task distribution: few-shot classification of Gaussian clusters, MAML against
Meta-SGD (and ANIL), and against no meta-training at all.

What it shows: a task distribution is any object whose ``sample(tasks, shots, queries,
generator)`` returns ``support_x, support_y, query_x, query_y`` shaped ``[tasks, examples,
...]``; integer labels with ``F.cross_entropy`` as the loss; the same training loop for
every algorithm of the family; accuracy with a 95% confidence interval over test tasks.

The tasks: points in R^20; each task has ``ways`` classes, Gaussian blobs whose centres lie
in one fixed plane (the same for every task), with unit noise in every direction outside
it. Within the plane the classes are well apart, but one example per class cannot tell the
plane from the noise, so a network adapted from a random initialisation does little better
than chance; meta-training can find the plane once, for all tasks.

    python examples/own_tasks.py                              # MAML and Meta-SGD
    python examples/own_tasks.py --algorithms maml,metasgd,anil
    python examples/own_tasks.py --smoke                      # tiny sizes, a few seconds
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import metagrad as mg


class GaussianClusters:
    """``ways``-way classification tasks of points in R^``dim``: class centres are drawn in a
    fixed random plane (``spread`` apart), examples are centre + ``width`` noise in the plane
    + ``noise`` in every direction outside it. Labels ``0..ways-1``, a new assignment per task."""

    def __init__(self, ways: int = 5, dim: int = 20, spread: float = 2.0, width: float = 0.3,
                 noise: float = 1.0, seed: int = 0) -> None:  # fmt: skip
        self.ways, self.dim, self.spread, self.width, self.noise = ways, dim, spread, width, noise
        # the plane: part of the distribution, not of a task, so it has its own seed
        basis = torch.randn(dim, 2, generator=torch.Generator().manual_seed(seed))
        self.plane = torch.linalg.qr(basis).Q.T  # [2, dim], orthonormal rows

    def sample(self, tasks: int, shots: int, queries: int,
               generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
        """``support_x [tasks, ways*shots, dim]``, ``support_y [tasks, ways*shots]`` (int64),
        and the same with ``queries`` examples per class for the query set."""
        w, n, g = self.ways, shots + queries, generator
        centres = self.spread * torch.randn(tasks, w, 1, 2, generator=g)
        in_plane = centres + self.width * torch.randn(tasks, w, n, 2, generator=g)
        off = self.noise * torch.randn(tasks, w, n, self.dim, generator=g)
        off = off - (off @ self.plane.T) @ self.plane  # noise outside the plane only
        x = in_plane @ self.plane + off
        y = torch.arange(w).view(1, w, 1).expand(tasks, w, n)
        # every class of a task gets shots support and queries query examples
        sx, qx = x[:, :, :shots].reshape(tasks, -1, self.dim), x[:, :, shots:].reshape(tasks, -1, self.dim)  # fmt: skip
        sy, qy = y[:, :, :shots].reshape(tasks, -1), y[:, :, shots:].reshape(tasks, -1)
        return sx, sy, qx, qy


class Classifier(nn.Module):
    """An MLP whose last layer is called ``head`` (ANIL adapts only that)."""

    def __init__(self, dim: int, ways: int, hidden: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())  # fmt: skip
        self.head = nn.Linear(hidden, ways)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def accuracy(logits: Tensor, y: Tensor) -> Tensor:
    return (logits.argmax(-1) == y).float().mean()


def learner(name: str, model: nn.Module, inner_lr: float, steps: int) -> mg.MAML:
    """One of the family on ``model``; all share the MAML API."""
    if name == "maml":
        return mg.MAML(model, F.cross_entropy, inner_lr=inner_lr, inner_steps=steps)
    if name == "metasgd":  # a learned rate per parameter entry, starting at inner_lr
        return mg.MetaSGD(model, F.cross_entropy, inner_lr=inner_lr, inner_steps=steps)
    if name == "anil":  # only the head adapts; the body is meta-learned
        return mg.ANIL(model, F.cross_entropy, head="head", inner_lr=inner_lr, inner_steps=steps)
    raise ValueError(f"unknown algorithm {name!r}: choose maml, metasgd or anil")


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithms", default="maml,metasgd", help="comma-separated: maml, metasgd, anil")  # fmt: skip
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--meta-batch", type=int, default=16)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=10)
    parser.add_argument("--inner-lr", type=float, default=0.4)
    parser.add_argument("--inner-steps", type=int, default=1)
    parser.add_argument("--test-steps", type=int, default=3)
    parser.add_argument("--test-tasks", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check that it runs")
    args = parser.parse_args(argv)
    if args.smoke:  # every algorithm, a few iterations each
        args.iterations, args.meta_batch, args.test_tasks = 10, 4, 20
        args.algorithms = "maml,metasgd,anil"
    torch.set_num_threads(1)  # small MLPs run fastest on one thread

    tasks = GaussianClusters(ways=args.ways)
    test = tasks.sample(args.test_tasks, args.shots, 15, torch.Generator().manual_seed(1234))
    results: dict[str, float] = {}

    def report(label: str, maml: mg.MAML) -> None:
        acc = maml.adaptation_curve(*test, args.test_steps, {"accuracy": accuracy})["accuracy"]
        final = acc[:, -1]
        mean, ci = final.mean().item(), 1.96 * final.std().item() / math.sqrt(len(final))
        print(f"{label:<28} {args.test_tasks} test tasks, accuracy after {args.test_steps} "
              f"steps: {100 * mean:.1f} +- {100 * ci:.1f} %")  # fmt: skip
        results[label] = mean

    # the baseline: a random initialisation adapted the same way (no meta-training)
    torch.manual_seed(args.seed)
    report("no meta-training", learner("maml", Classifier(tasks.dim, args.ways), args.inner_lr, args.inner_steps))  # fmt: skip
    for name in args.algorithms.split(","):
        torch.manual_seed(args.seed)  # the same initial network for every algorithm
        maml = learner(name.strip(), Classifier(tasks.dim, args.ways), args.inner_lr, args.inner_steps)  # fmt: skip
        opt = torch.optim.Adam(maml.parameters(), lr=1e-3)  # learned rates included
        g = torch.Generator().manual_seed(args.seed)  # the same training tasks too
        for it in range(1, args.iterations + 1):
            batch = tasks.sample(args.meta_batch, args.shots, args.queries, g)
            opt.zero_grad()
            loss = maml.meta_backward(*batch)
            opt.step()
            if it % max(args.iterations // 4, 1) == 0:
                print(f"{name} iteration {it:5d}  meta-loss {loss.item():.3f}")
        report(name, maml)
    assert all(0.0 <= a <= 1.0 for a in results.values())
    return results


if __name__ == "__main__":
    main()
