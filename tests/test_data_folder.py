"""``metagrad.data.load_image_folder`` on small generated trees, and the ``folder-*`` presets
through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metagrad.cli import main
from metagrad.data import DataError, FewShotDataset, load_image_folder


def write(path: Path, value: int | np.ndarray, size: tuple[int, int] = (10, 10)) -> None:
    """An RGB image: a constant ``value`` everywhere, or the given pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(value, int):
        value = np.full((*size[::-1], 3), value, dtype=np.uint8)
    Image.fromarray(value).save(path)


def tree(root: Path, splits: dict[str, dict[str, int]]) -> Path:
    """``root/<split>/<class>/NN.png`` with ``count`` images per class, each a constant grey
    level that encodes its class and position (``10 * class index + image index``)."""
    for split, classes in splits.items():
        for c, (name, count) in enumerate(classes.items()):
            for i in range(count):
                write(root / split / name / f"{i:02d}.png", 10 * c + i)
    return root


def assert_data_error(fn, *fragments: str) -> str:
    with pytest.raises(DataError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg, msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


def test_shapes_dtype_and_class_order(tmp_path: Path) -> None:
    tree(tmp_path, {"train": {"zebra": 4, "apple": 4, "mango": 4}})
    ds = load_image_folder(tmp_path, "train", image_size=8, channels=3)
    assert isinstance(ds, FewShotDataset)
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (3, 4, 3, 8, 8)
    assert ds.class_names == ["apple", "mango", "zebra"]  # sorted, not creation order
    # apple was written second (grey 10 + i), zebra first (grey i)
    assert ds.images[0, :, :, 0, 0].tolist() == [[10 + i] * 3 for i in range(4)]
    assert ds.images[2, :, 0, 0, 0].tolist() == [0, 1, 2, 3]
    batch = ds.sampler().sample(2, 3, 1, 2, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (2, 3, 3, 8, 8) and batch.query_x.shape == (2, 6, 3, 8, 8)


def test_greyscale_and_resize(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    for i in range(2):
        write(tmp_path / "val" / "a" / f"{i}.jpeg", pixels)
        write(tmp_path / "val" / "b" / f"{i}.JPG", 200, size=(30, 5))  # any size, any case
    ds = load_image_folder(tmp_path, "val", image_size=16, channels=1)
    assert ds.images.shape == (2, 2, 1, 16, 16)
    with Image.open(tmp_path / "val" / "a" / "0.jpeg") as im:
        expect = np.asarray(im.convert("L").resize((16, 16), Image.Resampling.LANCZOS))
    assert np.array_equal(ds.images[0, 0, 0].numpy(), expect)


def test_unequal_classes_keep_their_first_images_by_name(tmp_path: Path) -> None:
    cls = tmp_path / "train" / "big"
    for name, value in [("d.png", 4), ("b.png", 2), ("e.png", 5), ("a.png", 1), ("c.png", 3)]:
        write(cls / name, value)
    for name, value in [("y.png", 9), ("x.png", 8), ("z.png", 7)]:
        write(tmp_path / "train" / "small" / name, value)
    # not images, or hidden: ignored
    (cls / "notes.txt").write_text("not an image")
    write(cls / ".hidden.png", 99)
    write(tmp_path / "train" / ".cache" / "0.png", 99)
    (tmp_path / "train" / "README").write_text("a file beside the class folders")
    ds = load_image_folder(tmp_path, "train", image_size=10)
    assert ds.class_names == ["big", "small"] and ds.images.shape[:2] == (2, 3)
    assert ds.images[0, :, 0, 0, 0].tolist() == [1, 2, 3]  # a, b, c of a..e
    assert ds.images[1, :, 0, 0, 0].tolist() == [8, 9, 7]  # x, y, z


def test_missing_root_and_split(tmp_path: Path) -> None:
    assert_data_error(lambda: load_image_folder(tmp_path / "nowhere"), "nowhere", "does not exist")
    tree(tmp_path, {"train": {"a": 2, "b": 2}})
    assert_data_error(
        lambda: load_image_folder(tmp_path, "test"), "no 'test' folder", str(tmp_path / "test")
    )


def test_no_classes(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "stray.png").write_bytes(b"")
    assert_data_error(lambda: load_image_folder(tmp_path), "no class folders", "<class name>")


def test_empty_class_and_single_image(tmp_path: Path) -> None:
    tree(tmp_path, {"train": {"a": 2, "b": 2}})
    (tmp_path / "train" / "c").mkdir()
    (tmp_path / "train" / "c" / "labels.csv").write_text("x")
    assert_data_error(lambda: load_image_folder(tmp_path), str(tmp_path / "train" / "c"), "no images", ".png")  # fmt: skip
    (tmp_path / "train" / "c" / "labels.csv").unlink()
    write(tmp_path / "train" / "c" / "0.png", 1)
    assert_data_error(lambda: load_image_folder(tmp_path), str(tmp_path / "train" / "c"), "only 1 image", "at least 2")  # fmt: skip


def test_a_single_class(tmp_path: Path) -> None:
    tree(tmp_path, {"train": {"only": 3}})
    assert_data_error(lambda: load_image_folder(tmp_path), "only 1 class folder", "only")


def test_unreadable_image_names_the_file(tmp_path: Path) -> None:
    tree(tmp_path, {"train": {"a": 3, "b": 3}})
    bad = tmp_path / "train" / "b" / "01.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert_data_error(lambda: load_image_folder(tmp_path), str(bad), "cannot decode image")


def test_bad_arguments_are_value_errors(tmp_path: Path) -> None:
    tree(tmp_path, {"train": {"a": 2, "b": 2}})
    with pytest.raises(ValueError, match="channels"):
        load_image_folder(tmp_path, channels=2)
    with pytest.raises(ValueError, match="image_size"):
        load_image_folder(tmp_path, image_size=0)


# ---------------------------------------------------------------- the folder-* presets
QUICK = ["--set", "iterations=2", "--set", "val_every=2", "--set", "val_tasks=2",
         "--set", "eval_tasks=2", "--set", "eval_steps=2", "--set", "inner_steps=1",
         "--set", "filters=4", "--set", "image_size=16", "--set", "channels=1",
         "--set", "queries=2", "--set", "eval_queries=2", "--quiet"]  # fmt: skip


@pytest.fixture
def folders(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, classes in {"train": 6, "val": 5, "test": 5}.items():
        for c in range(classes):
            for i in range(4):
                pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
                write(tmp_path / "data" / split / f"class{c}" / f"{i}.png", pixels)
    return tmp_path / "data"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["folder-5w1s", "folder-5w5s"])
def test_folder_presets_run_end_to_end(tmp_path: Path, folders: Path, name: str) -> None:
    out = tmp_path / "run"
    shots = ["--set", "shots=1"]  # 5w5s needs 5 + 2 images per class; the fixture has 4
    assert main(["train", name, "--out", str(out), "--data-dir", str(folders), *QUICK, *shots]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["experiment"] == "folder" and result["steps"] == [0, 1, 2]
    assert set(result["results"]) == {"paper (1 query/class)", "15-query (2 query/class)"}


def one_line_error(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    # the error is the last line, and the only one that is not the "training ..." header
    assert code == 2 and err[-1].startswith("metagrad: error:"), err
    assert all(line.startswith("training ") for line in err[:-1]), err
    return err[-1]


def test_folder_preset_bad_input_is_one_line(tmp_path: Path, folders: Path, capsys) -> None:
    train = ["train", "folder-5w1s", *QUICK]
    err = one_line_error(capsys, [*train, "--out", str(tmp_path / "a"), "--data-dir", str(tmp_path / "missing")])  # fmt: skip
    assert "missing" in err and "does not exist" in err
    err = one_line_error(capsys, [*train, "--out", str(tmp_path / "b")])
    assert "--data-dir ROOT" in err
    err = one_line_error(capsys, [*train, "--out", str(tmp_path / "c"), "--data-dir", str(folders), "--set", "queries=15"])  # fmt: skip
    assert "4 images per class" in err and "queries=" in err
    err = one_line_error(capsys, [*train, "--out", str(tmp_path / "d"), "--data-dir", str(folders), "--set", "ways=7"])  # fmt: skip
    assert "6 classes" in err and "ways=6" in err
    err = one_line_error(capsys, [*train, "--out", str(tmp_path / "e"), "--data-dir", str(folders), "--set", "channels=2"])  # fmt: skip
    assert "channels" in err
