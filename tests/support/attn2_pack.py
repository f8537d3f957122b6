"""A stand-in for another attention pack, as the most used image-prompt packs patch a MODEL.

Written from the public description of their attn2 replace protocol (docs/reliability.md,
"Coexistence"), not from any pack's code. An object at an attn2 replace key computes ComfyUI's
attention and, for each registered ``(callback, kwargs)`` whose sigma window holds the current
sigma, adds ``callback(out, q, k, v, extra_options, **kwargs)`` to the output. Installing the pack
clones the model, copies the dicts on the path, and at each layer key stores a new such object if
the key is free, else calls ``.add(callback, **kwargs)`` on whatever object is there. SD1.5-style
models are keyed by block ``(block, id)``, SDXL-style ones by depth ``(block, id, index)``.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Callable

import torch

NO_SIGMA = 999999999.9  # the sigma assumed when the caller gives none (ComfyUI's percent_to_sigma(0))


class AddingReplace:
    """What the pack stores at a free attn2 replace key."""

    def __init__(self, callback: Callable[..., torch.Tensor], **kwargs: Any) -> None:
        self.entries: list[tuple[Callable[..., torch.Tensor], dict[str, Any]]] = [(callback, kwargs)]

    def add(self, callback: Callable[..., torch.Tensor], **kwargs: Any) -> None:
        """Register one more callback at this key."""
        self.entries.append((callback, kwargs))

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 extra_options: dict[str, Any]) -> torch.Tensor:
        from comfy.ldm.modules.attention import optimized_attention

        out = optimized_attention(q, k, v, extra_options["n_heads"])
        sigmas = extra_options.get("sigmas")
        sigma = float(sigmas.flatten()[0]) if sigmas is not None else NO_SIGMA
        for callback, kwargs in self.entries:
            if kwargs["sigma_end"] <= sigma <= kwargs["sigma_start"]:
                out = out + callback(out, q, k, v, extra_options, **kwargs)
        return out.to(q.dtype)


def make_callback(name: str, calls: Counter) -> Callable[..., torch.Tensor]:
    """A callback adding a visible term that depends on the running output and the queries.

    It counts its calls in ``calls[name]``, and calls on only part of the layer's feature map in
    ``calls[name + " on part of the map"]`` (real packs of this kind reshape their masks to the
    whole map). A function, so ModelPatcher.clone() (which deep-copies model_options) keeps it and
    its counter as they are, while its tensor kwargs are copied.
    """
    def callback(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 extra_options: dict[str, Any], weight: torch.Tensor, **_: Any) -> torch.Tensor:
        calls[name] += 1
        shape = extra_options.get("activations_shape")
        if shape is not None and q.shape[1] != shape[-2] * shape[-1]:
            calls[name + " on part of the map"] += 1
        return weight.to(out) * torch.tanh(out + q.roll(1, dims=-1))

    return callback


def attn2_keys(model: Any, per_depth: bool) -> list[tuple]:
    """Every cross-attention key of the UNet: ``(block, id, index)`` or ``(block, id)`` once per block."""
    unet = model.model.diffusion_model
    blocks = ([("input", i, b) for i, b in enumerate(unet.input_blocks)] + [("middle", 0, unet.middle_block)]
              + [("output", i, b) for i, b in enumerate(unet.output_blocks)])
    keys: list[tuple] = []
    for name, number, block in blocks:
        for module in block.children():
            depth = len(getattr(module, "transformer_blocks", ()))
            if depth and per_depth:
                keys += [(name, number, index) for index in range(depth)]
            elif depth and (name, number) not in keys:
                keys.append((name, number))
    return keys


def apply_pack(model: Any, callback: Callable[..., torch.Tensor], per_depth: bool, weight: float = 0.3,
               sigma_start: float = NO_SIGMA, sigma_end: float = 0.0) -> Any:
    """What one node of the pack does: a clone of ``model`` with ``callback`` at every attn2 key."""
    patched = model.clone()
    options = dict(patched.model_options)
    transformer_options = dict(options.get("transformer_options", {}))
    replaces = dict(transformer_options.get("patches_replace", {}))
    attn2 = dict(replaces.get("attn2", {}))
    kwargs = dict(weight=torch.tensor(weight), sigma_start=sigma_start, sigma_end=sigma_end)
    for key in attn2_keys(patched, per_depth):
        if key in attn2:
            attn2[key].add(callback, **kwargs)
        else:
            attn2[key] = AddingReplace(callback, **kwargs)
    replaces["attn2"] = attn2
    transformer_options["patches_replace"] = replaces
    options["transformer_options"] = transformer_options
    patched.model_options = options
    return patched
