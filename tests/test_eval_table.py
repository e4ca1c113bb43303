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


def test_runs_over_seeds_become_one_row_with_a_ci_over_seeds():
    import math

    import pytest

    from metagrad.errors import ConfigError
    from metagrad.experiments.evaluation import over_seeds

    runs = []
    for seed, value in enumerate([1.0, 2.0, 3.0]):
        r = result("MAML", 1)
        r["results"]["K=10"]["mse"] = [value, value / 2]
        r["run"] = f"runs/s{seed}"
        runs.append(r)
    merged = over_seeds(runs)
    row = merged["results"]["K=10"]
    assert row["mse"] == pytest.approx([2.0, 1.0])
    assert row["std"] == pytest.approx([1.0, 0.5])
    assert row["ci95"] == pytest.approx([1.96 / math.sqrt(3), 0.98 / math.sqrt(3)])
    assert merged["algorithm"] == "MAML, 3 seeds" and "MAML, 3 seeds" in format_table([merged])
    other = result("MAML", 2)
    with pytest.raises(ConfigError, match="one configuration"):
        over_seeds([runs[0], other])
