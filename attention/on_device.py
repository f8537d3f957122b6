"""Small constants the attention code needs on the device it runs on, made once, not per call.

On a GPU, building an index tensor from a Python list inside an attention call, or moving a CPU
tensor to the device there, makes the host wait for the device: every queued kernel must finish
before Python goes on. Hooks run in every cross-attention layer of every model evaluation, so
they take such constants from caches instead: row and token indices from :func:`index_tensor`
(shared, never written to), everything derived from a hook's own tensors from the memo of the
chain that runs it (``AttentionContext.memo``), whose copies on a device are dropped when ComfyUI
moves the model elsewhere (:func:`keep_device`).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Hashable

import torch

CPU = torch.device("cpu")


@functools.lru_cache(maxsize=4096)
def index_tensor(values: tuple, device: torch.device = CPU) -> torch.Tensor:
    """A long tensor of ``values`` (a tuple of ints, or of equal-length tuples) on ``device``.

    Made once per value and device and shared by every caller: never write to it. Made outside
    inference mode, so a tensor first asked for while sampling can index a training step later.
    """
    with torch.inference_mode(False):
        return torch.tensor(values, dtype=torch.long, device=device)


def memoized(memo: dict[Hashable, Any], key: Hashable, make: Callable[[], Any]) -> Any:
    """``memo[key]``, made by ``make()`` on first use (outside inference mode: a copy first made
    while sampling may take part in a training step of the same chain later)."""
    try:
        return memo[key]
    except KeyError:
        with torch.inference_mode(False):
            value = memo[key] = make()
        return value


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def keep_device(memo: dict[Hashable, Any], *args: Any, **kwargs: Any) -> None:
    """For a ``.to(*args, **kwargs)`` call that names a device: drop what ``memo`` keeps for any
    other device (keys name their device), so an offloaded model holds no memory there."""
    named = kwargs.get("device", next((a for a in args if isinstance(a, (str, torch.device))), None))
    if named is None:
        return
    target = torch.device(named)
    for key in list(memo):
        parts = key if isinstance(key, tuple) else (key,)
        if any(isinstance(p, torch.device) and not _same_device(p, target) for p in parts):
            del memo[key]
