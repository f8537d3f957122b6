"""Record the cross-attention maps of chosen tokens at chosen layers, step by step.

Memory stays bounded: per model evaluation and recorded layer only ``[rows, tokens, H, W]`` is
kept (heads averaged unless asked otherwise), never the full attention or all text tokens.
Maps keep their autograd graph when recording for training and are detached when sampling.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .chain import AttentionContext, AttentionFn, AttentionHook
from .layers import LayerKey
from .maps import aggregate_maps, maps_to_grid, token_probs
from .on_device import index_tensor


def _same_evaluation(a: Any, b: Any) -> bool:
    """Whether two sigmas as ComfyUI passed them belong to one model evaluation: the same tensor
    object (never read: that would sync), or equal numbers."""
    return a is b or (not torch.is_tensor(a) and not torch.is_tensor(b) and a == b)


def _fresh_index(positions: tuple, device: torch.device) -> torch.Tensor:
    """A new long tensor of token positions (a tuple, or a tuple of per-row tuples) on ``device``,
    made on the device from cached rows: one row per distinct prompt is ever copied from the host."""
    if positions and isinstance(positions[0], tuple):
        return torch.stack([index_tensor(row, device) for row in positions])
    return index_tensor(positions, device).clone()


def _read_sigma(sigma: Any) -> float | None:
    if sigma is None:
        return None
    return float(sigma.reshape(-1)[0]) if torch.is_tensor(sigma) else float(sigma)


@dataclass
class MapStore:
    """Maps collected by a recorder: one dict ``layer key -> [rows, T(, heads), H, W]`` per step."""

    token_index: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    word_sizes: tuple[int, ...] = ()  # tokens per word, in recording order (set_words)
    steps: list[dict[LayerKey, torch.Tensor]] = field(default_factory=list)
    # Per step, its sigma as ComfyUI passed it (read only when ``sigmas`` is asked for).
    sigma_sources: list[Any] = field(default_factory=list)
    _positions: tuple = field(default=(), init=False, repr=False)  # token_index as Python ints
    _positions_of: Any = field(default=None, init=False, repr=False)  # the token_index they are of
    _on_device: Any = field(default=None, init=False, repr=False)  # (token_index, device, its copy there)

    @property
    def sigmas(self) -> list[float | None]:
        """Each recorded step's sigma (None where the caller gave none)."""
        return [_read_sigma(sigma) for sigma in self.sigma_sources]

    def set_tokens(self, token_index: torch.Tensor | Sequence[int]) -> None:
        """Token positions to record: ``[T]`` for every row, or ``[rows, T]`` per row."""
        self.token_index = torch.as_tensor(token_index, dtype=torch.long)
        self.word_sizes = (1,) * int(self.token_index.shape[-1]) if self.token_index.ndim else ()
        self.positions()

    def positions(self) -> tuple:
        """``token_index`` as (nested) tuples of Python ints, read from it once per change."""
        if self._positions_of is not self.token_index:
            listed = self.token_index.tolist()
            listed = listed if isinstance(listed, list) else [listed]
            self._positions = tuple(tuple(row) for row in listed) if self.token_index.ndim == 2 else tuple(listed)
            self._positions_of = self.token_index
        return self._positions

    def device_index(self, device: torch.device) -> torch.Tensor:
        """``token_index`` on ``device``, made from cached rows once per change (never a copy
        from the host)."""
        if self.token_index.device == device:
            return self.token_index
        known = self._on_device
        if known is None or known[0] is not self.token_index or known[1] != device:
            known = self._on_device = (self.token_index, device, _fresh_index(self.positions(), device))
        return known[2]

    def check_positions(self, n_keys: int) -> None:
        """Refuse token positions outside ``n_keys`` text tokens (checked on the host)."""
        flat = [p for row in self.positions() for p in row] if self.token_index.ndim == 2 else self.positions()
        if flat and (min(flat) < 0 or max(flat) >= n_keys):
            raise IndexError(f"token_index out of range for {n_keys} keys")

    def set_words(self, words: Sequence[Sequence[int]] | Sequence[Sequence[Sequence[int]]]) -> None:
        """Words to record, each a list of token positions (a word may have several tokens, or
        none): ``[W][n]`` for every row, or ``[rows][W][n]`` per row with the same word sizes in
        every row. :meth:`word_maps` averages each word's tokens."""
        per_row = bool(words) and bool(words[0]) and not isinstance(words[0][0], int)
        rows = [list(map(list, row)) for row in words] if per_row else [list(map(list, words))]
        sizes = tuple(len(word) for word in rows[0])
        if any(tuple(len(word) for word in row) != sizes for row in rows):
            raise ValueError("set_words: every row must have words of the same token counts, got "
                             f"{[[len(w) for w in row] for row in rows]}")
        flat = [[p for word in row for p in word] for row in rows]
        positions = tuple(map(tuple, flat)) if per_row else tuple(flat[0])
        self.token_index = _fresh_index(positions, torch.device("cpu"))
        self._positions, self._positions_of = positions, self.token_index
        self.word_sizes = sizes

    def clear(self) -> None:
        """Forget every recorded map (the token selection stays)."""
        self.steps.clear()
        self.sigma_sources.clear()

    def add(self, sigma: Any, key: LayerKey, maps: torch.Tensor) -> None:
        """Store one layer's maps; a new sigma (another model evaluation, as ``sigma_source``
        tells) or a layer seen twice starts a new step."""
        if not self.steps or not _same_evaluation(self.sigma_sources[-1], sigma) or key in self.steps[-1]:
            self.steps.append({})
            self.sigma_sources.append(sigma)
        self.steps[-1][key] = maps

    def layer_maps(self, steps: Sequence[int] | None = None) -> list[torch.Tensor]:
        """The recorded per-layer maps of the chosen steps (all steps by default)."""
        chosen = range(len(self.steps)) if steps is None else steps
        return [m for i in chosen for m in self.steps[i].values()]

    def aggregate(self, steps: Sequence[int] | None = None,
                  size: tuple[int, int] | None = None) -> torch.Tensor:
        """Mean map per token over heads, layers and steps: ``[rows, T, H, W]``; layers of several
        resolutions are resized to ``size`` (default: the finest recorded)."""
        maps = self.layer_maps(steps)
        if not maps:
            raise RuntimeError("no attention maps were recorded: is the recorder installed on the "
                               "model that ran, and do its layers and sigma range match?")
        sizes = {tuple(m.shape[-2:]) for m in maps}
        if size is None and len(sizes) > 1:
            size = max(sizes, key=lambda s: s[0] * s[1])
        as_heads = [m if m.ndim == 5 else m.unsqueeze(1) for m in maps]
        return aggregate_maps(as_heads, size=size)

    def word_maps(self, steps: Sequence[int] | None = None,
                  size: tuple[int, int] | None = None) -> torch.Tensor:
        """Mean map per word (see :meth:`set_words`) over its tokens, heads, layers and steps:
        ``[rows, W, H, W]``; a word of no tokens gets a zero map."""
        maps = self.aggregate(steps, size)
        out, start = [], 0
        for n in self.word_sizes:
            out.append(maps[:, start:start + n].mean(1) if n else torch.zeros_like(maps[:, 0]))
            start += n
        return torch.stack(out, dim=1)


@dataclass(frozen=True, eq=False)
class AttentionRecorder(AttentionHook):
    """Hook that writes the selected tokens' probability maps into ``store`` and proceeds."""

    store: MapStore = field(default_factory=MapStore)
    keep_grad: bool = False
    keep_heads: bool = False
    rows: str = "cond"

    def apply(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext,
              proceed: AttentionFn) -> torch.Tensor:
        spatial = ctx.spatial
        if spatial is None or spatial[0] * spatial[1] != q.shape[1]:
            raise RuntimeError(f"attention layer {ctx.key}: cannot tell the map size of "
                               f"{q.shape[1]} queries (activations shape {spatial})")
        rows = ctx.row_list(self.rows)
        token_index = self.store.device_index(q.device)
        if token_index.ndim == 2 and token_index.shape[0] != len(rows):
            raise ValueError(f"token positions were given for {token_index.shape[0]} rows but "
                             f"{len(rows)} rows are recorded")
        self.store.check_positions(k.shape[1])
        with torch.set_grad_enabled(self.keep_grad and torch.is_grad_enabled()):
            if len(rows) == q.shape[0]:  # every row (training, rows="all"): nothing to select
                q_rows, k_rows = q, k
            else:
                index = ctx.rows(self.rows, q.device)
                q_rows, k_rows = q.index_select(0, index), k.index_select(0, index)
            picked = token_probs(q_rows, k_rows, ctx.heads, token_index, check=False)
            maps = maps_to_grid(picked, *spatial)  # [b, h, T, H, W]
            maps = maps if self.keep_heads else maps.mean(1)
        self.store.add(ctx.sigma_source, ctx.key, maps if self.keep_grad else maps.detach())
        return proceed(q, k, v)
