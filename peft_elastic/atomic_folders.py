"""Writing files so that a reader never sees a half-written one: stage in a temporary folder, verify, then rename."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_directory(save_directory: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `save_directory`; when the block ends without an error, move each file
    written there into `save_directory` (created if needed) with an atomic rename, replacing files of the same name
    and keeping the others. For adding files to a folder (a report next to other outputs); a folder of files that
    belong together is written with `export_directory` / `replaced_directory`. On an error nothing in
    `save_directory` changes and the temporary folder is removed."""
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
    if not target.exists():
        staging.rename(target)
        return
    old = _name_beside(target, ".old")
    target.rename(old)  # the old folder stays whole until the new one is in place
    try:
        staging.rename(target)
    except BaseException:
        old.rename(target)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def export_directory(save_directory: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """`replaced_directory(save_directory)` for a library export: a new or empty `save_directory` is written, a
    non-empty one is refused unless `overwrite` (then replaced whole, only once the block has succeeded)."""
    target = check_export_target(save_directory, overwrite)
    with replaced_directory(target) as staging:
        yield staging


def check_export_target(save_directory: str | os.PathLike, overwrite: bool = False) -> Path:
    """`save_directory` as a Path if `export_directory` may write it (call it before expensive work); a file, or a
    non-empty folder without `overwrite`, raises ValueError naming what it holds."""
    target = Path(save_directory)
    if target.exists() and not target.is_dir():
        raise ValueError(f"save_directory {str(target)!r} exists and is not a directory.")
    if not overwrite and target.is_dir() and any(target.iterdir()):
        held = sorted(path.name for path in target.iterdir())
        raise ValueError(
            f"save_directory {str(target)!r} is not empty (it holds {', '.join(held[:3])}"
            f"{', ...' if len(held) > 3 else ''}); choose another folder, or pass overwrite=True to replace it whole."
        )
    return target


def _beside(target: Path) -> Path:
    """A new empty folder next to `target` (same file system, so a rename moves it into place), with the permissions
    a folder made by `mkdir` gets (not `mkdtemp`'s owner-only ones)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            path = _name_beside(target, ".tmp")
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _name_beside(target: Path, suffix: str) -> Path:
    """An unused hidden name next to `target`."""
    while True:
        path = target.parent / f".{target.name}.{secrets.token_hex(4)}{suffix}"
        if not path.exists():
            return path
