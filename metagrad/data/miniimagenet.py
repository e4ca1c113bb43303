"""MiniImagenet (Vinyals et al. 2016) with the Ravi & Larochelle (2017) class split.

Layouts read from ``data_dir``, per split (``train``, ``val``, ``test``; the pickle wins if both):

1. ``mini-imagenet-cache-<split>.pkl``: a dict with ``"image_data"`` (uint8 ``[N, 84, 84, 3]``)
   and ``"class_dict"`` (``{wnid: [indices]}``). It is read with an unpickler that only admits
   numpy array reconstruction, so a malicious pickle cannot run code. It already holds decoded
   pixels, so it is only regrouped in memory, not cached again.
2. Ravi & Larochelle CSVs: ``<split>.csv`` (header ``filename,label``, label = wnid) and the
   images in ``data_dir/images/<filename>``. Images are converted to RGB and, if not already
   84x84, resized to 84x84 with Pillow LANCZOS (as the original split script did). The decoded
   split is cached in ``<cache_dir>/miniimagenet_<split>_<key>.npz`` (``cache_dir`` defaults to
   ``$METAGRAD_CACHE/miniimagenet`` or ``~/.cache/metagrad/miniimagenet``); the key hashes the
   CSV and the listed files' sizes and mtimes, so edits give a new cache.

Classes are ordered by wnid, images of a class in file order. Output images are uint8
``[classes, per_class, 3, 84, 84]``; the sampler maps them to float32 in [0, 1] (no mean/std
normalisation; do that in the model if wanted). ``strict=True`` requires the published counts
(64 / 16 / 20 classes of 600 images); ``strict=False`` accepts any number of classes (for
subsets and test fixtures) but every class must still hold the same number of images.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import pickle
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ._files import cache_dir_for, load_npz, save_npz_atomic
from .errors import DataError
from .sampler import FewShotDataset

EXPECTED_CLASSES = {"train": 64, "val": 16, "test": 20}
IMAGES_PER_CLASS = 600
SIZE = 84
_CACHE_VERSION = 1
_NUMPY_GLOBALS = {"_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer"}


def _oneline(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if module.split(".")[0] == "numpy" and name in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _check_counts(counts: dict[str, int], split: str, where: Path, strict: bool) -> None:
    sizes = sorted(set(counts.values()))
    if strict and (len(counts) != EXPECTED_CLASSES[split] or sizes != [IMAGES_PER_CLASS]):
        raise DataError(
            f"{where}: expected {EXPECTED_CLASSES[split]} classes x {IMAGES_PER_CLASS} images, "
            f"found {len(counts)} classes with {sizes} images each (strict=False accepts subsets)"
        )
    if not counts:
        raise DataError(f"{where}: no classes found")
    if len(sizes) > 1:
        odd = next(w for w, n in counts.items() if n != sizes[-1])
        raise DataError(
            f"{where}: classes differ in size ({sizes[0]}..{sizes[-1]} images, {odd} has "
            f"{counts[odd]}); every class needs the same number of images"
        )


def _load_pickle(path: Path, split: str, strict: bool) -> tuple[np.ndarray, list[str]]:
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="latin1").load()
    except Exception as e:  # corrupt pickles raise many types
        raise DataError(f"{path}: cannot unpickle ({_oneline(e)})") from e
    if not isinstance(obj, dict) or not {"image_data", "class_dict"} <= obj.keys():
        raise DataError(f"{path}: expected a dict with keys 'image_data' and 'class_dict'")
    data, class_dict = obj["image_data"], obj["class_dict"]
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 4):
        raise DataError(f"{path}: 'image_data' must be a uint8 array [N, {SIZE}, {SIZE}, 3]")
    if data.shape[1:] != (SIZE, SIZE, 3):
        raise DataError(f"{path}: 'image_data' has shape {data.shape}, expected [N, 84, 84, 3]")
    wnids = sorted(class_dict)
    _check_counts({w: len(class_dict[w]) for w in wnids}, split, path, strict)
    index = np.asarray([class_dict[w] for w in wnids], dtype=np.int64)
    if index.min() < 0 or index.max() >= len(data):
        raise DataError(f"{path}: 'class_dict' indexes outside 'image_data' (N={len(data)})")
    return np.ascontiguousarray(data[index].transpose(0, 1, 4, 2, 3)), wnids


def _read_csv(path: Path) -> dict[str, list[str]]:
    try:
        rows = list(csv.reader(io.StringIO(path.read_text())))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read ({_oneline(e)})") from e
    if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
        raise DataError(f"{path}: expected header 'filename,label', got {rows[0] if rows else []}")
    classes: dict[str, list[str]] = {}
    for lineno, row in enumerate(rows[1:], start=2):
        if len(row) != 2:
            if row:
                raise DataError(f"{path}:{lineno}: expected 'filename,label', got {row}")
            continue
        classes.setdefault(row[1].strip(), []).append(row[0].strip())
    return {w: classes[w] for w in sorted(classes)}


def _decode(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
            if rgb.size != (SIZE, SIZE):
                rgb = rgb.resize((SIZE, SIZE), Image.Resampling.LANCZOS)
            return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise DataError(f"{path}: cannot decode image ({_oneline(e)})") from e


def _load_csv(
    path: Path, split: str, strict: bool, cache_dir: str | os.PathLike | None
) -> tuple[np.ndarray, list[str]]:
    classes = _read_csv(path)
    images_dir = path.parent / "images"
    files = [images_dir / name for names in classes.values() for name in names]
    if not images_dir.is_dir():
        raise DataError(f"{path} lists {len(files)} images but {images_dir} does not exist")
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise DataError(
            f"{path} lists {len(files)} images; {len(missing)} missing from {images_dir}, "
            f"first: {missing[0].name}"
        )
    _check_counts({w: len(n) for w, n in classes.items()}, split, path, strict)
    h = hashlib.sha256(f"v{_CACHE_VERSION}:".encode() + path.read_bytes())
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    cache_file = (
        cache_dir_for("miniimagenet", cache_dir) / f"miniimagenet_{split}_{h.hexdigest()[:16]}.npz"
    )
    cached = load_npz(cache_file)
    if cached is None or cached.get("images", np.empty(0)).ndim != 5:
        images = np.stack(
            [np.stack([_decode(images_dir / n) for n in names]) for names in classes.values()]
        )
        cached = {"images": images, "class_names": np.array(list(classes))}
        save_npz_atomic(cache_file, **cached)
    return cached["images"], cached["class_names"].tolist()


def load_miniimagenet(
    data_dir: str | os.PathLike,
    split: str = "train",
    cache_dir: str | os.PathLike | None = None,
    *,
    strict: bool = True,
) -> FewShotDataset:
    """One split as ``images [classes, per_class, 3, 84, 84]`` uint8 and the classes' wnids."""
    if split not in EXPECTED_CLASSES:
        raise ValueError(f"split must be one of {sorted(EXPECTED_CLASSES)}, got {split!r}")
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise DataError(
            f"MiniImagenet data directory {data_dir} does not exist or is not a directory"
        )
    pkl, csv_path = data_dir / f"mini-imagenet-cache-{split}.pkl", data_dir / f"{split}.csv"
    if pkl.is_file():
        images, names = _load_pickle(pkl, split, strict)
    elif csv_path.is_file():
        images, names = _load_csv(csv_path, split, strict, cache_dir)
    else:
        raise DataError(
            f"{data_dir}: found neither {csv_path.name} (with images/) nor {pkl.name} "
            "for MiniImagenet"
        )
    return FewShotDataset(images=torch.from_numpy(images), class_names=names)
