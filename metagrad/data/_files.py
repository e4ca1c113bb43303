"""Small shared helpers: cache directories, file hashing, atomic ``.npz`` writes."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np


def cache_dir_for(dataset: str, cache_dir: str | os.PathLike | None) -> Path:
    """``cache_dir`` if given, else ``$METAGRAD_CACHE/<dataset>``, else ``~/.cache/metagrad/<dataset>``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    root = os.environ.get("METAGRAD_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "metagrad"
    return base / dataset


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    """Write ``arrays`` to ``path`` via a temporary file and ``os.replace`` (safe under races)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_npz(path: Path) -> dict[str, np.ndarray] | None:
    """The arrays of a cache file, or ``None`` if it is absent or unreadable (then rebuilt)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except Exception:
        return None
