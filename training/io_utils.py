"""Crash-safe file writing shared by the concept file and the exporters.

A file is first written in full to a hidden temporary file in the destination folder, flushed to
disk, then moved over the destination with ``os.replace`` (atomic on POSIX and Windows). A reader
therefore sees either the old file or the complete new one, never half of it, and a failure
leaves the old file untouched and removes the temporary one.
"""
from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Mapping
from typing import Any
from pathlib import Path

import safetensors.torch
import torch

TEMP_SUFFIX = ".tmp"


def _temp_path(path: Path) -> Path:
    """A fresh hidden file next to ``path``; created here so that no one else takes the name."""
    for _ in range(100):
        candidate = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
        try:
            # 0o666 lets the umask decide the final permissions, as for any new file.
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return candidate
    raise OSError(f"could not create a temporary file next to {path}")


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable; folders cannot be opened this way on Windows, which is fine."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _prepare(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors that own their memory (safetensors refuses shared storage)."""
    out = {}
    seen: set[int] = set()
    for key, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"value of {key!r} is a {type(tensor).__name__}, not a torch.Tensor")
        t = tensor.detach().to("cpu").contiguous()
        storage = t.untyped_storage()
        if storage.nbytes() != t.numel() * t.element_size() or storage.data_ptr() in seen:
            t = t.clone()  # a view into a larger tensor, or one tensor under two keys: copy it
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def atomic_write_safetensors(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor],
                             metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``tensors`` (and string ``metadata``) as a safetensors file at ``path``, atomically.

    Tensors are saved contiguous, on the CPU, in their own dtype. Returns the final path.
    """
    path = Path(path)
    if metadata is not None:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise TypeError(f"safetensors metadata must map strings to strings; bad entries: {bad}")
    prepared = _prepare(tensors)

    def write(temp: Path) -> None:
        # Serialise in memory and write the bytes ourselves: safetensors' own save_file goes through
        # a second temporary file of its own that a killed process would leave behind.
        data = safetensors.torch.save(prepared, metadata=dict(metadata) if metadata else None)
        with open(temp, "wb") as handle:
            handle.write(data)

    return _replace_atomically(path, write)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, like :func:`atomic_write_safetensors`."""
    def write(temp: Path) -> None:
        with open(temp, "w", encoding="utf-8") as handle:
            handle.write(text)

    return _replace_atomically(Path(path), write)


def _replace_atomically(path: Path, write: Callable[[Path], Any]) -> Path:
    """Let ``write`` fill a temp file beside ``path``, fsync it, rename it over ``path``.

    Any failure (or interrupt) removes the temp file and leaves ``path`` as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_path(path)
    try:
        write(temp)
        _fsync_file(temp)
        os.replace(temp, path)
    except BaseException:
        try:
            temp.unlink()
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path
