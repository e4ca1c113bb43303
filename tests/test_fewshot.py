"""Few-shot classification end to end: Omniglot (real data) and MiniImagenet (a fixture)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import metagrad as mg
from metagrad.cli import main
from metagrad.experiments.config import preset
from metagrad.experiments.registry import experiment_for
from metagrad.experiments.runs import Run
from metagrad.experiments.training import train

# end-to-end runs: `pytest -m "not slow"` (make test-fast) leaves them out
pytestmark = pytest.mark.slow

OMNIGLOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "omniglot"
needs_omniglot = pytest.mark.skipif(
    not (OMNIGLOT / "images_background.zip").is_file(), reason=f"Omniglot not found in {OMNIGLOT}"
)
QUICK = ["--set", "iterations=2", "--set", "val_every=2", "--set", "val_tasks=4",
         "--set", "eval_tasks=4", "--quiet"]  # fmt: skip


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    # one preprocessing of Omniglot for the whole session, never in the user's cache
    monkeypatch.setenv("METAGRAD_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def mini_dir(tmp_path_factory) -> Path:
    """MiniImagenet in the pickle-cache layout: 5 random classes of 20 images per split."""
    root = tmp_path_factory.mktemp("mini")
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        data = rng.integers(0, 256, (5 * 20, 84, 84, 3), dtype=np.uint8)
        classes = {f"n{split[:2]}{c:06d}": list(range(c * 20, c * 20 + 20)) for c in range(5)}
        with open(root / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
            pickle.dump({"image_data": data, "class_dict": classes}, f)
    return root


@needs_omniglot
def test_short_seeded_omniglot_run_learns(tmp_path):
    cfg = preset("omniglot-5w1s") | {
        "preset": "omniglot-5w1s", "data_dir": str(OMNIGLOT), "iterations": 80,
        "meta_batch": 8, "val_every": 40, "val_tasks": 100, "seed": 1,
    }  # fmt: skip
    exp = experiment_for(cfg)
    maml = train(exp, Run(tmp_path), progress=False)
    val = exp.validate(maml)["val_accuracy"]
    assert val > 0.5, val  # chance is 0.2
    rows = Run(tmp_path).metrics()
    assert [r["iteration"] for r in rows if "val_accuracy" in r] == [40, 80]
    assert (tmp_path / "best.pt").is_file()
    best_it = Run(tmp_path).load("best.pt")["iteration"]
    best_val = max(r["val_accuracy"] for r in rows if "val_accuracy" in r)
    assert {r["iteration"]: r for r in rows}[best_it]["val_accuracy"] == best_val
    last = exp.load_trained(Run(tmp_path), torch.device("cpu"), "last")
    for (name, p), q in zip(maml.named_parameters(), last.parameters(), strict=True):
        assert torch.equal(p, q), name  # "last": the parameters training ended with


@needs_omniglot
@pytest.mark.parametrize(
    "name",
    # 20w5s is 20w1s with 5 shots (both covered by 5w5s and 20w1s): left out for time
    ["omniglot-5w1s", "omniglot-5w5s", "omniglot-20w1s", "omniglot-5w1s-fo"],
)
def test_omniglot_presets_run_end_to_end(tmp_path, name, capsys):
    out = tmp_path / name
    assert main(["train", name, "--out", str(out), "--data-dir", str(OMNIGLOT), *QUICK]) == 0
    result = json.loads((out / "eval.json").read_text())
    cfg = preset(name)
    assert result["steps"] == list(range(cfg["eval_steps"] + 1))
    assert set(result["results"]) == {
        f"paper ({cfg['shots']} query/class)",
        "15-query (15 query/class)",
    }
    assert {p.name for p in (out / "plots").iterdir()} >= {"accuracy_vs_steps.png"}
    maml = mg.load_run(out)
    x = torch.rand(cfg["ways"], 1, 28, 28)
    assert maml.adapt(x, torch.arange(cfg["ways"]))(x).shape == (cfg["ways"], cfg["ways"])


@pytest.mark.parametrize("name", ["miniimagenet-5w1s", "miniimagenet-5w5s"])
def test_miniimagenet_presets_on_fixture(tmp_path, name, mini_dir):
    out = tmp_path / name
    args = ["train", name, "--out", str(out), "--data-dir", str(mini_dir), "--set", "strict=false"]
    assert preset(name)["eval_steps"] == 10  # the preset's; 3 here for time
    assert main([*args, *QUICK, "--set", "eval_steps=3"]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert len(result["results"]["15-query (15 query/class)"]["accuracy"]) == 4


def test_mlp_variant_builds_and_steps(mini_dir):
    cfg = preset("miniimagenet-5w1s") | {"model": "mlp", "data_dir": str(mini_dir), "strict": False}
    exp = experiment_for(cfg)
    maml = exp.build()
    metrics = exp.train_step(maml, exp.sample(torch.Generator().manual_seed(0)))
    assert 0.0 <= metrics["accuracy"] <= 1.0


def test_missing_dataset_is_a_one_line_error(tmp_path, capsys):
    code = main(["train", "omniglot-5w1s", "--out", str(tmp_path / "r"),
                 "--data-dir", str(tmp_path / "nowhere"), *QUICK])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("metagrad: error:") and "nowhere" in err[-1]
    code = main(["train", "miniimagenet-5w1s", "--out", str(tmp_path / "m"),
                 "--data-dir", str(tmp_path), *QUICK])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "mini-imagenet-cache-train.pkl" in err[-1]


def test_tasks_larger_than_the_split_are_a_one_line_error(tmp_path, capsys, mini_dir):
    # the fixture: 5 classes of 20 images per split
    for i, (setting, needle) in enumerate([("queries=25", "20 images per class"),
                                           ("ways=6", "5 classes")]):  # fmt: skip
        code = main(["train", "miniimagenet-5w1s", "--out", str(tmp_path / str(i)),
                     "--data-dir", str(mini_dir), "--set", "strict=false", "--set", setting,
                     *QUICK])  # fmt: skip
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and err[-1].startswith("metagrad: error:"), err
        assert needle in err[-1] and "Traceback" not in "\n".join(err)


def test_bad_model_value():
    with pytest.raises(ValueError, match="model"):
        experiment_for(preset("omniglot-5w1s") | {"model": "resnet"})


def test_vectorize_setting_reaches_maml():
    from metagrad.errors import ConfigError
    from metagrad.experiments.config import apply_overrides

    cfg = preset("omniglot-5w1s")
    assert cfg["vectorize"] == "auto" and experiment_for(cfg).build().vectorize is None
    for text, expect in [("vmap", True), ("loop", False), ("Support", "support")]:
        built = experiment_for(apply_overrides(cfg, [f"vectorize={text}"])).build()
        assert built.vectorize == expect and type(built.vectorize) is type(expect)
    with pytest.raises(ConfigError, match="auto, vmap, loop or support"):
        experiment_for(apply_overrides(cfg, ["vectorize=sometimes"])).build()


def test_compile_setting_auto_true_false_and_old_runs():
    from metagrad.errors import ConfigError
    from metagrad.experiments.config import apply_mapping, apply_overrides

    cfg = preset("omniglot-5w1s")
    assert cfg["compile"] == "auto" and experiment_for(cfg).build().compile_mode is None
    for text, expect in [("true", True), ("false", False), ("AUTO", None)]:
        built = experiment_for(apply_overrides(cfg, [f"compile={text}"])).build()
        assert built.compile_mode is expect
    # runs made when compile was a flag saved compile = false / true
    assert apply_mapping(cfg, {"compile": False}, "config.toml")["compile"] == "false"
    assert experiment_for(cfg | {"compile": True}).build().compile_mode is True
    with pytest.raises(ConfigError, match="compile"):
        experiment_for(apply_overrides(cfg, ["compile=sometimes"])).build()
