"""Omniglot loader (real data from ../shared/data/omniglot), splits, task sampler, bad data."""

from __future__ import annotations

import io
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metagrad.data import (
    DataError,
    FewShotSampler,
    load_omniglot,
    omniglot_split_indices,
    read_omniglot,
)
from metagrad.data import omniglot as om

# end-to-end runs: `pytest -m "not slow"` (make test-fast) leaves them out
pytestmark = pytest.mark.slow

OMNIGLOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "omniglot"
BG_ZIP, EV_ZIP = OMNIGLOT / "images_background.zip", OMNIGLOT / "images_evaluation.zip"
needs_data = pytest.mark.skipif(
    not (BG_ZIP.is_file() and EV_ZIP.is_file()),
    reason=f"real Omniglot zips not found in {OMNIGLOT}",
)


@pytest.fixture(scope="session")
def omniglot_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("omniglot_cache")


@pytest.fixture(scope="session")
def arrays(omniglot_cache: Path) -> om.OmniglotArrays:
    if not (BG_ZIP.is_file() and EV_ZIP.is_file()):
        pytest.skip(f"real Omniglot zips not found in {OMNIGLOT}")
    return read_omniglot(OMNIGLOT, cache_dir=omniglot_cache)  # the one full preprocessing


# --------------------------------------------------------------------------- real data


@needs_data
def test_counts_and_order(arrays: om.OmniglotArrays) -> None:
    assert arrays.images.shape == (1623, 20, 28, 28) and arrays.images.dtype == np.uint8
    assert arrays.part == ["background"] * 964 + ["evaluation"] * 659
    for lo, hi in [(0, 964), (964, 1623)]:
        keys = list(zip(arrays.alphabet[lo:hi], arrays.character[lo:hi], strict=True))
        assert keys == sorted(keys) and len(set(keys)) == hi - lo
    assert (
        len({a for a, p in zip(arrays.alphabet, arrays.part, strict=True) if p == "background"})
        == 30
    )
    assert len(set(arrays.alphabet[964:])) == 20


@needs_data
def test_pixel_values(arrays: om.OmniglotArrays) -> None:
    x = torch.from_numpy(arrays.images).float() / 255
    assert x.min() == 0.0 and x.max() == 1.0
    assert (x == 0).float().mean() > 0.6  # mostly background (0) ...
    assert (x.amax(dim=(-2, -1)) > 0.5).all()  # ... and no drawing is blank
    # Independent reference: first drawing of the first character, straight from the zip.
    with zipfile.ZipFile(BG_ZIP) as zf:
        raw = zf.read("images_background/Alphabet_of_the_Magi/character01/0709_01.png")
    ref = Image.open(io.BytesIO(raw)).convert("L").resize((28, 28), Image.Resampling.LANCZOS)
    assert np.array_equal(255 - np.asarray(ref), arrays.images[0, 0])
    assert np.allclose(1 - np.asarray(ref) / 255, arrays.images[0, 0] / 255, rtol=0, atol=1e-12)


@needs_data
def test_cache_is_reused(omniglot_cache: Path, arrays: om.OmniglotArrays, monkeypatch) -> None:
    assert len(list(omniglot_cache.glob("omniglot28_*.npz"))) == 1

    def fail(*args: object) -> None:
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(om, "_decode_part", fail)
    again = read_omniglot(OMNIGLOT, cache_dir=omniglot_cache)
    assert np.array_equal(again.images, arrays.images) and again.alphabet == arrays.alphabet


@needs_data
def test_env_var_cache_dir(
    tmp_path: Path, omniglot_cache: Path, arrays: om.OmniglotArrays, monkeypatch
) -> None:
    monkeypatch.setenv("METAGRAD_CACHE", str(tmp_path))
    shutil.copytree(omniglot_cache, tmp_path / "omniglot")
    monkeypatch.setattr(om, "_decode_part", None)  # must come from $METAGRAD_CACHE/omniglot
    assert read_omniglot(OMNIGLOT).images.shape == (1623, 20, 28, 28)


@needs_data
def test_load_omniglot_splits(omniglot_cache: Path, arrays: om.OmniglotArrays) -> None:
    sizes = {"train": 1100, "val": 100, "test": 423, "trainval": 1200}
    for split, n in sizes.items():
        ds = load_omniglot(OMNIGLOT, split, cache_dir=omniglot_cache)
        assert ds.images.shape == (n, 20, 1, 28, 28) and len(ds.class_names) == n
    ds = load_omniglot(OMNIGLOT, "test", "background", cache_dir=omniglot_cache)
    assert len(ds) == 659 and ds.class_names[0] == "Angelic/character01"
    batch = ds.sampler("per-task").sample(4, 5, 1, 15, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (4, 5, 1, 28, 28) and batch.query_x.shape == (4, 75, 1, 28, 28)
    assert batch.support_x.dtype == torch.float32 and batch.support_x.max() == 1.0
    assert (
        load_omniglot(OMNIGLOT, "trainval", cache_dir=omniglot_cache).sampler("classes").num_classes
        == 4800
    )


# --------------------------------------------------------------------------- splits


def test_paper_split() -> None:
    s = omniglot_split_indices("paper", seed=1)
    assert {k: len(v) for k, v in s.items()} == {
        "train": 1100,
        "val": 100,
        "test": 423,
        "trainval": 1200,
    }
    assert not set(s["train"]) & set(s["val"]) and not set(s["trainval"]) & set(s["test"])
    assert set(s["train"]) | set(s["val"]) == set(s["trainval"])
    assert set(s["trainval"]) | set(s["test"]) == set(range(1623))
    # the shuffle mixes background and evaluation characters, as the original MAML code did
    assert (s["test"] < 964).any() and (s["test"] >= 964).any()
    again, other = omniglot_split_indices("paper", 1), omniglot_split_indices("paper", 2)
    assert all(np.array_equal(s[k], again[k]) for k in s)
    assert not np.array_equal(s["test"], other["test"])


def test_background_split() -> None:
    s = omniglot_split_indices("background")
    assert {k: len(v) for k, v in s.items()} == {
        "train": 864,
        "val": 100,
        "test": 659,
        "trainval": 964,
    }
    assert not set(s["train"]) & set(s["val"])
    assert set(s["train"]) | set(s["val"]) == set(range(964))
    assert np.array_equal(s["test"], np.arange(964, 1623))
    assert np.array_equal(s["val"], omniglot_split_indices("background")["val"])
    with pytest.raises(ValueError, match="split_scheme"):
        omniglot_split_indices("nope")


# --------------------------------------------------------------------------- sampler


def marked_images(classes: int = 12, per_class: int = 8, size: int = 5) -> torch.Tensor:
    """Image (c, d) is zero except pixel (0, 1) = 1 + c * per_class + d, a rotation-revealing mark."""
    x = torch.zeros(classes, per_class, 1, size, size)
    x[:, :, 0, 0, 1] = 1 + torch.arange(classes * per_class, dtype=torch.float32).view(
        classes, per_class
    )
    return x


def decode_marks(
    x: torch.Tensor, per_class: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(class, drawing, quarter turns) of each marked image in ``x [..., 1, H, W]``."""
    flat = x.flatten(-3)
    value, pos = flat.max(dim=-1)
    mark = torch.zeros(x.shape[-3:])
    mark[0, 0, 1] = 1
    positions = [torch.rot90(mark, k, dims=(-2, -1)).flatten().argmax().item() for k in range(4)]
    turns = torch.full_like(pos, -1)
    for k, p in enumerate(positions):
        turns[pos == p] = k
    ident = value.long() - 1
    return ident // per_class, ident % per_class, turns


@pytest.mark.parametrize("rotation", ["none", "per-task", "classes"])
def test_sampler_structure(rotation: str) -> None:
    images = marked_images()
    ways, shots, queries, tasks = 5, 2, 3, 16
    batch = FewShotSampler(images, rotation).sample(
        tasks, ways, shots, queries, torch.Generator().manual_seed(0)
    )
    sx, sy, qx, qy = batch
    assert sx.shape == (tasks, ways * shots, 1, 5, 5) and qx.shape == (
        tasks,
        ways * queries,
        1,
        5,
        5,
    )
    assert sy.shape == (tasks, ways * shots) and qy.shape == (tasks, ways * queries)
    assert sx.dtype == qx.dtype == torch.float32 and sy.dtype == qy.dtype == torch.int64
    for y, n in [(sy, shots), (qy, queries)]:
        assert all((row.bincount(minlength=ways) == n).all() for row in y)
    sc, sd, sk = decode_marks(sx, 8)
    qc, qd, qk = decode_marks(qx, 8)
    assert (sk >= 0).all() and (qk >= 0).all()
    for t in range(tasks):
        per_label = []
        for label in range(ways):
            s, q = sy[t] == label, qy[t] == label
            cls = torch.cat([sc[t][s], qc[t][q]])
            assert (cls == cls[0]).all()  # one class per label
            draws = torch.cat([sd[t][s], qd[t][q]])
            assert len(set(draws.tolist())) == shots + queries  # support/query drawings disjoint
            k = torch.cat([sk[t][s], qk[t][q]])
            assert (k == k[0]).all()  # a class's support and query images share the rotation
            per_label.append((cls[0].item(), k[0].item()))
        # distinct classes per task (a rotated copy is a different class only in "classes" mode)
        key = per_label if rotation == "classes" else [c for c, _ in per_label]
        assert len(set(key)) == ways
    turns = torch.cat([sk.flatten(), qk.flatten()])
    if rotation == "none":
        assert (turns == 0).all()
    else:
        assert set(turns.tolist()) == {0, 1, 2, 3}
    # labels are randomly assigned: label 0 is not always the smallest class
    first = [sc[t][sy[t] == 0][0].item() for t in range(tasks)]
    assert len(set(first)) > 1


def test_sampler_determinism() -> None:
    sampler = FewShotSampler(marked_images(), "per-task")

    def draw(seed: int):
        return sampler.sample(8, 5, 1, 2, torch.Generator().manual_seed(seed))

    a, b, c = draw(3), draw(3), draw(4)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a.support_x, c.support_x)


def test_rotation_classes_mode() -> None:
    images = marked_images(classes=3, per_class=4)
    sampler = FewShotSampler(images, "classes")
    assert sampler.num_classes == 12 and FewShotSampler(images).num_classes == 3
    for v in range(12):
        expected = torch.rot90(images[v % 3], v // 3, dims=(-2, -1))
        assert torch.equal(sampler.class_images(v), expected)
    # with 12 ways every virtual class appears once: all 4 rotations of all 3 classes
    sx, sy, _, _ = sampler.sample(2, 12, 1, 0, torch.Generator().manual_seed(0))
    c, _, k = decode_marks(sx, 4)
    assert all(
        sorted(zip(c[t].tolist(), k[t].tolist(), strict=True))
        == [(i, j) for i in range(3) for j in range(4)]
        for t in range(2)
    )


def test_sampler_uint8_normalisation_and_errors() -> None:
    images = torch.randint(0, 256, (6, 5, 3, 4, 4), dtype=torch.uint8)
    sx, sy, qx, _ = FewShotSampler(images).sample(2, 3, 2, 1, torch.Generator().manual_seed(0))
    c, d = sx[0, 0], images.float() / 255
    assert sx.dtype == torch.float32 and any(
        torch.equal(c, d[i, j]) for i in range(6) for j in range(5)
    )
    with pytest.raises(ValueError, match="ways"):
        FewShotSampler(images).sample(1, 7, 1, 1)
    with pytest.raises(ValueError, match="per class"):
        FewShotSampler(images).sample(1, 2, 3, 3)
    with pytest.raises(ValueError, match="square"):
        FewShotSampler(torch.zeros(2, 2, 1, 3, 4), "per-task")
    with pytest.raises(ValueError, match="rotation"):
        FewShotSampler(images, "random")


# --------------------------------------------------------------------------- bad data


def png_bytes(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.random((105, 105)) > 0.1).convert("1")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_part_zip(path: Path, part: str, chars: dict[str, list[bytes]]) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for char, pngs in chars.items():
            zf.writestr(f"images_{part}/Alpha/{char}/", b"")
            for i, data in enumerate(pngs, 1):
                zf.writestr(f"images_{part}/Alpha/{char}/0001_{i:02d}.png", data)


def assert_data_error(fn, *fragments: str) -> str:
    with pytest.raises(DataError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg, msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


def test_missing_data_dir(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    assert_data_error(lambda: read_omniglot(missing, tmp_path), str(missing), "does not exist")


def test_neither_zips_nor_folders(tmp_path: Path) -> None:
    assert_data_error(
        lambda: read_omniglot(tmp_path, tmp_path / "c"),
        str(tmp_path),
        "images_background.zip",
        "images_background/",
    )


@needs_data
@pytest.mark.parametrize("damage", ["truncated", "random bytes"])
def test_corrupt_zip(tmp_path: Path, damage: str) -> None:
    bad = tmp_path / "images_background.zip"
    if damage == "truncated":
        bad.write_bytes(BG_ZIP.read_bytes()[: BG_ZIP.stat().st_size // 2])
    else:
        bad.write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "images_evaluation.zip").symlink_to(EV_ZIP)
    assert_data_error(
        lambda: read_omniglot(tmp_path, tmp_path / "c"), str(bad), "truncated or corrupt"
    )


@needs_data
def test_wrong_checksum(tmp_path: Path) -> None:
    shutil.copyfile(EV_ZIP, tmp_path / "images_evaluation.zip")
    (tmp_path / "images_background.zip").symlink_to(BG_ZIP)
    with zipfile.ZipFile(tmp_path / "images_evaluation.zip", "a") as zf:
        zf.comment = b"modified"  # still a valid zip, different bytes
    assert_data_error(
        lambda: read_omniglot(tmp_path, tmp_path / "c"),
        "images_evaluation.zip",
        "wrong sha256",
        om.SHA256["evaluation"],
    )


def test_empty_character_folder(tmp_path: Path) -> None:
    (tmp_path / "images_background" / "Alpha" / "character01").mkdir(parents=True)
    (tmp_path / "images_evaluation").mkdir()
    assert_data_error(
        lambda: read_omniglot(tmp_path, tmp_path / "c"),
        str(tmp_path / "images_background"),
        "Alpha/character01 has no images",
    )


def test_wrong_drawing_count_in_zip(tmp_path: Path) -> None:
    write_part_zip(
        tmp_path / "images_background.zip", "background", {"character01": [png_bytes()] * 19}
    )
    write_part_zip(tmp_path / "images_evaluation.zip", "evaluation", {})
    assert_data_error(
        lambda: read_omniglot(tmp_path, tmp_path / "c", check_sha256=False),
        "images_background.zip",
        "character01 has 19 images, expected 20",
    )
    # and with the default strict checksum, a foreign zip is refused first
    assert_data_error(lambda: read_omniglot(tmp_path, tmp_path / "c"), "wrong sha256")


def test_wrong_character_count(tmp_path: Path) -> None:
    write_part_zip(
        tmp_path / "images_background.zip", "background", {"character01": [png_bytes()] * 20}
    )
    write_part_zip(tmp_path / "images_evaluation.zip", "evaluation", {})
    assert_data_error(
        lambda: read_omniglot(tmp_path, tmp_path / "c", check_sha256=False),
        "images_background.zip",
        "found 1 characters, expected 964",
    )


def test_small_fixture_and_unreadable_png(tmp_path: Path, monkeypatch) -> None:
    """With the expected counts patched to 1+1 characters, a tiny fixture exercises the full path."""
    monkeypatch.setattr(om, "EXPECTED_CHARACTERS", {"background": 1, "evaluation": 1})
    pngs = [png_bytes(i) for i in range(20)]
    write_part_zip(tmp_path / "images_background.zip", "background", {"character01": pngs})
    ev = tmp_path / "images_evaluation" / "Beta" / "character01"
    ev.mkdir(parents=True)
    for i, data in enumerate(pngs, 1):
        (ev / f"0002_{i:02d}.png").write_bytes(data)
    arrays = read_omniglot(tmp_path, tmp_path / "c", check_sha256=False)
    assert arrays.images.shape == (2, 20, 28, 28) and arrays.part == ["background", "evaluation"]
    assert np.array_equal(arrays.images[0], arrays.images[1])  # same PNGs via zip and folder
    # an undecodable PNG is reported with its member name
    bad = pngs[:3] + [b"not a png"] + pngs[4:]
    write_part_zip(tmp_path / "images_background.zip", "background", {"character01": bad})
    assert_data_error(
        lambda: read_omniglot(tmp_path, tmp_path / "c", check_sha256=False),
        "images_background.zip:images_background/Alpha/character01/0001_04.png",
        "cannot decode PNG",
    )
    # the same through the folder layout, now failing in the evaluation part
    (tmp_path / "images_background.zip").unlink()
    shutil.copytree(tmp_path / "images_evaluation", tmp_path / "images_background")
    (ev / "0002_05.png").write_bytes(b"\x89PNG broken")
    assert_data_error(
        lambda: read_omniglot(tmp_path, tmp_path / "c"),
        str(ev / "0002_05.png"),
        "cannot decode PNG",
    )
