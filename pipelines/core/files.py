"""Content digests and all-or-nothing writes: a reader never sees a half-written file or folder."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Callable


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (weights can be many GiB)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def temp_sibling(target: Path) -> Path:
    """A fresh hidden path beside `target`, on the same filesystem so the final rename is atomic."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    elif tmp.exists():
        tmp.unlink()
    return tmp


def write_dir_atomic(target: Path, fill: Callable[[Path], None], *, exist_ok: bool = False) -> Path:
    """Fill a temp sibling folder, then rename it to `target`. With exist_ok, a target that
    exists (or appears meanwhile: another process won the race, and its folder is complete too)
    is kept; otherwise an existing target is an error the caller reports."""
    target = Path(target)
    if target.exists():
        if exist_ok:
            return target
        raise FileExistsError(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(target)
    tmp.mkdir()
    try:
        fill(tmp)
        os.rename(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if exist_ok and target.is_dir():
            return target
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def write_text_atomic(target: Path, text: str) -> Path:
    """Write a file through a temp sibling and rename (replacing any previous version)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(target)
    try:
        tmp.write_text(text)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target
