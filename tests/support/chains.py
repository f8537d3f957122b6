"""Looking at the attention chains the pack installed on a model (test helper)."""
from __future__ import annotations

from typing import Any

from concept_attention.attention.chain import AttentionChain
from concept_attention.attention.layers import LayerKey


def chain_at(model: Any, key: LayerKey) -> AttentionChain | None:
    """Our chain installed at a layer key, if any."""
    entry = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {}).get(key)
    return entry if isinstance(entry, AttentionChain) else None
