"""A chain of attention hooks run inside one cross-attention layer.

Each hook is middleware: it receives the projected ``q, k, v`` and a ``proceed`` callable that
runs the rest of the chain (ending in the stock attention, or in another pack's replace function
that was installed before us) and returns ``[B, Nq, heads*dim_head]``. Hooks are immutable
descriptions; state that must be collected (maps) lives in objects the hook points to.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import torch

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

COND, UNCOND = 0, 1  # ComfyUI's cond_or_uncond codes


class AttentionContext:
    """What a hook may know about the current call, derived from ComfyUI's ``extra_options``."""

    __slots__ = ("options", "batch")

    def __init__(self, options: dict[str, Any], batch: int):
        self.options = options
        self.batch = batch

    @property
    def heads(self) -> int:
        return int(self.options["n_heads"])

    @property
    def key(self) -> tuple[str, int, int]:
        block = self.options.get("block") or ("?", -1)
        return block[0], int(block[1]), int(self.options.get("block_index", 0))

    @property
    def spatial(self) -> tuple[int, int] | None:
        """(H, W) of the feature map whose pixels are this layer's queries."""
        shape = self.options.get("activations_shape")
        return (int(shape[-2]), int(shape[-1])) if shape is not None else None

    @property
    def sigma(self) -> float | None:
        sigmas = self.options.get("sigmas")
        if sigmas is None:
            return None
        return float(sigmas.reshape(-1)[0]) if torch.is_tensor(sigmas) else float(sigmas)

    def row_kinds(self) -> list[int]:
        """COND or UNCOND per batch row (all COND when the caller did not say, as in training)."""
        chunks = self.options.get("cond_or_uncond")
        if not chunks:
            return [COND] * self.batch
        per_chunk = self.batch // len(chunks)
        return [kind for kind in chunks for _ in range(per_chunk)]

    def rows(self, which: str) -> torch.Tensor:
        """Indices of the rows a hook gated to ``which`` ("cond", "uncond" or "all") acts on."""
        kinds = self.row_kinds()
        if which == "all":
            wanted = range(len(kinds))
        else:
            code = COND if which == "cond" else UNCOND
            wanted = [i for i, kind in enumerate(kinds) if kind == code]
        return torch.tensor(list(wanted), dtype=torch.long)


@dataclass(frozen=True, eq=False)
class AttentionHook:
    """Base hook: active for sigmas in [sigma_min, sigma_max] and rows of kind ``rows``."""

    sigma_max: float = float("inf")
    sigma_min: float = 0.0
    rows: str = "all"
    # Whether the hook (and so the chain below it) works on any subset of the queries and of the
    # batch rows, so a hook above may call it on just some of them; hooks that need the whole
    # feature map or batch say False.
    query_subsets: ClassVar[bool] = False

    def is_active(self, ctx: AttentionContext) -> bool:
        """Whether this hook does anything in this call."""
        sigma = ctx.sigma
        if sigma is not None and not (self.sigma_min <= sigma <= self.sigma_max):
            return False
        return self.rows == "all" or len(ctx.rows(self.rows)) > 0

    def apply(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext,
              proceed: AttentionFn) -> torch.Tensor:
        """Run this hook; the default does nothing but proceed."""
        return proceed(q, k, v)


@dataclass(frozen=True, eq=False)
class AttentionChain:
    """The callable installed as ComfyUI's attn2 replace for one layer key."""

    hooks: tuple[AttentionHook, ...] = ()
    inner: Callable[..., torch.Tensor] | None = None  # another pack's replace, kept and called
    stock: Callable[..., torch.Tensor] | None = field(default=None, compare=False)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 extra_options: dict[str, Any]) -> torch.Tensor:
        def base(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if self.inner is not None:
                return self.inner(q, k, v, extra_options)
            return self.stock(q, k, v, extra_options)

        ctx = AttentionContext(extra_options, q.shape[0])
        active = [hook for hook in self.hooks if hook.is_active(ctx)]
        call: AttentionFn = base
        # Stock attention is per query; another pack's function may need the whole feature map.
        call.query_subsets = self.inner is None  # type: ignore[attr-defined]
        for hook in reversed(active):
            call = _bind(hook, ctx, call)
        return call(q, k, v)

    def with_hook(self, hook: AttentionHook) -> "AttentionChain":
        """A new chain with ``hook`` appended (innermost of ours, still outside ``inner``)."""
        return AttentionChain(self.hooks + (hook,), self.inner, self.stock)

    def without(self, hooks: Sequence[AttentionHook]) -> "AttentionChain":
        """A new chain without the given hooks (compared by identity)."""
        kept = tuple(h for h in self.hooks if all(h is not other for other in hooks))
        return AttentionChain(kept, self.inner, self.stock)

    def __deepcopy__(self, memo: dict) -> "AttentionChain":
        # ModelPatcher.clone() deep-copies model_options; a chain is immutable, and the objects its
        # hooks point to (map stores, cached tensors) must stay shared, not be duplicated per clone.
        return self


def _bind(hook: AttentionHook, ctx: AttentionContext, proceed: AttentionFn) -> AttentionFn:
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return hook.apply(q, k, v, ctx, proceed)

    run.query_subsets = hook.query_subsets and accepts_query_subsets(proceed)  # type: ignore[attr-defined]
    return run


def accepts_query_subsets(proceed: AttentionFn) -> bool:
    """Whether ``proceed`` may be called with only some of the layer's queries."""
    return bool(getattr(proceed, "query_subsets", False))


def rows_of(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Select batch rows, broadcasting a batch of one."""
    return x.expand(rows.numel(), *x.shape[1:]) if x.shape[0] == 1 else x.index_select(0, rows)
