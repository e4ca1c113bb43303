"""One rank of the multi-process tests in ``test_distributed.py``.

Started by :func:`metagrad.experiments.distributed.launch` as
``python dist_worker.py OUT CASE [CASE ...]``; for each case it trains into ``OUT/CASE``
and saves this rank's final parameters as ``OUT/CASE-rank{R}.pt`` (or the error it
stopped with as ``OUT/CASE-rank{R}.err``). The test imports :func:`experiment` to train
the same cases in one process.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from metagrad.core import MAML
from metagrad.data.sampler import FewShotSampler
from metagrad.errors import MetagradError
from metagrad.experiments import distributed as D
from metagrad.experiments.base import Batch, Experiment
from metagrad.experiments.config import preset
from metagrad.experiments.fewshot import OmniglotExperiment
from metagrad.experiments.runs import Run
from metagrad.experiments.sinusoid import SinusoidExperiment
from metagrad.experiments.training import train

CPU = torch.device("cpu")


class SyntheticOmniglot(OmniglotExperiment):
    """The omniglot-5w1s preset (conv4 with BatchNorm) on random 28x28 images, stepped
    with SGD: a convolution bias that feeds BatchNorm has a meta-gradient of pure rounding
    noise (about 1e-8; BatchNorm cancels the bias), which Adam's first step turns into a
    full step of either sign, so with Adam those biases differ between any two
    summation orders, one process or two. SGD compares the meta-gradients themselves.
    """

    def optimizer(self, maml: MAML) -> torch.optim.Optimizer:
        return torch.optim.SGD(maml.parameters(), lr=0.5)

    def load_split(self, split: str) -> FewShotSampler:
        g = torch.Generator().manual_seed(["train", "val", "test"].index(split))
        images = torch.randint(0, 256, (12, 4, 1, 28, 28), generator=g, dtype=torch.uint8)
        return FewShotSampler(images, rotation=self.cfg["rotation"])


class HangingSinusoid(SinusoidExperiment):
    """Rank 1 hangs (sleeps) in its third meta-step, as a stuck process would."""

    rank = 0
    steps = 0

    def train_step(self, maml: MAML, batch: Batch) -> dict[str, float]:
        self.steps += 1
        if self.rank == 1 and self.steps == 3:
            time.sleep(600)
        return super().train_step(maml, batch)


# 5 and 3 tasks over 2 ranks: shards of 2 and 3, 1 and 2; 2 meta-iterations each. The
# cheetah's contact dynamics amplify float rounding (a 1e-7 relative change of the policy
# moves the states by ~5e-4 within 5 steps): its second iteration matches only if the first
# gave the same floats
RL_CASES = {
    "rl-nav": ("rl-nav2d", {"meta_batch": 5, "rollouts": 3, "horizon": 20, "cg_iters": 3}),
    "rl-cheetah": (
        "rl-cheetah-vel",
        {"meta_batch": 3, "rollouts": 2, "horizon": 10, "cg_iters": 3},
    ),
}


def sinusoid_cfg(**kw: object) -> dict:
    return preset("sinusoid") | {"preset": "sinusoid", "log_every": 1} | kw


def experiment(case: str, rank: int = 0) -> Experiment:
    """The experiment of ``case`` as rank ``rank`` builds it."""
    if case == "sinusoid":  # 5 tasks over 2 ranks: shards of 2 and 3 tasks
        return SinusoidExperiment(sinusoid_cfg(iterations=3, meta_batch=5), CPU)
    if case == "conv":
        cfg = preset("omniglot-5w1s") | {
            "preset": "omniglot-5w1s", "iterations": 2, "meta_batch": 4, "val_every": 0,
            "log_every": 1, "queries": 1,  # the synthetic data has 4 images per class
        }  # fmt: skip
        return SyntheticOmniglot(cfg, CPU)
    if case == "metasgd":  # learned rates are parameters: reduced and broadcast like weights
        cfg = sinusoid_cfg(iterations=3, meta_batch=5, algorithm="metasgd")
        return SinusoidExperiment(cfg, CPU)
    if case == "seeds":  # each rank its own seed: only the start-up broadcast makes them agree
        return SinusoidExperiment(sinusoid_cfg(iterations=2, meta_batch=4, seed=rank), CPU)
    if case == "timelimit":  # the ranks must agree on the iteration the time runs out
        cfg = sinusoid_cfg(iterations=10**6, meta_batch=4, time_limit_min=0.005)
        return SinusoidExperiment(cfg, CPU)
    if case in RL_CASES:  # meta-RL: each rank samples its tasks' paths, TRPO reduced
        name, kw = RL_CASES[case]
        cfg = preset(name) | {"preset": name, "iterations": 2, "val_every": 0, "log_every": 1}
        from metagrad.experiments.rl import RLExperiment

        return RLExperiment(cfg | kw, CPU)
    if case == "hang":
        exp = HangingSinusoid(sinusoid_cfg(iterations=1000, meta_batch=4), CPU)
        exp.rank = rank
        return exp
    raise ValueError(case)


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    out, cases = Path(argv[0]), argv[1:]
    timeout = float(os.environ.get("METAGRAD_TEST_DIST_TIMEOUT", "60"))
    world = D.init_world(D.world_from_env(), CPU, timeout)
    try:
        for case in cases:
            try:
                maml = train(experiment(case, world.rank), Run(out / case), progress=False,
                             world=world)  # fmt: skip
            except MetagradError as e:
                (out / f"{case}-rank{world.rank}.err").write_text(str(e))
                return 2
            torch.save(maml.state_dict(), out / f"{case}-rank{world.rank}.pt")
    finally:
        world.close()
    return 0


if __name__ == "__main__":
    D.exit_rank(main(sys.argv[1:]))  # as the CLI's ranks do
