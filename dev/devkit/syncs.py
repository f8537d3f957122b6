"""Count, on any device, the pack's calls that make a GPU host wait (host synchronisations).

On a GPU, Python that reads a value of a device tensor (``.item()``, ``float(t)``, ``bool(t)`` in
an ``if``, ``.tolist()``) waits until every queued kernel has run; so does a blocking copy between
host and device (``t.to(device)`` of a CPU tensor, ``torch.tensor(list, device=...)``). CUDA's own
counter, ``torch.cuda.set_sync_debug_mode``, only exists on a GPU. :class:`SyncCounter` is a proxy
that works on the CPU too: it counts these calls when they are made *from the pack's own code*
(the caller's file is under ``attention/``, ``concepts/``, ``sampling/``, ``training/`` or
``nodes/`` of the repository), in three kinds:

- ``read``: ``Tensor.item``, ``tolist``, ``numpy``, ``__bool__``, ``__float__``, ``__int__``,
  ``__index__`` (a device-to-host read: always a synchronisation on a GPU);
- ``copy``: ``Tensor.to``/``Tensor.cuda``/``Tensor.cpu`` given a device (or a tensor to match)
  without ``non_blocking=True`` (a blocking host-device copy on a GPU when the devices differ;
  the proxy cannot tell, so code on the hot path makes no such call at all and keeps what it needs
  on the device in caches filled once);
- ``build``: ``torch.tensor``/``torch.as_tensor`` from Python data (a host tensor; on a GPU it must
  then be copied over, which blocks).

A ``.to(..., non_blocking=True)`` is counted apart as ``async_copy`` (no synchronisation when the
source is pinned, which is how the pack uses it). ComfyUI's own calls (its CLIP encoder, its
samplers) are not counted: they are not ours to change. ``torch.cuda.synchronize`` is counted as
``read`` from anywhere. The proxy sees only the code path taken on the device it runs on.
"""
from __future__ import annotations

import collections
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import contextlib
import torch

from .pack import REPO_ROOT

PACK_DIRS = tuple(str(REPO_ROOT / name) + "/" for name in ("attention", "concepts", "sampling", "training", "nodes"))
READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")
COPIES = ("to", "cuda", "cpu")
BUILDS = ("tensor", "as_tensor")


def _from_pack(depth: int = 2) -> str | None:
    """``file:line`` of the caller ``depth`` frames up if it is pack code, else None."""
    frame = sys._getframe(depth)
    name = frame.f_code.co_filename
    return f"{Path(name).relative_to(REPO_ROOT)}:{frame.f_lineno}" if name.startswith(PACK_DIRS) else None


def _names_device(args: tuple, kwargs: dict) -> bool:
    """Whether ``Tensor.to`` arguments name a device (or a tensor whose device to take)."""
    if "device" in kwargs or "other" in kwargs:
        return True
    return any(isinstance(a, (str, torch.device, torch.Tensor)) for a in args)


class SyncCounter:
    """Context manager: counts of each kind and the pack lines that made them."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.where: collections.Counter[tuple[str, str]] = collections.Counter()
        self._saved: list[tuple[Any, str, Any]] = []

    def _count(self, kind: str, depth: int = 3) -> None:
        place = _from_pack(depth)
        if place is not None:
            self.counts[kind] += 1
            self.where[(kind, place)] += 1

    def _patch(self, owner: Any, name: str, make: Callable[[Any], Any]) -> None:
        original = getattr(owner, name)
        self._saved.append((owner, name, original))
        setattr(owner, name, make(original))

    def __enter__(self) -> "SyncCounter":
        counter = self

        def reading(original: Any) -> Any:
            def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
                counter._count("read")
                return original(self, *args, **kwargs)
            return wrapper

        def copying(original: Any, always: bool) -> Any:
            def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
                if kwargs.get("non_blocking") or (len(args) > 1 and args[-1] is True):
                    counter._count("async_copy")
                elif always or _names_device(args, kwargs):
                    counter._count("copy")
                return original(self, *args, **kwargs)
            return wrapper

        def building(original: Any) -> Any:
            def wrapper(data: Any, *args: Any, **kwargs: Any) -> Any:
                if not isinstance(data, torch.Tensor):
                    counter._count("build")
                return original(data, *args, **kwargs)
            return wrapper

        def synchronizing(original: Any) -> Any:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                counter.counts["read"] += 1
                counter.where[("read", "torch.cuda.synchronize")] += 1
                return original(*args, **kwargs)
            return wrapper

        for name in READS:
            self._patch(torch.Tensor, name, reading)
        for name in COPIES:
            self._patch(torch.Tensor, name, lambda original, always=name != "to": copying(original, always))
        for name in BUILDS:
            self._patch(torch, name, building)
        self._patch(torch.cuda, "synchronize", synchronizing)
        return self

    def __exit__(self, *exc: Any) -> None:
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()

    @property
    def blocking(self) -> int:
        """Reads, blocking copies and host-built tensors together."""
        return self.counts["read"] + self.counts["copy"] + self.counts["build"]

    def report(self) -> str:
        """One line per pack line that counted, most frequent first."""
        return "\n".join(f"{n:5d} {kind:10s} {place}" for (kind, place), n in self.where.most_common())


@contextlib.contextmanager
def counting() -> Iterator[SyncCounter]:
    """``with counting() as counter:`` around the code to count."""
    with SyncCounter() as counter:
        yield counter
