"""Config values shared by the experiments, parsed into ``MAML`` arguments (execution
strategy, compile, and the algorithm family: what adapts, learned rates, update rule,
multi-step loss)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from ..algorithms import MAMLpp, Reptile, iMAML
from ..core import MAML, inner
from ..errors import ConfigError

_NORMS = (
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
)

_VECTORIZE: dict[str, bool | str | None] = {
    "auto": None, "vmap": True, "true": True, "loop": False, "false": False, "support": "support",
}  # fmt: skip
_COMPILE: dict[str, bool | None] = {"auto": None, "true": True, "false": False}


def vectorize_option(value: str) -> bool | str | None:
    """The ``vectorize`` config value as ``MAML(vectorize=...)``: auto (None), vmap (True),
    loop (False), support (batch only the support sets)."""
    key = str(value).lower()
    if key not in _VECTORIZE:
        raise ConfigError(f"bad value {value!r} for vectorize: choose auto, vmap, loop or support")
    return _VECTORIZE[key]


def compile_option(value: str | bool) -> bool | None:
    """The ``compile`` config value as ``MAML(compile=...)``: auto (None), true, false."""
    key = str(value).lower()
    if key not in _COMPILE:
        raise ConfigError(f"bad value {value!r} for compile: choose auto, true or false")
    return _COMPILE[key]


# ------------------------------------------------------------------ the algorithm family
ALGORITHMS = {
    "maml": "MAML", "fomaml": "FOMAML", "anil": "ANIL", "metasgd": "Meta-SGD",
    "reptile": "Reptile", "imaml": "iMAML", "mamlpp": "MAML++",
}  # fmt: skip
LEARN_LR = {"none": None, "per-parameter": "per-parameter", "per-layer-per-step": "per-layer-per-step"}  # fmt: skip

# the config keys of the family, shared by the supervised presets
FAMILY: dict[str, Any] = {
    "algorithm": "maml",  # maml | fomaml | anil | metasgd | reptile | imaml | mamlpp
    # what adapts: no-norm (normalisation layers meta-learned only, as the original code;
    # measured not worse on Omniglot 5w1s, see README) | all | head | name prefixes "a,b"
    "adapt": "no-norm",
    "learn_lr": "none",  # none | per-parameter | per-layer-per-step
    "step_weights": [],  # multi-step loss weights, one per inner step; []: the last step's loss
    "inner_optimizer": "sgd",  # sgd | momentum | adam
    "inner_momentum": 0.9,
    "inner_betas": [0.9, 0.999],
    "inner_eps": 1e-8,
    "lam": 2.0,  # iMAML: the proximal strength
    "cg_steps": 5,  # iMAML: conjugate-gradient steps of the implicit meta-gradient
    "inner_batch": 0,  # Reptile: support examples per inner step (shuffled mini-batches); 0: all
    "carry_inner_state": False,  # Reptile: the inner Adam's moments carry over from task to task
    # MAML++ (algorithm=mamlpp), each component switchable for ablations
    "lslr": True,  # learned per-layer per-step inner rates
    "multi_step_loss": True,  # the annealed multi-step loss ...
    "msl_epochs": 10,  # ... for this many epochs, then the last step's loss only
    "first_order_epochs": 0,  # derivative-order annealing: first order for this many epochs
    "epoch_iterations": 500,  # meta-iterations per epoch (the MAML++ schedules count epochs)
}

# the outer loop: its optimizer, and the meta learning rate's schedule over `iterations`
OUTER: dict[str, Any] = {
    "meta_optimizer": "adam",  # adam | sgd (Reptile's paper: SGD at 1.0, linearly annealed)
    "lr_schedule": "constant",  # constant | linear (to 0) | cosine (to min_meta_lr)
    "min_meta_lr": 0.0,  # the cosine schedule's floor (MAML++: 1e-5)
    "clip_grad_value": 0.0,  # > 0: clamp each meta-gradient entry to +-value (MAML++ MiniImagenet: 10)
    "tensorboard": "auto",  # auto (on when tensorboard is installed) | true | false
}

# The papers' settings, which --set algorithm=NAME brings with it for the keys not set too:
# (experiment, algorithm) -> values. iMAML on Omniglot: the authors' 5-way 1-shot command
# (aravindr93/imaml_dev: 16 inner steps at 0.1, lam 2, 5 CG steps, tested with 16 steps).
# Reptile on Omniglot: the paper's 1-shot 5-way command (openai/supervised-reptile README:
# inner Adam with beta1 = 0 at 0.001, 5 inner steps on 10 shots per class, meta-batch 5, outer
# step 1.0 linearly annealed to 0 over 100k iterations, 50 test steps), its inner steps on
# mini-batches of 10 of the 50 training images (the test's steps on the 5 support images are
# full-batch either way), and one Adam for all tasks, its moments carried over.
# On the sinusoid (K = 10, meta-batch 25, 70k iterations, as the other rows of the table):
# Reptile with the outer rule of OpenAI's sine-wave example (SGD at 0.1 annealed linearly to
# 0) and 5 full-batch inner steps at the table's 0.01 (the example's 0.02 diverged on our ReLU
# net at iteration 14,922; the example uses tanh); iMAML has no published sinusoid
# settings: 10 steps at the table's 0.01, lam 1, 5 CG steps (our choice).
ALGORITHM_DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    ("sinusoid", "reptile"): {
        "inner_lr": 0.01, "inner_steps": 5, "meta_optimizer": "sgd", "meta_lr": 0.1,
        "lr_schedule": "linear",
    },
    ("sinusoid", "imaml"): {"inner_steps": 10, "lam": 1.0, "cg_steps": 5},
    ("omniglot", "imaml"): {
        "inner_steps": 16, "inner_lr": 0.1, "eval_steps": 16, "lam": 2.0, "cg_steps": 5,
    },
    ("omniglot", "reptile"): {
        "inner_optimizer": "adam", "inner_betas": [0.0, 0.999], "inner_lr": 0.001,
        "inner_steps": 5, "inner_batch": 10, "carry_inner_state": True, "train_shots": 10,
        "queries": 1, "meta_batch": 5,
        "meta_optimizer": "sgd", "meta_lr": 1.0, "lr_schedule": "linear", "iterations": 100_000,
        "eval_steps": 50,
    },
}  # fmt: skip


def with_algorithm_defaults(cfg: Mapping[str, Any], explicit: set[str]) -> dict[str, Any]:
    """``cfg`` with its algorithm's published settings for the keys not in ``explicit``."""
    defaults = ALGORITHM_DEFAULTS.get((cfg.get("experiment", ""), cfg.get("algorithm", "")), {})
    return dict(cfg) | {k: v for k, v in defaults.items() if k not in explicit}


def _weights(values: Any) -> list[float]:
    try:
        return [float(w) for w in values]
    except (TypeError, ValueError):
        raise ConfigError(
            f"bad value {values!r} for step_weights: expected numbers like [0.2, 0.8]"
        ) from None


def _bad(key: str, value: Any, choices: str) -> ConfigError:
    return ConfigError(f"bad value {value!r} for {key}: choose {choices}")


def last_layer(model: nn.Module) -> str:
    """The name of the last module (in registration order) with parameters of its own."""
    names = [n for n, m in model.named_modules() if n and list(m.parameters(recurse=False))]
    return names[-1]


def adapt_option(value: Any, model: nn.Module) -> Any:
    """The ``adapt`` config value as ``MAML(adapt=...)``."""
    if value == "all":
        return None
    if value == "head":
        return [last_layer(model)]
    if value == "no-norm":
        norms = {n for n, m in model.named_modules() if isinstance(m, _NORMS)}
        return lambda name: name.rsplit(".", 1)[0] not in norms
    prefixes = value if isinstance(value, list) else str(value).split(",")
    prefixes = [str(v).strip() for v in prefixes if str(v).strip()]
    if not prefixes:
        raise _bad(
            "adapt", value, "all, head, no-norm or parameter name prefixes like 'head,features.3'"
        )
    return prefixes


def inner_optimizer_option(cfg: Mapping[str, Any]) -> inner.UpdateRule:
    kind = cfg.get("inner_optimizer", "sgd")
    try:
        if kind == "sgd":
            return inner.SGD()
        if kind == "momentum":
            return inner.SGD(momentum=float(cfg["inner_momentum"]))
        if kind == "adam":
            b1, b2 = (float(b) for b in cfg["inner_betas"])
            return inner.Adam(betas=(b1, b2), eps=float(cfg["inner_eps"]))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"bad inner optimizer settings: {e}") from None
    raise _bad("inner_optimizer", kind, "sgd, momentum or adam")


def family_options(cfg: Mapping[str, Any], model: nn.Module) -> dict[str, Any]:
    """``MAML`` keyword arguments for the family keys of a config (see :data:`FAMILY`)."""
    cfg = FAMILY | dict(cfg)
    algorithm = cfg["algorithm"]
    if algorithm not in ALGORITHMS:
        raise _bad("algorithm", algorithm, ", ".join(ALGORITHMS))
    if cfg["learn_lr"] not in LEARN_LR:
        raise _bad("learn_lr", cfg["learn_lr"], ", ".join(LEARN_LR))
    adapt, learn_lr = cfg["adapt"], LEARN_LR[cfg["learn_lr"]]
    if algorithm == "anil":
        if adapt not in ("no-norm", "head"):  # the default, or the head itself
            raise ConfigError(
                f"algorithm=anil adapts the head only; adapt={adapt!r} contradicts it"
            )
        adapt = "head"
    if algorithm == "metasgd":
        if learn_lr not in (None, "per-parameter"):
            raise ConfigError(f"algorithm=metasgd learns per-parameter rates; learn_lr={learn_lr!r} contradicts it")  # fmt: skip
        learn_lr = "per-parameter"
    weights = _weights(cfg["step_weights"])
    if not weights:
        weights_arg = None
    elif len(weights) != cfg["inner_steps"]:
        raise ConfigError(f"step_weights has {len(weights)} weights for inner_steps={cfg['inner_steps']}; give one per step")  # fmt: skip
    else:
        weights_arg = weights
    return {
        "first_order": bool(cfg["first_order"]) or algorithm == "fomaml",
        "adapt": adapt_option(adapt, model),
        "learn_lr": learn_lr,
        "step_weights": weights_arg,
        "inner_optimizer": inner_optimizer_option(cfg),
    }


def algorithm_label(cfg: Mapping[str, Any]) -> str:
    """How result tables name a run's algorithm: ``MAML``, ``ANIL (first order)``,
    ``MAML + LSLR + multi-step loss``, ..."""
    cfg = FAMILY | dict(cfg)
    label = ALGORITHMS.get(cfg["algorithm"], cfg["algorithm"])
    extras = []
    if cfg["algorithm"] == "mamlpp":
        off = [k for k in ("lslr", "multi_step_loss") if not cfg[k]]
        extras += [f"{k}=false" for k in off]
        if cfg["first_order_epochs"]:
            extras.append(f"first order {cfg['first_order_epochs']} epochs")
    elif cfg["learn_lr"] == "per-layer-per-step":
        extras.append("LSLR")
    elif cfg["learn_lr"] == "per-parameter" and cfg["algorithm"] != "metasgd":
        extras.append("per-parameter lr")
    if _weights(cfg["step_weights"]):
        extras.append("multi-step loss")
    if cfg["inner_optimizer"] != "sgd":
        extras.append(f"inner {cfg['inner_optimizer']}")
    if cfg["adapt"] not in ("no-norm", "head") or (
        cfg["adapt"] == "head" and cfg["algorithm"] != "anil"
    ):
        extras.append(f"adapt={cfg['adapt']}")
    label = " + ".join([label, *extras])
    if cfg.get("first_order") and cfg["algorithm"] != "fomaml":
        label += " (first order)"
    return label


def build_learner(model: nn.Module, loss_fn: Any, cfg: Mapping[str, Any], **kwargs: Any) -> MAML:
    """The learner of a config (``MAML``, or ``Reptile``/``iMAML``): its inner-loop keys,
    the family keys, and ``kwargs`` (execution strategy, compile); a value the learner
    refuses is a ``ConfigError``."""
    algorithm = cfg.get("algorithm", "maml")
    options = family_options(cfg, model)
    cls: type[MAML] = MAML
    for key, off in (("inner_batch", 0), ("carry_inner_state", False)):
        if cfg.get(key, off) and algorithm != "reptile":
            raise ConfigError(f"{key} is Reptile's (algorithm=reptile), not {algorithm}'s: "
                              f"leave it at {str(off).lower()}")  # fmt: skip
    if algorithm == "reptile":
        cls = Reptile
        if cfg.get("inner_batch", 0):
            # the training support set: ways x shots images, or K points of a regression task
            support = cfg.get("ways", 1) * (cfg.get("train_shots") or cfg.get("shots", 0))
            if support and cfg["inner_batch"] > support:
                raise ConfigError(f"inner_batch={cfg['inner_batch']} exceeds the {support} examples "
                                  "of a training support set: lower it, or 0 for full-batch steps")  # fmt: skip
            options["inner_batch"] = cfg["inner_batch"]
        options["carry_inner_state"] = cfg.get("carry_inner_state", False)
    elif algorithm == "mamlpp":
        if options.pop("learn_lr") not in (None, "per-layer-per-step") or options.pop(
            "step_weights"
        ):
            raise ConfigError("algorithm=mamlpp sets its own rates and step weights: use lslr= and "
                              "multi_step_loss= to switch them")  # fmt: skip
        cls = MAMLpp
        options |= {k: cfg.get(k, FAMILY[k]) for k in (
            "lslr", "multi_step_loss", "msl_epochs", "first_order_epochs", "epoch_iterations")}  # fmt: skip
    elif algorithm == "imaml":
        if cfg.get("adapt", "no-norm") not in ("no-norm", "all"):
            raise ConfigError(f"algorithm=imaml adapts every parameter; adapt={cfg['adapt']!r} contradicts it")  # fmt: skip
        cls, options["adapt"] = iMAML, None
        options |= {"lam": cfg["lam"], "cg_steps": cfg["cg_steps"]}
    try:
        return cls(model, loss_fn, inner_lr=cfg["inner_lr"], inner_steps=cfg["inner_steps"],
                   **options, **kwargs)  # fmt: skip
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None
