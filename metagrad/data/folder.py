"""Few-shot classification from your own images: one folder per class, one folder per split.

Layout::

    ROOT/train/<class name>/<image files>
    ROOT/val/<class name>/<image files>
    ROOT/test/<class name>/<image files>

Any split name works (``split="val"`` reads ``ROOT/val``). Images are the files whose suffix
is one of :data:`IMAGE_SUFFIXES` (any case); other files and hidden entries (names starting
with ``.``) are ignored. Classes are ordered by folder name and the images of a class by
file name, so the same folder always gives the same tensor.

Every image is converted to greyscale (``channels=1``) or RGB (``channels=3``) and resized
to ``image_size`` x ``image_size`` with Pillow's LANCZOS filter (a non-square image is
stretched; crop beforehand to keep its aspect ratio). The result is uint8
``[classes, per_class, channels, image_size, image_size]``; the sampler maps it to float32
in [0, 1]. A tensor needs the same count for every class, so when the classes differ in
size each keeps its first ``per_class = min count`` images (in file-name order) and the
rest are not read.

Nothing is cached: the images are decoded on every call (MiniImagenet-sized folders take a
while; keep the returned dataset, or save ``dataset.images`` with ``torch.save``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import DataError
from .sampler import FewShotDataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
_MODES = {1: "L", 3: "RGB"}


def _oneline(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _visible(path: Path) -> list[Path]:
    return sorted((p for p in path.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)


def _images(class_dir: Path) -> list[Path]:
    return [p for p in _visible(class_dir) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]


def _decode(path: Path, mode: str, size: int) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im = im.convert(mode)
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.LANCZOS)
            pixels = np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot decode image ({_oneline(e)})") from e
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def load_image_folder(
    root: str | os.PathLike, split: str = "train", image_size: int = 84, channels: int = 3
) -> FewShotDataset:
    """One split of your own image folders, ``root/split/<class name>/<image files>``.

    Classes are read in folder-name order and images in file-name order; files whose suffix
    is not in :data:`IMAGE_SUFFIXES` (any case) and hidden entries are ignored. When the
    classes differ in size, each keeps its first ``min count`` images, so the tensor is
    uniform.

    Args:
        root: the folder holding ``train/``, ``val/`` and ``test/`` (or other split names).
        split: the sub-folder to read.
        image_size: images are resized (LANCZOS) to ``image_size`` x ``image_size``.
        channels: 1 (greyscale) or 3 (RGB).

    Returns:
        A :class:`FewShotDataset`: ``images``, uint8 ``[classes, per_class, channels,
        image_size, image_size]``, and ``class_names``; ``.sampler()`` samples tasks.

    Raises:
        DataError: a missing folder, no class folders, a class with fewer than 2 images, or
            an image that cannot be decoded; one line naming the folder or file.
        ValueError: ``channels``, ``image_size`` or ``split`` out of range.

    Example:
        >>> ds = load_image_folder("data/shapes", "train", image_size=28)  # doctest: +SKIP
        >>> ds.sampler().sample(4, ways=5, shots=1, queries=5)  # doctest: +SKIP
    """
    if channels not in _MODES:
        raise ValueError(f"channels must be 1 (greyscale) or 3 (RGB), got {channels!r}")
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if not split or "/" in split or split in (".", ".."):
        raise ValueError(f"split must be a folder name like 'train', got {split!r}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a directory")
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(f"{root}: no {split!r} folder; expected {split_dir}/<class name>/<images>")
    class_dirs = [p for p in _visible(split_dir) if p.is_dir()]
    if not class_dirs:
        raise DataError(
            f"{split_dir}: no class folders; expected {split_dir}/<class name>/<images>"
        )
    files = {d.name: _images(d) for d in class_dirs}
    for d in class_dirs:
        count = len(files[d.name])
        if count == 0:
            raise DataError(f"{d}: no images (looked for {', '.join(IMAGE_SUFFIXES)})")
        if count < 2:
            raise DataError(
                f"{d}: only 1 image; a class needs at least 2 (a support and a query image)"
            )
    if len(class_dirs) < 2:
        raise DataError(
            f"{split_dir}: only 1 class folder ({class_dirs[0].name}); tasks need 2 or more"
        )
    per_class = min(len(f) for f in files.values())
    mode = _MODES[channels]
    images = np.stack(
        [np.stack([_decode(p, mode, image_size) for p in f[:per_class]]) for f in files.values()]
    )
    return FewShotDataset(images=torch.from_numpy(images), class_names=list(files))
