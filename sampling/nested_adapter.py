"""Image-encoder adapter for Nested Attention: a Perceiver resampler plus per-layer K/V projections.

CLIP-vision patch tokens (penultimate hidden states) go through a Perceiver resampler (learned
latent queries attending to the image tokens) into ``M`` tokens; every cross-attention layer has
its own ``to_k_ip``/``to_v_ip`` turning them into the nested keys/values of that layer
(``docs/method.md`` §16). The state-dict layout is IP-Adapter-Plus's, so public IP-Adapter-Plus
SD1.5/SDXL files load as they are, used as nested keys/values without training, and files trained
here load in IP-Adapter tools:

- ``image_proj.latents`` ``[1, M, dim]``, ``image_proj.proj_in`` (embed -> dim),
  ``image_proj.proj_out`` (dim -> out), ``image_proj.norm_out``;
- ``image_proj.layers.{i}.0.{norm1,norm2,to_q,to_kv,to_out}``: Perceiver attention (no biases);
- ``image_proj.layers.{i}.1.{0,1,3}``: LayerNorm, Linear, (GELU), Linear feed-forward;
- ``ip_adapter.{2j+1}.to_k_ip.weight`` / ``to_v_ip.weight`` ``[C_j, out]``.

**Layer order.** IP-Adapter numbers diffusers' ``unet.attn_processors`` in iteration order, which
follows module registration: ``UNet2DConditionModel.__init__`` registers ``down_blocks`` and
``up_blocks`` (both as empty ModuleLists) before it assigns ``mid_block``, so the order is down
blocks, up blocks, then the mid block; inside a block the transformer blocks run in order, each
with ``attn1`` (even numbers, no weights) before ``attn2`` (odd numbers). In ComfyUI terms: the
j-th cross-attention layer is the j-th of [input blocks..., output blocks..., middle block], so
``n = 2*j + 1`` (:func:`ip_order`). The Perceiver head width is not stored in the files: it is 64
in every IP-Adapter-Plus release (12 heads for SD1.5, 20 for SDXL) unless the file's metadata says
otherwise (files written here record it).
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..attention.layers import CrossAttentionLayer, LayerKey
from ..concepts.safe_files import atomic_write_safetensors

log = logging.getLogger(__name__)

FORMAT = "concept_attention.nested_adapter"
DEFAULT_DIM_HEAD = 64
_BLOCK_ORDER = {"input": 0, "output": 1, "middle": 2}


@dataclass(frozen=True)
class AdapterConfig:
    """Sizes of an adapter; ``widths`` are the per-layer K/V widths in IP-Adapter order."""

    embed_dim: int  # width of the image tokens (CLIP-vision hidden size)
    dim: int = 768  # resampler width
    depth: int = 4
    heads: int = 12
    dim_head: int = DEFAULT_DIM_HEAD
    num_queries: int = 16
    out_dim: int = 768  # width of the resampled tokens
    ff_mult: int = 4
    widths: tuple[int, ...] = ()

    def to_json(self) -> str:
        """The config as a JSON string (for safetensors metadata)."""
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> "AdapterConfig":
        """Inverse of :meth:`to_json`."""
        data = json.loads(text)
        data["widths"] = tuple(data.get("widths", ()))
        return AdapterConfig(**data)


class PerceiverAttention(nn.Module):
    """Latent queries attend to [image tokens, latents] (keys/values from one fused projection)."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = heads * dim_head
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.dim_head).transpose(1, 2)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Attention output ``[B, Q, dim]`` (the caller adds the residual)."""
        x, latents = self.norm1(x), self.norm2(latents)
        q = self._split(self.to_q(latents))
        k, v = (self._split(t) for t in self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1))
        # softmax(q k^T / sqrt(d)), in float32 for half inputs
        cdtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        logits = q.to(cdtype) @ k.to(cdtype).transpose(-1, -2) * self.dim_head ** -0.5
        weights = torch.softmax(logits, dim=-1)
        out = (weights.to(v.dtype) @ v).transpose(1, 2).reshape(latents.shape[0], latents.shape[1], -1)
        return self.to_out(out)


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    """LayerNorm, Linear, GELU, Linear (no biases): indices 0, 1, 3 hold the weights."""
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class Resampler(nn.Module):
    """Perceiver resampler: ``[B, N, embed_dim]`` image tokens -> ``[B, num_queries, out_dim]``."""

    def __init__(self, config: AdapterConfig):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, config.num_queries, config.dim) / config.dim ** 0.5)
        self.proj_in = nn.Linear(config.embed_dim, config.dim)
        self.proj_out = nn.Linear(config.dim, config.out_dim)
        self.norm_out = nn.LayerNorm(config.out_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(config.dim, config.heads, config.dim_head),
                           feed_forward(config.dim, config.ff_mult)])
            for _ in range(config.depth))

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """Resampled tokens ``[B, num_queries, out_dim]``."""
        x = self.proj_in(image_tokens)
        latents = self.latents.expand(x.shape[0], -1, -1)
        for attention, ff in self.layers:
            latents = latents + attention(x, latents)
            latents = latents + ff(latents)
        return self.norm_out(self.proj_out(latents))


class _LayerProjection(nn.Module):
    def __init__(self, out_dim: int, width: int):
        super().__init__()
        self.to_k_ip = nn.Linear(out_dim, width, bias=False)
        self.to_v_ip = nn.Linear(out_dim, width, bias=False)


class NestedAdapter(nn.Module):
    """Resampler + one K/V projection pair per cross-attention layer (IP-Adapter-Plus layout)."""

    def __init__(self, config: AdapterConfig):
        super().__init__()
        if not config.widths:
            raise ValueError("an adapter needs the widths of the model's cross-attention layers")
        self.config = config
        self.image_proj = Resampler(config)
        self.ip_adapter = nn.ModuleDict({str(2 * j + 1): _LayerProjection(config.out_dim, w)
                                         for j, w in enumerate(config.widths)})

    def tokens(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Resampled tokens ``[B, M, out_dim]`` of CLIP-vision tokens ``[B, N, embed_dim]``."""
        if image_embeds.dim() == 2:
            image_embeds = image_embeds[None]
        if image_embeds.shape[-1] != self.config.embed_dim:
            raise ValueError(f"this adapter expects image tokens of width {self.config.embed_dim} "
                             f"(its CLIP vision model), got width {image_embeds.shape[-1]}: use the "
                             "CLIP vision model the adapter was trained with")
        param = self.image_proj.latents
        return self.image_proj(image_embeds.to(device=param.device, dtype=param.dtype))

    def projected(self, tokens: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(K, V)`` per adapter layer (IP-Adapter order), each ``[..., M, C_j]``."""
        return [(p.to_k_ip(tokens), p.to_v_ip(tokens)) for p in self.ip_adapter.values()]

    def forward(self, image_embeds: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer ``(K, V)`` ``[B, M, C_j]`` for a batch of image tokens (training entry point)."""
        return self.projected(self.tokens(image_embeds))

    def layer_kv(self, layers: Sequence[CrossAttentionLayer], tokens: torch.Tensor
                 ) -> dict[LayerKey, tuple[torch.Tensor, torch.Tensor]]:
        """``{layer key: (K [M, inner], V [M, inner])}`` for one image's tokens ``[M, out]`` (or ``[1, M, out]``)."""
        ordered = self.match(layers)
        tokens = tokens[0] if tokens.dim() == 3 else tokens
        with torch.no_grad():
            kv = self.projected(tokens)
        return {layer.key: (k.detach(), v.detach()) for layer, (k, v) in zip(ordered, kv)}

    def match(self, layers: Sequence[CrossAttentionLayer]) -> list[CrossAttentionLayer]:
        """The model's layers in IP-Adapter order, checked against this adapter's widths."""
        ordered = ip_order(layers)
        widths = tuple(layer.heads * layer.dim_head for layer in ordered)
        if widths != tuple(self.config.widths):
            raise ValueError(
                f"this adapter is for a model with {len(self.config.widths)} cross-attention layers "
                f"of widths {_describe(self.config.widths)}; this model has {len(widths)} of widths "
                f"{_describe(widths)} (IP-Adapter order: input, output, middle blocks). Use an "
                "adapter made for this model's architecture (SD1.5 and SDXL adapters differ)")
        return ordered

    def init_from_model(self, diffusion_model: nn.Module, layers: Sequence[CrossAttentionLayer]) -> int:
        """Copy each layer's ``to_k``/``to_v`` into its projections where widths allow; returns how many."""
        copied = 0
        with torch.no_grad():
            for layer, proj in zip(self.match(layers), self.ip_adapter.values()):
                attn = diffusion_model.get_submodule(layer.module_path)
                for source, target in ((attn.to_k, proj.to_k_ip), (attn.to_v, proj.to_v_ip)):
                    if source.weight.shape == target.weight.shape:
                        target.weight.copy_(source.weight.float())
                        copied += 1
        return copied


def _describe(widths: Sequence[int]) -> str:
    """'320 x2, 640 x2, ...': run-length form of a width list."""
    runs: list[list[int]] = []
    for w in widths:
        if runs and runs[-1][0] == w:
            runs[-1][1] += 1
        else:
            runs.append([w, 1])
    return "[" + ", ".join(f"{w}" if n == 1 else f"{w} x{n}" for w, n in runs) + "]"


def ip_order(layers: Sequence[CrossAttentionLayer]) -> list[CrossAttentionLayer]:
    """Cross-attention layers in IP-Adapter's order: input blocks, output blocks, middle block."""
    return sorted(layers, key=lambda layer: _BLOCK_ORDER[layer.key[0]])  # stable: keeps block order


def config_for_layers(layers: Sequence[CrossAttentionLayer], embed_dim: int, **sizes: int) -> AdapterConfig:
    """A config whose projections fit ``layers`` (other sizes: AdapterConfig's defaults or ``sizes``)."""
    widths = tuple(layer.heads * layer.dim_head for layer in ip_order(layers))
    return AdapterConfig(embed_dim=embed_dim, widths=widths, **sizes)


_LAYER_KEY = re.compile(r"^image_proj\.layers\.(\d+)\.0\.to_q\.weight$")
_PROJ_KEY = re.compile(r"^ip_adapter\.(\d+)\.to_k_ip\.weight$")


def config_from_state_dict(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
                           ) -> AdapterConfig:
    """Infer every size from an IP-Adapter-Plus-layout state dict; clear errors for other files."""
    if "image_proj.latents" not in sd:
        if "image_proj.proj.weight" in sd:
            raise ValueError("this is a plain IP-Adapter file (its image projection 'image_proj.proj' "
                             "makes 4 tokens from the pooled CLIP embedding); nested attention needs "
                             "an IP-Adapter-Plus file (a Perceiver resampler over the CLIP patch "
                             "tokens, key 'image_proj.latents') or an adapter trained with this pack")
        kinds = sorted({k.split(".")[1] for k in sd if k.startswith("image_proj.")})
        raise ValueError("not an IP-Adapter-Plus/nested adapter file: no 'image_proj.latents' "
                         f"(image_proj parts found: {kinds or 'none'}); FaceID and other variants "
                         "are not supported")
    depth = len([k for k in sd if _LAYER_KEY.match(k)])
    projections = sorted(int(m.group(1)) for k in sd if (m := _PROJ_KEY.match(k)))
    if depth == 0 or not projections:
        raise ValueError("incomplete adapter file: it has no resampler layers or no "
                         "'ip_adapter.N.to_k_ip.weight' projections")
    if projections != list(range(1, 2 * len(projections), 2)):
        raise ValueError(f"adapter projections must be numbered 1, 3, 5, ...; found {projections}")
    meta = dict(metadata or {})
    dim_head = int(json.loads(meta["config"])["dim_head"]) if "config" in meta else DEFAULT_DIM_HEAD
    latents = sd["image_proj.latents"]
    dim = latents.shape[-1]
    inner = sd["image_proj.layers.0.0.to_q.weight"].shape[0]
    if inner % dim_head:
        raise ValueError(f"resampler attention width {inner} is not a multiple of the head width {dim_head}")
    config = AdapterConfig(
        embed_dim=sd["image_proj.proj_in.weight"].shape[1], dim=dim, depth=depth,
        heads=inner // dim_head, dim_head=dim_head, num_queries=latents.shape[-2],
        out_dim=sd["image_proj.proj_out.weight"].shape[0],
        ff_mult=sd["image_proj.layers.0.1.1.weight"].shape[0] // dim,
        widths=tuple(sd[f"ip_adapter.{n}.to_k_ip.weight"].shape[0] for n in projections))
    return config


def adapter_from_state_dict(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                            dtype: torch.dtype = torch.float32) -> NestedAdapter:
    """Build and fill an adapter from a state dict (every key must fit, nothing may be missing)."""
    config = config_from_state_dict(sd, metadata)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in NestedAdapter(config).state_dict().items()}
    unexpected = sorted(set(sd) - set(shapes))
    missing = sorted(set(shapes) - set(sd))
    if unexpected or missing:
        raise ValueError(f"adapter file does not have the IP-Adapter-Plus layout: unexpected keys "
                         f"{unexpected[:6]}, missing keys {missing[:6]}")
    bad = [k for k, shape in shapes.items() if tuple(sd[k].shape) != tuple(shape)]
    if bad:
        raise ValueError(f"adapter file has inconsistent sizes for {bad[:6]} "
                         f"(e.g. {bad[0]}: {tuple(sd[bad[0]].shape)}, expected {tuple(shapes[bad[0]])})")
    adapter = NestedAdapter(config)
    adapter.load_state_dict({k: v.to(dtype) for k, v in sd.items()})
    return adapter.to(dtype).eval()


def load_adapter(path: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> NestedAdapter:
    """Load an adapter from a ``.safetensors`` file (never a pickle)."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"{os.path.basename(path)}: only .safetensors adapter files are loaded "
                         "(pickled .bin/.pt files can run code); convert it to safetensors first")
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
        sd = {key: handle.get_tensor(key) for key in handle.keys()}
    adapter = adapter_from_state_dict(sd, metadata, dtype)
    log.info("loaded nested adapter %s: %d queries, %d layers, image width %d",
             os.path.basename(path), adapter.config.num_queries, len(adapter.config.widths),
             adapter.config.embed_dim)
    return adapter


def save_adapter(adapter: NestedAdapter, path: str | os.PathLike[str],
                 extra_metadata: Mapping[str, str] | None = None) -> None:
    """Write the adapter atomically as safetensors in the IP-Adapter-Plus layout (config in metadata)."""
    metadata = {"format": FORMAT, "config": adapter.config.to_json(), **(extra_metadata or {})}
    atomic_write_safetensors(path, adapter.state_dict(), metadata)
