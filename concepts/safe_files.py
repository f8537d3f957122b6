"""Safe file writing shared by every writer of the pack: names, targets, atomic all-or-nothing writes.

A file is first written in full to a hidden temporary file in the destination folder, flushed to
disk, then moved over the destination (atomic on POSIX and Windows). A reader therefore sees either
the old file or the complete new one, never half of it, and a failure leaves the old file untouched
and removes the temporary one. Several files written together (Export: a LoRA and one embedding
per trigger) are all-or-nothing: every name and target is checked first, every file is written to
its temporary file, and only then are they moved into place; a failure while moving puts back
what was there before.

Nothing is replaced unless the caller says ``overwrite``; without it a target that exists is
refused before anything is written (and a file that appears meanwhile is never replaced: the
move itself refuses to replace it).
"""
from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import stat
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

TEMP_SUFFIX = ".tmp"
MAX_NAME_BYTES = 200

Writer = Callable[[Path], Any]  # fills the temporary file it is given

# Characters that break file names on some system or the prompt syntax around `embedding:NAME`.
_UNSAFE_CHARS = re.compile(r"[\\/:*?\"<>|(),\x00-\x1f\x7f]|\s")
# Device names Windows reserves in every folder, whatever the extension (CON.txt is the console):
# the plain list, the superscript-digit ports Windows also accepts, and the console pseudo-files.
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$", "CLOCK$",
                     *(f"{port}{digit}" for port in ("COM", "LPT") for digit in "0123456789¹²³")}
# Unicode categories a file name never needs and that hide what it says: controls, format
# characters (bidi overrides, zero-width joiners), surrogates, private use, unassigned, separators.
_INVISIBLE_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"}

TRIGGER_ADVICE = "Rename the trigger (letters, digits, '_', '-' and single dots are safe)"
NAME_ADVICE = "Use letters, digits, '_', '-' and single dots only (no folders)"


def is_reserved_device_name(stem: str) -> bool:
    """Whether Windows treats ``stem`` (before its first dot, any case) as a device, not a file."""
    return stem.split(".")[0].rstrip(" ").upper() in _WINDOWS_RESERVED


def check_file_stem(name: str, what: str = "an embedding file name",
                    advice: str = TRIGGER_ADVICE) -> str:
    """Refuse names that are not a safe file name on every system (no folders, no '..'); returns it.

    ``what`` names the input in the message, ``advice`` says what to do.
    """
    if not isinstance(name, str):
        raise ValueError(f"{what} must be text, got a {type(name).__name__}. {advice}")
    problem = None
    invisible = [c for c in name if unicodedata.category(c) in _INVISIBLE_CATEGORIES]
    if not name:
        problem = "it is empty"
    elif name.startswith("."):
        problem = "it starts with a dot"
    elif ".." in name:
        problem = "it contains '..'"
    elif _UNSAFE_CHARS.search(name):
        problem = ("it contains a path separator, a space or one of : * ? \" < > | ( ) , "
                   "or a control character")
    elif invisible:
        problem = (f"it contains an invisible or direction-changing character "
                   f"(U+{ord(invisible[0]):04X}), so it would not read as what it is")
    elif name.endswith((".", " ")):
        problem = "it ends with a dot"
    elif is_reserved_device_name(name):
        problem = "it is a reserved device name on Windows"
    elif len(name.encode("utf-8")) > MAX_NAME_BYTES:
        problem = f"it is longer than {MAX_NAME_BYTES} bytes"
    if problem is not None:
        raise ValueError(f"{name!r} cannot be used as {what}: {problem}. {advice}")
    return name


def inside_folder(path: str | os.PathLike[str], folder: str | os.PathLike[str]) -> bool:
    """Whether ``path``, links resolved, lies in ``folder`` (links resolved too)."""
    real, root = os.path.realpath(path), os.path.realpath(folder)
    try:
        return os.path.commonpath([real, root]) == root
    except ValueError:  # different drives on Windows
        return False


class TargetExistsError(ValueError):
    """A write refused because its target exists and ``overwrite`` was not asked for."""

    def __init__(self, message: str, paths: Sequence[Path]) -> None:
        super().__init__(message)
        self.paths = list(paths)


def check_targets(paths: Sequence[str | os.PathLike[str]], overwrite: bool,
                  input_name: str = "file name") -> list[Path]:
    """Refuse targets that cannot be written: the same file twice, a folder, or (without
    ``overwrite``) any file that already exists. Nothing is written; returns the paths.

    ``input_name`` is the input the user changes to pick other names (e.g. ``save_name``).
    """
    targets = [Path(p) for p in paths]
    seen: dict[str, Path] = {}
    for target in targets:
        key = os.path.normcase(os.path.abspath(target)).casefold()  # case-insensitive disks too
        if key in seen:
            raise ValueError(f"two files of this write would both be {target.name!r} in {target.parent} "
                             f"(names that differ only in case are the same file on Windows and "
                             f"macOS): give them different names")
        seen[key] = target
    taken = []
    for target in targets:
        if not os.path.lexists(target):
            continue
        mode = os.lstat(target).st_mode
        if target.is_dir():
            raise ValueError(f"{target} is a folder, not a file: nothing was written. Choose another "
                             f"{input_name}, or move the folder away")
        if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
            raise ValueError(f"{target} is not a regular file: nothing was written. Choose another "
                             f"{input_name}")
        taken.append(target)
    if taken and not overwrite:
        listed = ", ".join(str(t) for t in taken)
        it = "it" if len(taken) == 1 else "them"
        raise TargetExistsError(
            f"{listed} already exist{'s' if len(taken) == 1 else ''}: nothing was written and "
            f"nothing was replaced. Choose another {input_name}, or switch 'overwrite' on to "
            f"replace {it}", taken)
    return targets


def next_free_path(path: str | os.PathLike[str], tag: str = "") -> Path:
    """``path`` if nothing is there, else ``<stem><tag>.ext``, ``<stem><tag>_2.ext``, ``_3`` ..."""
    path = Path(path)
    if not tag and not os.path.lexists(path):
        return path
    for number in range(1, 10000):
        counter = "" if number == 1 else f"_{number}"
        candidate = path.with_name(f"{path.stem}{tag}{counter}{path.suffix}")
        if not os.path.lexists(candidate):
            return candidate
    raise ValueError(f"no free file name next to {path}: tidy up the folder {path.parent}")


# ---------------------------------------------------------------------------------------------
# Writing


def _temp_path(path: Path, suffix: str = TEMP_SUFFIX) -> Path:
    """A fresh hidden file next to ``path``; created here so that no one else takes the name."""
    for _ in range(100):
        candidate = path.with_name(f".{path.name}.{secrets.token_hex(4)}{suffix}")
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


def _unlink_quietly(path: Path | None) -> None:
    if path is None:
        return
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _link_unsupported(error: OSError) -> bool:
    return error.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS,
                           errno.EMLINK)


def _move_without_replacing(temp: Path, path: Path) -> None:
    """Move ``temp`` to ``path`` only if nothing is there (a hard link refuses to replace)."""
    try:
        os.link(temp, path)
    except FileExistsError:
        raise TargetExistsError(f"{path} appeared while it was being written: nothing was replaced. "
                                "Choose another name, or switch 'overwrite' on to replace it", [path]) from None
    except OSError as error:
        if not _link_unsupported(error):
            raise
        if os.path.lexists(path):  # no hard links here (FAT, some network disks): check, then move
            raise TargetExistsError(f"{path} appeared while it was being written: nothing was "
                                    f"replaced", [path]) from None
        if os.name == "nt":
            os.rename(temp, path)  # refuses an existing target on Windows
        else:
            os.replace(temp, path)
        return
    temp.unlink()


def _keep_old(path: Path) -> Path:
    """A hidden second name (hard link, or copy) for the file at ``path``, to put it back later."""
    backup = _temp_path(path, ".old")
    backup.unlink()
    try:
        os.link(path, backup, follow_symlinks=False)
    except OSError as error:
        if not _link_unsupported(error):
            raise
        shutil.copy2(path, backup, follow_symlinks=False)
    return backup


def write_files_atomically(files: Sequence[tuple[str | os.PathLike[str], Writer]],
                           overwrite: bool = True, input_name: str = "file name") -> list[Path]:
    """Write several files all-or-nothing; returns their paths.

    ``files`` pairs each target with a function that fills a temporary file. Every target is
    checked first (:func:`check_targets`), then every temporary file is written and flushed, then
    they are moved into place. Any failure (an interrupt too) removes every temporary file, removes
    the files this call created and puts back the ones it replaced, then re-raises.
    """
    paths = check_targets([p for p, _ in files], overwrite, input_name)
    temps: list[Path] = []
    moved: list[tuple[Path, Path | None]] = []  # (target, hidden copy of what it replaced)
    try:
        for path, (_, write) in zip(paths, files):
            path.parent.mkdir(parents=True, exist_ok=True)
            temps.append(_temp_path(path))
            write(temps[-1])
            _fsync_file(temps[-1])
        for path, temp in zip(paths, temps):
            if overwrite and os.path.lexists(path):
                # One file: the rename alone is atomic. Several: keep the old one to put it back.
                backup = _keep_old(path) if len(paths) > 1 else None
                moved.append((path, backup))
                os.replace(temp, path)
            else:
                _move_without_replacing(temp, path)
                moved.append((path, None))
    except BaseException:
        for temp in temps:
            _unlink_quietly(temp)
        for path, backup in reversed(moved):
            try:
                if backup is not None:
                    os.replace(backup, path)
                    _unlink_quietly(backup)  # rename does nothing if both names are one file already
                elif not (overwrite and len(paths) == 1):
                    _unlink_quietly(path)
            except OSError:
                pass  # the original error is the one to report
        raise
    for _, backup in moved:
        _unlink_quietly(backup)
    for folder in {path.parent for path in paths}:
        _fsync_dir(folder)
    return paths


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


def safetensors_writer(tensors: Mapping[str, torch.Tensor],
                       metadata: Mapping[str, str] | None = None) -> Writer:
    """A :data:`Writer` of a safetensors file (tensors contiguous, on the CPU, in their dtype)."""
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

    return write


def text_writer(text: str) -> Writer:
    """A :data:`Writer` of a UTF-8 text file."""
    def write(temp: Path) -> None:
        with open(temp, "w", encoding="utf-8") as handle:
            handle.write(text)

    return write


def atomic_write_safetensors(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor],
                             metadata: Mapping[str, str] | None = None, overwrite: bool = True) -> Path:
    """Write ``tensors`` (and string ``metadata``) as a safetensors file at ``path``, atomically.

    Tensors are saved contiguous, on the CPU, in their own dtype. Returns the final path. Without
    ``overwrite`` an existing file is refused (:class:`TargetExistsError`) and left as it is.
    """
    return write_files_atomically([(path, safetensors_writer(tensors, metadata))], overwrite)[0]


def atomic_write_text(path: str | os.PathLike[str], text: str, overwrite: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, like :func:`atomic_write_safetensors`."""
    return write_files_atomically([(path, text_writer(text))], overwrite)[0]
