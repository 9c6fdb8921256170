"""The sparsity mask of a quantized checkpoint, stored bit-packed next to it (`sparsity_mask.safetensors`).

GPTQ's error feedback fills pruned weights, so the pattern of the sparse float model cannot be read back from the
quantized one: it is recorded before quantizing and kept with the checkpoint. One uint8 tensor (out × ceil(in / 8))
per quantized linear layer, keyed by the layer's module name; the file's metadata holds each layer's `in`.

Both ways hold one layer's mask at a time, whatever the depth: `SparsityMaskWriter` appends each mask to the file as it
comes, and `load_sparsity_mask` reads a layer's mask from the file when it is asked for.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch

from .packing import pack_mask, unpack_mask

MASK_FILE = "sparsity_mask.safetensors"
_FORMAT = "peft_elastic.sparsity_mask.v1"


def _mask_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path / MASK_FILE if path.is_dir() else path


class SparsityMaskWriter:
    """Write a `sparsity_mask.safetensors` one layer at a time: `add(name, mask)` packs a bool (out × in) mask and
    appends it to a temporary file beside `path`; leaving the `with` block without an error writes the safetensors
    header (names, shapes, offsets, each layer's `in`) and then the data into `path`."""

    def __init__(self, path: str | os.PathLike):
        self.path = _mask_path(path)
        self._entries: dict[str, dict] = {}
        self._columns: dict[str, int] = {}

    def __enter__(self) -> SparsityMaskWriter:
        self._data = tempfile.TemporaryFile(dir=self.path.parent, prefix=".sparsity_mask_")
        return self

    def add(self, name: str, mask: torch.Tensor) -> None:
        if mask.dtype != torch.bool or mask.dim() != 2:
            raise ValueError(
                f"mask {name!r} must be a 2-D bool tensor (out × in), got {mask.dtype} {tuple(mask.shape)}"
            )
        if name in self._entries:
            raise ValueError(f"mask {name!r} was given twice; each module has one mask.")
        packed = pack_mask(mask.cpu()).contiguous()  # (out, ceil(in / 8)) uint8
        start = self._data.tell()
        self._data.write(packed.numpy().data)
        self._entries[name] = {"dtype": "U8", "shape": list(packed.shape), "data_offsets": [start, self._data.tell()]}
        self._columns[name] = mask.shape[1]

    def __exit__(self, error_type, error, traceback) -> None:
        try:
            if error_type is None:
                metadata = {"format": _FORMAT, "in_features": json.dumps(self._columns)}
                header = json.dumps({"__metadata__": metadata, **self._entries}, separators=(",", ":")).encode()
                header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors writes it
                self._data.seek(0)
                with open(self.path, "wb") as out:
                    out.write(struct.pack("<Q", len(header)))
                    out.write(header)
                    shutil.copyfileobj(self._data, out)
        finally:
            self._data.close()


def save_sparsity_mask(
    masks: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], path: str | os.PathLike
) -> None:
    """Write `{module name: bool (out × in) mask of the weights kept}` (a mapping, or `(name, mask)` pairs) to `path`
    (a file, or a directory to hold `sparsity_mask.safetensors`), taking one mask at a time from `masks`."""
    with SparsityMaskWriter(path) as writer:
        for name, mask in masks.items() if isinstance(masks, Mapping) else masks:
            writer.add(name, mask)


class SparsityMaskFile(Mapping[str, torch.Tensor]):
    """The masks of a `sparsity_mask.safetensors`, read on access: `masks[name]` is that layer's bool (out × in) mask,
    read from the file and unpacked when asked for. Only the names and in-features are held; each access opens the
    file for that layer alone (a handle kept open would keep every page it had read mapped in memory). Raises if the
    file is changed or removed after it was opened."""

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        self.path = _mask_path(path)
        if not self.path.is_file():
            raise FileNotFoundError(
                f"No sparsity mask at {str(self.path)!r}: quantize_gptq writes {MASK_FILE} next to the checkpoint of "
                "a sparse model; quantize the sparse float model with peft_elastic.quantize_gptq to get one."
            )
        self._stamp = self._stat()
        with safe_open(str(self.path), "pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != _FORMAT:
                raise ValueError(
                    f"{str(self.path)!r} is not a peft_elastic sparsity mask (format {metadata.get('format')!r})."
                )
            columns = json.loads(metadata["in_features"])
            self._columns = {name: int(columns[name]) for name in handle.keys()}

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return None
        return stat.st_ino, stat.st_size, stat.st_mtime_ns

    def changed(self) -> bool:
        """Whether the file was replaced, written or removed since it was opened (its inode, size or time changed)."""
        return self._stat() != self._stamp

    def packed(self, name: str) -> torch.Tensor:
        """The bit-packed mask of `name`: uint8 (out × ceil(in / 8)), bit `j % 8` of byte `j // 8` is input `j`."""
        from safetensors import safe_open

        if name not in self._columns:
            raise KeyError(name)
        if self.changed():
            raise RuntimeError(
                f"The sparsity mask {str(self.path)!r} was {'changed' if self.path.exists() else 'removed'} after it "
                "was opened; its masks are read from the file when a layer asks for one. Load it again."
            )
        with safe_open(str(self.path), "pt") as handle:
            return handle.get_tensor(name)

    def __getitem__(self, name: str) -> torch.Tensor:
        return unpack_mask(self.packed(name), self._columns[name])

    def __contains__(self, name: object) -> bool:  # without reading the mask, as Mapping's would
        return name in self._columns

    def __iter__(self) -> Iterator[str]:
        return iter(self._columns)

    def __len__(self) -> int:
        return len(self._columns)

    def __repr__(self) -> str:
        return f"SparsityMaskFile({str(self.path)!r}, {len(self)} layers)"


def load_sparsity_mask(path: str | os.PathLike) -> SparsityMaskFile:
    """`{module name: bool (out × in) mask}` from a file written by `save_sparsity_mask` (or its directory): a mapping
    that reads one layer's mask from the file per access (`dict(...)` of it holds them all)."""
    return SparsityMaskFile(path)


def find_mask_file(model) -> tuple[Path | None, str]:
    """The `sparsity_mask.safetensors` of the checkpoint `model` was loaded from (a local folder, or a hub model's
    files from the cache, or downloaded if online), or None; and that folder or id, as the model names it."""
    from transformers.utils import cached_file

    config = getattr(model, "config", None)
    folder = getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", "") or ""
    try:
        found = cached_file(folder, MASK_FILE, _raise_exceptions_for_missing_entries=False) if folder else None
    except OSError:
        found = None
    path = Path(found) if found else Path(folder) / MASK_FILE
    return (path if folder and path.is_file() else None), str(folder)
