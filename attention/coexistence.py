"""Sharing a model's attention with other packs' patches, in any order (docs/reliability.md, "Coexistence").

ComfyUI hands an attn2 replace only ``extra_options``, not the replace table, and reads the table
when the layer runs. So a replace another pack installs after ours under the block-level key
``(block, id)`` would never run (ComfyUI picks our per-depth key first), and a plain replace
written over our per-depth key would drop our hooks. A ``diffusion_model`` wrapper, installed
once with our first patch and kept in ``transformer_options["wrappers"]`` (so it travels wherever
the model's transformer options go: every sampler path and our training loop), fixes this for each
UNet call. It passes on a copy of the transformer options in which:

- the attn2 replace table in force is exposed under ``LIVE_REPLACES_KEY``, so a chain finds the
  block-level replace that is there *now* (``AttentionChain.foreign_base``);
- each per-depth key where another pack wrote its own replace over one of our chains holds our
  hooks over that replace (``AttentionChain.rebased``), found through the registry of our chains
  kept under ``CHAINS_KEY``;
- the attn2_patch list runs our nested-attention context patch first (it finds subjects by the
  raw text features) and ``stash_context`` last (regional deltas need the features exactly as
  ``to_k``/``to_v`` will see them, after every other pack's patch).

Nothing the model owns is changed: every changed level is a new dict or list.
"""
from __future__ import annotations

from typing import Any

from .chain import CALL_MEMO_KEY, LIVE_REPLACES_KEY, AttentionChain
from .nested_hook import NestedContextPatch
from .regional import stash_context

WRAPPER_KEY = "concept_attention"  # our key among ComfyUI's wrappers
CHAINS_KEY = "concept_attention_chains"  # transformer_options: {per-depth layer key: our chain}
DIFFUSION_MODEL = "diffusion_model"  # comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
TRANSFORMER_OPTIONS_ARG = 5  # UNetModel.forward(x, timesteps, context, y, control, transformer_options)


def coexistence_wrapper(executor: Any, *args: Any, **kwargs: Any) -> Any:
    """``diffusion_model`` wrapper: run the UNet with :func:`per_call_options`."""
    if "transformer_options" in kwargs:
        kwargs["transformer_options"] = per_call_options(kwargs["transformer_options"])
    elif len(args) > TRANSFORMER_OPTIONS_ARG:
        args = (*args[:TRANSFORMER_OPTIONS_ARG], per_call_options(args[TRANSFORMER_OPTIONS_ARG]),
                *args[TRANSFORMER_OPTIONS_ARG + 1:])
    return executor(*args, **kwargs)


def per_call_options(transformer_options: dict[str, Any]) -> dict[str, Any]:
    """The transformer options one UNet call runs with (see the module docstring)."""
    options = dict(transformer_options)
    replaces = options.get("patches_replace", {})
    attn2 = replaces.get("attn2", {})
    rebased = {key: chain.rebased(attn2[key]) for key, chain in options.get(CHAINS_KEY, {}).items()
               if attn2.get(key) is not None and not isinstance(attn2[key], AttentionChain)}
    if rebased:
        attn2 = {**attn2, **rebased}
        options["patches_replace"] = {**replaces, "attn2": attn2}
    options[LIVE_REPLACES_KEY] = attn2
    options[CALL_MEMO_KEY] = {}
    patches = options.get("patches", {})
    attn2_patch = patches.get("attn2_patch")
    if attn2_patch:
        ordered = ordered_attn2_patches(attn2_patch)
        if any(a is not b for a, b in zip(ordered, attn2_patch)):
            options["patches"] = {**patches, "attn2_patch": ordered}
    return options


def ordered_attn2_patches(patches: list[Any]) -> list[Any]:
    """Our nested context patches first, ``stash_context`` last, the rest in their own order."""
    first = [p for p in patches if isinstance(p, NestedContextPatch)]
    last = [p for p in patches if p is stash_context]
    middle = [p for p in patches if not isinstance(p, NestedContextPatch) and p is not stash_context]
    return first + middle + last


def with_wrapper(transformer_options: dict[str, Any]) -> dict[str, Any]:
    """``transformer_options`` with :func:`coexistence_wrapper` installed once (new dicts on the path)."""
    wrappers = transformer_options.get("wrappers", {})
    ours = wrappers.get(DIFFUSION_MODEL, {})
    if ours.get(WRAPPER_KEY) == [coexistence_wrapper]:
        return transformer_options
    return {**transformer_options,
            "wrappers": {**wrappers, DIFFUSION_MODEL: {**ours, WRAPPER_KEY: [coexistence_wrapper]}}}
