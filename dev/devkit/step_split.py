"""Where a training step's time goes: UNet forward, backward, calibration, optimizer, the rest.

While :func:`timing_parts` is active, every UNet forward, every ``backward()`` call, every
calibration-loss computation of the training objective and every optimizer step is bracketed by
two marks: CUDA events on a GPU (their time is the span the GPU spent from the first to the
second, so it includes any idle gap the host left inside the part), wall-clock readings on the
CPU. The host's own time inside each part is kept too: a part whose host time is close to its
GPU time is bound by the host, not by the GPU. Cheap enough to leave on for a few whole steps
(torch.profiler's event parsing takes minutes on a full-size SDXL step).

Backward is the whole ``backward()`` call (UNet, calibration and text encoder in one graph);
parts do not nest unless gradient checkpointing recomputes forwards inside backward (off by default).
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

PARTS = ("UNet forward", "backward", "calibration (forward part)", "optimizer")


class PartTimes:
    """The marks of each part; :meth:`seconds` reads them (after the device finished)."""

    def __init__(self, on_gpu: bool):
        self.on_gpu = on_gpu
        self.spans: dict[str, list[tuple[Any, Any, float]]] = {part: [] for part in PARTS}

    def mark(self) -> Any:
        """A point in the device's work queue (CUDA event) or in wall-clock time (CPU)."""
        if not self.on_gpu:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        """Bracket one piece of work of part ``name``."""
        start, host = self.mark(), time.perf_counter()
        try:
            yield
        finally:
            self.spans[name].append((start, self.mark(), time.perf_counter() - host))

    def seconds(self) -> dict[str, tuple[float, float]]:
        """Per part: (device seconds, host seconds), summed over its pieces."""
        if self.on_gpu:
            torch.cuda.synchronize()
        out = {}
        for name, spans in self.spans.items():
            device = sum(start.elapsed_time(end) * 1e-3 if self.on_gpu else end - start
                         for start, end, _ in spans)
            out[name] = (device, sum(host for _, _, host in spans))
        return out


@contextlib.contextmanager
def timing_parts(diffusion_model: torch.nn.Module, times: PartTimes) -> Iterator[None]:
    """Inside: the four parts of every training step are timed into ``times``. Restores the UNet's
    forward, ``Tensor.backward`` and the objective's calibration method on exit."""
    from concept_attention.training.objective import TrainingObjective

    own_forward = vars(diffusion_model).get("forward")  # an instance override (checkpointing, ...)
    forward, backward = diffusion_model.forward, torch.Tensor.backward
    map_losses = TrainingObjective._map_losses

    def timed(name: str, call: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            with times.part(name):
                return call(*args, **kwargs)
        return run

    opened: list[Any] = []

    def before_step(optimizer: Any, args: Any, kwargs: Any) -> None:
        opened.append(times.part("optimizer"))
        opened[-1].__enter__()

    def after_step(optimizer: Any, args: Any, kwargs: Any) -> None:
        if opened:
            opened.pop().__exit__(None, None, None)

    hooks = [register_optimizer_step_pre_hook(before_step), register_optimizer_step_post_hook(after_step)]
    try:
        diffusion_model.forward = timed("UNet forward", forward)
        torch.Tensor.backward = timed("backward", backward)
        TrainingObjective._map_losses = timed("calibration (forward part)", map_losses)
        yield
    finally:
        for hook in hooks:
            hook.remove()
        TrainingObjective._map_losses = map_losses
        torch.Tensor.backward = backward
        if own_forward is None:
            vars(diffusion_model).pop("forward", None)
        else:
            diffusion_model.forward = own_forward
