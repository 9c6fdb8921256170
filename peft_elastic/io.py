"""Writing files so that a reader never sees a half-written one: stage in a temporary folder, verify, then rename."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_directory(save_directory: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `save_directory`; when the block ends without an error, move each file
    written there into `save_directory` (created if needed) with an atomic rename, replacing files of the same name.
    On an error nothing in `save_directory` changes and the temporary folder is removed."""
    target = Path(save_directory)
    if target.exists() and not target.is_dir():
        raise ValueError(f"save_directory {str(target)!r} exists and is not a directory.")
    staging = _beside(target)
    try:
        yield staging
        target.mkdir(exist_ok=True)
        for path in sorted(staging.rglob("*")):
            destination = target / path.relative_to(staging)
            if path.is_dir():
                destination.mkdir(exist_ok=True)
            else:
                os.replace(path, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def replaced_directory(directory: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `directory`; when the block ends without an error it becomes
    `directory`, replacing a previous one whole (a folder of files that belong together: nothing of the old one is
    kept). On an error nothing changes and the temporary folder is removed."""
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{str(target)!r} exists and is not a directory.")
    staging = _beside(target)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)


def _beside(target: Path) -> Path:
    """A new empty folder next to `target` (same file system, so a rename moves it into place)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
