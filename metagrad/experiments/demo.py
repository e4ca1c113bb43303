"""``make demo``: sinusoid MAML vs the pretrained baseline in a few minutes on a laptop CPU.

Trains both into ``runs/demo/`` (re-running resumes/reuses them), evaluates them on the
600 fixed test tasks, writes the figures, and prints MSE after 0, 1 and 10 steps at K=10.
"""

from __future__ import annotations

import sys
import time

from ..cli import main as cli
from .runs import Run

ITERATIONS = 10_000
OUT = "runs/demo"


def run_demo(out: str = OUT, iterations: int = ITERATIONS) -> int:
    t0 = time.perf_counter()
    for method in ("maml", "pretrain"):
        code = cli(
            ["train", "sinusoid", "--out", f"{out}/{method}", "--set", f"method={method}",
             "--set", f"iterations={iterations}", "--no-eval"]
        )  # fmt: skip
        if code:
            return code
    cli(["plot", f"{out}/maml", "--baseline", f"{out}/pretrain"])
    maml, pre = (Run(f"{out}/{m}").read_json("eval.json") for m in ("maml", "pretrain"))
    k10 = "K=10"
    print(f"\nSinusoid regression, {maml['tasks']} test tasks, K=10, MSE mean ± 95% CI")
    print(f"(trained {iterations} meta-iterations each; the paper trains 70,000)")
    print(f"{'steps':<8}{'MAML':>20}{'pretrained':>20}")
    for s in (0, 1, 10):
        cells = [
            f"{r['results'][k10]['mse'][s]:.3f} ± {r['results'][k10]['ci95'][s]:.3f}"
            for r in (maml, pre)
        ]
        print(f"{s:<8}{cells[0]:>20}{cells[1]:>20}")
    print(f"\nfigures: {out}/maml/plots/   ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(run_demo())
