"""Attention supervision for pretraining the toy base model: words' maps pulled onto their objects.

Stable Diffusion learned from its data that a class word attends to its object; a toy model
trained on 5000 scenes does so only weakly (``docs/toy_world.md``). While the base model is
pretrained, this term pulls the cross-attention map of each object's shape, colour and pattern
word (head-averaged probability, softmax over all keys) at every supervised layer toward the
object's mask area-pooled to the map's size:

    KL(mask as a distribution || map as a distribution) + (1 - soft IoU(min-max map, mask))

averaged over (row, word, layer), only for rows whose noise level is at most ``max_t``. It belongs
to pretraining alone: concepts are always learned from the frozen base, never with this term.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from concept_attention.attention.maps import minmax_normalize
from concept_attention.attention.patching import install_hook
from concept_attention.attention.recorder import AttentionRecorder, MapStore
from concept_attention.attention.tokens import find_subsequence
from concept_attention.smallworld import model as toy
from concept_attention.smallworld import scenes as sw

EPS = 1e-6


@dataclass
class SupervisionSettings:
    """Weight (0: off), layers, the noise window and which words are supervised."""

    weight: float = 0.0
    layers: str = toy.CALIBRATION_LAYERS
    max_t: float = 1.0  # supervise rows with sigma index <= max_t * (N - 1)
    roles: Sequence[str] = ("shape", "colour", "pattern")


class WordPositions:
    """Token positions of each object's words in a token stream (word ids cached)."""

    def __init__(self, ids_of: Callable[[str], list[int]]):
        self.ids_of = ids_of
        self.cache: dict[str, list[int]] = {}

    def ids(self, word: str) -> list[int]:
        """BPE ids of one word (cached)."""
        if word not in self.cache:
            self.cache[word] = list(self.ids_of(word))
        return self.cache[word]

    def __call__(self, stream: Sequence[Optional[int]], objects: Sequence[sw.ObjectSpec]) -> list[dict[str, list[int]]]:
        """Per object: positions of its shape, colour and pattern words (empty when not named).

        Phrases list the objects in order: object i's shape word is the first occurrence after
        object i-1's, and its colour and pattern words, when named, lie between the two.
        """
        out, previous = [], 0
        for obj in objects:
            shape = self.ids(obj.shape)
            starts = [s for s in find_subsequence(stream, shape) if s > previous]
            if not starts:
                raise ValueError(f"the tokens do not name the {obj.shape} after position {previous}")
            found = {"shape": list(range(starts[0], starts[0] + len(shape)))}
            for role, word in (("colour", obj.colour), ("pattern", sw.PATTERN_WORDS[obj.pattern])):
                ids = self.ids(word) if word else []
                hits = [s for s in find_subsequence(stream, ids) if previous < s < starts[0]] if ids else []
                found[role] = list(range(hits[0], hits[0] + len(ids))) if hits else []
            out.append(found)
            previous = starts[0]
        return out


@dataclass
class WordTargets:
    """A batch's supervised words: token index [B,T], token->word averaging [B,W,T], masks [B,W,h,w]."""

    token_index: torch.Tensor
    words: torch.Tensor
    masks: torch.Tensor
    valid: torch.Tensor  # [B, W] bool


def word_targets(streams: Sequence[Sequence[Optional[int]]], objects: Sequence[Sequence[sw.ObjectSpec]],
                 masks: torch.Tensor, active: torch.Tensor, positions: WordPositions,
                 roles: Sequence[str]) -> WordTargets:
    """Targets of a batch: row b's objects ``objects[b]`` with pooled masks ``masks[b]`` [3,h,w].

    Rows not ``active`` (outside the noise window, or empty captions) get no words.
    """
    rows = []
    for b, (stream, objs) in enumerate(zip(streams, objects)):
        words = []
        if bool(active[b]) and any(t is not None for t in stream) and objs:
            for k, found in enumerate(positions(stream, objs)):
                words += [(found[role], k) for role in roles if found[role]]
        rows.append(words)
    n_words = max(1, max(len(w) for w in rows))
    n_tokens = max(1, max(sum(len(p) for p, _ in w) for w in rows))
    batch = len(rows)
    token_index = torch.zeros(batch, n_tokens, dtype=torch.long)
    averaging = torch.zeros(batch, n_words, n_tokens)
    target = torch.zeros(batch, n_words, *masks.shape[-2:])
    valid = torch.zeros(batch, n_words, dtype=torch.bool)
    for b, words in enumerate(rows):
        slot = 0
        for w, (tokens, k) in enumerate(words):
            token_index[b, slot:slot + len(tokens)] = torch.tensor(tokens)
            averaging[b, w, slot:slot + len(tokens)] = 1.0 / len(tokens)
            target[b, w] = masks[b, k].float()
            valid[b, w] = True
            slot += len(tokens)
    return WordTargets(token_index, averaging, target, valid)


def map_loss(maps: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over valid words of KL(target || map) + 1 - soft IoU(min-max map, target); maps [B,W,h,w]."""
    if target.shape[-1] != maps.shape[-1]:
        target = F.adaptive_avg_pool2d(target, maps.shape[-2:])
    flat_map, flat_target = maps.flatten(2), target.flatten(2)
    q = flat_target / flat_target.sum(-1, keepdim=True).clamp(min=EPS)
    p = flat_map / flat_map.sum(-1, keepdim=True).clamp(min=EPS)
    kl = (q * (torch.log(q.clamp(min=EPS)) - torch.log(p.clamp(min=EPS)))).sum(-1)
    normed = minmax_normalize(maps).flatten(2)
    iou = torch.minimum(normed, flat_target).sum(-1) / torch.maximum(normed, flat_target).sum(-1).clamp(min=EPS)
    per_word = kl + 1.0 - iou
    return (per_word * valid).sum() / valid.sum().clamp(min=1)


def supervision_loss(store: MapStore, targets: WordTargets) -> torch.Tensor:
    """The term over every recorded layer (maps [B,T,h,w] of ``targets.token_index``)."""
    layers = store.layer_maps()
    if not layers or not bool(targets.valid.any()):
        return torch.zeros(())
    losses = []
    for maps in layers:
        words = torch.einsum("bkt,btyx->bkyx", targets.words.to(maps), maps)
        losses.append(map_loss(words, targets.masks.to(maps), targets.valid.to(maps.device)))
    return torch.stack(losses).mean()


def recording_options(patcher: Any, settings: SupervisionSettings) -> tuple[dict, MapStore]:
    """``transformer_options`` that record the supervised layers' maps with gradients, and their store."""
    store = MapStore()
    hooked = patcher.clone()
    install_hook(hooked, AttentionRecorder(store=store, keep_grad=True, rows="all"), settings.layers)
    return dict(hooked.model_options["transformer_options"]), store


def objects_of(record: str) -> list[sw.ObjectSpec]:
    """Object specs from the JSON a latent cache keeps per scene."""
    return [sw.ObjectSpec(**o) for o in json.loads(record)]
