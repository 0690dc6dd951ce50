"""Files: atomic writes (a temp file in the same folder, then a rename: no partial file is ever left) and
cache entries that carry a format version, their key and a checksum."""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import warnings
from pathlib import Path

import torch

CACHE_FORMAT, CACHE_VERSION = "fewstep.cache", 2


class FewstepWarning(UserWarning):
    """Something legal but suspicious, or a cache that was not used (the result is recomputed)."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` via a temp file and rename, so no partial file is ever left. The file
    gets the usual permissions (0666 less the umask), not the temp file's 0600."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {path}: it is a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _checksum(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def save_cached(path: Path, tensor: torch.Tensor, key: str) -> bool:
    """Write a cache entry (format, version, key, checksum, tensor). A cache that cannot be written (a
    read-only folder, a file where the folder should be) is a warning, not an error: returns False."""
    buf = io.BytesIO()
    t = tensor.detach().cpu()
    torch.save({"format": CACHE_FORMAT, "version": CACHE_VERSION, "key": key, "sha256": _checksum(t), "tensor": t}, buf)
    try:
        write_atomic(path, buf.getvalue())
    except OSError as e:
        warnings.warn(f"could not write the cache file {path} ({type(e).__name__}: {e}); the result is kept in "
                      "memory only", FewstepWarning, stacklevel=3)
        return False
    return True


def load_cached(path: Path, key: str, shape: tuple) -> torch.Tensor | None:
    """The cached tensor of ``shape`` for ``key``, or None: no file, or (with a warning naming the file) a
    file that is not a whole entry of this format, version, key and checksum."""
    if not path.is_file():
        return None
    try:
        d = torch.load(path, weights_only=True)
        problem = _problem(d, key, shape)
    except Exception as e:  # torch raises several types for a truncated or foreign file
        problem = f"unreadable ({type(e).__name__}: {e})"
    if problem is None:
        return d["tensor"]
    warnings.warn(f"cache file {path}: {problem}; recomputing it", FewstepWarning, stacklevel=3)
    return None


def _problem(d, key: str, shape: tuple) -> str | None:
    """What is wrong with a loaded cache entry, or None."""
    if not isinstance(d, dict) or d.get("format") != CACHE_FORMAT or not isinstance(d.get("tensor"), torch.Tensor):
        return "not a fewstep cache file"
    if d.get("version") != CACHE_VERSION:
        return f"cache format version {d.get('version')!r}, this fewstep writes {CACHE_VERSION}"
    if d.get("key") != key:
        return "made for another key"
    if tuple(d["tensor"].shape) != tuple(shape):
        return f"shape {tuple(d['tensor'].shape)}, expected {tuple(shape)}"
    if _checksum(d["tensor"]) != d.get("sha256"):
        return "checksum mismatch (the file was changed or damaged)"
    return None
