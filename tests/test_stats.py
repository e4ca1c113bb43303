"""Statistics of evaluation curves, including tasks on which fine-tuning diverged."""

import math

import torch

from metagrad.experiments.evaluation import format_table
from metagrad.experiments.stats import mean_ci95, summarize_curves


def test_mean_ci95_is_196_standard_errors():
    v = torch.tensor([[1.0], [2.0], [3.0], [6.0]])
    mean, ci = mean_ci95(v)
    assert mean == [3.0]
    assert math.isclose(ci[0], 1.96 * v.std().item() / 2.0, rel_tol=1e-6)


def test_diverged_task_is_counted_and_left_out_of_the_converged_mean():
    curves = torch.tensor([[3.0, 1.0, 0.5], [2.0, 1.0, 0.5], [4.0, 5e6, math.inf], [1.0, 1.0, 1.0]])
    s = summarize_curves(curves)
    assert s["diverged"] == [0, 1, 1]
    assert s["mse"][2] == math.inf
    assert s["converged_tasks"] == 3
    ok = curves[[0, 1, 3]]
    assert s["mse_converged"] == mean_ci95(ok)[0]
    assert s["ci95_converged"] == mean_ci95(ok)[1]
    assert s["median"] == curves.median(0).values.tolist()


def test_table_shows_converged_row_with_a_note():
    curves = torch.tensor([[3.0, 1.0], [2.0, math.nan], [1.0, 0.5]])
    res = {
        "method": "maml",
        "metric": "mse",
        "tasks": 3,
        "steps": [0, 1],
        "results": {"K=5": summarize_curves(curves)},
    }
    table = format_table([res])
    assert "K=5*" in table
    assert "0.750 ± " in table  # mean of 1.0 and 0.5, the two finite tasks
    assert "2 of 3 tasks that stayed finite at every step (1 diverged)" in table
