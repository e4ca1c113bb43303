"""Evaluating run directories and printing result tables."""

from __future__ import annotations

from typing import Any

import torch

from .runs import EVAL, Run


def evaluate_run(
    run: Run, device: torch.device, *, reuse: bool = False, checkpoint: str = "best"
) -> dict[str, Any]:
    """Evaluate a trained run and write ``eval.json`` (or read it back when ``reuse``).

    ``checkpoint="last"`` evaluates the parameters training ended with instead of the best
    validated ones, and writes ``eval-last.json`` (``eval.json`` stays as it is).
    """
    from .registry import experiment_for

    name = EVAL if checkpoint == "best" else EVAL.replace(".json", f"-{checkpoint}.json")
    if reuse and (run.path / name).is_file():
        return run.read_json(name)
    cfg = run.config()
    if cfg.get("threads", 0) > 0:  # the run's setting (0: torch's default)
        torch.set_num_threads(cfg["threads"])
    exp = experiment_for(cfg, device)
    maml, source = exp.load_trained_with_source(run, device, checkpoint)
    result = exp.evaluate(maml)
    result["run"] = str(run.path)
    result["checkpoint"] = source
    run.write_json(name, result)
    return result


def over_seeds(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runs of one configuration that differ in their training seed, as one result:
    per setting and step, the mean over runs of their mean metric, with the 95% CI over
    runs (``ci95``: Student's t for ``runs - 1`` degrees of freedom, 4.30 standard errors
    for 3 runs; 0 for one run) and the standard deviation (``std``). The interval is about
    the training seed, not the test tasks."""
    from ..errors import ConfigError
    from .stats import mean_ci95

    first = results[0]
    metric, steps, settings = first["metric"], first["steps"], list(first["results"])
    for res in results[1:]:
        if (res["metric"], res["steps"], list(res["results"])) != (metric, steps, settings):
            raise ConfigError(
                "--over-seeds needs runs of one configuration (the same metric, step counts "
                f"and settings); {res.get('run', '?')} differs from {first.get('run', '?')}"
            )
    merged = {}
    for setting in settings:
        values = torch.tensor([res["results"][setting][metric] for res in results])
        mean, ci = mean_ci95(values, student=True)
        std = values.double().std(0).tolist() if len(results) > 1 else [0.0] * len(steps)
        merged[setting] = {metric: mean, "ci95": ci, "std": std}
    label = first.get("algorithm", first["method"])
    return first | {
        "algorithm": f"{label}, {len(results)} seeds",
        "results": merged,
        "runs": [res.get("run") for res in results],
        "checkpoint": None,
    }


def format_table(results: list[dict[str, Any]], steps: list[int] | None = None) -> str:
    """A plain-text table: one row per (run, setting), one column per step count."""
    if steps is None:  # the step counts every run was evaluated at (runs may differ)
        steps = [s for s in results[0]["steps"] if all(s in r["steps"] for r in results)]
    metric = results[0]["metric"]
    head = ["algorithm", "setting"] + [f"{s} step{'s' * (s != 1)}" for s in steps]
    rows, notes = [], set()
    for res in results:
        for setting, vals in res["results"].items():
            diverged = vals.get("diverged", [0] * len(res["steps"]))
            # a task that diverged makes the plain mean inf: then the whole row is over the
            # tasks that stayed finite at every step (one task set for every column)
            converged = any(diverged) and "mse_converged" in vals
            key, ci_key = ("mse_converged", "ci95_converged") if converged else (metric, "ci95")
            if converged:
                lost = res["tasks"] - vals["converged_tasks"]
                notes.add(
                    f"{res.get('algorithm', res['method'])} {setting}*: mean over the {vals['converged_tasks']} of "
                    f"{res['tasks']} tasks that stayed finite at every step ({lost} diverged)"
                )
            cells = []
            for s in steps:
                i = res["steps"].index(s)
                scale = 100.0 if metric == "accuracy" else 1.0
                mean, ci = vals[key][i] * scale, vals[ci_key][i] * scale
                if diverged[i] and not converged:
                    cells.append(f"diverged on {diverged[i]} task{'s' * (diverged[i] > 1)}")
                else:
                    cells.append(f"{mean:.3f} ± {ci:.3f}")
            rows.append([res.get("algorithm", res["method"]), setting + "*" * converged, *cells])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    unit = " (%)" if metric == "accuracy" else ""
    lines = [f"{metric}{unit}, mean ± 95% CI", fmt.format(*head)]
    lines += [fmt.format(*r) for r in rows]
    lines += sorted(notes)
    for res in results:
        if res.get("checkpoint"):
            ck = res["checkpoint"]
            lines.append(
                f"{res.get('run', res['method'])}: {ck['file']} (iteration {ck['iteration']})"
            )
    return "\n".join(lines)
