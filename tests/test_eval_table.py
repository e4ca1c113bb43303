"""Result tables of several runs side by side."""

from __future__ import annotations

from metagrad.experiments.evaluation import format_table


def result(name: str, steps: int) -> dict:
    return {
        "method": "maml", "algorithm": name, "metric": "mse", "tasks": 10,
        "steps": list(range(steps + 1)),
        "results": {"K=10": {"mse": [1.0] * (steps + 1), "ci95": [0.1] * (steps + 1)}},
    }  # fmt: skip


def test_runs_evaluated_at_different_step_counts_share_their_common_columns():
    table = format_table([result("MAML", 10), result("Meta-SGD", 3)])
    head = table.splitlines()[1]
    assert "3 steps" in head and "4 steps" not in head
    assert "MAML" in table and "Meta-SGD" in table
