"""The one thin layer between the attention math and ComfyUI's ``ModelPatcher``.

Hooks are installed as :class:`AttentionChain` objects in ``transformer_options["patches_replace"]
["attn2"]`` under per-depth keys ``(block, id, depth)``. Installation is copy-on-write: the dicts on
the path are copied, so a clone never shares a mutable level with the model it came from. Other
packs' attention patches keep running in whatever order they were installed: see
``attention/coexistence.py`` and docs/reliability.md, "Coexistence".
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

from .chain import AttentionChain, AttentionHook
from .coexistence import CHAINS_KEY, with_wrapper
from .layers import CrossAttentionLayer, LayerKey, discover_layers, select_layers
from .nested_hook import NestedAttentionHook, NestedContextPatch, NestedSource
from .regional import RegionalKV, stash_context


def stock_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    extra_options: dict[str, Any]) -> torch.Tensor:
    """ComfyUI's own attention call, exactly as ``CrossAttention.forward`` makes it."""
    from comfy.ldm.modules import attention as comfy_attention

    return comfy_attention.optimized_attention(
        q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"),
        transformer_options=extra_options)


def model_layers(model: Any) -> list[CrossAttentionLayer]:
    """Cross-attention layers of a ModelPatcher's UNet."""
    return discover_layers(model.model.diffusion_model)


def resolve_layers(model: Any, selector: str | Iterable[CrossAttentionLayer]) -> list[CrossAttentionLayer]:
    """Layers named by a selector string (see ``select_layers``) or given directly."""
    if isinstance(selector, str):
        return select_layers(model_layers(model), selector)
    return list(selector)


def _transformer_options(model: Any) -> dict[str, Any]:
    return model.model_options.get("transformer_options", {})


def _attn2_replaces(model_options: dict[str, Any]) -> dict[Any, Any]:
    return model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})


def _write_transformer_options(model: Any, transformer_options: dict[str, Any]) -> None:
    """Give ``model`` new transformer options (in a new ``model_options`` dict), with our wrapper."""
    options = dict(model.model_options)
    options["transformer_options"] = with_wrapper(transformer_options)
    model.model_options = options


def _write_transformer_option(model: Any, group: str, name: str, value: Any) -> None:
    """Set ``transformer_options[group][name]``, copying every dict on the path (copy-on-write)."""
    transformer_options = dict(_transformer_options(model))
    transformer_options[group] = {**transformer_options.get(group, {}), name: value}
    _write_transformer_options(model, transformer_options)


def _write_chains(model: Any, attn2: dict[Any, Any], chains: dict[LayerKey, AttentionChain]) -> None:
    """Set the attn2 replace table and the registry of our chains (copy-on-write)."""
    transformer_options = dict(_transformer_options(model))
    transformer_options["patches_replace"] = {**transformer_options.get("patches_replace", {}), "attn2": attn2}
    transformer_options[CHAINS_KEY] = chains
    _write_transformer_options(model, transformer_options)


def install_hook(model: Any, hook: AttentionHook,
                 layers: str | Iterable[CrossAttentionLayer] = "all",
                 outermost: bool = False) -> list[CrossAttentionLayer]:
    """Add ``hook`` to the chains of the chosen layers of ``model`` (a clone you own).

    Hooks run outermost first; a new hook goes innermost of ours unless ``outermost``. Another
    pack's replace already at a layer's per-depth key becomes the chain's ``inner`` and keeps running.
    """
    chosen = resolve_layers(model, layers)
    attn2 = dict(_attn2_replaces(model.model_options))
    chains = dict(_transformer_options(model).get(CHAINS_KEY, {}))
    for layer in chosen:
        existing = attn2.get(layer.key)
        if not isinstance(existing, AttentionChain):
            ours = chains.get(layer.key)
            if existing is not None and ours is not None:  # a pack wrote over our chain after us
                existing = ours.rebased(existing)
            else:
                block_level = attn2.get(layer.key[:2])
                existing = AttentionChain(inner=existing, stock=stock_attention, fallback=None
                                          if isinstance(block_level, AttentionChain) else block_level)
        attn2[layer.key] = chains[layer.key] = existing.with_hook(hook, outermost)
    _write_chains(model, attn2, chains)
    return chosen


def remove_hooks(model: Any, hooks: Iterable[AttentionHook]) -> None:
    """Take hooks out of every chain of ``model``; chains left empty give their key back."""
    hooks = list(hooks)
    attn2 = dict(_attn2_replaces(model.model_options))
    chains = dict(_transformer_options(model).get(CHAINS_KEY, {}))
    for key, ours in list(chains.items()):  # chains another pack wrote over (see install_hook)
        if not isinstance(attn2.get(key), AttentionChain):
            kept = ours.without(hooks)
            if kept.hooks:
                chains[key] = kept
            else:
                del chains[key]
    for key, entry in list(attn2.items()):
        if not isinstance(entry, AttentionChain):
            continue
        chain = entry.without(hooks)
        chains.pop(key, None)
        if chain.hooks:
            attn2[key] = chains[key] = chain
        elif chain.callbacks:  # other packs' callbacks were added to it: it must keep running them
            attn2[key] = chain
        elif chain.inner is not None:
            attn2[key] = chain.inner
        else:
            del attn2[key]
    _write_chains(model, attn2, chains)


def install_regional(model: Any, region_deltas: list[dict[str, torch.Tensor]], masks: torch.Tensor,
                     texts: Sequence[torch.Tensor | None] | None = None) -> list[RegionalKV]:
    """Each region's K/V deltas (ModelPatcher weight key -> delta) act only inside its mask.

    ``masks`` is [R,H,W] or [B,R,H,W] in [0,1], one per entry of ``region_deltas``; pixels outside
    every mask keep the model's own weights. ``texts`` (per region, text features ``[1, T, ctx]``
    or None) are what each region's pixels read in the positive rows instead of the prompt,
    e.g. the prompt without the other regions' triggers. ``model`` must be a clone you own.
    """
    if masks.shape[-3] != len(region_deltas):
        raise ValueError(f"{len(region_deltas)} regions but {masks.shape[-3]} masks")
    if texts is not None and len(texts) != len(region_deltas):
        raise ValueError(f"{len(region_deltas)} regions but {len(texts)} region texts")
    texts = tuple(texts) if texts is not None and any(t is not None for t in texts) else ()
    if stash_context not in _attn2_patches(model):
        _write_attn2_patches(model, _attn2_patches(model) + [stash_context])
    hooks = []
    for layer in model_layers(model):
        k_key, v_key = layer.weight_keys
        deltas = tuple((d.get(k_key), d.get(v_key)) for d in region_deltas)
        if not texts and all(dk is None and dv is None for dk, dv in deltas):
            continue
        attention = model.model.diffusion_model.get_submodule(layer.module_path) if texts else None
        hook = RegionalKV(deltas=deltas, masks=masks, texts=texts, attention=attention)
        install_hook(model, hook, [layer])
        hooks.append(hook)
    return hooks


def _attn2_patches(model: Any) -> list[Any]:
    return list(model.model_options.get("transformer_options", {}).get("patches", {}).get("attn2_patch", []))


def _write_attn2_patches(model: Any, patch_list: list[Any]) -> None:  # copy-on-write
    _write_transformer_option(model, "patches", "attn2_patch", patch_list)


def nested_subjects(model: Any) -> tuple[NestedSource, ...]:
    """Nested-attention subjects already installed on ``model``."""
    for patch in _attn2_patches(model):
        if isinstance(patch, NestedContextPatch):
            return patch.subjects
    return ()


def install_nested(model: Any, subjects: Iterable[NestedSource],
                   layers: str | Iterable[CrossAttentionLayer] = "all",
                   exclusive: bool = True) -> NestedContextPatch:
    """Add nested-attention subjects to ``model`` (a clone you own), keeping any installed before.

    One context patch and one hook per layer hold all subjects, so banks appended to the text
    features are always taken off by the hook that knows about them.
    """
    chosen = resolve_layers(model, layers)
    old_patch = next((p for p in _attn2_patches(model) if isinstance(p, NestedContextPatch)), None)
    subjects = tuple(subjects)
    keys = frozenset(layer.key for layer in chosen)
    if old_patch is not None:
        names = {s.name for s in old_patch.subjects}
        clash = [s.name for s in subjects if s.name in names]
        if clash:
            raise ValueError(f"nested attention is already applied for {', '.join(clash)} on this model; "
                             "apply each subject word once")
        subjects = old_patch.subjects + subjects
        keys = keys | old_patch.layer_keys
        old_hooks = [entry for chain in _attn2_replaces(model.model_options).values()
                     if isinstance(chain, AttentionChain) for entry in chain.hooks
                     if isinstance(entry, NestedAttentionHook) and entry.patch is old_patch]
        remove_hooks(model, old_hooks)
    patch = NestedContextPatch(subjects, keys)
    _write_attn2_patches(model, [p for p in _attn2_patches(model) if p is not old_patch] + [patch])
    hook = NestedAttentionHook(patch=patch, exclusive=exclusive)
    # Outermost, so every other hook of the chain sees only the prompt's own rows.
    install_hook(model, hook, [layer for layer in model_layers(model) if layer.key in keys], outermost=True)
    return patch
