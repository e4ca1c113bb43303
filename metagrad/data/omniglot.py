"""Omniglot (Lake et al. 2015) for few-shot classification: 1623 characters x 20 drawings.

Source: ``data_dir`` holds ``images_background.zip`` / ``images_evaluation.zip`` (read directly
with :mod:`zipfile`) or their extracted folders ``images_background/`` / ``images_evaluation/``
(members ``images_<part>/<Alphabet>/characterNN/<id>_<nn>.png``, 105x105 1-bit).

Checksums: a zip must have one of the known SHA-256 digests (:data:`SHA256`, the repack in
``shared/data/omniglot``) or the digest recorded in ``<zip>.sha256`` by :func:`download_omniglot`.
The official zips on GitHub are different files whose digests are not known offline, so a
download is instead verified structurally (it opens and holds 964 / 659 characters of 20
drawings) and its digest is then recorded. ``check_sha256=False`` accepts any copy that passes
the structural checks (which always run when the cache is built).

Preprocessing (once, then cached): each PNG is converted to ``L``, resized to 28x28 with Pillow
LANCZOS and inverted, as in the original MAML code (``1 - img / 255``), so strokes are 1 and the
background 0. (The original script resized the mode-``1`` PNGs directly, which Pillow silently
does with NEAREST; converting to ``L`` first gives the intended anti-aliased LANCZOS result.) It is stored as uint8 ``255 - pixel`` (exactly ``255 * (1 - img / 255)``) in
``<cache_dir>/omniglot28_<key>.npz`` with shape ``[1623, 20, 28, 28]`` and per-character
alphabet, character and part. The key hashes the zips' digests (or, for folders, the file list
with sizes and mtimes), so a changed source gets a new cache. ``cache_dir`` defaults to
``$METAGRAD_CACHE/omniglot`` or ``~/.cache/metagrad/omniglot``. Order: background characters
(sorted alphabet, then character), then evaluation: indices 0..963 are background, 964..1622
evaluation.

Split schemes (:func:`omniglot_split_indices`; every split comes back as sorted indices):

* ``"paper"`` (default): the protocol of the original MAML code (cbfinn/maml): shuffle all 1623
  characters with a fixed seed, the first 1100 are ``train``, the next 100 ``val`` and the last
  423 ``test``; ``trainval`` is the first 1200. The shuffle uses ``numpy.random.default_rng
  (split_seed)``, so the characters differ from the original's Python ``random.seed(1)`` draw.
* ``"background"``: ``test`` is the evaluation set (659), ``val`` 100 background characters
  chosen with ``default_rng(split_seed)``, ``train`` the other 864, ``trainval`` all 964.

Rotations are applied at sampling time by :class:`~metagrad.data.sampler.FewShotSampler`
(``rotation="per-task"`` as in the MAML code, or ``"classes"`` for 4x the classes).
"""

from __future__ import annotations

import hashlib
import io
import os
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ._files import cache_dir_for, load_npz, save_npz_atomic, sha256_file
from .errors import DataError
from .sampler import FewShotDataset

PARTS = ("background", "evaluation")
SHA256 = {
    "background": "d931c25d46ce8c541f33513e22b21eabb66e0ef680b1e72cfc10aa281d7eda37",
    "evaluation": "fcec9289cf2a2f190508fc4b48d1deb70261204ef7961c0d05e411b46553eeb8",
}
EXPECTED_CHARACTERS = {"background": 964, "evaluation": 659}
DRAWINGS = 20
SIZE = 28
URL = "https://github.com/brendenlake/omniglot/raw/master/python/images_{part}.zip"
SPLIT_SCHEMES = ("paper", "background")
_CACHE_VERSION = 1
_CACHE_FIELDS = {"images", "alphabet", "character", "part"}
_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, zipfile.BadZipFile, zlib.error)


@dataclass
class OmniglotArrays:
    """All 1623 characters: ``images`` uint8 ``[1623, 20, 28, 28]`` (255 = stroke) + metadata."""

    images: np.ndarray
    alphabet: list[str]
    character: list[str]
    part: list[str]  # "background" or "evaluation"

    @property
    def class_names(self) -> list[str]:
        return [f"{a}/{c}" for a, c in zip(self.alphabet, self.character, strict=True)]


def _oneline(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _locate(data_dir: Path, part: str) -> Path:
    """The zip of ``part`` if present, else its extracted folder."""
    zip_path, folder = data_dir / f"images_{part}.zip", data_dir / f"images_{part}"
    if zip_path.is_file():
        return zip_path
    if folder.is_dir():
        return folder
    raise DataError(
        f"{data_dir}: found neither {zip_path.name} nor {folder.name}/ "
        "(expected the Omniglot zips or their extracted folders)"
    )


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable zip, truncated or corrupt ({_oneline(e)})") from e


def _check_digest(path: Path, part: str) -> str:
    digest = sha256_file(path)
    accepted = {SHA256[part]}
    sidecar = path.with_name(path.name + ".sha256")
    if sidecar.is_file():
        accepted.update(sidecar.read_text().split()[:1])
    if digest not in accepted:
        raise DataError(
            f"{path}: wrong sha256, expected {SHA256[part]}, got {digest} "
            "(pass check_sha256=False to accept another copy)"
        )
    return digest


def _zip_listing(zf: zipfile.ZipFile, part: str) -> dict[tuple[str, str], list[str]]:
    listing: dict[tuple[str, str], list[str]] = {}
    prefix = f"images_{part}/"
    for name in zf.namelist():
        pieces = name[len(prefix) :].split("/") if name.startswith(prefix) else []
        if len(pieces) == 3:  # Alphabet/characterNN/file (file == "" for a directory entry)
            files = listing.setdefault((pieces[0], pieces[1]), [])
            if pieces[2].lower().endswith(".png"):
                files.append(name)
    return listing


def _dir_listing(folder: Path) -> dict[tuple[str, str], list[str]]:
    def subdirs(p: Path) -> list[Path]:
        return sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))

    return {
        (alpha.name, char.name): [
            str(f)
            for f in char.iterdir()
            if f.suffix.lower() == ".png" and not f.name.startswith(".")
        ]
        for alpha in subdirs(folder)
        for char in subdirs(alpha)
    }


def _check_listing(listing: dict[tuple[str, str], list[str]], part: str, where: Path) -> None:
    for (alpha, char), files in sorted(listing.items()):
        if len(files) != DRAWINGS:
            what = "has no images" if not files else f"has {len(files)} images, expected {DRAWINGS}"
            raise DataError(f"{where}: character folder images_{part}/{alpha}/{char} {what}")
    if len(listing) != EXPECTED_CHARACTERS[part]:
        raise DataError(
            f"{where}: found {len(listing)} characters, expected {EXPECTED_CHARACTERS[part]}"
        )


def _decode(data: bytes, name: str) -> np.ndarray:
    """28x28 uint8, 255 where the stroke is (``255 * (1 - img / 255)``)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            small = im.convert("L").resize((SIZE, SIZE), Image.Resampling.LANCZOS)
    except _READ_ERRORS as e:
        raise DataError(f"{name}: cannot decode PNG ({_oneline(e)})") from e
    return 255 - np.asarray(small, dtype=np.uint8)


def _decode_part(src: Path, part: str) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Validate and decode one part: ``[characters, 20, 28, 28]`` and the (alphabet, char) keys."""
    zf = _open_zip(src) if src.suffix == ".zip" else None
    try:
        listing = _zip_listing(zf, part) if zf else _dir_listing(src)
        _check_listing(listing, part, src)
        keys = sorted(listing)
        out = np.empty((len(keys), DRAWINGS, SIZE, SIZE), dtype=np.uint8)
        for i, key in enumerate(keys):
            for j, member in enumerate(sorted(listing[key])):
                name = f"{src}:{member}" if zf else member
                try:
                    data = zf.read(member) if zf else Path(member).read_bytes()
                except _READ_ERRORS as e:
                    raise DataError(f"{name}: cannot read ({_oneline(e)})") from e
                out[i, j] = _decode(data, name)
    finally:
        if zf:
            zf.close()
    return out, keys


def _source_key(src: Path, part: str, check_sha256: bool) -> str:
    if src.suffix == ".zip":
        _open_zip(src).close()  # a truncated or corrupt zip is reported as such, not as a digest
        return _check_digest(src, part) if check_sha256 else sha256_file(src)
    h = hashlib.sha256()
    for files in _dir_listing(src).values():
        for f in sorted(files):
            st = os.stat(f)
            h.update(f"{os.path.relpath(f, src)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


def read_omniglot(
    data_dir: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    *,
    check_sha256: bool = True,
    download: bool = False,
) -> OmniglotArrays:
    """All 1623 characters, preprocessed to 28x28 on the first call and cached afterwards."""
    data_dir = Path(data_dir).expanduser()
    if download and not all(
        (data_dir / f"images_{p}.zip").is_file() or (data_dir / f"images_{p}").is_dir()
        for p in PARTS
    ):
        download_omniglot(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"Omniglot data directory {data_dir} does not exist or is not a directory")
    sources = {part: _locate(data_dir, part) for part in PARTS}
    keys = [_source_key(sources[p], p, check_sha256) for p in PARTS]
    key = hashlib.sha256(f"v{_CACHE_VERSION}:{keys[0]}:{keys[1]}".encode()).hexdigest()[:16]
    cache_file = cache_dir_for("omniglot", cache_dir) / f"omniglot{SIZE}_{key}.npz"
    cached = load_npz(cache_file)
    shape = (sum(EXPECTED_CHARACTERS.values()), DRAWINGS, SIZE, SIZE)
    if cached is None or not _CACHE_FIELDS <= cached.keys() or cached["images"].shape != shape:
        decoded = [_decode_part(sources[p], p) for p in PARTS]
        cached = {
            "images": np.concatenate([imgs for imgs, _ in decoded]),
            "alphabet": np.array([a for _, ks in decoded for a, _ in ks]),
            "character": np.array([c for _, ks in decoded for _, c in ks]),
            "part": np.array([p for p, (_, ks) in zip(PARTS, decoded, strict=True) for _ in ks]),
        }
        save_npz_atomic(cache_file, **cached)
    return OmniglotArrays(
        images=cached["images"],
        alphabet=cached["alphabet"].tolist(),
        character=cached["character"].tolist(),
        part=cached["part"].tolist(),
    )


def omniglot_split_indices(scheme: str = "paper", seed: int = 1) -> dict[str, np.ndarray]:
    """Sorted character indices of ``train``, ``val``, ``test`` and ``trainval`` (see module doc)."""
    rng = np.random.default_rng(seed)
    n_background = EXPECTED_CHARACTERS["background"]
    total = n_background + EXPECTED_CHARACTERS["evaluation"]
    if scheme == "paper":
        perm = rng.permutation(total)
        splits = {"train": perm[:1100], "val": perm[1100:1200], "test": perm[1200:]}
        splits["trainval"] = perm[:1200]
    elif scheme == "background":
        perm = rng.permutation(n_background)
        splits = {"train": perm[100:], "val": perm[:100], "test": np.arange(n_background, total)}
        splits["trainval"] = np.arange(n_background)
    else:
        raise ValueError(f"split_scheme must be one of {SPLIT_SCHEMES}, got {scheme!r}")
    return {name: np.sort(idx) for name, idx in splits.items()}


def load_omniglot(
    data_dir: str | os.PathLike,
    split: str = "train",
    split_scheme: str = "paper",
    cache_dir: str | os.PathLike | None = None,
    *,
    split_seed: int = 1,
    check_sha256: bool = True,
    download: bool = False,
) -> FewShotDataset:
    """One split as ``images [classes, 20, 1, 28, 28]`` uint8 (255 = stroke) and class names.

    ``split`` is ``"train"``, ``"val"``, ``"test"`` or ``"trainval"``; ``dataset.sampler(rotation)``
    gives float32 tasks with strokes 1.0 and background 0.0.
    """
    splits = omniglot_split_indices(split_scheme, split_seed)
    if split not in splits:
        raise ValueError(f"split must be one of {sorted(splits)}, got {split!r}")
    arrays = read_omniglot(data_dir, cache_dir, check_sha256=check_sha256, download=download)
    idx = splits[split]
    names = arrays.class_names
    images = torch.from_numpy(arrays.images[idx]).unsqueeze(2)
    return FewShotDataset(images=images, class_names=[names[i] for i in idx])


def download_omniglot(data_dir: str | os.PathLike, force: bool = False) -> Path:
    """Fetch the two official zips into ``data_dir`` (only when asked; needs a network).

    Each download is checked structurally (opens, 964 / 659 characters of 20 drawings) before it
    is moved into place, and its SHA-256 is written to ``<zip>.sha256`` so later loads accept it.
    """
    data_dir = Path(data_dir).expanduser()
    data_dir.mkdir(parents=True, exist_ok=True)
    for part in PARTS:
        dest = data_dir / f"images_{part}.zip"
        if dest.is_file() and not force:
            continue
        url, tmp = URL.format(part=part), dest.with_name(dest.name + ".part")
        try:
            urllib.request.urlretrieve(url, tmp)
            with _open_zip(tmp) as zf:
                _check_listing(_zip_listing(zf, part), part, tmp)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise DataError(f"download of {url} to {tmp} failed ({_oneline(e)})") from e
        except DataError:
            tmp.unlink(missing_ok=True)
            raise
        digest = sha256_file(tmp)
        os.replace(tmp, dest)
        dest.with_name(dest.name + ".sha256").write_text(f"{digest}  {dest.name}\n")
    return data_dir
