"""MiniImagenet loader on small generated fixtures in both layouts (CSV + images, pickle cache)."""

from __future__ import annotations

import csv
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metagrad.data import DataError, load_miniimagenet
from metagrad.data import miniimagenet as mi

CLASSES = {"train": 3, "val": 2, "test": 2}
PER_CLASS = 6


def wnid(split: str, c: int) -> str:
    return f"n{ {'train': 1, 'val': 2, 'test': 3}[split]:02d}{c:06d}"


def make_csv_layout(root: Path, per_class: int = PER_CLASS) -> None:
    """``<split>.csv`` + ``images/`` with tiny random JPEGs named like the Ravi & Larochelle files."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for split, n in CLASSES.items():
        with open(root / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["filename", "label"])
            for c in reversed(range(n)):  # classes not in wnid order in the file
                for i in range(per_class):
                    name = f"{wnid(split, c)}{i + 1:08d}.jpg"
                    pixels = rng.integers(0, 256, (84, 84, 3), dtype=np.uint8)
                    Image.fromarray(pixels).save(root / "images" / name, quality=90)
                    writer.writerow([name, wnid(split, c)])


def make_pickle_layout(src: Path, root: Path) -> None:
    """``mini-imagenet-cache-<split>.pkl`` from the CSV fixture's decoded JPEGs, images interleaved."""
    root.mkdir(parents=True, exist_ok=True)
    for split in CLASSES:
        with open(src / f"{split}.csv") as f:
            rows = list(csv.reader(f))[1:]
        order = np.random.default_rng(1).permutation(len(rows))  # shuffle image order
        data = np.stack([np.asarray(Image.open(src / "images" / rows[i][0])) for i in order])
        class_dict: dict[str, list[int]] = {}
        for pos, i in enumerate(order):
            class_dict.setdefault(rows[i][1], []).append(pos)
        for w in class_dict:  # keep each class's images in file order
            class_dict[w].sort(key=lambda p: rows[order[p]][0])
        with open(root / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
            pickle.dump({"image_data": data, "class_dict": class_dict}, f)


@pytest.fixture
def csv_dir(tmp_path: Path) -> Path:
    make_csv_layout(tmp_path / "mini")
    return tmp_path / "mini"


def assert_data_error(fn, *fragments: str) -> str:
    with pytest.raises(DataError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg, msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


def test_csv_layout_loads_and_samples(csv_dir: Path, tmp_path: Path) -> None:
    for split, n in CLASSES.items():
        ds = load_miniimagenet(csv_dir, split, cache_dir=tmp_path / "cache", strict=False)
        assert ds.images.shape == (n, PER_CLASS, 3, 84, 84) and ds.images.dtype == torch.uint8
        assert ds.class_names == sorted(wnid(split, c) for c in range(n))
    ds = load_miniimagenet(csv_dir, "train", cache_dir=tmp_path / "cache", strict=False)
    first = np.asarray(Image.open(csv_dir / "images" / f"{wnid('train', 0)}00000001.jpg"))
    assert np.array_equal(ds.images[0, 0].permute(1, 2, 0).numpy(), first)
    sx, sy, qx, qy = ds.sampler().sample(4, 3, 2, 3, torch.Generator().manual_seed(0))
    assert sx.shape == (4, 6, 3, 84, 84) and qx.shape == (4, 9, 3, 84, 84)
    assert sy.shape == (4, 6) and qy.shape == (4, 9)
    assert sx.dtype == torch.float32 and 0 <= sx.min() and sx.max() <= 1
    rotated = ds.sampler("per-task").sample(2, 2, 1, 1, torch.Generator().manual_seed(0))
    assert rotated.support_x.shape == (2, 2, 3, 84, 84)


def test_pickle_layout_matches_csv(csv_dir: Path, tmp_path: Path) -> None:
    make_pickle_layout(csv_dir, tmp_path / "pkl")
    for split in CLASSES:
        a = load_miniimagenet(csv_dir, split, cache_dir=tmp_path / "cache", strict=False)
        b = load_miniimagenet(tmp_path / "pkl", split, strict=False)
        assert torch.equal(a.images, b.images) and a.class_names == b.class_names
    batch = b.sampler().sample(3, 2, 1, 2, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (3, 2, 3, 84, 84) and batch.query_x.shape == (3, 4, 3, 84, 84)


def test_resize_to_84(csv_dir: Path, tmp_path: Path) -> None:
    path = csv_dir / "images" / f"{wnid('val', 1)}00000003.jpg"
    big = Image.fromarray(np.random.default_rng(2).integers(0, 256, (120, 100, 3), dtype=np.uint8))
    big.save(path)
    ds = load_miniimagenet(csv_dir, "val", cache_dir=tmp_path / "cache", strict=False)
    expected = np.asarray(Image.open(path).resize((84, 84), Image.Resampling.LANCZOS))
    assert np.array_equal(ds.images[1, 2].permute(1, 2, 0).numpy(), expected)


def test_cache_is_reused(csv_dir: Path, tmp_path: Path, monkeypatch) -> None:
    first = load_miniimagenet(csv_dir, "test", cache_dir=tmp_path / "cache", strict=False)
    assert len(list((tmp_path / "cache").glob("miniimagenet_test_*.npz"))) == 1
    monkeypatch.setattr(mi, "_decode", None)  # a decode now would fail
    again = load_miniimagenet(csv_dir, "test", cache_dir=tmp_path / "cache", strict=False)
    assert torch.equal(first.images, again.images)
    # touching an image changes the key: the cache is rebuilt (and here hits the broken decoder)
    path = next((csv_dir / "images").glob(f"{wnid('test', 0)}*.jpg"))
    os.utime(path, ns=(0, 0))
    with pytest.raises(TypeError):
        load_miniimagenet(csv_dir, "test", cache_dir=tmp_path / "cache", strict=False)


def test_strict_counts(csv_dir: Path, tmp_path: Path) -> None:
    assert_data_error(
        lambda: load_miniimagenet(csv_dir, "train", cache_dir=tmp_path / "c"),
        str(csv_dir / "train.csv"),
        "expected 64 classes x 600 images, found 3 classes with [6] images each",
    )
    make_pickle_layout(csv_dir, tmp_path / "pkl")
    assert_data_error(
        lambda: load_miniimagenet(tmp_path / "pkl", "val"),
        "mini-imagenet-cache-val.pkl",
        "expected 16 classes x 600 images",
    )


def test_missing_images(csv_dir: Path, tmp_path: Path) -> None:
    name = f"{wnid('train', 1)}00000004.jpg"
    (csv_dir / "images" / name).unlink()
    assert_data_error(
        lambda: load_miniimagenet(csv_dir, "train", cache_dir=tmp_path / "c", strict=False),
        f"{csv_dir / 'train.csv'} lists 18 images; 1 missing from {csv_dir / 'images'}, first: {name}",
    )


def test_missing_images_dir(csv_dir: Path, tmp_path: Path) -> None:
    (csv_dir / "images").rename(csv_dir / "elsewhere")
    assert_data_error(
        lambda: load_miniimagenet(csv_dir, "val", cache_dir=tmp_path / "c", strict=False),
        "val.csv lists 12 images",
        f"{csv_dir / 'images'} does not exist",
    )


def test_missing_csv_and_dir(tmp_path: Path) -> None:
    assert_data_error(
        lambda: load_miniimagenet(tmp_path, "test"),
        str(tmp_path),
        "test.csv",
        "mini-imagenet-cache-test.pkl",
    )
    assert_data_error(lambda: load_miniimagenet(tmp_path / "nope"), str(tmp_path / "nope"))


def test_bad_csv(csv_dir: Path, tmp_path: Path) -> None:
    (csv_dir / "val.csv").write_text("file,wnid\na.jpg,n1\n")
    assert_data_error(
        lambda: load_miniimagenet(csv_dir, "val", strict=False), "val.csv", "expected header"
    )
    (csv_dir / "val.csv").write_text("filename,label\na.jpg\n")
    assert_data_error(lambda: load_miniimagenet(csv_dir, "val", strict=False), "val.csv:2")


def test_unequal_class_sizes(csv_dir: Path, tmp_path: Path) -> None:
    lines = (csv_dir / "test.csv").read_text().splitlines()
    (csv_dir / "test.csv").write_text("\n".join(lines[:-1]) + "\n")  # drop one image of a class
    assert_data_error(
        lambda: load_miniimagenet(csv_dir, "test", cache_dir=tmp_path / "c", strict=False),
        "test.csv",
        f"{wnid('test', 0)} has 5",
    )


def test_unreadable_image(csv_dir: Path, tmp_path: Path) -> None:
    path = csv_dir / "images" / f"{wnid('val', 0)}00000002.jpg"
    path.write_bytes(b"\xff\xd8 truncated jpeg")
    assert_data_error(
        lambda: load_miniimagenet(csv_dir, "val", cache_dir=tmp_path / "c", strict=False),
        str(path),
        "cannot decode image",
    )


def test_bad_pickles(tmp_path: Path) -> None:
    path = tmp_path / "mini-imagenet-cache-train.pkl"
    path.write_bytes(np.random.default_rng(0).bytes(1000))
    assert_data_error(lambda: load_miniimagenet(tmp_path, strict=False), str(path), "unpickle")
    path.write_bytes(pickle.dumps({"images": np.zeros(3)}))
    assert_data_error(lambda: load_miniimagenet(tmp_path, strict=False), str(path), "class_dict")
    path.write_bytes(pickle.dumps({"image_data": np.zeros((2, 84, 84, 3)), "class_dict": {}}))
    assert_data_error(lambda: load_miniimagenet(tmp_path, strict=False), str(path), "uint8")
    data = np.zeros((2, 84, 84, 3), dtype=np.uint8)
    path.write_bytes(pickle.dumps({"image_data": data, "class_dict": {"n1": [0, 5]}}))
    assert_data_error(lambda: load_miniimagenet(tmp_path, strict=False), str(path), "outside")
    marker = tmp_path / "pwned"
    path.write_bytes(pickle.dumps(Evil(str(marker))))
    assert_data_error(lambda: load_miniimagenet(tmp_path, strict=False), str(path), "refusing")
    assert not marker.exists()


class Evil:
    """A pickle that would create a file when loaded by a plain ``pickle.load``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))
