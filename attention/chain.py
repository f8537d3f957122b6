"""A chain of attention hooks run inside one cross-attention layer.

Each hook is middleware: it receives the projected ``q, k, v`` and a ``proceed`` callable that
runs the rest of the chain (ending in the stock attention, or in another pack's attention patches,
see :class:`AttentionChain`) and returns ``[B, Nq, heads*dim_head]``. Hooks are immutable
descriptions; state that must be collected (maps) lives in objects the hook points to.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, ClassVar, Hashable, Sequence

import torch

from .on_device import CPU, index_tensor, keep_device

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

COND, UNCOND = 0, 1  # ComfyUI's cond_or_uncond codes
# transformer_options key (so also extra_options) under which the attn2 replace table in force for
# this UNet call is exposed to our chains (attention/coexistence.py puts it there).
LIVE_REPLACES_KEY = "concept_attention_attn2"
# The sigma callbacks are tested against when the caller gave none (as in training): ComfyUI's
# percent_to_sigma(0.0), the largest sigma a start_percent can name, so a window opened at 0 % holds.
SIGMA_WHEN_ABSENT = 999999999.9
# transformer_options key of a dict that lives for one model evaluation (attention/coexistence.py
# puts a new one in every UNet call): what every layer of that evaluation can share, e.g. sigma.
CALL_MEMO_KEY = "concept_attention_call"
_UNREAD = object()


class AttentionContext:
    """What a hook may know about the current call, derived from ComfyUI's ``extra_options``.

    Nothing here reads a device tensor unless asked: ``sigma`` is read at most once per model
    evaluation (kept in the evaluation's ``CALL_MEMO_KEY`` dict), row indices come from
    :func:`~.on_device.index_tensor`, and ``memo`` keeps what a hook derives from its own tensors
    (device copies, resized masks) for the chain that runs it.
    """

    __slots__ = ("options", "batch", "memo", "_sigma")

    def __init__(self, options: dict[str, Any], batch: int, memo: dict[Hashable, Any] | None = None):
        self.options = options
        self.batch = batch
        self.memo: dict[Hashable, Any] = {} if memo is None else memo
        self._sigma: Any = _UNREAD  # read on first use: reading a device tensor syncs

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
    def sigma_source(self) -> Any:
        """The sigma ComfyUI passed (a tensor, a number or None), unread; one object per model
        evaluation, so its identity tells evaluations apart."""
        return self.options.get("sigmas")

    @property
    def sigma(self) -> float | None:
        """This call's sigma (None when the caller gave none), read once per model evaluation."""
        if self._sigma is _UNREAD:
            sigmas = self.sigma_source
            if sigmas is None or not torch.is_tensor(sigmas):
                self._sigma = None if sigmas is None else float(sigmas)
            else:
                call = self.options.get(CALL_MEMO_KEY)
                known = call.get("sigma") if call is not None else None
                if known is not None and known[0] is sigmas:
                    self._sigma = known[1]
                else:
                    self._sigma = float(sigmas.reshape(-1)[0])
                    if call is not None:
                        call["sigma"] = (sigmas, self._sigma)
        return self._sigma

    def row_kinds(self) -> list[int]:
        """COND or UNCOND per batch row (all COND when the caller did not say, as in training)."""
        chunks = self.options.get("cond_or_uncond")
        if not chunks:
            return [COND] * self.batch
        per_chunk = self.batch // len(chunks)
        return [kind for kind in chunks for _ in range(per_chunk)]

    def row_list(self, which: str) -> tuple[int, ...]:
        """Positions of the rows a hook gated to ``which`` ("cond", "uncond" or "all") acts on."""
        kinds = self.row_kinds()
        if which == "all":
            return tuple(range(len(kinds)))
        code = COND if which == "cond" else UNCOND
        return tuple(i for i, kind in enumerate(kinds) if kind == code)

    def rows(self, which: str, device: torch.device | None = None) -> torch.Tensor:
        """:meth:`row_list` as a long tensor on ``device`` (default CPU), shared: never write to it."""
        return index_tensor(self.row_list(which), device or CPU)


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
        """Whether this hook does anything in this call (sigma is read only for a narrower window
        than the default, which every sigma lies in)."""
        if self.sigma_min > 0.0 or self.sigma_max != math.inf:
            sigma = ctx.sigma
            if sigma is not None and not (self.sigma_min <= sigma <= self.sigma_max):
                return False
        return self.rows == "all" or len(ctx.row_list(self.rows)) > 0

    def apply(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext,
              proceed: AttentionFn) -> torch.Tensor:
        """Run this hook; the default does nothing but proceed."""
        return proceed(q, k, v)


@dataclass(eq=False)
class AttentionChain:
    """The callable installed as ComfyUI's attn2 replace for one layer key.

    Our hooks run outermost; what their ``proceed`` finally reaches (the *base*) is another pack's
    replace ``inner`` captured at this per-depth key when the chain was made, else the replace
    another pack keeps under the block-level key ``(block, id)`` (looked up when the layer runs,
    see ``attention/coexistence.py``), else ComfyUI's stock attention; then every callback added
    with :meth:`add` whose sigma window holds the current sigma adds its term, in the order added.

    ``hooks`` never change in place (:meth:`with_hook` and :meth:`without` make new chains).
    ``add`` and ``to`` change the chain in place, as other packs and ComfyUI expect of an object at
    a replace key; a clone's chain is its own copy (``__deepcopy__``), so they never reach the
    model a clone came from.
    """

    hooks: tuple[AttentionHook, ...] = ()
    inner: Callable[..., torch.Tensor] | None = None  # another pack's replace at our per-depth key
    stock: Callable[..., torch.Tensor] | None = None
    # The Attn2Replace protocol: (callback, kwargs) pairs, each adding
    # ``callback(out, q, k, v, extra_options, **kwargs)`` while sigma_end <= sigma <= sigma_start.
    callbacks: list[tuple[Callable[..., torch.Tensor], dict[str, Any]]] = field(default_factory=list)
    # The block-level replace seen at install; the base only where the live table is not exposed.
    fallback: Callable[..., torch.Tensor] | None = None
    # What the hooks derive from their own tensors on the device they run on (AttentionContext.memo):
    # this chain's own, dropped when ComfyUI moves the model elsewhere (``to``), never copied to a clone.
    memo: dict[Hashable, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 extra_options: dict[str, Any]) -> torch.Tensor:
        ctx = AttentionContext(extra_options, q.shape[0], self.memo)
        foreign = self.foreign_base(extra_options)
        callbacks = self.active_callbacks(ctx) if self.callbacks else ()
        below = self.stock if foreign is None else foreign

        def base(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            out = below(q, k, v, extra_options)
            if not callbacks:
                return out
            for callback, kwargs in callbacks:
                out = out + callback(out, q, k, v, extra_options, **kwargs)
            return out.to(q.dtype)

        # Stock attention is per query and per row; another pack's function or callback may need
        # the whole feature map and batch.
        base.query_subsets = foreign is None and not callbacks  # type: ignore[attr-defined]
        call: AttentionFn = base
        for hook in reversed([hook for hook in self.hooks if hook.is_active(ctx)]):
            call = _bind(hook, ctx, call)
        return call(q, k, v)

    def foreign_base(self, extra_options: dict[str, Any]) -> Callable[..., torch.Tensor] | None:
        """The other pack's replace our hooks proceed into in this call, or None for stock."""
        if self.inner is not None:
            return self.inner
        table = extra_options.get(LIVE_REPLACES_KEY)
        if table is None:
            return self.fallback
        found = table.get(extra_options.get("block"))
        return None if isinstance(found, AttentionChain) else found

    def active_callbacks(self, ctx: AttentionContext) -> list[tuple[Callable[..., torch.Tensor], dict[str, Any]]]:
        """The added callbacks whose sigma window holds this call's sigma."""
        sigma = ctx.sigma
        sigma = SIGMA_WHEN_ABSENT if sigma is None else sigma
        return [(callback, kwargs) for callback, kwargs in self.callbacks
                if kwargs.get("sigma_end", 0.0) <= sigma <= kwargs.get("sigma_start", float("inf"))]

    def add(self, callback: Callable[..., torch.Tensor], **kwargs: Any) -> None:
        """Protocol entry point for another pack: add ``callback``'s term to this layer's output."""
        self.callbacks.append((callback, kwargs))

    def with_hook(self, hook: AttentionHook, outermost: bool = False) -> "AttentionChain":
        """A new chain with ``hook`` added innermost of ours (still outside the base), or outermost."""
        hooks = (hook,) + self.hooks if outermost else self.hooks + (hook,)
        return replace(self, hooks=hooks, callbacks=list(self.callbacks))

    def without(self, hooks: Sequence[AttentionHook]) -> "AttentionChain":
        """A new chain without the given hooks (compared by identity)."""
        kept = tuple(h for h in self.hooks if all(h is not other for other in hooks))
        return replace(self, hooks=kept, callbacks=list(self.callbacks))

    def rebased(self, replacement: Callable[..., torch.Tensor]) -> "AttentionChain":
        """Our hooks over ``replacement``, a replace another pack wrote over this chain's key.

        That pack replaced the chain with everything below it, so only the hooks are kept: the
        result is what installing our hooks after that pack would have given.
        """
        return AttentionChain(self.hooks, inner=replacement, stock=self.stock)

    def to(self, *args: Any, **kwargs: Any) -> "AttentionChain":
        """ComfyUI moves replace objects with ``.to`` when it loads or offloads the model: forget
        the hooks' copies on other devices, and pass it on to the replace we hide."""
        keep_device(self.memo, *args, **kwargs)
        if hasattr(self.inner, "to"):
            self.inner = self.inner.to(*args, **kwargs)
        return self

    def models(self) -> list[Any]:
        """Models the replace we hide needs loaded (ComfyUI asks replace objects for them)."""
        return list(self.inner.models()) if hasattr(self.inner, "models") else []

    def __deepcopy__(self, memo: dict) -> "AttentionChain":
        # ModelPatcher.clone() deep-copies model_options. The copy gets its own callback list and
        # its own copy of the replace it wraps (through ``memo``, so an object also referenced
        # elsewhere in the same options stays one object); hooks are immutable descriptions and
        # stay shared, with the map stores they write to, which belong to the node that made them.
        copied = AttentionChain.__new__(AttentionChain)
        memo[id(self)] = copied
        copied.hooks = self.hooks
        copied.stock = self.stock
        copied.inner = copy.deepcopy(self.inner, memo)
        copied.callbacks = copy.deepcopy(self.callbacks, memo)
        copied.fallback = copy.deepcopy(self.fallback, memo)
        copied.memo = {}
        return copied


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
