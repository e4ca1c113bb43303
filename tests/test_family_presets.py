"""The algorithm family through the presets and the CLI: ``--set algorithm=...`` and the
family keys reach the learner, runs save and reload learned rates, tables name the
algorithm, and bad values are one clear line."""

from __future__ import annotations

import json

import pytest
import torch
from test_fewshot import QUICK, private_cache  # noqa: F401  (fixture: a private data cache)
from test_sinusoid_cli import SMALL, assert_one_line_error, cli

import metagrad as mg
from metagrad.errors import ConfigError
from metagrad.experiments.config import apply_overrides, preset
from metagrad.experiments.registry import experiment_for


def built(name: str, *sets: str) -> mg.MAML:
    return experiment_for(apply_overrides(preset(name), list(sets))).build()


@pytest.mark.parametrize("name", ["sinusoid", "omniglot-5w1s"])
def test_algorithm_keys_reach_the_learner(name):
    maml = built(name)
    assert maml.learn_lr is None and not maml.first_order and maml.step_weights is None
    # the default: every parameter but the normalisation layers' (the MLP has none)
    assert set(maml.adapts) == set(built(name, "adapt=no-norm").adapts)
    assert set(built(name, "adapt=all").adapts) == {n for n, _ in maml.model.named_parameters()}
    assert built(name, "algorithm=fomaml").first_order
    anil = built(name, "algorithm=anil")
    last = [n for n, _ in anil.model.named_parameters()][-2:]  # the last layer's weight, bias
    assert list(anil.adapts) == last
    metasgd = built(name, "algorithm=metasgd")
    assert metasgd.learn_lr == "per-parameter" and len(metasgd.learned_lrs()) == len(metasgd.adapts)
    steps = preset(name)["inner_steps"]
    weights = ",".join(["0.5"] * steps)
    lslr = built(name, "learn_lr=per-layer-per-step", f"step_weights={weights}")
    assert all(r.shape == (steps,) for r in lslr.learned_lrs().values())
    assert lslr.step_weights is not None and lslr.step_weights.tolist() == [0.5] * steps
    adam = built(name, "inner_optimizer=adam", "inner_betas=0.8,0.9", "inner_eps=1e-6")
    assert adam.inner_optimizer == mg.inner.Adam(betas=(0.8, 0.9), eps=1e-6)
    mom = built(name, "inner_optimizer=momentum", "inner_momentum=0.5")
    assert mom.inner_optimizer == mg.inner.SGD(momentum=0.5)


def test_no_norm_adapts_everything_but_the_norm_layers():
    maml = built("omniglot-5w1s", "adapt=no-norm")
    names = [n for n, _ in maml.model.named_parameters()]
    # conv4 blocks features.<block>.<layer>: conv (0), BatchNorm (1), ReLU (2)
    norms = {n for n in names if n.startswith("features.") and n.split(".")[2] == "1"}
    assert norms and set(maml.adapts) == set(names) - norms
    assert list(built("omniglot-5w1s", "adapt=head").adapts) == ["head.weight", "head.bias"]


@pytest.mark.parametrize(
    ("sets", "match"),
    [
        (
            ["algorithm=reptilian"],
            "bad value 'reptilian' for algorithm: choose maml, fomaml, anil, metasgd",
        ),  # fmt: skip
        (["learn_lr=sometimes"], "bad value 'sometimes' for learn_lr"),
        (["step_weights=1,2,3"], "step_weights has 3 weights for inner_steps=1"),
        (["step_weights=a"], "bad value .* for step_weights"),
        (["adapt=nothing"], "selects no parameter of the model"),
        (["inner_optimizer=rmsprop"], "bad value 'rmsprop' for inner_optimizer"),
        (["inner_optimizer=momentum", "inner_momentum=1.5"], "momentum must be in"),
        (["algorithm=anil", "adapt=all"], "algorithm=anil adapts the head only"),
        (
            ["algorithm=metasgd", "learn_lr=per-layer-per-step"],
            "algorithm=metasgd learns per-parameter",
        ),  # fmt: skip
    ],
)
def test_bad_family_values_are_config_errors(sets, match):
    with pytest.raises(ConfigError, match=match):
        built("sinusoid", *sets)


@pytest.mark.slow
def test_metasgd_run_saves_and_reloads_learned_rates(tmp_path):
    """A Meta-SGD sinusoid run through the CLI: the learned rates train, are saved, come
    back with mg.load_run, and the eval table names the algorithm."""
    out = tmp_path / "metasgd"
    cli("train", "sinusoid", "--out", str(out), "--set", "iterations=200",
        "--set", "algorithm=metasgd", "--quiet", *SMALL)  # fmt: skip
    maml = mg.load_run(str(out))
    assert isinstance(maml, mg.MAML) and maml.learn_lr == "per-parameter"
    lrs = maml.learned_lrs()
    assert lrs and any(not torch.all(r == 0.01) for r in lrs.values())  # they trained
    result = json.loads((out / "eval.json").read_text())
    assert result["algorithm"] == "Meta-SGD"
    table = cli("eval", str(out)).stdout
    assert "Meta-SGD" in table
    bad = cli("train", "sinusoid", "--out", str(tmp_path / "bad"), "--set", "learn_lr=often",
              check=False)  # fmt: skip
    assert_one_line_error(bad, "learn_lr")


def resolved(name: str, *sets: str) -> dict:
    import argparse

    from metagrad.cli import resolve_config

    args = argparse.Namespace(preset=name, set=list(sets), config=None, data_dir=None, seed=None)
    return resolve_config(args)


def test_reptile_and_imaml_through_the_presets():
    assert type(built("sinusoid", "algorithm=reptile")) is mg.Reptile
    imaml = built("omniglot-5w1s", "algorithm=imaml", "lam=3", "cg_steps=7")
    assert type(imaml) is mg.iMAML and (imaml.lam, imaml.cg_steps) == (3.0, 7)
    # iMAML adapts every parameter (the authors' code adapts BatchNorm too)
    assert set(imaml.adapts) == {n for n, _ in imaml.model.named_parameters()}
    # --set algorithm=imaml brings the authors' Omniglot settings, unless set as well
    cfg = resolved("omniglot-5w1s", "algorithm=imaml")
    assert (cfg["inner_steps"], cfg["inner_lr"], cfg["eval_steps"]) == (16, 0.1, 16)
    assert resolved("omniglot-5w1s", "algorithm=imaml", "inner_steps=4")["inner_steps"] == 4
    assert resolved("omniglot-5w1s")["inner_steps"] == 1  # MAML keeps the preset's
    reptile = resolved("omniglot-5w1s", "algorithm=reptile", "meta_batch=8")
    assert (reptile["meta_optimizer"], reptile["meta_lr"], reptile["lr_schedule"]) == (
        "sgd",
        1.0,
        "linear",
    )
    assert (reptile["inner_optimizer"], reptile["inner_steps"], reptile["meta_batch"]) == (
        "adam",
        5,
        8,
    )
    # the supervised-reptile README's 1-shot 5-way Omniglot command
    assert (reptile["inner_lr"], reptile["inner_betas"], reptile["train_shots"]) == (0.001, [0.0, 0.999], 10)  # fmt: skip
    assert (reptile["iterations"], reptile["eval_steps"]) == (100_000, 50)
    assert reptile["inner_batch"] == 10  # its inner steps on mini-batches of 10 of the 50
    learner = experiment_for(reptile).build()
    assert type(learner) is mg.Reptile and learner.inner_batch == 10
    assert learner.carry_inner_state  # one Adam for all tasks, as the paper's code
    assert built("sinusoid", "algorithm=reptile").inner_batch is None  # full-batch steps


@pytest.mark.parametrize(
    ("sets", "match"),
    [
        (["algorithm=imaml", "adapt=head"], "algorithm=imaml adapts every parameter"),
        (["algorithm=imaml", "lam=0"], "lam > 0"),
        (["algorithm=imaml", "cg_steps=0"], "cg_steps >= 1"),
        (["algorithm=reptile", "learn_lr=per-parameter"], "Reptile does not take learn_lr"),
        (["algorithm=reptile", "step_weights=1"], "Reptile does not take step_weights"),
        (["algorithm=reptile", "inner_batch=11"], "inner_batch=11 exceeds the 10 examples"),
        (["algorithm=reptile", "inner_batch=-1"], "inner_batch must be a positive"),
        (["algorithm=maml", "inner_batch=5"], "inner_batch is Reptile's"),
        (["algorithm=anil", "carry_inner_state=true"], "carry_inner_state is Reptile's"),
        (["algorithm=reptile", "carry_inner_state=true"], "needs an Adam inner optimizer"),
    ],
)
def test_bad_reptile_and_imaml_values(sets, match):
    with pytest.raises(ConfigError, match=match):
        built("sinusoid", *sets)


@pytest.mark.parametrize(("algorithm", "label"), [("reptile", "Reptile"), ("imaml", "iMAML")])
def test_reptile_and_imaml_train_and_name_themselves(tmp_path, algorithm, label):
    from metagrad.cli import main

    threads = torch.get_num_threads()
    out = tmp_path / algorithm
    try:
        code = main(["train", "sinusoid", "--out", str(out), "--set", "iterations=3",
                     "--set", f"algorithm={algorithm}", "--set", "inner_steps=2",
                     "--set", "eval_tasks=5", "--quiet"])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    assert json.loads((out / "eval.json").read_text())["algorithm"] == label
    assert type(mg.load_run(str(out))).__name__ == label


def test_sinusoid_settings_of_reptile_and_imaml_and_train_shots():
    reptile = resolved("sinusoid", "algorithm=reptile")
    assert (reptile["inner_lr"], reptile["inner_steps"], reptile["meta_optimizer"]) == (0.01, 5, "sgd")  # fmt: skip
    assert (reptile["meta_lr"], reptile["lr_schedule"]) == (0.1, "linear")
    imaml = resolved("sinusoid", "algorithm=imaml")
    assert (imaml["inner_steps"], imaml["lam"], imaml["cg_steps"]) == (10, 1.0, 5)
    from test_fewshot import OMNIGLOT

    if not (OMNIGLOT / "images_background.zip").is_file():
        pytest.skip("Omniglot not found")
    cfg = resolved("omniglot-5w1s", "algorithm=reptile", f"data_dir={OMNIGLOT}")
    sx, sy, qx, qy = experiment_for(cfg).sample(torch.Generator().manual_seed(0))
    # training tasks take train_shots support images per class, test tasks the preset's shots
    assert sx.shape[:2] == (5, 5 * 10) and qx.shape[:2] == (5, 5 * 1)
