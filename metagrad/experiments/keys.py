"""What each config key means: one line per key of every preset, for ``metagrad presets NAME``
and the generated reference in the docs (a test checks that every key has its line)."""

from __future__ import annotations

from typing import Any

KEYS: dict[str, str] = {
    # what runs
    "experiment": "which experiment runs the config: sinusoid | omniglot | miniimagenet | folder | rl (set by the preset)",
    "method": "maml (meta-training) | pretrain (the regression/TRPO baseline) | oracle (sees the task)",
    "seed": "random seed of initialisation, task sampling and the training loop (`--seed` sets it)",
    "iterations": "meta-iterations to train",
    "time_limit_min": "stop training after this many minutes of wall time, checkpointed (0: no limit)",
    # tasks
    "meta_batch": "tasks per meta-iteration",
    "ways": "classes per task",
    "shots": "support examples per class (per task for the sinusoid) at test and, unless `train_shots`, in training",
    "train_shots": "support examples per class in meta-training; 0: `shots` (Reptile's Omniglot command: 10)",
    "queries": "query examples per class (per task for the sinusoid) in meta-training",
    # model
    "model": "conv4 (the MAML paper's) | conv4-mamlpp (MAML++: max-pooling, per-step BatchNorm) | mlp",
    "hidden": "hidden layer widths of the MLP (sinusoid) or the policy (meta-RL)",
    "filters": "channels of each conv4 layer",
    "bn_per_step_weights": "conv4-mamlpp: a BatchNorm scale and bias per inner step (BNWB)",
    "bn_per_step_stats": "conv4-mamlpp: running statistics per inner step, used in eval mode (BNRS)",
    "init_log_std": "initial log standard deviation of the Gaussian policy",
    # the inner loop and the algorithm family
    "algorithm": "maml | fomaml | anil | metasgd | reptile | imaml | mamlpp; brings its papers' settings for keys not set",
    "inner_lr": "inner step size alpha (the start value of learned rates)",
    "inner_steps": "inner steps in meta-training",
    "first_order": "treat inner gradients as constants (first-order MAML)",
    "adapt": "what the inner loop updates: no-norm (all but normalisation layers) | all | head | name prefixes a,b",
    "learn_lr": "learned inner rates: none | per-parameter (Meta-SGD) | per-layer-per-step (LSLR)",
    "step_weights": "multi-step loss: one weight per inner step; []: the loss after the last step",
    "inner_optimizer": "inner update rule: sgd | momentum | adam (state reset per task)",
    "inner_momentum": "inner_optimizer=momentum: its momentum",
    "inner_betas": "inner_optimizer=adam: its betas",
    "inner_eps": "inner_optimizer=adam: its epsilon",
    "lam": "iMAML: strength of the proximal term lambda",
    "cg_steps": "iMAML: conjugate-gradient steps of the implicit meta-gradient",
    "inner_batch": "Reptile: support examples per inner step, shuffled mini-batches (0: all)",
    "carry_inner_state": "Reptile with inner Adam: its moments carry over from task to task (true) or start at zero (false)",
    "lslr": "MAML++: learned per-layer per-step inner rates",
    "multi_step_loss": "MAML++: the annealed multi-step loss",
    "msl_epochs": "MAML++: epochs of multi-step loss, then the last step's loss only",
    "first_order_epochs": "MAML++: epochs trained first order before second order (derivative-order annealing)",
    "epoch_iterations": "MAML++: meta-iterations per epoch (its schedules count epochs)",
    # the outer loop
    "meta_lr": "meta learning rate (start value of its schedule)",
    "meta_optimizer": "adam | sgd",
    "lr_schedule": "meta learning rate over `iterations`: constant | linear (to 0) | cosine (to `min_meta_lr`)",
    "min_meta_lr": "the cosine schedule's floor",
    "clip_grad_value": "> 0: clamp each meta-gradient entry to +-value",
    # execution
    "vectorize": "how tasks run: auto (the fastest exact one) | vmap | loop | support",
    "compile": "torch.compile the meta-gradient: auto (on CUDA) | true | false; checked against eager",
    "threads": "torch threads; 0: torch's default (all cores, or cores / processes with --nproc)",
    "on_nonfinite": "a NaN/inf meta-loss or meta-gradient: stop (the run, checkpoint intact) | skip (the step)",
    # logging, checkpoints, validation
    "log_every": "iterations between metrics.csv rows",
    "checkpoint_every": "iterations between checkpoints",
    "tensorboard": "TensorBoard event files in RUN/tensorboard: auto (when installed) | true | false",
    "val_every": "iterations between validations (best.pt keeps the best); 0: none",
    "val_tasks": "validation tasks (few-shot: of the validation classes, 15-query protocol)",
    "val_seed": "meta-RL: seed of the validation tasks (checkpoint selection and step-size tuning)",
    # data
    "data_dir": "dataset folder (`--data-dir`); empty: $METAGRAD_DATA/NAME or ./data/NAME",
    "split": "Omniglot classes: paper (1200 train incl. 100 validation, 423 test) | background",
    "rotation": "Omniglot training rotations: per-task | classes (as extra classes) | none",
    "eval_rotation": "Omniglot rotations of validation and test tasks: per-task | none",
    "strict": "MiniImagenet: require the standard split sizes",
    "image_size": "image folders: images are resized to image_size x image_size",
    "channels": "image folders: 1 (greyscale) or 3 (RGB)",
    # evaluation
    "eval_tasks": "test tasks of the evaluation (fixed by `eval_seed`)",
    "eval_shots": "sinusoid: the K values evaluated",
    "eval_steps": "inner steps evaluated at test (accuracy or MSE after each)",
    "eval_queries": "query examples per class of the second test protocol (sinusoid: query points per task)",
    "eval_seed": "seed of the test tasks (independent of `seed`)",
    "finetune_lrs": "pretrained sinusoid baseline: fine-tuning step sizes tried on validation tasks",
    "finetune_val_tasks": "pretrained sinusoid baseline: validation tasks for that choice",
    # meta-RL
    "env": "gymnasium ID of the task environment (metagrad/Navigation2D-v0, ...HalfCheetahVel-v0, ...)",
    "rollouts": "paths sampled per task and policy",
    "horizon": "maximum path length",
    "gamma": "discount factor",
    "gae_lambda": "GAE lambda (1.0: Monte-Carlo returns minus the baseline)",
    "center_adv": "normalise advantages per task (rllab's center_adv)",
    "max_kl": "TRPO: the KL trust region",
    "cg_iters": "TRPO: conjugate-gradient iterations",
    "cg_damping": "TRPO: damping added to the KL Hessian",
    "backtrack_ratio": "TRPO: line-search shrink factor",
    "max_backtracks": "TRPO: line-search steps",
    "hvp": "TRPO KL Hessian-vector products: fisher (J^T M J through the inner step: the KL Hessian at the old policy, without third derivatives) | exact (double backward) | finite_difference (rllab's)",
    "num_workers": "sampler worker processes (0: in process)",
    "eval_env_steps": "meta-RL: env steps of paths per test task and step (the original's 4,000; ant direction 8,000)",
    "eval_later_factor": "meta-RL: test steps after the first use this times the first step size",
    "pretrain_eval_lr": "meta-RL: the pretrained policy's test step size; 0: tuned on validation tasks",
    "random_eval_lr": "meta-RL: the random baseline's test step size; 0: tuned on validation tasks",
    "eval_lr_grid": "meta-RL: the step sizes tried when tuning",
    "tune_tasks": "meta-RL: validation tasks of the step-size tuning",
    "eval_random": "meta-RL: also evaluate a fresh random policy per test task (the random baseline row)",
}  # fmt: skip


def describe(key: str) -> str:
    """The one-line meaning of a config key (KeyError for a key no preset has)."""
    return KEYS[key]


def format_value(value: Any) -> str:
    """A config value as it is written after ``--set key=``."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    return str(value)
