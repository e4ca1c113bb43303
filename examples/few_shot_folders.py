"""Few-shot image classification from your own image folders, with MAML, ANIL, Meta-SGD or
MAML++.

What it shows: ``metagrad.data.load_image_folder`` reading ``ROOT/{train,val,test}/<class
name>/<images>``; the vectorised task sampler (``dataset.sampler().sample(...)``); the
conv4 network sized for any image size; the algorithm family on one training loop (MAML++
with its per-step BatchNorm network, its ``schedule(it)`` and a cosine meta learning rate);
test accuracy with a 95% confidence interval over test tasks of unseen classes.

Without ``--data`` it first writes a small synthetic dataset in a temporary folder: each
class is a shape in a colour (a red ring, a blue cross, ...), drawn at random positions and
sizes on a noisy background; test classes are combinations never seen in training.

    python examples/few_shot_folders.py --data ROOT --algorithm anil --image-size 84
    python examples/few_shot_folders.py --algorithm mamlpp     # on the synthetic folders
    python examples/few_shot_folders.py --smoke                # tiny sizes, a few seconds
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor

import metagrad as mg
from metagrad.data import load_image_folder

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond", "hbar", "vbar")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40),
    "magenta": (200, 50, 200), "cyan": (40, 200, 210),
}  # fmt: skip


def draw(shape: str, rgb: tuple[int, int, int], size: int, rng: np.random.Generator) -> Image.Image:
    """One image of a class: the shape at a random place and size, the colour jittered, on
    a noisy dark background."""
    background = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    img = Image.fromarray(background)
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.22, 0.38) * size
    cx, cy = (size / 2 + rng.uniform(-0.12, 0.12, 2) * size).tolist()
    fill = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in rgb)
    box = (cx - r, cy - r, cx + r, cy + r)
    w = max(r / 2.5, 1.0)
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "ring":
        d.ellipse(box, outline=fill, width=int(w))
    elif shape == "square":
        d.rectangle(box, fill=fill)
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif shape == "cross":
        d.rectangle((cx - w / 2, cy - r, cx + w / 2, cy + r), fill=fill)
        d.rectangle((cx - r, cy - w / 2, cx + r, cy + w / 2), fill=fill)
    elif shape == "hbar":
        d.rectangle((cx - r, cy - w / 2, cx + r, cy + w / 2), fill=fill)
    else:  # vbar
        d.rectangle((cx - w / 2, cy - r, cx + w / 2, cy + r), fill=fill)
    return img


def make_synthetic_folders(root: Path, size: int = 28, per_class: int = 20,
                           splits: tuple[int, int, int] = (30, 6, 12), seed: int = 0) -> Path:  # fmt: skip
    """Write ``root/{train,val,test}/<colour>-<shape>/NNN.png``: ``splits`` classes per split
    (disjoint), ``per_class`` images each."""
    rng = np.random.default_rng(seed)
    classes = [(c, s) for c in COLOURS for s in SHAPES]
    order = rng.permutation(len(classes))
    start = 0
    for split, count in zip(("train", "val", "test"), splits, strict=True):
        for i in order[start : start + count]:
            colour, shape = classes[i]
            folder = root / split / f"{colour}-{shape}"
            folder.mkdir(parents=True, exist_ok=True)
            for j in range(per_class):
                draw(shape, COLOURS[colour], size, rng).save(folder / f"{j:03d}.png")
        start += count
    return root


def accuracy(logits: Tensor, y: Tensor) -> Tensor:
    return (logits.argmax(-1) == y).float().mean()


def build(args: argparse.Namespace) -> mg.MAML:
    """The network and the learner of ``args.algorithm``."""
    ways, steps, lr, loss = args.ways, args.inner_steps, args.inner_lr, F.cross_entropy
    if args.algorithm == "mamlpp":
        # per-step BatchNorm: its forward takes the inner step index, which the core passes
        model = mg.models.mamlpp_conv4(ways, steps, image=args.image_size,
                                       in_channels=args.channels, filters=args.filters)  # fmt: skip
        # LSLR rates start at inner_lr; the multi-step loss anneals over the first tenth
        return mg.MAMLpp(model, loss, inner_lr=lr, inner_steps=steps, msl_epochs=1,
                         epoch_iterations=max(args.iterations // 10, 1))  # fmt: skip
    # the MAML paper's MiniImagenet conv4 (3x3 conv, BatchNorm, ReLU, 2x2 max-pool) x 4 and a
    # linear head, sized for image_size
    side = args.image_size // 16
    model = mg.models.Conv4(ways, args.channels, args.filters, stride=1, pool=True,
                            spatial_mean=False, features=args.filters * side * side)  # fmt: skip
    if args.algorithm == "anil":
        return mg.ANIL(model, loss, head="head", inner_lr=lr, inner_steps=steps)
    if args.algorithm == "metasgd":
        return mg.MetaSGD(model, loss, inner_lr=lr, inner_steps=steps)
    return mg.MAML(model, loss, inner_lr=lr, inner_steps=steps)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="", help="ROOT with train/, val/, test/ class folders (default: synthetic)")  # fmt: skip
    parser.add_argument("--algorithm", default="anil", choices=["anil", "metasgd", "mamlpp", "maml"])  # fmt: skip
    parser.add_argument("--image-size", type=int, default=0, help="default: 84 for --data, 28 synthetic")  # fmt: skip
    parser.add_argument("--channels", type=int, default=3, choices=[1, 3])
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=5, help="query images per class")
    parser.add_argument("--filters", type=int, default=32)
    parser.add_argument("--inner-lr", type=float, default=0.1)
    parser.add_argument("--inner-steps", type=int, default=3)
    parser.add_argument("--test-steps", type=int, default=5)
    parser.add_argument("--meta-batch", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--test-tasks", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check that it runs")
    args = parser.parse_args(argv)
    args.image_size = args.image_size or (84 if args.data else 28)
    if args.image_size < 16:
        parser.error("--image-size must be at least 16 (conv4 halves it four times)")
    if args.smoke:
        args.filters, args.iterations, args.meta_batch, args.test_tasks = 8, 3, 2, 4
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data) if args.data else None
        if root is None:
            per_class, splits = (6, (6, 5, 5)) if args.smoke else (20, (30, 6, 12))
            root = make_synthetic_folders(Path(tmp), args.image_size, per_class, splits)
            print(f"synthetic image folders in {root}")
        # uint8 [classes, per_class, C, H, W]; unequal classes keep their first min-count images
        train = load_image_folder(root, "train", args.image_size, args.channels)
        test = load_image_folder(root, "test", args.image_size, args.channels)
    print(f"train: {len(train)} classes x {train.images.shape[1]} images, "
          f"test: {len(test)} classes x {test.images.shape[1]} images, {tuple(train.images.shape[2:])}")  # fmt: skip

    torch.manual_seed(args.seed)
    maml = build(args)
    opt = torch.optim.Adam(maml.parameters(), lr=1e-3)
    # MAML++ anneals the meta learning rate (cosine); constant for the others
    sched = None
    if args.algorithm == "mamlpp":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.iterations, eta_min=1e-5)
    sampler, g = train.sampler(), torch.Generator().manual_seed(args.seed)
    log_every = max(args.iterations // 10, 1)
    for it in range(args.iterations):
        maml.schedule(it)  # MAML++: this iteration's loss weights and derivative order
        # support x [tasks, ways*shots, C, H, W] float in [0, 1], y [tasks, ways*shots] labels
        batch = sampler.sample(args.meta_batch, args.ways, args.shots, args.queries, g)
        opt.zero_grad()
        loss, logits = maml.meta_backward(*batch, return_outputs=True)
        opt.step()
        if sched is not None:
            sched.step()
        if (it + 1) % log_every == 0:
            acc = accuracy(logits, batch.query_y).item()
            print(
                f"iteration {it + 1:5d}  loss {loss.item():.3f}  training query accuracy {acc:.2f}"
            )

    # test classes, never seen in training; tasks from a fixed seed, in chunks (memory)
    g, curves = torch.Generator().manual_seed(1234), []
    for start in range(0, args.test_tasks, 50):
        batch = test.sampler().sample(min(50, args.test_tasks - start), args.ways, args.shots,
                                      args.queries, g)  # fmt: skip
        curves.append(maml.adaptation_curve(*batch, args.test_steps, {"acc": accuracy})["acc"])
    final = torch.cat(curves)[:, -1]
    mean, ci = final.mean().item(), 1.96 * final.std().item() / math.sqrt(len(final))
    print(f"test accuracy, {args.algorithm}, {args.ways}-way {args.shots}-shot, {len(final)} "
          f"tasks, {args.test_steps} steps: {100 * mean:.1f} +- {100 * ci:.1f} %")  # fmt: skip
    assert 0.0 <= mean <= 1.0
    return {"accuracy": mean, "ci95": ci}


if __name__ == "__main__":
    main()
