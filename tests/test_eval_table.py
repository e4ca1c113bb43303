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
    # Student's t with 2 degrees of freedom: 4.303 standard errors, not 1.96
    assert row["ci95"] == pytest.approx([4.3027 / math.sqrt(3), 4.3027 / 2 / math.sqrt(3)])
    assert merged["algorithm"] == "MAML, 3 seeds" and "MAML, 3 seeds" in format_table([merged])
    other = result("MAML", 2)
    with pytest.raises(ConfigError, match="one configuration"):
        over_seeds([runs[0], other])


def test_t_quantiles_match_the_tables_and_tend_to_the_normal():
    import pytest

    from metagrad.experiments.stats import t_quantile_975

    # published 0.975 quantiles of Student's t
    table = {1: 12.706, 2: 4.303, 3: 3.182, 9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086,
             30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}  # fmt: skip
    for df, q in table.items():
        assert t_quantile_975(df) == pytest.approx(q, abs=6e-4), df
    qs = [t_quantile_975(df) for df in range(1, 200)]
    assert all(a > b for a, b in zip(qs, qs[1:], strict=False))
    assert t_quantile_975(10**6) == pytest.approx(1.96, abs=1e-4)
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_quantile_975(0)
